"""Evaluate a model on a benchmark, round 1 against round 2: images on a Ray Data actor pool, saved to
object storage as they are made, scored per round, reported to MLflow.

    ray job submit --working-dir . -- python jobs/evaluate.py --model models:/irg@champion --benchmark geneval \\
        --samples 4 --detector /models/mask2former-swin-s-coco --color-classifier /models/clip-vit-l-14
    ... --benchmark tiif --judge-url http://vllm:8000/v1 --judge-model Qwen/Qwen2.5-VL-72B-Instruct
    ... --benchmark genai_bench --vqa-model /models/qwen2.5-vl-7b-instruct
    ... --benchmark oneig --samples 4 --judge-url http://vllm:8000/v1 --judge-model Qwen/Qwen2.5-VL-7B-Instruct

Submitting again with the same --name resumes: finished samples are kept, the rest are generated, and
the same MLflow run gets the report. Compare two evaluations with `irg eval compare NAME_A NAME_B`.
"""

import argparse
import logging
import sys

from mlflow.exceptions import MlflowException

from irg.device import DTYPE_CHOICES
from irg.eval.benchmarks import BENCHMARKS, SPLITS
from irg.eval.generate import GenerationSettings
from irg.eval.run import EXPERIMENT, EvalConfig, evaluate
from irg.eval.scorer_settings import DEFAULT_SCORER, SCORERS, ScorerSettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder, s3:// URI, irg:NAME or models:/NAME@ALIAS")
    parser.add_argument("--benchmark", default="shapes", help=f"{', '.join(BENCHMARKS)} or a GenEval-format .jsonl")
    parser.add_argument("--split", help="the prompt set of a benchmark with several: "
                        + "; ".join(f"{b}: {' (default) or '.join(s)}" for b, s in SPLITS.items()))
    parser.add_argument("--name", help="evaluation name (default: <benchmark>-<model>, a registered model by its "
                        "version: <benchmark>-<NAME>-v<VERSION>); reuse it to resume")
    parser.add_argument("--output", help="folder or s3:// URI (default: <store>/eval/<name>)")
    parser.add_argument("--limit", type=int, help="first N prompts (shapes: N prompts drawn from --seed)")
    gen = parser.add_argument_group("generation", "settings left out take the model's defaults")
    gen.add_argument("--size", type=int, help="image side in pixels (multiple of 16)")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--rounds", type=int)
    gen.add_argument("--samples", type=int, default=1, help="images per prompt (GenEval's protocol: 4)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--max-think-tokens", type=int)
    gen.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bf16 on GPU, fp32 on the CPU")
    gen.add_argument("--workers", type=int, help="generator actors (default: one per GPU, else one)")
    gen.add_argument("--batch-size", type=int, default=4, help="prompts per pipeline call")
    gen.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    score = parser.add_argument_group("scoring")
    score.add_argument("--scorer", choices=SCORERS, help="default: the benchmark's own (a .jsonl: geneval)")
    score.add_argument("--score-workers", type=int, default=1, help="scoring actors")
    score.add_argument("--detector", help="geneval: local Hugging Face Mask2Former (COCO instance) folder")
    score.add_argument("--color-classifier", help="geneval: local Hugging Face CLIP folder")
    score.add_argument("--vqa-model", help="genai_bench: local Hugging Face image-text-to-text folder for VQAScore "
                       "(without it, a judge that returns log-probabilities stands in, labelled not comparable)")
    score.add_argument("--style-model", help="oneig: folder with CSD, OneIG-StyleEncoder and their reference "
                       "embeddings for the style score (layout: irg/eval/oneig_style.py)")
    score.add_argument("--judge-url", help="wise, tiif, oneig (genai_bench without --vqa-model): OpenAI-compatible "
                       "endpoint, e.g. http://vllm:8000/v1")
    score.add_argument("--judge-model", help="the judge's model name on that endpoint")
    score.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="variable holding the judge's key")
    score.add_argument("--judge-rpm", type=float, help="judge requests per minute (default: no limit)")
    score.add_argument("--judge-concurrency", type=int, default=4)
    score.add_argument("--judge-cache", help="verdict cache folder or s3:// URI (default: <output>/judge-cache)")
    score.add_argument("--judge-template", help="a file with the judge prompt (wise: {prompt}, {explanation}; "
                       "tiif: {questions})")
    parser.add_argument("--experiment", default=EXPERIMENT, help="MLflow experiment")
    return parser


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The evaluation the arguments describe (ValueError for settings that cannot work)."""
    scorer = None
    if args.scorer or args.detector or args.judge_url or args.vqa_model or args.style_model:
        kind = args.scorer or DEFAULT_SCORER.get(args.benchmark, "geneval")
        scorer = ScorerSettings(
            kind=kind, detector=args.detector, color_classifier=args.color_classifier, vqa_model=args.vqa_model,
            style_model=args.style_model, judge_url=args.judge_url,
            judge_model=args.judge_model, judge_api_key_env=args.judge_api_key_env,
            judge_requests_per_minute=args.judge_rpm, judge_concurrency=args.judge_concurrency,
            judge_cache=args.judge_cache, judge_template=args.judge_template, device=args.device)
    generation = GenerationSettings(height=args.size, width=args.size, steps=args.steps, rounds=args.rounds,
                                    samples=args.samples, seed=args.seed, max_think_tokens=args.max_think_tokens,
                                    dtype=args.dtype)
    return EvalConfig(model=args.model, benchmark=args.benchmark, split=args.split, name=args.name, output=args.output,
                      limit=args.limit, generation=generation, scorer=scorer, workers=args.workers,
                      batch_size=args.batch_size, score_workers=args.score_workers, device=args.device,
                      experiment=args.experiment)


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        report = evaluate(cfg)
    except (ValueError, FileNotFoundError, PermissionError, MlflowException) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"report: {report.meta['output']}/report.json; MLflow experiment {cfg.experiment!r}, "
          f"evaluation {report.name!r}, run {report.meta['run_id']}")


if __name__ == "__main__":
    main()
