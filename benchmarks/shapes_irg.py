"""Does round 2 (after reflection) beat round 1 on the shapes world, and does the gain come from reflecting?

Draws round 1 for each shapes prompt, then round 2 after the model's own reflection and, as a control,
after a neutral think that names no flaw (same round 1, seeds and noise; see irg.eval.irg_gain), scores
every image by GenEval's rules and prints one JSON object: per category and overall the three scores,
the paired differences and fixed/broken rates with 95 % bootstrap intervals, and how often the
reflection names a flaw the judge finds. Writes report.json, prompts.jsonl and grid.png to --out and
logs them to MLflow (experiment irg-eval) unless --no-mlflow. Progress goes to stderr.

    PYTHONPATH=. python benchmarks/shapes_irg.py /path/to/checkpoint --device cuda --dtype bf16
    PYTHONPATH=. python benchmarks/shapes_irg.py tests/fixtures/bagel_tiny --limit 6 --height 64 --width 64 \\
        --num-steps 2 --max-think-tokens 4 --no-mlflow
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from irg.device import DEVICE_HELP, DTYPE_CHOICES, dtype_name
from irg.eval.benchmarks import shapes_prompts
from irg.eval.irg_gain import GRID_PROMPTS, RESAMPLES, gain_grid, log_gain_run, measure_irg_gain

REPORT_PROMPTS = 300  # fewer give intervals too wide to tell a few points of gain from none


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint folder, s3:// URI or models:/NAME@ALIAS")
    parser.add_argument("--limit", type=int, default=REPORT_PROMPTS,
                        help=f"prompts, cycling through the six categories (default and minimum for a report: "
                             f"{REPORT_PROMPTS}; fewer for a quick run)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per call (round 2 runs twice as many)")
    parser.add_argument("--seed", type=int, default=0, help="prompts, generation and bootstrap")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    parser.add_argument("--height", type=int, help="default: the model's")
    parser.add_argument("--width", type=int, help="default: the model's")
    parser.add_argument("--num-steps", type=int, help="default: the model's")
    parser.add_argument("--max-think-tokens", type=int, help="default: the model's")
    parser.add_argument("--think-temperature", type=float, help="default: the model's")
    parser.add_argument("--round-settings", type=json.loads,
                        help='per-round overrides as JSON, over the model\'s: e.g. \'[{}, {"start_noise": 0.6}]\' '
                             "(round 2 from round 1 noised to 0.6; the control runs with the same settings)")
    parser.add_argument("--resamples", type=int, default=RESAMPLES, help="bootstrap resamples")
    parser.add_argument("--grid-prompts", type=int, default=GRID_PROMPTS)
    parser.add_argument("--out", type=Path, default=Path("out/benchmarks/shapes_irg"))
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--tracking-uri", help="default: as irg.tracking decides ($MLFLOW_TRACKING_URI, ...)")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
    logging.getLogger("irg.eval.irg_gain").setLevel(logging.INFO)
    if args.limit < REPORT_PROMPTS:
        print(f"a quick run: {args.limit} prompts (a report needs at least {REPORT_PROMPTS})", file=sys.stderr)

    from irg.pipeline import IRGPipeline
    from irg.registry import checkpoint_uri

    start = time.perf_counter()
    pipe = IRGPipeline.from_pretrained(checkpoint_uri(args.model), device=args.device, dtype=args.dtype)
    settings = {"height": args.height, "width": args.width, "num_steps": args.num_steps,
                "max_think_tokens": args.max_think_tokens, "think_temperature": args.think_temperature,
                "round_settings": args.round_settings}
    result = measure_irg_gain(pipe, shapes_prompts(args.limit, args.seed), batch_size=args.batch_size,
                              seed=args.seed, resamples=args.resamples, **settings)
    result.report.update(model=args.model, device=str(pipe.device), dtype=dtype_name(pipe.dtype))
    report = result.report
    grid = gain_grid(result.rows, args.grid_prompts)
    args.out.mkdir(parents=True, exist_ok=True)
    grid.save(args.out / "grid.png")
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    with open(args.out / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps(row.to_dict()) + "\n" for row in result.rows)
    run_id = None
    if not args.no_mlflow:
        params = {"limit": args.limit, "batch_size": args.batch_size, "seed": args.seed, "dtype": args.dtype,
                  "resamples": args.resamples, **settings}
        run_id = log_gain_run(result, grid, args.model, args.tracking_uri, params)
        print(f"MLflow run {run_id}", file=sys.stderr)
    print(json.dumps({**report, "wall_s": round(time.perf_counter() - start, 1), "out": str(args.out),
                      "mlflow_run_id": run_id}, indent=1))


if __name__ == "__main__":
    main()
