"""Which training choices draw the shapes world best for the compute: a fixed wall-clock budget of training
from random weights, then the round-1 score on a fixed set of prompts.

Trains the shapes preset (its tokenizer and autoencoder from ``irg:shapes``, the LLM and ViT from random
weights) with the step the Ray Train workers run (:func:`irg.train.step.train_step` on a DeepSpeed engine),
in one process without Ray, on rows of the recipe's base modes made on the fly: text to image, image to
plan and, with ``--weights``, editing. After ``--minutes`` it scores the EMA weights' round 1 on
``--prompts`` shapes prompts (the same prompts and seeds every run) by GenEval's rules, once per
``--cfg-text`` value (sweeping evaluation settings costs no training), and prints one JSON object;
``--out`` gets it appended to ``probes.jsonl`` with a strip of samples. ``--checkpoint`` skips the
training and sweeps a trained model. ``--reconstruct N`` decodes the autoencoder's latents of N renders
and reports how often the detector reads them as the originals (is the autoencoder the limit?).

On a GPU (``--device cuda``) the same loop is the recipe's base stage in one process: ``--save DIR`` writes
the EMA model in the BAGEL layout, which ``jobs/shapes.py --base DIR`` takes instead of training its own.

    PYTHONPATH=. python benchmarks/shapes_probe.py --minutes 12 --label bf16            # the recipe's settings
    PYTHONPATH=. python benchmarks/shapes_probe.py --minutes 12 --dtype fp32 --label fp32
    PYTHONPATH=. python benchmarks/shapes_probe.py --checkpoint irg:shapes --cfg-text 1 2 4 6 --minutes 0
    PYTHONPATH=. python benchmarks/shapes_probe.py --device cuda --tokens 65536 --minutes 8 --save out/base
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from irg.device import DTYPE_CHOICES, resolve_dtype

ROOT = Path(__file__).resolve().parent.parent
BASE_WEIGHTS = "initial_full_learning=1,initial_thinking_understanding_learning=0.25,image_editing_learning=0.7"
OLD_THINK_TAIL = (" Every shape is flat and solid with crisp edges on a plain light grey background, with clear "
                  "space around it, so each one is easy to see, count and tell apart.")  # the think before issue 25


def log(msg: str) -> None:
    print(f"[probe] {msg}", file=sys.stderr, flush=True)


def parse_weights(text: str) -> dict[str, float]:
    from irg.data.format import MODES

    weights = {}
    for item in text.split(","):
        mode, _, value = item.partition("=")
        if mode not in MODES:
            raise SystemExit(f"--weights: unknown mode {mode!r} (modes: {', '.join(MODES)})")
        weights[mode] = float(value)
    return weights


class RowSource:
    """Training samples made on the fly, drawn by mode weight, as the data stream would prepare them."""

    def __init__(self, tokenizer, model_config, weights: dict[str, float], system_prompt: str, seed: int,
                 think_boilerplate: bool):
        from irg.data.sequence import PreprocessConfig

        self.tokenizer, self.model_config, self.system_prompt = tokenizer, model_config, system_prompt
        self.modes, self.weights = list(weights), list(weights.values())
        self.rng, self.np_rng = random.Random(f"probe:{seed}"), np.random.default_rng(seed)
        self.preprocess, self.think_boilerplate = PreprocessConfig(), think_boilerplate
        self.images = self.tokens = 0

    def sample(self):
        from dataclasses import replace

        from irg.data.format import EDITING_MODE, parse_conversation
        from irg.data.sequence import build_sample
        from irg.data.synth import example_conversation, make_edit_example, make_example

        mode = self.rng.choices(self.modes, self.weights)[0]
        size = self.model_config.vae_image_min_size
        example = make_edit_example(self.rng, size) if mode == EDITING_MODE else make_example(self.rng, size)
        if self.think_boilerplate:
            example = replace(example, think=example.think.removesuffix(" </think>") + OLD_THINK_TAIL + " </think>")
        parts = parse_conversation(example_conversation(mode, example, self.system_prompt))
        sample = build_sample(parts, self.tokenizer, self.preprocess, self.model_config, self.np_rng)
        self.images += mode in ("initial_full_learning", EDITING_MODE)
        self.tokens += sample.num_tokens
        return sample

    def batch(self, tokens: int, special):
        from irg.data.sequence import pack

        samples, total = [], 0
        while total < tokens:
            samples.append(self.sample())
            total += samples[-1].num_tokens
        return pack(samples, special)


def build(args, dtype, device):
    """The shapes preset at the asked width and depth, from random weights, with irg:shapes' tokenizer and
    autoencoder; its DeepSpeed engine."""
    from dataclasses import replace

    from irg.model import build_model, load_pretrained
    from irg.model.config import shapes_config
    from irg.train.config import ModelSettings, OptimSettings, TrainConfig
    from irg.train.engine import deepspeed_engine, prepare_model
    from irg.train.shapes_recipe import init_weights

    shipped = load_pretrained(str(ROOT / "irg" / "models" / "shapes"), device="cpu")
    tokenizer = shipped.tokenizer
    start, end = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
    config = shapes_config(shipped.config.llm.vocab_size, start, end)
    heads = max(1, args.width // 64)
    config.llm = replace(config.llm, hidden_size=args.width, intermediate_size=3 * args.width,
                         num_hidden_layers=args.depth, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 2))
    config.ae = shipped.config.ae
    model = build_model(config)
    init_weights(model, seed=args.seed)
    model.to(device)
    cfg = TrainConfig(model=ModelSettings(dtype=str(dtype).removeprefix("torch."), timestep_shift=args.shift,
                                          timestep_sampling=args.timestep_sampling),
                      optim=OptimSettings(lr=args.lr, warmup_steps=args.warmup, ema_decay=args.ema))
    engine = deepspeed_engine(prepare_model(model, cfg), cfg)
    return engine, shipped, config


def evaluate(model, shipped, config, prompts, cfg_values: list[float], num_steps: int | None, batch_size: int = 10):
    """Round-1 score per CFG value on ``prompts``: overall and per category, and a strip of the first images."""
    from irg.eval.geneval import shapes_scorer
    from irg.pipeline import IRGPipeline, model_defaults

    defaults = model_defaults(str(ROOT / "irg" / "models" / "shapes"), config, shipped.generation_config)
    device = next(model.parameters()).device
    pipe = IRGPipeline(model.eval(), shipped.autoencoder.to(device).float().eval(), shipped.tokenizer, defaults)
    scorer = shapes_scorer()
    results, strip = {}, None
    for cfg in cfg_values:
        images = []
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i:i + batch_size]
            outs = pipe([p.prompt for p in batch], rounds=1, seed=list(range(i, i + len(batch))),
                        round_settings=[{"cfg_text_scale": cfg}], **({"num_steps": num_steps} if num_steps else {}))
            images += [out.images[0] for out in outs]
        verdicts = scorer.score(list(zip(prompts, images)))
        per_category: dict[str, list[float]] = {}
        for prompt, verdict in zip(prompts, verdicts):
            per_category.setdefault(prompt.category, []).append(verdict.score)
        results[str(cfg)] = {"overall": round(statistics.mean(v.score for v in verdicts), 3),
                             **{c: round(statistics.mean(s), 3) for c, s in per_category.items()}}
        log(f"cfg_text {cfg}: round 1 {results[str(cfg)]['overall']}")
        if strip is None:
            from irg.train.figures import image_strip

            strip = image_strip(images[:12])
    return results, strip


HELD_OUT = {"text_to_image": "initial_full_learning=1", "editing": "image_editing_learning=1"}


def held_out_losses(model, shipped, config, batches: int = 4, tokens: int = 4096) -> dict:
    """Image MSE of the text-to-image and the editing task on held-out rows, at the reference's timestep
    draws (logit-normal, the model's shift) and fixed noise: one yardstick whatever the run's sampling."""
    from irg.data.sequence import SpecialTokens
    from irg.train.shapes_recipe import SHAPES_SYSTEM_PROMPT

    special = SpecialTokens.from_tokenizer(shipped.tokenizer)
    model = model.float().eval()
    device = next(model.parameters()).device
    autoencoder = shipped.autoencoder.to(device).float().eval()
    model.config.timestep_sampling, model.config.timestep_shift = "logit_normal", 1.0
    losses = {}
    for task, weights in HELD_OUT.items():
        source = RowSource(shipped.tokenizer, config, parse_weights(weights), SHAPES_SYSTEM_PROMPT,
                           seed=10_000 + len(task), think_boilerplate=False)
        total = count = 0.0
        generator = torch.Generator().manual_seed(0)
        for _ in range(batches):
            batch = source.batch(tokens, special).to(device)
            with torch.no_grad():
                images = batch.padded_images.float()
                ae = config.ae
                shape = (images.shape[0], ae.z_channels, *(side // ae.downsample for side in images.shape[2:]))
                latent = autoencoder.encode(images, noise=torch.randn(shape, generator=generator).to(device))
                out = model(batch, latent, generator=generator)
            total += out.mse_per_element.mean(-1).sum().item()
            count += out.mse_per_element.shape[0]
        losses[task] = round(total / count, 4)
    return losses


def reconstruction_check(shipped, count: int) -> dict:
    """The autoencoder's reconstructions of ``count`` renders: how often the detector reads them as the original."""
    from PIL import Image

    from irg.data.synth import make_example, measure

    rng, same = random.Random("probe-reconstruction"), 0
    ae = shipped.autoencoder.float().eval()
    for _ in range(count):
        image = make_example(rng, 64).correct
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        with torch.no_grad():
            decoded = ae.decode(ae.encode(pixels.to(next(ae.parameters()).device)))[0].clamp(-1, 1).cpu()
        back = Image.fromarray(((decoded.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
        same += [(d.shape, d.color) for d in measure(back)] == [(d.shape, d.color) for d in measure(image)]
    return {"renders": count, "read_as_original": round(same / count, 3)}


def markdown_table(path: Path) -> str:
    """The probes recorded in ``path`` (probes.jsonl) as the model card's table."""
    lines = ["| probe | steps | tokens | images | tokens/s | train MSE | held-out MSE t2i / edit "
             "| round 1 (CFG: score) |",
             "|---|---|---|---|---|---|---|---|"]
    for line in path.read_text().splitlines():
        r = json.loads(line)
        t = r.get("training", {})
        held = r["held_out_mse"]
        scores = ", ".join(f"{cfg}: {v['overall']:.3f}" for cfg, v in r["round1"].items())
        lines.append(f"| {r['label']} | {t.get('steps', '-')} | {t.get('tokens', '-')} | {t.get('images', '-')} | "
                     f"{t.get('tokens_per_s', '-')} | {t.get('loss_mse', '-')} | {held['text_to_image']} / "
                     f"{held['editing']} | {scores} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="probe")
    parser.add_argument("--minutes", type=float, default=12.0, help="training budget, wall clock (0: no training)")
    parser.add_argument("--steps", type=int, help="training budget in steps instead (of --tokens each): a budget "
                                                  "that other work on the machine does not shrink")
    parser.add_argument("--checkpoint", help="evaluate this trained model instead of training one")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="bf16", help="bf16: fp32 master weights")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=0.99)
    parser.add_argument("--timestep-sampling", choices=("logit_normal", "uniform"), default="logit_normal")
    parser.add_argument("--shift", type=float, default=1.0, help="training timestep shift")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--weights", default=BASE_WEIGHTS, help="mode=weight,... of the rows")
    parser.add_argument("--think-boilerplate", action="store_true", help="the think's old style sentence (+38 tokens)")
    parser.add_argument("--tokens", type=int, default=8192, help="packed tokens per step")
    parser.add_argument("--prompts", type=int, default=120)
    parser.add_argument("--cfg-text", type=float, nargs="+", default=[4.0], help="round-1 text CFG scales to score")
    parser.add_argument("--num-steps", type=int, help="flow steps at evaluation (default: the model's)")
    parser.add_argument("--reconstruct", type=int, default=0, help="also check the autoencoder on this many renders")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--save", type=Path, help="write the trained EMA model here (BAGEL layout)")
    parser.add_argument("--out", type=Path, default=Path("out/probes"))
    parser.add_argument("--table", action="store_true", help="print --out's probes as a markdown table and exit")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(args.out / "probes.jsonl"))
        return

    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        torch.cuda.set_device(device)
    from benchmarks.train_step import init_single_process_group
    from irg.data.sequence import SpecialTokens
    from irg.eval.benchmarks import shapes_prompts
    from irg.model import build_model, load_pretrained
    from irg.train.shapes_recipe import SHAPES_SYSTEM_PROMPT
    from irg.train.step import train_step

    torch.manual_seed(args.seed)
    dtype = resolve_dtype(args.dtype, device, "--dtype")
    report = {"label": args.label, "settings": {k: v for k, v in vars(args).items() if k not in ("out", "label")},
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    prompts = shapes_prompts(args.prompts, args.seed)
    if args.checkpoint:
        from irg.model.checkpoint import resolve_model

        shipped = load_pretrained(resolve_model(args.checkpoint), device=device)
        model, config = shipped.model.float(), shipped.config
    else:
        init_single_process_group("nccl" if device.type == "cuda" else "gloo")
        engine, shipped, config = build(args, dtype, device)
        ema = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
        source = RowSource(shipped.tokenizer, config, parse_weights(args.weights), SHAPES_SYSTEM_PROMPT, args.seed,
                           args.think_boilerplate)
        special = SpecialTokens.from_tokenizer(shipped.tokenizer)
        autoencoder = shipped.autoencoder.to(device, dtype).eval().requires_grad_(False)
        start, steps, losses = time.monotonic(), 0, []
        while (steps < args.steps) if args.steps else (time.monotonic() - start < args.minutes * 60):
            result = train_step(engine, autoencoder, source.batch(args.tokens, special), config, 1)
            decay = min(args.ema, (1 + steps) / (10 + steps))  # warmed up: a short probe forgets the init
            with torch.no_grad():
                for k, v in engine.module.state_dict().items():
                    ema[k].lerp_(v.float(), 1 - decay)
            steps += 1
            losses.append((result.loss_mse, result.loss_ce))
            if steps % 20 == 0:
                log(f"step {steps} ({time.monotonic() - start:.0f}s): mse {result.loss_mse:.4f} "
                    f"ce {result.loss_ce:.4f}")
        tail = losses[-max(1, len(losses) // 5):]  # the last fifth: a mean less noisy than the last step
        report["training"] = {
            "steps": steps, "seconds": round(time.monotonic() - start), "tokens": source.tokens,
            "images": source.images, "tokens_per_s": round(source.tokens / (time.monotonic() - start)),
            "loss_mse": round(statistics.mean(m for m, _ in tail if m is not None), 4),
            "loss_ce": round(statistics.mean(c for _, c in tail if c is not None), 4)}
        with torch.device("meta"):
            model = build_model(config)
        model.load_state_dict(ema, assign=True)
        if args.save:
            from irg.model import save_pretrained
            from irg.train.shapes_recipe import GENERATION_CONFIG

            save_pretrained(args.save, model.float(), shipped.autoencoder.float(), shipped.tokenizer,
                            generation_config=GENERATION_CONFIG)
            report["saved"] = str(args.save)
    if args.reconstruct:
        report["autoencoder"] = reconstruction_check(shipped, args.reconstruct)
    report["held_out_mse"] = held_out_losses(model, shipped, config)
    log(f"held-out image MSE {report['held_out_mse']}")
    report["round1"], strip = evaluate(model.float(), shipped, config, prompts, args.cfg_text, args.num_steps)
    args.out.mkdir(parents=True, exist_ok=True)
    strip.save(args.out / f"{args.label}.png")
    with open(args.out / "probes.jsonl", "a") as f:
        f.write(json.dumps(report) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
