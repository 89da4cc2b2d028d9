"""Step caching's speed-up and its effect on quality, on the same prompts and seeds.

Generates the shapes benchmark's prompts (two rounds, the model's settings) once with step caching off
and once per ``--intervals`` value (RoundSettings.step_cache_interval: the model runs every N-th
denoising step, the first two and the last; the steps between extrapolate it), every run with the
same prompts, seeds and batches, so the images differ only by the caching. Every round's image is
scored by the shapes world's GenEval rules; per setting the report gives the overall score of each
round (mean of the category means) with its 95 % bootstrap interval, the paired difference to no
caching with its interval, how many final images changed their verdict either way, the model
evaluations per image and the wall time of generation alone. Writes report.json and grid.png (rows:
prompts; columns: round 2 without caching, then with each interval) to --out and logs them to MLflow
(experiment irg-eval) unless --no-mlflow, prints the report as JSON; progress goes to stderr.

    PYTHONPATH=. python benchmarks/step_cache.py irg:shapes --limit 120 --intervals 2 3
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from irg.device import DEVICE_HELP, DTYPE_CHOICES, dtype_name
from irg.eval.benchmarks import shapes_prompts
from irg.eval.geneval import shapes_scorer
from irg.eval.irg_gain import Bootstrap


def log(message: str) -> None:
    print(f"[step-cache] {message}", file=sys.stderr, flush=True)


def generate(pipe, prompts, interval: int, batch_size: int, seed: int) -> tuple[list, float, int]:
    """Both rounds of every prompt with step caching at ``interval`` (1: off): the outputs, the seconds
    the generation took and the model evaluations of one image (all rounds and CFG branches)."""
    evaluations = {"n": 0}

    def count(event):
        if event.kind == "step" and event.prompt_index == 0 and not event.detail.reused:
            detail = event.detail
            evaluations["n"] += 1 + (detail.v_text is not None) + (detail.v_img is not None)

    rounds = pipe.defaults.rounds
    outputs, seconds, per_image = [], 0.0, 0
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b: b + batch_size]
        overrides = [{"step_cache_interval": interval}] * rounds
        evaluations["n"] = 0
        start = time.perf_counter()
        outputs += pipe([p.prompt for p in batch], seed=[seed + b + i for i in range(len(batch))],
                        round_settings=overrides, callback=count)
        seconds += time.perf_counter() - start
        per_image = evaluations["n"]
        log(f"interval {interval}: {len(outputs)}/{len(prompts)} prompts ({seconds:.0f} s)")
    return outputs, seconds, per_image


def grid(columns: list[list[Image.Image]], rows: int) -> Image.Image:
    size = columns[0][0].size
    canvas = Image.new("RGB", (size[0] * len(columns), size[1] * rows), "white")
    for c, images in enumerate(columns):
        for r, image in enumerate(images[:rows]):
            canvas.paste(image, (c * size[0], r * size[1]))
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint folder, s3:// URI, irg:NAME or models:/NAME@ALIAS")
    parser.add_argument("--limit", type=int, default=120, help="prompts, cycling through the six categories")
    parser.add_argument("--intervals", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    parser.add_argument("--grid-prompts", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("out/benchmarks/step_cache"))
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--tracking-uri", help="default: as irg.tracking decides ($MLFLOW_TRACKING_URI, ...)")
    args = parser.parse_args()
    if args.limit < 1 or any(i < 2 for i in args.intervals):
        parser.error("--limit must be >= 1 and every --intervals value >= 2 (1 is caching off)")

    from irg.pipeline import IRGPipeline
    from irg.registry import checkpoint_uri

    pipe = IRGPipeline.from_pretrained(checkpoint_uri(args.model), device=args.device, dtype=args.dtype)
    prompts = shapes_prompts(args.limit, args.seed)
    scorer = shapes_scorer()
    boot = Bootstrap([p.category for p in prompts], seed=args.seed)
    runs = {}
    for interval in [1, *args.intervals]:
        outputs, seconds, evaluations = generate(pipe, prompts, interval, args.batch_size, args.seed)
        scores = [np.array([v.score for v in scorer.score([(p, o.images[r]) for p, o in zip(prompts, outputs)])])
                  for r in range(len(outputs[0].images))]
        runs[interval] = {"outputs": outputs, "seconds": seconds, "evaluations": evaluations, "scores": scores}

    off = runs[1]
    settings = {}
    for interval, run in runs.items():
        final, final_off = run["scores"][-1], off["scores"][-1]
        entry = {
            "generation_s": round(run["seconds"], 1),
            "speedup": round(off["seconds"] / run["seconds"], 3),
            "model_evaluations_per_image": run["evaluations"],
            "rounds": {f"round{r + 1}": boot.mean_of_categories(s) for r, s in enumerate(run["scores"])},
        }
        if interval != 1:
            entry["final_minus_off"] = boot.mean_of_categories(final - final_off)
            entry["final_verdicts_changed"] = {"fixed": int(((final >= 0.5) & (final_off < 0.5)).sum()),
                                               "broken": int(((final < 0.5) & (final_off >= 0.5)).sum())}
        settings["off" if interval == 1 else f"interval_{interval}"] = entry
    args.out.mkdir(parents=True, exist_ok=True)
    columns = [[o.images[-1] for o in run["outputs"]] for run in runs.values()]
    picture = grid(columns, args.grid_prompts)
    picture.save(args.out / "grid.png")
    report = {
        "benchmark": "step_cache", "model": args.model, "prompts": len(prompts), "seed": args.seed,
        "batch_size": args.batch_size, "device": str(pipe.device), "dtype": dtype_name(pipe.dtype),
        "torch": torch.__version__, "machine": platform.platform(), "threads": torch.get_num_threads(),
        "defaults": {"size": f"{pipe.defaults.width}x{pipe.defaults.height}", "steps": pipe.defaults.num_steps,
                     "rounds": pipe.defaults.rounds},
        "settings": settings, "grid": str(args.out / "grid.png"),
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    if not args.no_mlflow:
        from irg import tracking
        from irg.eval.run import EXPERIMENT

        metrics = {f"{name}_{key}": value for name, entry in settings.items()
                   for key, value in (("speedup", entry["speedup"]),
                                      ("final_score", entry["rounds"][f"round{len(entry['rounds'])}"]["value"]))}
        key = f"step_cache-{args.model.rstrip('/').rsplit('/', 1)[-1]}-{time.strftime('%Y%m%d-%H%M%S')}"
        report["mlflow_run_id"] = tracking.log_measurement(
            EXPERIMENT, key, {"irg.eval.model": args.model, "irg.eval.benchmark": "step_cache"},
            {"model": args.model, "limit": str(args.limit), "intervals": json.dumps(args.intervals),
             "seed": str(args.seed)}, metrics, {"report.json": report}, {"grid.png": picture}, args.tracking_uri)
        log(f"MLflow run {report['mlflow_run_id']}")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
