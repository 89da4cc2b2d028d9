"""`irg data import` / `irg data stats`: validated copies of IRGL folders, with a manifest that adds up."""

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from irg import storage
from irg.data import manifest as manifest_module
from irg.data.format import MODES, RowError
from irg.data.manifest import MANIFEST, dataset_stats, format_stats, import_dataset
from irg.data.synth import synth_conversation, write_synthetic

ROWS = {mode: 2 + i for i, mode in enumerate(MODES)}  # distinct counts, so the table shows each one


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    for mode, rows in ROWS.items():
        write_synthetic(str(root), rows=rows, seed=1, image_size=32, rows_per_file=3, modes=mode, progress=False)
    return root


def conversations(root, mode: str) -> list[str]:
    files = sorted(Path(root, mode).rglob("*.parquet"))
    return [c for f in files for c in pq.read_table(f).column("conversation").to_pylist()]


def write_rows(path: Path, rows: list[str], column: str = "conversation") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: pa.array(rows, pa.string())}), path)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_import_reproduces_every_row_and_the_manifest_matches_the_files(synthetic, tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_module, "ROW_GROUP_ROWS", 3)  # several row groups per part at this scale
    dst = tmp_path / "imported"
    manifest = import_dataset(str(synthetic), str(dst), rows_per_file=4, progress=False)

    assert json.loads((dst / MANIFEST).read_text()) == manifest
    assert manifest["source"] == str(synthetic) and manifest["created"].endswith("+00:00")
    assert manifest["rejected_total"] == 0 and manifest["rejected"] == [] and manifest["issues"] == []
    for mode, rows in ROWS.items():
        assert conversations(dst, mode) == conversations(synthetic, mode)
        entry = manifest["modes"][mode]
        assert entry["rows"] == rows and entry["rejected"] == 0
        assert [f["rows"] for f in entry["files"]] == [min(4, rows - start) for start in range(0, rows, 4)]
        for f in entry["files"]:
            path = dst / f["path"]
            assert f["path"].startswith(f"{mode}/part-") and f["bytes"] == path.stat().st_size
            assert f["sha256"] == sha256(path.read_bytes())
            metadata = pq.read_metadata(path)
            assert (f["rows"], f["row_groups"]) == (metadata.num_rows, metadata.num_row_groups)
            assert f["row_groups"] == -(-f["rows"] // 3)
        assert entry["bytes"] == sum(f["bytes"] for f in entry["files"])
    assert sorted(p.name for p in dst.iterdir()) == sorted([MANIFEST, *MODES])

    with pytest.raises(FileExistsError, match="already exists"):  # never mixed with an earlier import
        import_dataset(str(synthetic), str(dst), progress=False)


def bad_source(root: Path) -> Path:
    """Three good rows and three bad ones in one file, an empty file, a file without the
    ``conversation`` column, and a folder that is not a mode."""
    good = [synth_conversation("initial_full_learning", 0, i, image_size=32) for i in range(3)]
    broken_image = json.loads(good[0])
    broken_image[2]["content"][1]["content"] = "bm90IGFuIGltYWdl"  # base64 of "not an image"
    bad_base64 = json.loads(good[1])
    bad_base64[2]["content"][1]["content"] = "%%%"
    write_rows(root / "initial_full_learning" / "part-0.parquet",
               [good[0], "{not json", good[1], json.dumps(broken_image), good[2], json.dumps(bad_base64)])
    write_rows(root / "initial_full_learning" / "part-1.parquet", [])
    write_rows(root / "improving_full_learning" / "a.parquet", good[:2], column="text")
    write_rows(root / "extras" / "x.parquet", good[:1])
    return root


def test_bad_rows_are_counted_listed_and_not_copied(tmp_path):
    src, dst = bad_source(tmp_path / "src"), tmp_path / "dst"
    manifest = import_dataset(str(src), str(dst), progress=False)

    assert conversations(dst, "initial_full_learning") == [
        synth_conversation("initial_full_learning", 0, i, image_size=32) for i in range(3)]
    assert not (dst / "improving_full_learning").exists()
    modes = manifest["modes"]
    assert (modes["initial_full_learning"]["rows"], modes["initial_full_learning"]["rejected"]) == (3, 3)
    assert (modes["improving_full_learning"]["rows"], modes["improving_full_learning"]["rejected"]) == (0, 2)
    assert manifest["rejected_total"] == 5
    assert manifest["rejected_by_kind"] == {"malformed_json": 1, "bad_image": 2, "invalid_format": 2}
    where = {(r["file"], r["row_group"], r["row"]): r for r in manifest["rejected"]}
    assert set(where) == {("initial_full_learning/part-0.parquet", 0, row) for row in (1, 3, 5)} | {
        ("improving_full_learning/a.parquet", 0, row) for row in (0, 1)}
    assert where["initial_full_learning/part-0.parquet", 0, 1]["field"] == "conversation"
    assert "not valid JSON" in where["initial_full_learning/part-0.parquet", 0, 1]["reason"]
    assert where["initial_full_learning/part-0.parquet", 0, 3]["field"] == "conversation[2].content[1].content"
    assert "not a readable image" in where["initial_full_learning/part-0.parquet", 0, 3]["reason"]
    assert "not valid base64" in where["initial_full_learning/part-0.parquet", 0, 5]["reason"]
    assert "no 'conversation' column" in where["improving_full_learning/a.parquet", 0, 0]["reason"]
    issues = {(i["kind"], i["location"]) for i in manifest["issues"]}
    assert ("empty_file", "initial_full_learning/part-1.parquet") in issues
    assert {m for kind, m in issues if kind == "missing_mode"} == set(MODES) - {
        "initial_full_learning", "improving_full_learning"}
    assert manifest["ignored_folders"] == ["extras"]

    table = format_stats(dataset_stats(str(dst)))
    assert "ignored folder (not a mode): extras" in table
    assert "initial_full_learning/part-0.parquet row group 0 row 3: conversation[2].content[1].content" in table


def test_strict_mode_raises_naming_the_row_and_leaves_nothing(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_rows(src / MODES[0] / "part-0.parquet", [synth_conversation(MODES[0], 0, i, image_size=32) for i in range(2)])
    write_rows(src / "initial_full_learning" / "part-0.parquet",
               [synth_conversation("initial_full_learning", 0, 0, image_size=32), "{not json"])
    with pytest.raises(RowError, match=r"initial_full_learning/part-0.parquet row group 0 row 1: conversation: "
                                       r"not valid JSON") as info:
        import_dataset(str(src), str(dst), strict=True, rows_per_file=1, progress=False)
    assert isinstance(info.value, ValueError)
    assert not [p for p in dst.rglob("*") if p.is_file()]  # the parts written before it were removed


def test_stats_from_footers_without_a_manifest_and_from_the_manifest_with_one(synthetic, tmp_path):
    stats = dataset_stats(str(synthetic))
    assert stats["stats_from"] == "parquet footers" and stats["issues"] == [] and stats["ignored_folders"] == []
    for mode, rows in ROWS.items():
        entry = stats["modes"][mode]
        assert entry["rows"] == rows and entry["rejected"] is None
        files = sorted(Path(synthetic, mode).glob("*.parquet"))
        assert [f["path"] for f in entry["files"]] == [f"{mode}/{f.name}" for f in files]
        assert entry["bytes"] == sum(os.path.getsize(f) for f in files)
    table = format_stats(stats)
    assert "from parquet footers (no manifest)" in table
    for mode, rows in ROWS.items():
        assert any(line.split()[:2] == [mode, str(rows)] for line in table.splitlines())

    dst = tmp_path / "imported"
    manifest = import_dataset(str(synthetic), str(dst), progress=False)
    stats = dataset_stats(str(dst))
    assert stats == {"uri": str(dst), "stats_from": "manifest", **manifest}
    table = format_stats(stats)
    assert f"manifest of {manifest['created']}" in table
    for mode, rows in ROWS.items():
        assert any(line.split()[:2] == [mode, str(rows)] for line in table.splitlines())
    assert table.splitlines()[-1].split()[:2] == ["total", str(sum(ROWS.values()))]


@pytest.mark.integration
def test_import_into_seaweedfs_and_read_the_stats_back(synthetic, s3_env):
    store = s3_env.config
    dst = store.uri("imported-manifest")
    manifest = import_dataset(str(synthetic), dst, store=store, progress=False)

    stats = dataset_stats(dst, store)
    assert stats["stats_from"] == "manifest" and stats["modes"] == manifest["modes"]
    fs, root = storage.arrow_filesystem(dst, store)
    for mode, rows in ROWS.items():
        assert stats["modes"][mode]["rows"] == rows
        for f in manifest["modes"][mode]["files"]:
            with fs.open_input_stream(f"{root}/{f['path']}") as stream:
                data = stream.read()
            assert len(data) == f["bytes"] and sha256(data) == f["sha256"]
        written = [pq.read_table(f"{root}/{f['path']}", filesystem=fs).column("conversation").to_pylist()
                   for f in manifest["modes"][mode]["files"]]
        assert [c for part in written for c in part] == conversations(synthetic, mode)

    fs.delete_file(f"{root}/{MANIFEST}")  # the same data read from its parquet footers
    footers = dataset_stats(dst, store)
    assert footers["stats_from"] == "parquet footers"
    assert {m: s["rows"] for m, s in footers["modes"].items()} == ROWS
    assert {m: s["bytes"] for m, s in footers["modes"].items()} == {m: s["bytes"] for m, s in manifest["modes"].items()}
