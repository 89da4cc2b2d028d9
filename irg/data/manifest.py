"""Import an IRGL folder into object storage, validating every row, and describe a data set.

:func:`import_dataset` copies ``<src>/<mode>/**/*.parquet`` (a local folder, or an ``s3://`` URI
such as a copy of the public IRG-Toy-Dataset) to ``<dst>/<mode>/part-NNNNN.parquet``, keeping only
rows that :func:`~irg.data.format.parse_conversation` accepts, and writes ``<dst>/manifest.json``
last: a destination with a manifest is a complete import. Rows are read one row group at a time and
each part file is written in a local temporary folder and copied to its final name only once
complete, so memory stays bounded and no reader ever sees a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import posixpath
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tqdm import tqdm

from irg import storage
from irg.data.format import MODES, RowError, parse_conversation
from irg.data.plan import DataIssue, RowGroup, discover

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "irgl-manifest/1"
ROW_GROUP_ROWS = 64
MAX_REJECTED_LISTED = 1000


def import_dataset(src: str, dst: str, store: storage.StoreConfig | None = None, strict: bool = False,
                   rows_per_file: int = 256, progress: bool = True) -> dict:
    """Copy the valid rows of the IRGL folder ``src`` to ``dst`` and return the manifest written there.

    Invalid rows are not copied but listed (file, row group, row, field, reason); ``strict`` raises a
    :class:`~irg.data.format.RowError` (a ValueError) at the first one instead, after removing the
    files this call wrote. Folders of ``src`` that are not modes are reported, not imported.
    """
    if not isinstance(rows_per_file, int) or rows_per_file < 1:
        raise ValueError(f"rows_per_file must be an integer >= 1, got {rows_per_file!r}")
    src_fs, src_root = storage.arrow_filesystem(src, store)
    dst_fs, dst_root = storage.arrow_filesystem(dst, store)
    if src_fs.get_file_info(src_root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{src} is not a folder")
    _refuse_existing(dst_fs, dst_root, dst)
    groups, issues = discover(src_fs, src_root, list(MODES))
    if strict:
        unreadable = [i for i in issues if i.kind == "unreadable_file"]
        if unreadable:
            raise RowError(posixpath.relpath(unreadable[0].location, src_root), unreadable[0].detail, "unreadable_file")

    rejected = _Rejections()
    with tempfile.TemporaryDirectory(prefix="irg-import-") as scratch, \
            tqdm(total=sum(g.num_rows for g in groups), unit="row", desc="import", file=sys.stderr,
                 disable=not progress) as bar:
        writer = _PartWriter(dst_fs, dst_root, rows_per_file, scratch)
        try:
            for path, file_groups in itertools.groupby(groups, key=lambda g: g.path):
                with src_fs.open_input_file(path) as handle:
                    parquet = pq.ParquetFile(handle)
                    for group in file_groups:
                        _copy_group(parquet, group, writer, rejected, strict)
                        bar.update(group.num_rows)
            writer.finish()
        except BaseException:
            writer.remove_written()
            raise

    modes = {mode: {"rows": sum(f["rows"] for f in files), "bytes": sum(f["bytes"] for f in files),
                    "rejected": rejected.by_mode[mode], "files": files}
             for mode, files in writer.files.items()}
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": src,
        "modes": modes,
        "rejected_total": sum(rejected.by_kind.values()),
        "rejected_by_kind": dict(rejected.by_kind),
        "rejected": rejected.listed,
        "issues": [_issue(i, src_root) for i in issues],
        "ignored_folders": _ignored_folders(src_fs, src_root),
    }
    with storage.open_file(storage.join(dst, MANIFEST), "w", store) as f:  # atomic: the manifest means complete
        json.dump(manifest, f, indent=1)
    return manifest


def _refuse_existing(fs: pafs.FileSystem, root: str, uri: str) -> None:
    """Importing over an earlier import would mix its leftover parts into the new data set."""
    for name in (MANIFEST, *MODES):
        if fs.get_file_info(posixpath.join(root, name)).type != pafs.FileType.NotFound:
            raise FileExistsError(f"{storage.join(uri, name)} already exists: import into an empty destination")


@dataclass
class _Rejections:
    """Counts of every rejected row; the first :data:`MAX_REJECTED_LISTED` are listed in full."""

    listed: list[dict] = field(default_factory=list)
    by_mode: Counter = field(default_factory=Counter)
    by_kind: Counter = field(default_factory=Counter)


def _copy_group(parquet: pq.ParquetFile, group: RowGroup, writer: _PartWriter, rejected: _Rejections,
                strict: bool) -> None:
    """Hand the valid rows of one row group to ``writer``; record the others (or raise, if ``strict``)."""
    for row, (raw, problem) in enumerate(_read_group(parquet, group.index, group.num_rows)):
        try:
            if problem is not None:
                raise problem
            writer.add(group.mode, _check_row(raw))
        except RowError as e:
            if strict:
                where = f"{group.relpath} row group {group.index} row {row}"
                raise RowError(f"{where}: {e.field}", e.reason, e.kind) from None
            rejected.by_mode[group.mode] += 1
            rejected.by_kind[e.kind] += 1
            if len(rejected.listed) < MAX_REJECTED_LISTED:
                rejected.listed.append({"file": group.relpath, "row_group": group.index, "row": row,
                                        "field": e.field, "kind": e.kind, "reason": e.reason})


def _read_group(parquet: pq.ParquetFile, index: int, num_rows: int):
    """(raw conversation, None) per row, or (None, RowError) per row when the row group cannot be used."""
    if "conversation" not in parquet.schema_arrow.names:
        error = RowError("conversation", f"no 'conversation' column (has {parquet.schema_arrow.names})")
        return [(None, error)] * num_rows
    try:
        column = parquet.read_row_group(index, columns=["conversation"]).column("conversation")
    except Exception as e:  # noqa: BLE001 - a corrupt row group rejects its rows, with the cause
        return [(None, RowError("row_group", f"unreadable: {type(e).__name__}: {e}", "unreadable"))] * num_rows
    return ((column[i].as_py(), None) for i in range(len(column)))


def _check_row(raw) -> str:
    """The row's conversation as text, once it parses (images included)."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RowError("conversation", f"not UTF-8 text ({e})", "malformed_json") from None
    parse_conversation(raw)
    return raw


class _PartWriter:
    """Writes each mode's valid rows into part files of ``rows_per_file`` rows (row groups of 64)."""

    def __init__(self, fs: pafs.FileSystem, root: str, rows_per_file: int, scratch: str):
        self.fs, self.root, self.rows_per_file = fs, root, rows_per_file
        self._local = os.path.join(scratch, "part.parquet")  # the part being written
        self.files: dict[str, list[dict]] = {mode: [] for mode in MODES}
        self.written: list[str] = []
        self._mode, self._writer, self._rows, self._pending = None, None, 0, []

    def add(self, mode: str, conversation: str) -> None:
        if mode != self._mode:
            self._close()
            self._mode = mode
        self._pending.append(conversation)
        if len(self._pending) == ROW_GROUP_ROWS or self._rows + len(self._pending) == self.rows_per_file:
            self._flush()
        if self._rows == self.rows_per_file:
            self._close()

    def finish(self) -> None:
        self._close()

    def _flush(self) -> None:
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._local, pa.schema([("conversation", pa.string())]))
        self._writer.write_table(pa.table({"conversation": pa.array(self._pending, pa.string())}))
        self._rows += len(self._pending)
        self._pending = []

    def _close(self) -> None:
        """Complete the current part and copy it to its final name."""
        if self._pending:
            self._flush()
        if self._writer is None:
            return
        self._writer.close()
        metadata = pq.read_metadata(self._local)
        relpath = posixpath.join(self._mode, f"part-{len(self.files[self._mode]):05d}.parquet")
        target = posixpath.join(self.root, relpath)
        self.fs.create_dir(posixpath.dirname(target))
        pafs.copy_files(self._local, target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        self.written.append(target)
        self.files[self._mode].append({"path": relpath, "rows": metadata.num_rows,
                                       "row_groups": metadata.num_row_groups, "bytes": os.path.getsize(self._local),
                                       "sha256": _sha256(self._local)})
        os.remove(self._local)
        self._writer, self._rows = None, 0

    def remove_written(self) -> None:
        """Undo a failed import: remove the parts already copied (best effort)."""
        if self._writer is not None:
            self._writer.close()
        for path in self.written:
            with contextlib.suppress(OSError):
                self.fs.delete_file(path)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _issue(issue: DataIssue, root: str) -> dict:
    location = posixpath.relpath(issue.location, root) if issue.location.startswith(root) else issue.location
    return {"kind": issue.kind, "mode": issue.mode, "location": location, "detail": issue.detail}


def _ignored_folders(fs: pafs.FileSystem, root: str) -> list[str]:
    """Top-level folders that are not modes (their rows are not part of the data set)."""
    entries = fs.get_file_info(pafs.FileSelector(root))
    return sorted(posixpath.basename(e.path) for e in entries
                  if e.type == pafs.FileType.Directory and posixpath.basename(e.path) not in MODES)


def dataset_stats(uri: str, store: storage.StoreConfig | None = None) -> dict:
    """The data set's manifest when it has one (``stats_from: "manifest"``), else what the parquet
    footers say (``stats_from: "parquet footers"``; rejected rows are unknown without reading them)."""
    fs, root = storage.arrow_filesystem(uri, store)
    try:
        with fs.open_input_stream(posixpath.join(root, MANIFEST)) as f:
            return {"uri": uri, "stats_from": "manifest", **json.loads(f.read())}
    except FileNotFoundError:
        pass
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri} is not a folder")
    groups, issues = discover(fs, root, list(MODES))
    files: dict[str, dict] = {}
    for g in groups:
        entry = files.setdefault(g.path, {"mode": g.mode, "path": g.relpath, "rows": 0, "row_groups": 0})
        entry["rows"] += g.num_rows
        entry["row_groups"] += 1
    sizes = {info.path: info.size for info in fs.get_file_info(list(files))}
    modes = {}
    for mode in MODES:
        mode_files = [{k: v for k, v in f.items() if k != "mode"} | {"bytes": sizes[p]}
                      for p, f in files.items() if f["mode"] == mode]
        modes[mode] = {"rows": sum(f["rows"] for f in mode_files), "bytes": sum(f["bytes"] for f in mode_files),
                       "rejected": None, "files": mode_files}
    return {"uri": uri, "stats_from": "parquet footers", "modes": modes,
            "issues": [_issue(i, root) for i in issues], "ignored_folders": _ignored_folders(fs, root)}


def format_stats(stats: dict) -> str:
    """A table of rows, files, bytes and rejected rows per mode, with the problems found below it."""
    modes = stats["modes"]
    rejected = [s["rejected"] for s in modes.values() if s["rejected"] is not None]
    rows = [(mode, s["rows"], len(s["files"]), _human_bytes(s["bytes"]), _or_dash(s["rejected"]))
            for mode, s in modes.items()]
    rows.append(("total", sum(s["rows"] for s in modes.values()), sum(len(s["files"]) for s in modes.values()),
                 _human_bytes(sum(s["bytes"] for s in modes.values())), _or_dash(sum(rejected) if rejected else None)))
    table = [("mode", "rows", "files", "bytes", "rejected"), *[tuple(map(str, r)) for r in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    if stats.get("stats_from") == "parquet footers":
        out = [f"{stats['uri']}: from parquet footers (no manifest)"]
    else:
        where = f"{stats['uri']}: " if "uri" in stats else ""
        out = [f"{where}manifest of {stats['created']}, imported from {stats['source']}"]
    out += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table]
    out += [f"rejected {kind}: {count}" for kind, count in sorted(stats.get("rejected_by_kind", {}).items())]
    out += [f"  {r['file']} row group {r['row_group']} row {r['row']}: {r['field']}: {r['reason']}"
            for r in stats.get("rejected", [])[:10]]
    if stats.get("rejected_total", 0) > 10:
        out.append(f"  ... and {stats['rejected_total'] - 10} more (see the manifest)")
    out += [f"issue {i['kind']}: {i['location']}: {i['detail']}" for i in stats.get("issues", [])]
    out += [f"ignored folder (not a mode): {name}" for name in stats.get("ignored_folders", [])]
    return "\n".join(out)


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


def _human_bytes(n: int) -> str:
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
