"""Training step throughput: tokens/s and MFU of one worker running the IRGL step.

Runs the step the Ray Train workers run (:func:`irg.train.step.train_step`: autoencoder encode,
packed forward, token-weighted losses, DeepSpeed backward and optimizer step) in one process,
without Ray, on packed batches of synthetic shapes-world samples (think text plus generated images).
Prints one JSON object to stdout; progress goes to stderr.

    PYTHONPATH=. python benchmarks/train_step.py                                   # tiny model, CPU
    PYTHONPATH=. python benchmarks/train_step.py --preset mot-1.5b --device cuda --dtype bf16 \\
        --tokens 16384 --image-size 512 --activation-checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from irg.device import DTYPE_CHOICES, resolve_dtype
from irg.embedded_store import free_port

ROOT = Path(__file__).resolve().parent.parent
TINY_CHECKPOINT = ROOT / "tests" / "fixtures" / "bagel_tiny"
SHAPES_MODEL = ROOT / "irg" / "models" / "shapes"  # the shapes preset's vocabulary is its own tokenizer's


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def packed_batches(tokenizer, model_config, tokens: int, image_size: int, count: int):
    """``count`` packed batches of about ``tokens`` tokens each, from full-learning synthetic samples."""
    from irg.data.format import TextPart
    from irg.data.sequence import PreprocessConfig, SpecialTokens, build_sample, pack
    from irg.data.synth import make_example, mode_parts

    special = SpecialTokens.from_tokenizer(tokenizer)
    unit, patch = model_config.pixels_per_latent_token, model_config.vit.patch_size
    data = PreprocessConfig(vae_transform=(image_size, image_size // 2, unit),
                            vit_transform=(min(model_config.vit_transform[0], image_size),
                                           min(model_config.vit_image_min_size, image_size // 2), patch))
    rng, np_rng = random.Random(0), np.random.default_rng(0)
    batches = []
    for _ in range(count):
        samples, total = [], 0
        while total < tokens:
            example = make_example(rng, image_size)
            parts = [TextPart(example.prompt, False), *mode_parts("improving_full_learning", example)]
            sample = build_sample(parts, tokenizer, data, model_config, np_rng)
            samples.append(sample)
            total += sample.num_tokens
        batches.append(pack(samples, special))
    return batches


def init_single_process_group(backend: str) -> None:
    port = free_port()
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    torch.distributed.init_process_group(backend, rank=0, world_size=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="tiny, shapes, mot-1.5b or bagel-7b (random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32", help="fp32 or bf16 (any irg.device spelling)")
    parser.add_argument("--tokens", type=int, default=2048, help="packed tokens per step")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--freeze-vit", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: known GPU or measured CPU matmul")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        torch.cuda.set_device(device)
    import deepspeed

    from irg.model import AutoEncoder, build_model, get_config
    from irg.model.checkpoint import load_tokenizer, read_config
    from irg.train.config import ModelSettings, OptimSettings, TrainConfig
    from irg.train.engine import deepspeed_engine, prepare_model
    from irg.train.step import peak_flops, train_step

    dtype = resolve_dtype(args.dtype, device, "--dtype")
    init_single_process_group("nccl" if device.type == "cuda" else "gloo")
    shapes = args.preset == "shapes"
    config = read_config(str(SHAPES_MODEL)) if shapes else get_config(args.preset)
    tokenizer = load_tokenizer(str(SHAPES_MODEL if shapes else TINY_CHECKPOINT))
    log(f"building {args.preset} on {device}")
    torch.manual_seed(0)
    with device:
        model = build_model(config)
        autoencoder = AutoEncoder(config.ae).to(dtype).eval().requires_grad_(False)
    cfg = TrainConfig(model=ModelSettings(dtype=str(dtype).removeprefix("torch."),
                                          activation_checkpointing=args.activation_checkpointing,
                                          freeze_vit=args.freeze_vit),
                      optim=OptimSettings(warmup_steps=1))
    cfg.deepspeed.zero_stage = args.zero_stage
    engine = deepspeed_engine(prepare_model(model, cfg), cfg)
    batches = packed_batches(tokenizer, config, args.tokens, args.image_size, 4)
    peak = peak_flops(device, dtype, args.peak_tflops)

    results = []
    for i in range(args.warmup + args.steps):
        result = train_step(engine, autoencoder, batches[i % len(batches)], config, 1,
                            vit_trainable=not args.freeze_vit)
        if i >= args.warmup:
            results.append(result)
        log(f"step {i + 1}: {result.tokens} tokens in {result.seconds:.3f}s, loss {result.loss:.4f}")

    seconds = sum(r.seconds for r in results)
    tokens = sum(r.tokens for r in results)
    flops = sum(r.flops for r in results)
    report = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": args.dtype, "zero_stage": args.zero_stage, "deepspeed": deepspeed.__version__,
        "torch": torch.__version__, "activation_checkpointing": args.activation_checkpointing,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": statistics.mean(r.tokens for r in results),
        "step_seconds_median": statistics.median(r.seconds for r in results),
        "tokens_per_s": tokens / seconds,
        "model_tflops_per_s": flops / seconds / 1e12,
        "peak_tflops": peak / 1e12,
        "mfu": flops / seconds / peak,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "final_loss": results[-1].loss,
    }
    print(json.dumps(report, indent=2))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
