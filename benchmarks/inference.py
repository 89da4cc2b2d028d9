"""Inference benchmark of the BAGEL model and the IRG pipeline with random weights.

Prints one JSON object to stdout (progress goes to stderr). Random weights are enough: every cost
measured here (prefill, denoising pass, decode step, a full 2-round request with fixed-length
thinks) depends on shapes, not values. No Ray; no checkpoint needed.

The decode step is timed three ways at a 1000-token context: the packed forward (eager), and the
generation engine's static-shape decode over a KV slot (irg.model.slot_decode), eager and, on CUDA,
replayed as a CUDA graph (the spec's floor: 4.7 ms on an H200). The full 2-round request is timed
with step caching off and at each ``--step-cache`` interval; its thinks (random weights would stop
at a random length) are timed apart as ``--think-tokens`` decode steps each, with the engine's decoder.

    PYTHONPATH=. python benchmarks/inference.py --preset bagel-7b    # H100/H200, bf16, ~30 GB
    PYTHONPATH=. python benchmarks/inference.py --preset tiny --image-size 64 --steps 4 --context-tokens 300
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from irg.device import DEVICE_HELP, DTYPE_CHOICES, resolve_device, resolve_dtype
from irg.model import AutoEncoder, Bagel, KVCache, get_config
from irg.model.attention import KVSlots
from irg.model.embeddings import PositionEmbedding2D
from irg.model.latents import grid_position_ids
from irg.model.slot_decode import SlotDecoder
from irg.pipeline.irg_pipeline import IRGPipeline
from irg.pipeline.text import next_tokens

TINY_CHECKPOINT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "bagel_tiny"
SPEC_FLOOR = ("~22-26 s on one H200 for a full 2-round 1024x1024 50-step request; 4096-token denoising pass "
              "93 ms (context 850) to 125 ms (context 10.5K); decode step 6.3 ms eager")
QWEN_SPECIALS = {"<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652, "<|vision_end|>": 151653}
PREFILL_CHUNK = 4096  # bounds the activation memory of a long prefill
DECODE_CONTEXT = 1000
PROMPT = "A red cube on top of a blue sphere, photographed on a wooden table in soft morning light."


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class CharTokenizer:
    """Stand-in for the Qwen2.5 tokenizer with random 7B weights: one id per character, and the four
    special tokens the pipeline and the model use at their real Qwen2.5 ids."""

    def __init__(self, vocab_limit: int = 151643):  # ids below Qwen's first special token
        self.vocab_limit = vocab_limit

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % self.vocab_limit for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids if i < self.vocab_limit)

    def convert_tokens_to_ids(self, tokens):
        return [QWEN_SPECIALS[t] for t in tokens] if isinstance(tokens, list) else QWEN_SPECIALS[tokens]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset on CUDA; the process's peak RSS otherwise."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def time_ms(fn, device: torch.device, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3)}


def random_init(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Allocate a meta-built module straight on the device (no CPU copy, no fp32 detour) and fill it:
    small normals everywhere, then the fixed sin-cos position tables."""
    module = module.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.normal_(0.0, 0.02)
        for m in module.modules():
            if isinstance(m, PositionEmbedding2D):  # vit_pos_embed, latent_pos_embed
                m.reset_parameters()
    return module.eval()


def sig(x: float) -> float:
    return float(f"{x:.4g}")


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def gen_expert_params_per_layer(config) -> int:
    """Weights one latent token passes through in one layer: q, k, v, o and the SwiGLU MLP of the
    generation expert (biases and norms are negligible)."""
    llm = config.llm
    h, kv = llm.hidden_size, llm.num_key_value_heads * llm.head_dim
    return 2 * h * h + 2 * h * kv + 3 * h * llm.intermediate_size


def denoise_flops(config, n: int, context: int) -> float:
    # FLOPs of one branch = L * (2 * P_layer * N + 4 * N * (C + N) * hidden)
    #   2 * P_layer per token for the generation expert's matmuls (P_layer: q, k, v, o, MLP weights),
    #   4 * N * (C + N) * hidden for attention scores (QK^T) and the weighted sum (AV).
    # The two <|vision_*|> markers, embeddings and llm2vae are left out.
    llm = config.llm
    per_layer = 2 * gen_expert_params_per_layer(config) * n + 4 * n * (context + n) * llm.hidden_size
    return float(llm.num_hidden_layers * per_layer)


def prefill_random(model: Bagel, length: int, device: torch.device, generator: torch.Generator) -> KVCache:
    """A KV cache of ``length`` random text tokens, prefilled in chunks."""
    ids = torch.randint(0, min(model.config.llm.vocab_size, 151643), (length,), generator=generator).to(device)
    caches = [KVCache()]
    for chunk in ids.split(PREFILL_CHUNK):
        caches = model.prefill_text(caches, [chunk])
    return caches[0]


def fixed_think_text(tokenizer, tokens: int) -> tuple[str, int]:
    """A think text of about ``tokens`` tokens, so the request's image part is deterministic."""
    base = "The cube must sit on the sphere; check colours, lighting, shadows and the wood grain. "
    ids = tokenizer.encode(base * (tokens // 8 + 2), add_special_tokens=False)[:tokens]
    text = tokenizer.decode(ids)
    return text, len(tokenizer.encode(text, add_special_tokens=False))


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "bagel-7b"], default="tiny")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--context-tokens", type=int, nargs="+", default=[850, 10500])
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--think-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip-full-request", action="store_true")
    parser.add_argument("--step-cache", type=int, nargs="*", default=[2, 3],
                        help="step_cache_interval values to time the full request at, besides off")
    args = parser.parse_args()
    device = resolve_device(args.device, "--device")
    dtype = resolve_dtype(args.dtype, device, "--dtype")
    dtype_name = str(dtype).removeprefix("torch.")
    config = get_config(args.preset)
    unit = config.pixels_per_latent_token
    if args.image_size % unit or args.image_size > unit * config.max_latent_size:
        parser.error(f"--image-size must be a multiple of {unit} and at most {unit * config.max_latent_size}")
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the weights: same values, same numerics, run to run
    result = {
        "preset": args.preset, "device": str(device), "dtype": dtype_name, "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "args": vars(args), "spec_floor": SPEC_FLOOR,
    }

    # The presets carry their tokenizer's <|vision_start|>/<|vision_end|> ids.
    if args.preset == "tiny":
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(TINY_CHECKPOINT)
    else:
        tokenizer = CharTokenizer()

    log(f"building {args.preset} on {device} ({dtype_name})")
    reset_peak(device)
    start = time.perf_counter()
    with torch.device("meta"):
        model = Bagel(config)
        autoencoder = AutoEncoder(config.ae)
    model = random_init(model, device, dtype)
    autoencoder = random_init(autoencoder, device, dtype)
    sync(device)
    llm_layers = model.language_model.model.layers
    result["build"] = {
        "seconds": round(time.perf_counter() - start, 2),
        "params_total": count(model), "params_llm": count(model.language_model),
        "params_gen_expert_per_token": gen_expert_params_per_layer(config) * len(llm_layers),
        "params_vit": count(model.vit_model) + count(model.connector), "params_autoencoder": count(autoencoder),
        "peak_memory_gib": round(peak_memory_gib(device), 3),
    }
    log(f"build: {result['build']}")

    grid = args.image_size // unit
    n = grid * grid
    positions = grid_position_ids(grid, grid, config.max_latent_size, device=device)
    x_t = torch.randn(3, n, config.latent_channels, generator=generator).to(device, dtype)
    t = torch.full((3,), 0.5, device=device)
    result["denoise_pass"] = {"latent_tokens": n, "flops_formula": "L * (2*P_layer*N + 4*N*(C+N)*hidden) per branch",
                              "runs": []}
    for context in args.context_tokens:
        reset_peak(device)
        cache = prefill_random(model, context, device, generator)
        for branches in (1, 3):
            log(f"denoise pass: context {context}, {n} latent tokens, {branches} branch(es)")
            caches = [cache] * branches
            timing = time_ms(lambda caches=caches, branches=branches: model.predict_velocity(
                caches, x_t[:branches], t[:branches], positions), device, args.warmup, args.repeats)
            flops = branches * denoise_flops(config, n, context)
            result["denoise_pass"]["runs"].append({
                "context_tokens": context, "branches": branches, **timing, "gflop": sig(flops / 1e9),
                "tflops_per_s": sig(flops / (timing["median_ms"] / 1e3) / 1e12),
                "peak_memory_gib": round(peak_memory_gib(device), 3),
            })
        del cache, caches  # free the context before the next length

    log(f"decode step: context {DECODE_CONTEXT}")
    decode_cache = prefill_random(model, DECODE_CONTEXT, device, generator)
    token = torch.tensor([7], device=device)
    result["decode_step"] = {"context_tokens": DECODE_CONTEXT,
                             **time_ms(lambda: model.decode_step([decode_cache], token), device,
                                       args.warmup, max(args.repeats, 20))}
    llm = config.llm
    slots = KVSlots(1, DECODE_CONTEXT + args.think_tokens + 8, llm.num_hidden_layers, llm.num_key_value_heads,
                    llm.head_dim, device, dtype)
    (slot,) = slots.claim()
    in_slot = slots.context(slot, decode_cache)
    at = torch.tensor([DECODE_CONTEXT], device=device)
    for graphs in (False, True) if device.type == "cuda" else (False,):
        log(f"decode step in a KV slot, static shapes{', CUDA graph' if graphs else ', eager'}")
        decoder = SlotDecoder(model, slots, cuda_graphs=graphs)
        timing = time_ms(lambda: decoder(token, torch.tensor([slot], device=device), at, at),  # noqa: B023
                         device, args.warmup, max(args.repeats, 20))
        result["decode_step_slot_cuda_graph" if graphs else "decode_step_slot_eager"] = {
            "context_tokens": DECODE_CONTEXT, **timing}

    if not args.skip_full_request:
        # Thinks with random weights would stop at a random length, so they are timed apart: one
        # sampled decode loop of --think-tokens steps, as the engine runs it (the static-shape decoder
        # over the slot, a CUDA graph on CUDA), counted per round.
        log(f"think: {args.think_tokens} decode steps")
        token = torch.tensor([tokenizer.convert_tokens_to_ids("<|im_start|>")], device=device)
        slot_ids = torch.tensor([slot], device=device)
        sync(device)
        start = time.perf_counter()
        for i in range(args.think_tokens):
            position = torch.tensor([in_slot.length + i], device=device)
            logits = decoder(token, slot_ids, position, position)
            token = torch.tensor(next_tokens(logits, 0.3, [generator]), device=device)
        sync(device)
        think_round_s = time.perf_counter() - start
        del slots, decoder, in_slot

        pipeline = IRGPipeline(model, autoencoder, tokenizer)
        think_text, think_len = fixed_think_text(tokenizer, args.think_tokens)
        request = dict(height=args.image_size, width=args.image_size, rounds=2, seed=0, think_texts=[think_text] * 2)
        log("full request: warm-up (2 steps)")
        pipeline(PROMPT, num_steps=2, **request)
        for interval in [1, *args.step_cache]:
            log(f"full request: {args.steps} steps, {args.image_size}px, 2 rounds, step cache interval {interval}")
            reset_peak(device)
            sync(device)
            start = time.perf_counter()
            out = pipeline(PROMPT, num_steps=args.steps, round_settings=[{"step_cache_interval": interval}] * 2,
                           **request)
            sync(device)
            pipeline_s = time.perf_counter() - start
            result["full_request" if interval == 1 else f"full_request_step_cache_{interval}"] = {
                "image_size": args.image_size, "steps": args.steps, "rounds": 2, "think_tokens": think_len,
                "step_cache_interval": interval,
                "think_s": round(2 * think_round_s, 3), "pipeline_s": round(pipeline_s, 3),
                "total_s": round(2 * think_round_s + pipeline_s, 3),
                "pipeline_timings_s": {k: round(v, 3) for k, v in out.timings.items()},
                "peak_memory_gib": round(peak_memory_gib(device), 3),
            }
    return result


if __name__ == "__main__":
    with torch.inference_mode(), contextlib.redirect_stdout(sys.stderr):  # stdout holds only the JSON
        report = main()
    print(json.dumps(report, indent=2))
