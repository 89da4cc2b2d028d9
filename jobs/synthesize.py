"""IRGL rows from a model's own round-1 images (how the paper built IRGL-300K): the model draws round 1
for N shapes-world prompts on a Ray Data actor pool, a judge finds each image's flaws, and every prompt
becomes one row per learning mode, with a reflection on those flaws and a corrected target.

    ray job submit --working-dir . -- python jobs/synthesize.py --model s3://irg/models/shapes-base \\
        --out s3://irg/data/irgl-shapes --prompts 4096

Rows go to <out>/<mode>/<prefix>-part-NNNNN.parquet, next to synthetic rows in the same mode folders.
Submitting again resumes: finished parts are kept, the rest are drawn. Generation settings not given
are the model's defaults.
"""

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from irg.data.irgl_synthesis import ray_drawer, synthesize_from_model
from irg.device import DEVICE_HELP, DTYPE_CHOICES
from irg.names import check_name
from irg.pipeline.prompts import SYSTEM_PROMPT

JUDGES = ("shapes", "chat")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder, s3:// URI or models:/NAME@ALIAS")
    parser.add_argument("--out", required=True, help="IRGL data folder or s3:// URI (one folder per mode)")
    parser.add_argument("--prompts", type=int, default=1024, help="shapes-world prompts to draw (default 1024)")
    parser.add_argument("--seed", type=int, default=0, help="draws the prompts and each prompt's generation seed")
    parser.add_argument("--prefix", default="model", help="file name prefix of the rows and the summary")
    parser.add_argument("--rows-per-file", type=int, default=256, help="prompts per part (the unit of resuming)")
    parser.add_argument("--system-prompt-file", type=Path,
                        help="the model's system prompt (default: the IRG one), asked with and written in every row")
    gen = parser.add_argument_group("generation (default: the model's own settings)")
    gen.add_argument("--size", type=int, help="image side in pixels (multiple of 16)")
    gen.add_argument("--steps", type=int, help="flow timesteps")
    gen.add_argument("--max-think-tokens", type=int)
    gen.add_argument("--batch-size", type=int, default=4, help="prompts per pipeline call")
    gen.add_argument("--workers", type=int, help="generator actors (default: one per GPU, else one)")
    gen.add_argument("--device", default="auto", help=DEVICE_HELP)
    gen.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bf16 on GPU, fp32 on the CPU")
    judge = parser.add_argument_group("judge")
    judge.add_argument("--judge", choices=JUDGES, default="shapes",
                       help="shapes: the palette detector (agrees with the shapes GenEval scorer); chat: a VLM")
    judge.add_argument("--judge-url", help="chat: OpenAI-compatible endpoint, e.g. http://vllm:8000/v1")
    judge.add_argument("--judge-model", help="chat: the judge's model name on that endpoint")
    judge.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="chat: variable holding the key")
    judge.add_argument("--judge-rpm", type=float, help="chat: requests per minute (default: no limit)")
    judge.add_argument("--judge-concurrency", type=int, default=4, help="chat: requests at once")
    judge.add_argument("--judge-cache", help="chat: answer cache folder or s3:// URI (default: <out>/judge-cache)")
    return parser


def make_judge(args: argparse.Namespace):
    """The judge the arguments ask for (ValueError for a chat judge without its endpoint)."""
    from irg.eval.shapes_judge import ChatJudge, ShapesJudge

    if args.judge == "shapes":
        return ShapesJudge()
    from irg.eval.judge import JudgeClient
    from irg.storage import join

    if not args.judge_url or not args.judge_model:
        raise ValueError("--judge chat needs --judge-url and --judge-model")
    client = JudgeClient(args.judge_url, args.judge_model, os.environ.get(args.judge_api_key_env),
                         requests_per_minute=args.judge_rpm, max_concurrency=args.judge_concurrency,
                         cache_dir=args.judge_cache or join(args.out, "judge-cache"))
    return ChatJudge(client)


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        from irg.registry import checkpoint_uri

        check_name(args.prefix, "--prefix")  # part and summary file names: a '/' would leave the mode folders
        system_prompt = args.system_prompt_file.read_text() if args.system_prompt_file else SYSTEM_PROMPT
        judge = make_judge(args)
        draw = ray_drawer(checkpoint_uri(args.model), workers=args.workers, batch_size=args.batch_size,
                          device=args.device, dtype=args.dtype, system_prompt=system_prompt,
                          generation={"height": args.size, "width": args.size, "num_steps": args.steps,
                                      "max_think_tokens": args.max_think_tokens})
        summary = synthesize_from_model(args.out, judge, draw, prompts=args.prompts, seed=args.seed,
                                        system_prompt=system_prompt, prefix=args.prefix,
                                        rows_per_file=args.rows_per_file)
    except (ValueError, FileNotFoundError, PermissionError) as e:  # InvalidRequestError is a ValueError
        print(f"synthesize: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"out": args.out, **asdict(summary)}, indent=2))


if __name__ == "__main__":
    main()
