"""Throughput of the IRGL data pipeline: SeaweedFS -> Ray Data (decode, transform, tokenise) -> packing.

Prints one JSON object to stdout (progress goes to stderr). Starts its own throwaway SeaweedFS on
127.0.0.1 and a local Ray, writes synthetic rows for all six modes, then times one stage-1 epoch
streamed into ``--consumers`` packers over ``streaming_split`` (threads, as Ray Train workers would
consume their shards). Both servers are stopped at the end, also on error.

    PYTHONPATH=. python benchmarks/data_throughput.py                      # defaults: < 3 min on 2 cores
    PYTHONPATH=. python benchmarks/data_throughput.py --rows 256 --image-size 512 --cpus 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

TINY_CHECKPOINT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "bagel_tiny"
MIB = 1024 * 1024


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class MemorySampler:
    """Peak memory of this process tree (Ray's processes and SeaweedFS are its descendants), every 0.5 s.

    The RSS sum counts shared pages once per process that maps them (the Ray object store lives in
    /dev/shm and is mapped by every worker), so it is an upper bound; ``/dev/shm`` growth since the
    start approximates the object store's high-water mark.
    """

    def __init__(self, interval: float = 0.5):
        import psutil

        self.root, self.interval = psutil.Process(), interval
        self.shm_base = self._shm_used()
        self.peak_rss_sum = self.peak_shm = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _shm_used() -> int:
        return shutil.disk_usage("/dev/shm").used if os.path.isdir("/dev/shm") else 0

    def sample(self) -> None:
        import psutil

        total = 0
        for process in [self.root, *self.root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        self.peak_rss_sum = max(self.peak_rss_sum, total)
        self.peak_shm = max(self.peak_shm, self._shm_used() - self.shm_base)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Self:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="synthetic rows per mode")
    parser.add_argument("--image-size", type=int, default=256, help="synthetic image side in pixels")
    parser.add_argument("--consumers", type=int, default=2, help="packers reading streaming_split shards")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="ray.init(num_cpus=...)")
    parser.add_argument("--prepare-concurrency", type=int, default=2, help="Ray Data workers that prepare rows")
    parser.add_argument("--expected-tokens", type=int, default=32768)
    parser.add_argument("--max-tokens", type=int, default=36864)
    parser.add_argument("--small-transforms", action="store_true",
                        help="VAE/ViT transforms capped at the image size instead of the reference (1024/980 px)")
    args = parser.parse_args(argv)
    for name in ("rows", "consumers", "cpus", "prepare_concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def data_config(args):
    from irg.data.sequence import PreprocessConfig

    if not args.small_transforms:
        return PreprocessConfig()
    size, vit = args.image_size, args.image_size - args.image_size % 14
    return PreprocessConfig(vae_transform=(size, size // 2, 16), vit_transform=(vit, vit // 2, 14))


def consume(dataset, consumers: int, special, expected_tokens: int, max_tokens: int) -> tuple[list, list, list]:
    """Pack every shard in its own thread; returns the packers and when each record and batch came out."""
    from irg.data.batching import PackedBatches
    from irg.data.stream import iter_records

    shards = dataset.streaming_split(consumers, equal=False)
    records: list[float] = []
    batches: list[float] = []

    def timed(shard):
        for record in iter_records(shard):
            records.append(time.perf_counter())
            yield record

    packers = [PackedBatches(timed(shard), special, expected_tokens, max_tokens) for shard in shards]
    errors: list[BaseException] = []

    def run(packer):
        try:
            for _ in packer:
                batches.append(time.perf_counter())
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,), daemon=True) for p in packers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return packers, sorted(records), sorted(batches)


def main(args: argparse.Namespace) -> dict:
    import ray

    from irg.data.batching import DataStats
    from irg.data.format import MODES
    from irg.data.sequence import SpecialTokens
    from irg.data.stream import IRGLData, StreamConfig
    from irg.data.synth import write_synthetic
    from irg.embedded_store import SeaweedS3
    from irg.model.checkpoint import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="irg-bench-") as tmp, \
            SeaweedS3(tmp, "irg-bench", "irg-bench-secret", "irg-bench") as server:
        store = server.config
        os.environ.update(store.env())  # write_synthetic goes through irg.storage, which reads the environment
        root = store.uri("synth")
        log(f"SeaweedFS at {server.endpoint_url}; writing {args.rows} rows per mode ({args.image_size} px)")
        start = time.perf_counter()
        write_synthetic(root, rows=args.rows, image_size=args.image_size, rows_per_file=64)
        synth_s = time.perf_counter() - start

        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            config = data_config(args)
            data = IRGLData(StreamConfig.for_stage(1, root, str(TINY_CHECKPOINT), preprocess=config,
                                                   prepare_concurrency=args.prepare_concurrency), store)
            special = SpecialTokens.from_tokenizer(load_tokenizer(str(TINY_CHECKPOINT)))
            log(f"streaming one stage-1 epoch ({sum(data.quota.values())} rows) into {args.consumers} consumers")
            with MemorySampler() as memory:
                start = time.perf_counter()
                packers, records, batches = consume(data.dataset(epoch=0), args.consumers, special,
                                               args.expected_tokens, args.max_tokens)
                end = time.perf_counter()
        finally:
            ray.shutdown()

    stats = DataStats()
    for packer in packers:
        stats = stats.merge(packer.stats)
    wall = end - start
    # Starting the prepare workers (imports, tokenizer) dominates a short run; the rate after the first
    # record arrived is closer to what a long epoch sustains.
    first_record = records[0]
    return {
        "machine": {"cpus": os.cpu_count(), "ray_num_cpus": args.cpus, "platform": platform.platform()},
        "settings": {"rows_per_mode_written": args.rows, "image_size": args.image_size, "consumers": args.consumers,
                     "prepare_concurrency": args.prepare_concurrency, "expected_tokens": args.expected_tokens,
                     "max_tokens": args.max_tokens, "vae_transform": list(config.vae_transform),
                     "vit_transform": list(config.vit_transform), "stage": 1},
        "synth_write_s": round(synth_s, 2),
        "wall_s": round(wall, 2),
        "first_record_s": round(first_record - start, 2),
        "first_batch_s": round(batches[0] - start, 2),
        "rows_per_s": round(stats.used / wall, 2),
        "packed_tokens_per_s": round(stats.tokens / wall, 1),
        "rows_per_s_after_first_record": round((len(records) - 1) / (end - first_record), 2),
        "rows": {"read": stats.read, "used": stats.used, "rejected": dict(stats.rejected)},
        "used_per_mode": {mode: stats.used_per_mode.get(mode, 0) for mode in MODES},
        "batches": stats.batches,
        "batches_per_consumer": [p.stats.batches for p in packers],
        "packed_tokens": stats.tokens,
        "peak_memory_mib": {
            "driver_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB, 1),
            "process_tree_rss_sum": round(memory.peak_rss_sum / MIB, 1),
            "dev_shm_growth": round(memory.peak_shm / MIB, 1),
        },
    }


if __name__ == "__main__":
    arguments = parse_args()
    with contextlib.redirect_stdout(sys.stderr):  # stdout holds only the JSON
        report = main(arguments)
    print(json.dumps(report, indent=2))
