"""Epoch planning and consumer-side packing, without Ray or storage."""

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from irg.data.batching import PackedBatches
from irg.data.plan import DataPosition, RowGroup, discover, epoch_quota, plan_epoch, row_id
from irg.data.sequence import Sample, SpecialTokens, TextItem

SPECIAL = SpecialTokens(1, 2, 3, 4)


def groups(**rows_per_mode):
    """Two row groups per mode splitting its rows."""
    out = []
    for mode, n in rows_per_mode.items():
        half = n // 2
        out += [RowGroup(mode, f"/d/{mode}/a.parquet", f"{mode}/a.parquet", 0, half),
                RowGroup(mode, f"/d/{mode}/a.parquet", f"{mode}/a.parquet", 1, n - half)]
    return out


def test_quota_follows_weights_and_never_repeats():
    quota = epoch_quota({"a": 100, "b": 100, "c": 100}, {"a": 1.0, "b": 1.0, "c": 0.5})
    assert quota == {"a": 100, "b": 100, "c": 50}
    assert epoch_quota({"a": 10, "b": 100}, {"a": 1.0, "b": 1.0}) == {"a": 10, "b": 10}  # scarce mode bounds
    assert epoch_quota({"a": 100, "b": 100}, {"a": 1.0, "b": 1.0}, epoch_rows=20) == {"a": 10, "b": 10}
    with pytest.raises(ValueError, match="no mode with a positive weight"):
        epoch_quota({"a": 0}, {"a": 1.0})


def test_plan_selects_exact_quota_without_duplicates_and_varies_by_epoch():
    g = groups(a=40, b=40, c=40)
    quota = {"a": 40, "b": 40, "c": 20}
    plans = [plan_epoch(g, quota, seed=1, epoch=e) for e in (0, 0, 1)]
    ids = [[row_id(u.relpath, u.row_group, r) for u in plan for r in u.rows] for plan in plans]
    assert ids[0] == ids[1]  # deterministic
    assert len(ids[0]) == len(set(ids[0])) == 100
    for mode, n in quota.items():
        assert sum(1 for i in ids[0] if i.startswith(mode + "/")) == n
    c_rows = [{i for i in plan_ids if i.startswith("c/")} for plan_ids in (ids[0], ids[2])]
    assert c_rows[0] != c_rows[1]  # a half-weighted mode reads a different half each epoch
    assert len({u.mode for u in plans[0][:4]}) > 1  # modes interleave


def test_resume_skips_exactly_the_consumed_rows():
    g = groups(a=30, b=30)
    quota = {"a": 30, "b": 30}
    full = [row_id(u.relpath, u.row_group, r) for u in plan_epoch(g, quota, 0, 0) for r in u.rows]
    position = DataPosition(0, set(full[:17]))
    restored = DataPosition.from_dict(pickle.loads(pickle.dumps(position.to_dict())))
    assert restored.consumed == position.consumed
    rest = [row_id(u.relpath, u.row_group, r) for u in plan_epoch(g, quota, 0, 0, restored.consumed) for r in u.rows]
    assert sorted(rest + full[:17]) == sorted(full)


def test_discover_reports_missing_empty_and_unreadable(tmp_path):
    (tmp_path / "a").mkdir()
    pq.write_table(pa.table({"conversation": ["x"] * 5}), tmp_path / "a" / "part-0.parquet", row_group_size=2)
    pq.write_table(pa.table({"conversation": pa.array([], pa.string())}), tmp_path / "a" / "part-1.parquet")
    (tmp_path / "a" / "part-2.parquet").write_bytes(b"not parquet")
    found, issues = discover(pafs.LocalFileSystem(), str(tmp_path), ["a", "b"])
    assert [(g.index, g.num_rows) for g in found] == [(0, 2), (1, 2), (2, 1)]
    assert sorted((i.kind, i.mode) for i in issues) == [("empty_file", "a"), ("missing_mode", "b"),
                                                        ("unreadable_file", "a")]


def record(rid: str, mode: str, tokens: int, status: str = "used"):
    sample = Sample([TextItem(np.arange(tokens - 2, dtype=np.int64), loss=True)])
    return {"row_id": rid, "mode": mode, "status": status, "reason": "" if status == "used" else "bad_image",
            "detail": "" if status == "used" else f"f.parquet row {rid}: broken", "num_tokens": tokens,
            "sample": pickle.dumps(sample) if status == "used" else b""}


def test_packing_respects_the_budget_and_counts_everything():
    rng = np.random.default_rng(0)
    records = [record(str(i), "ab"[i % 2], int(rng.integers(5, 40))) for i in range(60)]
    records[7] = record("7", "b", 0, status="rejected")
    packer = PackedBatches(iter(records), SPECIAL, expected_tokens=80, max_tokens=100, max_buffer=3)
    batches = list(packer)
    used = [rid for b in batches for rid in b.row_ids]
    assert all(b.num_tokens <= 100 for b in batches)
    assert all(b.num_tokens >= 80 for b in batches[:-1]) or len(batches) == 1
    assert sorted(used, key=int) == [str(i) for i in range(60) if i != 7]  # nothing lost, nothing twice
    assert packer.stats.read == 60 and packer.stats.used == 59 and packer.stats.rejected == {"bad_image": 1}
    assert packer.stats.examples["bad_image"] == ["f.parquet row 7: broken"]
    assert packer.position.consumed == set(used)
    assert all(sum(b.batch.sample_lens) == b.num_tokens for b in batches)


def test_a_batch_starts_with_the_mandatory_mode_found_within_the_lookahead():
    records = [record(f"a{i}", "a", 20) for i in range(20)] + [record(f"b{i}", "b", 20) for i in range(5)]

    def first_modes(lookahead):
        batches = list(PackedBatches(iter(records), SPECIAL, expected_tokens=60, max_tokens=60,
                                     mandatory=("b",), mandatory_lookahead=lookahead))
        assert sorted(r for b in batches for r in b.row_ids) == sorted(r["row_id"] for r in records)
        return [b.modes[0] for b in batches]

    assert first_modes(30)[:3] == ["b", "b", "b"]  # 20 rows ahead of the first "b": still found
    assert first_modes(5)[0] == "a"  # beyond the lookahead: the batch starts without it
