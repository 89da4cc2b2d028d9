"""The IRGL pipeline end to end: SeaweedFS -> Ray Data -> two consumers packing batches."""

import json
import threading
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from conftest import FIXTURE_DIR

from irg import storage
from irg.data.batching import DataStats, PackedBatches
from irg.data.format import FULL_MODES, IRGL_MODES, MODES
from irg.data.plan import DataPlanError, DataPosition
from irg.data.prepare import BadRowError
from irg.data.sequence import PreprocessConfig, SpecialTokens
from irg.data.stream import IRGLData, StreamConfig, iter_records
from irg.data.synth import synth_conversation, write_synthetic

pytestmark = pytest.mark.integration  # Ray Data on a local Ray instance, reading from the SeaweedFS server

ROWS_PER_MODE = 24
SMALL = PreprocessConfig(vae_transform=(64, 32, 16), vit_transform=(56, 28, 14))
SPECIAL = SpecialTokens(1298, 1299, 1306, 1307)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def synthetic(s3_server):
    root = s3_server.config.uri("synth")
    storage_config = s3_server.config
    # write_synthetic goes through irg.storage, which reads the AWS environment.
    with pytest.MonkeyPatch.context() as mp:
        for key, value in storage_config.env().items():
            mp.setenv(key, value)
        written = write_synthetic(root, rows=ROWS_PER_MODE, seed=3, image_size=64, rows_per_file=10, progress=False)
    assert written == {mode: ROWS_PER_MODE for mode in MODES}
    return root, storage_config


def stream_config(root, **overrides):
    """Stage-1 settings at fixture scale (64 px images); ``weights=`` replaces the stage's weights."""
    settings = dict(preprocess=SMALL, prepare_concurrency=2) | overrides
    if "weights" in settings:
        return StreamConfig(root=root, checkpoint=str(FIXTURE_DIR), **settings)
    return StreamConfig.for_stage(1, root, str(FIXTURE_DIR), **settings)


def consume_in_parallel(dataset, consumers: int, **packing):
    """Run ``consumers`` packers over ``streaming_split`` shards, as Ray Train workers would."""
    shards = dataset.streaming_split(consumers, equal=False)
    results = [None] * consumers

    def run(i):
        packer = PackedBatches(iter_records(shards[i]), SPECIAL, **packing)
        results[i] = (list(packer), packer)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(consumers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def test_six_modes_stream_to_two_consumers_with_the_stage_weights(ray_cluster, synthetic):
    root, store = synthetic
    data = IRGLData(stream_config(root), store)
    # Stage 1: full modes weight 1.0, thinking modes 0.5 -> each epoch reads every full-mode row and
    # half of each thinking mode's rows.
    expected = {m: ROWS_PER_MODE if m in FULL_MODES else ROWS_PER_MODE // 2 for m in IRGL_MODES}
    assert data.quota == expected
    results = consume_in_parallel(data.dataset(epoch=0), 2, expected_tokens=1500, max_tokens=2000)

    row_ids = [rid for batches, _ in results for packed in batches for rid in packed.row_ids]
    assert len(row_ids) == len(set(row_ids)) == sum(expected.values())  # no row twice in the epoch
    modes = Counter(rid.split("/")[0] for rid in row_ids)
    assert modes == Counter(expected)
    assert all(len(batches) > 0 for batches, _ in results)  # both consumers got work
    stats = DataStats()
    for _, packer in results:
        stats = stats.merge(packer.stats)
    assert stats.read == stats.used == sum(expected.values()) and not stats.rejected
    for batches, _ in results:
        for packed in batches:
            assert packed.num_tokens <= 2000
            assert packed.batch.sequence_length == sum(packed.batch.sample_lens)

    # The next epoch reads a different half of each thinking mode.
    next_ids = {rid for r in iter_records(data.dataset(epoch=1)) for rid in [r["row_id"]]}
    thinking = {rid for rid in row_ids if rid.split("/")[0] not in FULL_MODES}
    assert thinking != {rid for rid in next_ids if rid.split("/")[0] not in FULL_MODES}


def test_a_restarted_run_neither_repeats_nor_skips(ray_cluster, synthetic):
    root, store = synthetic
    data = IRGLData(stream_config(root, weights={m: 1.0 for m in FULL_MODES}), store)
    first = PackedBatches(iter_records(data.dataset(epoch=0)), SPECIAL, expected_tokens=1500, max_tokens=2000,
                          position=DataPosition(epoch=0))
    iterator = iter(first)
    before = [rid for _ in range(3) for rid in next(iterator).row_ids]
    saved = json.loads(json.dumps(first.position.to_dict()))  # what a checkpoint would hold

    position = DataPosition.from_dict(saved)
    rest = PackedBatches(iter_records(data.dataset(epoch=0, position=position)), SPECIAL, expected_tokens=1500,
                         max_tokens=2000, position=position)
    after = [rid for packed in rest for rid in packed.row_ids]
    assert not set(before) & set(after)
    assert sorted(before + after) == sorted(
        r["row_id"] for r in iter_records(data.dataset(epoch=0)))  # the whole epoch, exactly once
    assert len(before + after) == 2 * ROWS_PER_MODE


def write_rows(store, uri, rows):
    fs, path = storage.arrow_filesystem(uri, store)
    pq.write_table(pa.table({"conversation": pa.array(rows, pa.string())}), path, filesystem=fs)


def test_bad_input_is_counted_named_and_skipped_or_fatal_in_strict_mode(ray_cluster, s3_server):
    store = s3_server.config
    root = store.uri("bad")
    good = [synth_conversation("initial_full_learning", 0, i) for i in range(3)]
    broken_image = json.loads(good[0])
    broken_image[2]["content"][1]["content"] = "bm90IGFuIGltYWdl"  # base64 of "not an image"
    bad_base64 = json.loads(good[1])
    bad_base64[2]["content"][1]["content"] = "%%%"
    write_rows(store, f"{root}/initial_full_learning/part-0.parquet",
               good + ["{not json", json.dumps(broken_image), json.dumps(bad_base64)])
    write_rows(store, f"{root}/initial_full_learning/part-1.parquet", [])  # an empty file
    weights = {"initial_full_learning": 1.0, "improving_full_learning": 1.0}  # the second mode has no folder

    data = IRGLData(stream_config(root, weights=weights), store)
    assert sorted(i.kind for i in data.issues) == ["empty_file", "missing_mode"]
    packer = PackedBatches(iter_records(data.dataset()), SPECIAL, expected_tokens=1500, max_tokens=2000)
    used = [rid for packed in packer for rid in packed.row_ids]
    assert len(used) == 3
    stats = packer.stats.to_dict()
    assert stats["read"] == 6 and stats["used"] == 3
    assert stats["rejected"] == {"malformed_json": 1, "bad_image": 2}
    examples = " ".join(stats["rejected_examples"]["bad_image"])
    assert "part-0.parquet row group 0 row 4" in examples and "conversation[2].content[1].content" in examples
    assert "not valid base64" in examples and "not a readable image" in examples

    # Strict mode: a planning problem is fatal, and so is the first bad row.
    with pytest.raises(DataPlanError, match="missing_mode"):
        IRGLData(stream_config(root, weights=weights, strict=True), store)
    with pytest.raises(DataPlanError, match="improving_full_learning"):
        IRGLData(stream_config(root, weights=weights, mandatory=("improving_full_learning",)), store)
    rows_only = store.uri("bad-rows")
    write_rows(store, f"{rows_only}/initial_full_learning/part-0.parquet", good + ["{not json"])
    strict = IRGLData(stream_config(rows_only, weights={"initial_full_learning": 1.0}, strict=True), store)
    with pytest.raises(Exception, match=r"part-0.parquet row group 0 row 3: conversation: not valid JSON") as info:
        list(iter_records(strict.dataset()))
    assert BadRowError.__name__ in str(info.value)
