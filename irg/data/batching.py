"""Consumer side of the data pipeline: prepared records -> packed batches within a token budget.

Runs inside each training worker on its shard of the stream (no Ray needed here). Packing follows
the reference's rules: fill a batch until it holds ``expected_tokens``; a sample that would push it
past ``max_tokens`` waits in a small buffer (and is preferred for the next batch) unless the buffer
is full, in which case the batch is emitted; every batch starts with one sample of each mandatory
mode when the stream provides one. Every record is counted, so the run can report what it read,
used and rejected, and every row of an emitted batch is recorded in the data position.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from irg.data.plan import DataPosition
from irg.data.prepare import load_sample
from irg.data.sequence import Sample, SpecialTokens, pack
from irg.model import PackedBatch

MAX_EXAMPLES_PER_REASON = 5


@dataclass
class DataStats:
    """What a consumer saw: rows read, used (in emitted batches) and rejected, with reasons."""

    read: int = 0
    used: int = 0
    rejected: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    used_per_mode: Counter = field(default_factory=Counter)
    batches: int = 0
    tokens: int = 0

    def record_rejection(self, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        if len(self.examples[reason]) < MAX_EXAMPLES_PER_REASON:
            self.examples[reason].append(detail)

    def merge(self, other: DataStats) -> DataStats:
        merged = DataStats(read=self.read + other.read, used=self.used + other.used,
                           rejected=self.rejected + other.rejected, examples=defaultdict(list),
                           used_per_mode=self.used_per_mode + other.used_per_mode,
                           batches=self.batches + other.batches, tokens=self.tokens + other.tokens)
        for source in (self.examples, other.examples):
            for reason, details in source.items():
                merged.examples[reason].extend(details[: MAX_EXAMPLES_PER_REASON - len(merged.examples[reason])])
        return merged

    def to_dict(self) -> dict:
        return {"read": self.read, "used": self.used, "rejected": dict(self.rejected),
                "rejected_examples": {k: list(v) for k, v in self.examples.items()},
                "used_per_mode": dict(self.used_per_mode), "batches": self.batches, "tokens": self.tokens}


@dataclass
class Packed:
    batch: PackedBatch
    row_ids: list[str]
    modes: list[str]
    num_tokens: int


@dataclass
class _Pending:
    row_id: str
    mode: str
    sample: Sample

    @property
    def num_tokens(self) -> int:
        return self.sample.num_tokens


class PackedBatches:
    """Iterate packed batches over an iterable of prepared records (dicts from :mod:`irg.data.prepare`)."""

    def __init__(self, records: Iterable[dict], special: SpecialTokens, expected_tokens: int = 32768,
                 max_tokens: int = 36864, mandatory: Iterable[str] = (), max_buffer: int = 50,
                 mandatory_lookahead: int = 64, position: DataPosition | None = None):
        if expected_tokens > max_tokens:
            raise ValueError(f"expected_tokens ({expected_tokens}) must be <= max_tokens ({max_tokens})")
        self.records = records
        self.special = special
        self.expected_tokens, self.max_tokens = expected_tokens, max_tokens
        self.mandatory = tuple(mandatory)
        self.max_buffer, self.mandatory_lookahead = max_buffer, mandatory_lookahead
        self.stats = DataStats()
        self.position = position or DataPosition()

    def __iter__(self) -> Iterator[Packed]:
        stream = _Stream(self._samples())
        buffer: deque[_Pending] = deque()
        current: list[_Pending] = []
        tokens = 0
        while True:
            if not current:
                self._take_mandatory(stream, buffer, current)
                tokens = sum(p.num_tokens for p in current)
            candidate = self._next(stream, buffer, tokens)
            if candidate is None:
                break
            item, from_buffer = candidate
            if tokens + item.num_tokens > self.max_tokens:
                if not from_buffer and len(buffer) < self.max_buffer:
                    buffer.append(item)
                    continue
                if not current:  # a sample alone over the budget (max_tokens_per_sample > max_tokens)
                    current, tokens = [item], item.num_tokens
                else:
                    buffer.appendleft(item)
                yield self._emit(current)
                current, tokens = [], 0
                continue
            current.append(item)
            tokens += item.num_tokens
            if tokens >= self.expected_tokens:
                yield self._emit(current)
                current, tokens = [], 0
        if current:
            yield self._emit(current)

    def _samples(self) -> Iterator[_Pending]:
        for record in self.records:
            self.stats.read += 1
            if record["status"] != "used":
                self.stats.record_rejection(record["reason"], record["detail"])
                continue
            yield _Pending(record["row_id"], record["mode"], load_sample(record))

    def _next(self, stream: _Stream, buffer: deque, tokens: int):
        """Prefer buffered samples while the batch is small; otherwise the stream, then the buffer."""
        if buffer and (tokens < self.expected_tokens // 2 or stream.done):
            return buffer.popleft(), True
        item = stream.next()
        if item is not None:
            return item, False
        return (buffer.popleft(), True) if buffer else None

    def _take_mandatory(self, stream: _Stream, buffer: deque, current: list) -> None:
        """Start a batch with one sample of each mandatory mode, looking a bounded way ahead for it."""
        for mode in self.mandatory:
            found = next((p for p in buffer if p.mode == mode), None)
            if found is not None:
                buffer.remove(found)
                current.append(found)
                continue
            for _ in range(self.mandatory_lookahead):
                item = stream.next()
                if item is None:
                    return
                if item.mode == mode:
                    current.append(item)
                    break
                buffer.append(item)

    def _emit(self, items: list[_Pending]) -> Packed:
        batch = pack([p.sample for p in items], self.special)
        row_ids = [p.row_id for p in items]
        self.position.consumed.update(row_ids)
        self.stats.used += len(items)
        self.stats.used_per_mode.update(p.mode for p in items)
        self.stats.batches += 1
        self.stats.tokens += batch.sequence_length
        return Packed(batch, row_ids, [p.mode for p in items], batch.sequence_length)


class _Stream:
    """An iterator that remembers it has run out."""

    def __init__(self, iterator: Iterator[_Pending]):
        self.iterator, self.done = iterator, False

    def next(self) -> _Pending | None:
        if self.done:
            return None
        item = next(self.iterator, None)
        self.done = item is None
        return item
