"""Read one work unit (rows of a parquet row group) and turn each row into a training sample.

This is the CPU-heavy part of the data pipeline (base64 and PNG decoding, resizing, tokenising); it
runs inside Ray Data tasks but has no Ray dependency. A bad row becomes a *rejected* record that
names its file, row and field, so the stream carries on and the run's summary can say what was
dropped and why; in strict mode the first bad row raises instead.
"""

from __future__ import annotations

import pickle
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from irg.data.format import RowError, parse_conversation
from irg.data.plan import WorkUnit, row_id
from irg.data.sequence import PreprocessConfig, Sample, build_sample
from irg.model import BagelConfig

PREPARED_COLUMNS = ("row_id", "mode", "status", "reason", "detail", "num_tokens", "sample")


class BadRowError(ValueError):
    """Raised in strict mode for the first row that cannot be used."""


@dataclass
class Preparer:
    """Turns work units into prepared records; one per Ray Data worker (it holds the tokenizer)."""

    tokenizer: object
    config: PreprocessConfig
    model: BagelConfig  # the checkpoint's geometry: strides, latent grid, ViT position table
    max_tokens_per_sample: int
    seed: int
    epoch: int
    strict: bool = False

    def __call__(self, fs: pafs.FileSystem, unit: WorkUnit) -> list[dict]:
        try:
            with fs.open_input_file(unit.path) as handle:
                table = pq.ParquetFile(handle).read_row_group(unit.row_group)
        except Exception as e:  # noqa: BLE001 - a broken row group rejects its rows, with the cause
            return [self._reject(unit, r, "unreadable", f"row group {unit.row_group}: {type(e).__name__}: {e}")
                    for r in unit.rows]
        if "conversation" not in table.column_names:
            return [self._reject(unit, r, "invalid_format", f"no 'conversation' column (has {table.column_names})")
                    for r in unit.rows]
        column = table.column("conversation")
        return [self._prepare(unit, r, column[r].as_py()) for r in unit.rows]

    def _prepare(self, unit: WorkUnit, row: int, raw) -> dict:
        rid = row_id(unit.relpath, unit.row_group, row)
        try:
            sample = build_sample(parse_conversation(raw), self.tokenizer, self.config, self.model, self._rng(rid))
        except RowError as e:
            return self._reject(unit, row, e.kind, str(e))
        except ValueError as e:  # an image too large for the latent grid or the ViT table
            return self._reject(unit, row, "bad_image_size", str(e))
        if sample.num_tokens > self.max_tokens_per_sample:
            return self._reject(unit, row, "too_long",
                                f"{sample.num_tokens} tokens > max_tokens_per_sample {self.max_tokens_per_sample}")
        if not sample.items:
            return self._reject(unit, row, "empty_after_dropout", "condition dropout removed every part")
        return {"row_id": rid, "mode": unit.mode, "status": "used", "reason": "", "detail": "",
                "num_tokens": sample.num_tokens, "sample": pickle.dumps(sample, protocol=5)}

    def _rng(self, rid: str) -> np.random.Generator:
        """Per-row randomness (dropout, timesteps) independent of which worker reads the row."""
        return np.random.default_rng([self.seed, self.epoch, zlib.crc32(rid.encode())])

    def _reject(self, unit: WorkUnit, row: int, reason: str, detail: str) -> dict:
        rid = row_id(unit.relpath, unit.row_group, row)
        if self.strict:
            raise BadRowError(f"{unit.path} row group {unit.row_group} row {row}: {detail}")
        return {"row_id": rid, "mode": unit.mode, "status": "rejected", "reason": reason,
                "detail": f"{unit.path} row group {unit.row_group} row {row}: {detail}", "num_tokens": 0,
                "sample": b""}


def load_sample(record: dict) -> Sample:
    return pickle.loads(record["sample"])
