"""Peak memory of exporting trained EMA weights: the old path (whole shards read, the model built and
a second copy made, all in fp32) against the streamed one (shards memory-mapped, one tensor at a time).

Prints one JSON object to stdout: the byte arithmetic of both paths for the 1.5B preset (built on the
meta device) and for BAGEL-7B (14.6 B parameters, likewise), and one real export of the tiny fixture checkpoint
measured both ways (torch's CPU allocations through the profiler, Python's through tracemalloc).

    PYTHONPATH=. python benchmarks/export_memory.py
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import tracemalloc
from pathlib import Path

import pyarrow.fs as pafs
import torch
from torch.profiler import ProfilerActivity, profile

from irg.model import get_config, load_pretrained, save_pretrained
from irg.model.bagel import Bagel
from irg.train.checkpointing import ema_shard_file, ema_shards
from irg.train.ema import ShardedEMA, assemble
from irg.train.export import export_checkpoint, export_peak_bytes

TINY_CHECKPOINT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "bagel_tiny"
GB = 1e9


def peak_allocated_bytes(fn, mapped_bytes: int = 0):
    """``fn()`` and the peak of torch's CPU allocations while it ran (the profiler's record of every
    allocation and free, in order). Memory-mapped files show there as allocations although they are
    page cache the kernel can drop: ``mapped_bytes`` (the files ``fn`` maps) are not counted."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return result, peak - mapped_bytes


def write_shards(model: torch.nn.Module, folder: Path, world_size: int) -> int:
    """A training checkpoint's EMA shards of ``model`` in ``folder``; returns their total size in bytes."""
    (folder / "ema").mkdir(parents=True, exist_ok=True)
    for rank in range(world_size):
        torch.save(ShardedEMA(model, 0.9, rank, world_size).state_dict(), folder / ema_shard_file(rank))
    return sum(f.stat().st_size for f in (folder / "ema").iterdir())


def old_export(checkpoint: Path, base: Path, out: Path, dtype: torch.dtype) -> None:
    """The export before streaming: the full fp32 EMA, loaded into the model, written in ``dtype``."""
    with ema_shards(pafs.LocalFileSystem(), str(checkpoint)) as shards:
        weights = {k: v.clone() for k, v in assemble(shards).items()}  # what reading whole shards gave
    pretrained = load_pretrained(base, model_weights=weights)
    save_pretrained(out, pretrained.model, pretrained.autoencoder, pretrained.tokenizer, dtype=dtype,
                    generation_config=pretrained.generation_config)


def arithmetic(preset: str) -> dict:
    """Peak bytes of both paths and the file sizes for a preset's model, built on the meta device."""
    with torch.device("meta"):
        shapes = [tuple(t.shape) for t in Bagel(get_config(preset)).state_dict(keep_vars=True).values()]
    params, largest = sum(math.prod(s) for s in shapes), max(math.prod(s) for s in shapes)
    return {
        "params": params, "largest_tensor_params": largest,
        "old_peak_gb": round(params * 8 / GB, 1),  # fp32 EMA state dict + the fp32 model built from it
        "old_file_gb_fp32": round(params * 4 / GB, 1),
        "new_peak_gb": round(export_peak_bytes(shapes, torch.bfloat16) / GB, 2),  # incl. the process itself
        "new_tensor_gb": round(largest * (2 + 4) / GB, 2),  # the bf16 tensor + its fp32 pieces mapped in
        "new_file_gb_bf16": round(params * 2 / GB, 1),
    }


def measured_tiny(world_size: int = 3) -> dict:
    model = load_pretrained(TINY_CHECKPOINT).model
    largest = max(t.numel() for t in model.state_dict().values())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shard_bytes = write_shards(model, tmp / "checkpoint", world_size)
        del model
        result = {"world_size": world_size, "shard_bytes": shard_bytes, "largest_tensor_bytes_fp32": largest * 4}
        for name, run, mapped in (
            ("old", lambda: old_export(tmp / "checkpoint", TINY_CHECKPOINT, tmp / "old", torch.bfloat16), 0),
            ("new", lambda: export_checkpoint(pafs.LocalFileSystem(), str(tmp / "checkpoint"),
                                              str(TINY_CHECKPOINT), str(tmp / "new")), shard_bytes),
        ):
            result[f"{name}_torch_peak_bytes"] = peak_allocated_bytes(run, mapped)[1]
            tracemalloc.start()  # a second run: the profiler's own records would count as Python's
            run()
            result[f"{name}_python_peak_bytes"] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        same = (tmp / "old" / "ema.safetensors").read_bytes() == (tmp / "new" / "ema.safetensors").read_bytes()
        result["bf16_weights_byte_identical"] = same
    return result


def main() -> None:
    report = {
        "mot-1.5b": arithmetic("mot-1.5b"),
        "bagel-7b": arithmetic("bagel-7b"),
        "tiny_measured": measured_tiny(),
        "cpus": os.cpu_count(), "torch": torch.__version__,
    }
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
