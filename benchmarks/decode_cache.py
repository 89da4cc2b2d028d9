"""Decode cost against context length: the KV cache in slots and extended in place versus by concatenation.

Prints one JSON object to stdout (progress goes to stderr). For each context length, a random-weight
model of ``--preset`` prefills that many tokens, then decodes ``--tokens`` more one at a time, and
the benchmark reports per decode token the median time and the bytes the step allocates (every
op's allocations as torch's profiler records them, in a separate pass). ``in_place`` is IRG's cache
(:class:`irg.model.attention.LayerKV`: new rows written after the context's own, in memory of its
own that doubles when full); ``slot`` the same context in a preallocated KV slot
(:class:`irg.model.attention.KVSlots`, what the generation engine serves from: it never reallocates);
``slot_static`` the engine's static-shape decode over that slot (:class:`irg.model.slot_decode.
SlotDecoder`, what CUDA graphs replay; eager here unless on CUDA), which reads the whole slot under a
mask, so its cost follows the slot's size (here each context's, plus the decoded tokens), not the
context's; ``concatenation`` replays what the cache did before (every layer's keys and values copied
into a new tensor one row longer at every token). No Ray; no checkpoint needed.

    PYTHONPATH=. python benchmarks/decode_cache.py                          # shapes preset, CPU, ~2 min
    PYTHONPATH=. python benchmarks/decode_cache.py --preset mot-1.5b --device cuda --contexts 1000 4000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from irg.device import DEVICE_HELP, DTYPE_CHOICES, resolve_device, resolve_dtype
from irg.model import Bagel, KVCache, get_config
from irg.model.attention import KVSlots, LayerKV
from irg.model.config import PRESETS
from irg.model.slot_decode import SlotDecoder

MODES = ("in_place", "slot", "slot_static", "concatenation")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def allocated_bytes(run, device) -> int:
    """Bytes ``run()`` allocates, as torch's profiler records them op by op (what each op itself
    allocates, frees not subtracted)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        run()
    field = "self_device_memory_usage" if device.type == "cuda" else "self_cpu_memory_usage"
    return sum(max(getattr(event, field), 0) for event in prof.events())


def _extended_by_concatenation(self: LayerKV, keys: torch.Tensor, values: torch.Tensor) -> LayerKV:
    return LayerKV(torch.cat([self.keys, keys]), torch.cat([self.values, values]))


@contextlib.contextmanager
def cache_mode(mode: str):
    """``concatenation``: the cache's extension replaced by the copy it used to make; else IRG's as it is."""
    if mode != "concatenation":
        yield
        return
    original = LayerKV.extended
    LayerKV.extended = _extended_by_concatenation
    try:
        yield
    finally:
        LayerKV.extended = original


def context(model: Bagel, length: int, device) -> KVCache:
    vocab = model.config.llm.vocab_size
    ids = torch.randint(0, min(vocab, 800), (length,), generator=torch.Generator().manual_seed(length))
    (cache,) = model.prefill_text([KVCache()], [ids.to(device)])
    return cache


def decoder_for(mode: str, model: Bagel, cache: KVCache, args, device):
    """The context to decode from in ``mode`` and a step: context -> the context one token longer."""
    token = torch.tensor([5], device=device)

    def packed(cache):
        return model.decode_step([cache], token)[1][0]

    if mode in ("in_place", "concatenation"):
        return cache, packed
    llm = model.config.llm
    slots = KVSlots(1, cache.length + 2 * (args.warmup + args.tokens) + 1, llm.num_hidden_layers,
                    llm.num_key_value_heads, llm.head_dim, device, model.vae2llm.weight.dtype)
    in_slot = slots.context(slots.claim()[0], cache)
    if mode == "slot":
        return in_slot, packed
    decoder = SlotDecoder(model, slots, cuda_graphs=device.type == "cuda")
    slot_ids = torch.tensor([0], device=device)

    def static(cache):
        at = torch.tensor([cache.length], device=device)
        decoder(token, slot_ids, at, at)
        return slots.appended(cache)

    return in_slot, static


def measure(model: Bagel, mode: str, length: int, args, device, sync) -> dict:
    cache, step = decoder_for(mode, model, context(model, length, device), args, device)
    for _ in range(args.warmup):
        cache = step(cache)
    times = []
    for _ in range(args.tokens):
        sync()
        start = time.perf_counter()
        cache = step(cache)
        sync()
        times.append(time.perf_counter() - start)
    state = {"cache": cache}

    def decode():
        for _ in range(args.tokens):
            state["cache"] = step(state["cache"])

    return {"ms_per_token": round(statistics.median(times) * 1e3, 3),
            "allocated_bytes_per_token": allocated_bytes(decode, device) // args.tokens}


def main(args) -> dict:
    device, dtype = resolve_device(args.device), None
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    config = get_config(args.preset)
    model = Bagel(config).to(device=device, dtype=dtype).eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    llm = config.llm
    kv_row_bytes = 2 * llm.num_hidden_layers * llm.num_key_value_heads * llm.head_dim * torch.finfo(dtype).bits // 8
    results: dict = {mode: {} for mode in MODES}
    with torch.no_grad():
        for mode in results:
            with cache_mode(mode):
                for length in args.contexts:
                    results[mode][str(length)] = measure(model, mode, length, args, device, sync)
                    log(f"{mode:>13}: context {length:>5}: {results[mode][str(length)]}")
    growth = {}
    for mode, by_length in results.items():
        first, last = by_length[str(args.contexts[0])], by_length[str(args.contexts[-1])]
        growth[mode] = {"ms_per_token": round(last["ms_per_token"] / first["ms_per_token"], 2),
                        "allocated_bytes_per_token": round(
                            last["allocated_bytes_per_token"] / max(first["allocated_bytes_per_token"], 1), 2)}
    return {
        "machine": {"platform": platform.platform(), "device": str(device),
                    "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "settings": {"preset": args.preset, "dtype": str(dtype).removeprefix("torch."), "contexts": args.contexts,
                     "tokens": args.tokens, "warmup": args.warmup, "kv_bytes_per_context_token": kv_row_bytes},
        "per_decode_token": results,
        f"growth_from_{args.contexts[0]}_to_{args.contexts[-1]}": growth,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="shapes")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--contexts", type=int, nargs="+", default=[125, 250, 500, 1000, 2000])
    parser.add_argument("--tokens", type=int, default=32, help="decode tokens measured per context")
    parser.add_argument("--warmup", type=int, default=4)
    args = parser.parse_args(argv)
    if min(args.contexts) < 1 or args.tokens < 1 or args.warmup < 0:
        parser.error("--contexts and --tokens must be >= 1, --warmup >= 0")
    args.contexts = sorted(args.contexts)
    return args


if __name__ == "__main__":
    arguments = parse_args()
    with contextlib.redirect_stdout(sys.stderr):
        report = main(arguments)
    print(json.dumps(report, indent=2))
