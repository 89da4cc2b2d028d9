"""What one epoch of IRGL training reads: row groups per mode, the weighted selection, the position.

Planning runs on the driver from parquet footers alone (no row is read): it finds every row group of
every mode folder, reports what cannot be used (a missing mode folder, an empty or unreadable file),
and turns the per-mode weights into an exact number of rows per mode for the epoch, drawn without
replacement by a generator seeded with (seed, epoch). Resuming removes the rows already consumed, so
a restarted run neither repeats nor skips any row of its epoch.
"""

from __future__ import annotations

import posixpath
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class DataPlanError(ValueError):
    """The data cannot be used as configured (a mandatory mode is missing, or strict mode found a problem)."""


class EpochExhausted(DataPlanError):
    """Every row of the epoch was already consumed (a run restored right at an epoch's end)."""


@dataclass(frozen=True)
class RowGroup:
    mode: str
    path: str  # inside the filesystem
    relpath: str  # relative to the data root: stable across endpoints, used in row ids
    index: int
    num_rows: int


@dataclass(frozen=True)
class WorkUnit:
    """The rows of one row group to read this epoch (a Ray Data task reads one unit)."""

    mode: str
    path: str
    relpath: str
    row_group: int
    rows: tuple[int, ...]


@dataclass
class DataIssue:
    kind: str  # missing_mode, empty_file, unreadable_file
    mode: str
    location: str
    detail: str


def row_id(relpath: str, row_group: int, row: int) -> str:
    return f"{relpath}#{row_group}:{row}"


@dataclass
class DataPosition:
    """Where a run is in its data: the epoch and every row already trained on in it."""

    epoch: int = 0
    consumed: set[str] = field(default_factory=set)

    def to_dict(self) -> dict:
        by_unit: dict[str, list[int]] = defaultdict(list)
        for rid in self.consumed:
            unit, _, row = rid.rpartition(":")
            by_unit[unit].append(int(row))
        return {"epoch": self.epoch, "consumed": {u: sorted(rows) for u, rows in sorted(by_unit.items())}}

    @classmethod
    def from_dict(cls, d: dict) -> DataPosition:
        consumed = {f"{unit}:{row}" for unit, rows in d.get("consumed", {}).items() for row in rows}
        return cls(int(d.get("epoch", 0)), consumed)

    def merge(self, other: DataPosition) -> DataPosition:
        if other.epoch != self.epoch:
            raise ValueError(f"cannot merge positions of epochs {self.epoch} and {other.epoch}")
        return DataPosition(self.epoch, self.consumed | other.consumed)


def discover(fs: pafs.FileSystem, root: str, modes: list[str]) -> tuple[list[RowGroup], list[DataIssue]]:
    """Every row group of ``root/<mode>/*.parquet``, in a stable order, and the problems found."""
    groups, issues = [], []
    for mode in modes:
        folder = posixpath.join(root, mode)
        info = fs.get_file_info(folder)
        if info.type != pafs.FileType.Directory:
            issues.append(DataIssue("missing_mode", mode, folder, f"no folder for mode {mode}"))
            continue
        files = sorted(
            (f for f in fs.get_file_info(pafs.FileSelector(folder, recursive=True))
             if f.type == pafs.FileType.File and f.path.endswith(".parquet")),
            key=lambda f: f.path,
        )
        if not files:
            issues.append(DataIssue("missing_mode", mode, folder, f"no parquet files for mode {mode}"))
        for f in files:
            relpath = posixpath.relpath(f.path, root)
            try:
                with fs.open_input_file(f.path) as handle:
                    metadata = pq.ParquetFile(handle).metadata
            except Exception as e:  # noqa: BLE001 - any unreadable footer is reported, not fatal
                issues.append(DataIssue("unreadable_file", mode, f.path, f"{type(e).__name__}: {e}"))
                continue
            if metadata.num_rows == 0:
                issues.append(DataIssue("empty_file", mode, f.path, "the file has no rows"))
                continue
            for index in range(metadata.num_row_groups):
                n = metadata.row_group(index).num_rows
                if n:
                    groups.append(RowGroup(mode=mode, path=f.path, relpath=relpath, index=index, num_rows=n))
    return groups, issues


def rows_per_mode(groups: list[RowGroup]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for g in groups:
        counts[g.mode] += g.num_rows
    return dict(counts)


def epoch_quota(available: dict[str, int], weights: dict[str, float], epoch_rows: int | None = None) -> dict[str, int]:
    """Rows of each mode in one epoch: proportional to the weights, no mode read twice.

    Without ``epoch_rows`` the epoch is as long as the scarcest mode (relative to its weight) allows.
    """
    active = {m: w for m, w in weights.items() if w > 0 and available.get(m, 0) > 0}
    if not active:
        raise ValueError("no mode with a positive weight has any rows")
    total_weight = sum(active.values())
    longest = min(available[m] * total_weight / w for m, w in active.items())
    length = longest if epoch_rows is None else min(float(epoch_rows), longest)
    return {m: min(available[m], int(round(length * w / total_weight))) for m, w in active.items()}


def plan_epoch(groups: list[RowGroup], quota: dict[str, int], seed: int, epoch: int,
               consumed: set[str] = frozenset()) -> list[WorkUnit]:
    """The epoch's rows, grouped into per-row-group units in a seeded random order (modes interleave)."""
    units = []
    for mode_index, mode in enumerate(sorted(quota)):
        mode_groups = [g for g in groups if g.mode == mode]
        offsets = np.cumsum([0] + [g.num_rows for g in mode_groups])
        rng = np.random.default_rng([seed, epoch, mode_index])
        chosen = np.sort(rng.choice(offsets[-1], size=quota[mode], replace=False))
        for g, start, end in zip(mode_groups, offsets[:-1], offsets[1:]):
            rows = chosen[(chosen >= start) & (chosen < end)] - start
            rows = tuple(int(r) for r in rows if row_id(g.relpath, g.index, int(r)) not in consumed)
            if rows:
                units.append(WorkUnit(mode=mode, path=g.path, relpath=g.relpath, row_group=g.index, rows=rows))
    order = np.random.default_rng([seed, epoch, len(quota)]).permutation(len(units))
    return [units[i] for i in order]
