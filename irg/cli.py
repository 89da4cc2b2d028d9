"""``irg`` command line: ``irg generate`` runs the IRG generator and writes one PNG per round."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from irg.device import DEVICE_HELP, DTYPE_CHOICES

DEBUG_ENV = "IRG_DEBUG"  # set: a user error shows its traceback too


class UsageError(ValueError):
    """An argument the command cannot use (reported in one line, like the pipeline's InvalidRequestError)."""


def parse_size(text: str) -> tuple[int, int]:
    """``1024`` or ``WIDTHxHEIGHT`` -> (width, height)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or WIDTHxHEIGHT, got {text!r}") from None
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise argparse.ArgumentTypeError(f"size must be N or WIDTHxHEIGHT, got {text!r}")


def positive_int(text: str) -> int:
    """An argument that counts something: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="irg", description="Interleaving Reasoning Generation")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="think, draw, reflect and draw again for one prompt")
    gen.add_argument("--model", required=True, help="checkpoint folder or s3:// URI in the official BAGEL layout, "
                     "or irg:NAME (a model the package ships, e.g. irg:shapes)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--out", required=True, type=Path, help="output folder (round PNGs + trace.json)")
    # Generation settings left unset take the model's defaults (its generation_config.json, else
    # irg.pipeline.DEFAULTS); the CLI does not restate them (nor import torch to print them).
    gen.add_argument("--size", type=parse_size, help="N or WIDTHxHEIGHT, multiples of 16")
    gen.add_argument("--steps", type=int, help="flow timesteps per image")
    gen.add_argument("--rounds", type=int, help="images to draw; round 2+ follow a reflection")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="auto", help=DEVICE_HELP)
    gen.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bf16 on CUDA, fp32 on the CPU")
    gen.add_argument("--max-think-tokens", type=int, help="think budget per round")
    gen.add_argument("--think-temperature", type=float)
    gen.set_defaults(func=generate)
    gen.epilog = ("Settings of `irg generate` left out take the model's defaults: its generation_config.json, "
                  "else the pipeline's (irg.pipeline.DEFAULTS).")

    store = commands.add_parser("store", help="the embedded S3-compatible object store (SeaweedFS on 127.0.0.1)")
    store_commands = store.add_subparsers(dest="store_command", required=True)
    for name, func, text in (("up", store_up, "start it (idempotent) and make it the default store"),
                             ("down", store_down, "stop it (idempotent); the data stays"),
                             ("status", store_status, "say whether it runs and answers")):
        sub = store_commands.add_parser(name, help=text)
        sub.add_argument("--data-dir", type=Path, default=None, help="default: $IRG_HOME/store (~/.irg/store)")
        if name == "up":
            sub.add_argument("--port", type=int, default=8333, help="S3 port on 127.0.0.1")
            sub.add_argument("--bucket", default=None, help="bucket to create (default: $IRG_BUCKET or irg)")
        sub.set_defaults(func=func)

    data = commands.add_parser("data", help="IRGL training data")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    synth = data_commands.add_parser("synth", help="write synthetic IRGL data (all six modes)")
    synth.add_argument("--out", required=True, help="folder or s3:// URI")
    synth.add_argument("--rows", type=positive_int, required=True, help="rows per mode")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=256)
    synth.set_defaults(func=data_synth)
    imp = data_commands.add_parser("import", help="validate and copy an IRGL folder, writing a manifest")
    imp.add_argument("src", help="folder or s3:// URI with one folder per mode")
    imp.add_argument("dst", help="folder or s3:// URI")
    imp.add_argument("--strict", action="store_true", help="stop at the first invalid row")
    imp.set_defaults(func=data_import)
    stats = data_commands.add_parser("stats", help="rows per mode (from the manifest, or parquet footers)")
    stats.add_argument("uri")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(func=data_stats)

    registry = commands.add_parser("registry", help="IRG models in the MLflow model registry "
                                   "($MLFLOW_TRACKING_URI, default sqlite under $IRG_HOME/mlflow)")
    registry_commands = registry.add_subparsers(dest="registry_command", required=True)
    listing = registry_commands.add_parser("list", help="registered models, versions and aliases")
    listing.add_argument("name", nargs="?", help="one registered model (default: all)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=registry_list)
    promote = registry_commands.add_parser("promote", help="point an alias (default champion) at a version")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("--alias", default="champion")
    promote.set_defaults(func=registry_promote)
    register = registry_commands.add_parser("register", help="log a BAGEL-layout checkpoint and register it")
    register.add_argument("model", help="checkpoint folder, s3:// URI or irg:NAME")
    register.add_argument("name", help="registered model name")
    register.set_defaults(func=registry_register)

    evaluation = commands.add_parser("eval", help="evaluation reports (the runs jobs/evaluate.py logs to MLflow)")
    eval_commands = evaluation.add_subparsers(dest="eval_command", required=True)
    compare = eval_commands.add_parser("compare", help="two evaluations side by side, round by round")
    for run in ("run_a", "run_b"):
        compare.add_argument(run, help="MLflow run id or evaluation name (its --name)")
    compare.add_argument("--experiment", default="irg-eval", help="where names are looked up")
    compare.add_argument("--json", action="store_true")
    compare.set_defaults(func=eval_compare)
    show = eval_commands.add_parser("show", help="an evaluation's report, or several laid out like the paper's table")
    show.add_argument("runs", nargs="+", metavar="run", help="MLflow run id or evaluation name; several (a model's "
                      "GenEval, WISE, TIIF, GenAI-Bench and OneIG-EN runs, of one or more models) make one table")
    show.add_argument("--paper", action="store_true", help="the paper's table even for one run")
    show.add_argument("--experiment", default="irg-eval")
    show.set_defaults(func=eval_show)
    return parser


def _registry():
    from irg import registry, tracking

    tracking.configure()
    return registry


def registry_list(args: argparse.Namespace) -> int:
    rows = _registry().list_models(args.name)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<24} {'version':>7}  {'aliases':<20} {'status':<10} run")
    for r in rows:
        print(f"{r['name']:<24} {r['version']:>7}  {','.join(r['aliases']) or '-':<20} {r['status']:<10} {r['run_id']}")
    return 0


def registry_promote(args: argparse.Namespace) -> int:
    version = _registry().promote(args.name, args.version, args.alias)
    print(f"{args.name}@{args.alias} -> version {version.version} (models:/{args.name}@{args.alias})")
    return 0


def registry_register(args: argparse.Namespace) -> int:
    version = _registry().log_model(args.model, args.name)
    print(f"registered {version.name} version {version.version} (models:/{version.name}/{version.version})")
    return 0


def eval_compare(args: argparse.Namespace) -> int:
    from irg.eval.report import compare_table, load_run_report

    a, b = (load_run_report(run, args.experiment) for run in (args.run_a, args.run_b))
    print(json.dumps({"a": a.to_dict(), "b": b.to_dict()}, indent=2) if args.json else compare_table(a, b))
    return 0


def eval_show(args: argparse.Namespace) -> int:
    from irg.eval.report import format_table, load_run_report, paper_table

    reports = [load_run_report(run, args.experiment) for run in args.runs]
    print(paper_table(reports) if args.paper or len(reports) > 1 else format_table(reports[0]))
    return 0


def generate(args: argparse.Namespace) -> int:
    import hashlib
    from dataclasses import asdict

    from tqdm import tqdm

    from irg.device import resolve_device, resolve_dtype
    from irg.model.checkpoint import read_config
    from irg.pipeline import IRGPipeline, model_defaults, validate_request

    width, height = args.size or (None, None)
    # Everything that can be checked without the weights is checked before loading them.
    try:
        device = resolve_device(args.device, "--device")
        dtype = resolve_dtype(args.dtype, device, "--dtype")
    except ValueError as e:
        raise UsageError(str(e)) from None
    config = read_config(args.model)
    request = validate_request(config, args.prompt, height=height, width=width, num_steps=args.steps,
                               rounds=args.rounds, seed=args.seed, max_think_tokens=args.max_think_tokens,
                               think_temperature=args.think_temperature, defaults=model_defaults(args.model, config))
    pipe = IRGPipeline.from_pretrained(args.model, device=device, dtype=dtype)
    bar = tqdm(total=request.rounds * (request.num_steps - 1), unit="step", desc="round 1: thinking")

    def on_event(event):
        if event.kind == "think_token":
            bar.set_description(f"round {event.round + 1}: thinking ({len(event.text)} chars)", refresh=False)
        elif event.kind == "step":
            bar.set_description(f"round {event.round + 1}: drawing", refresh=False)
            bar.update(1)
        elif event.kind == "think_done":
            preview = event.text if len(event.text) <= 200 else event.text[:200] + "..."
            bar.write(f"round {event.round + 1} think: {preview!r}")

    (out,) = pipe.generate(request, callback=on_event)
    bar.close()
    args.out.mkdir(parents=True, exist_ok=True)
    files = []
    for r, image in enumerate(out.images):
        path = args.out / f"round{r + 1}.png"
        image.save(path)
        files.append(path.name)
    trace = {
        "prompt": args.prompt,
        "model": str(args.model),
        "settings": {"width": request.width, "height": request.height, "steps": request.num_steps,
                     "rounds": request.rounds, "seed": out.seed, "device": str(device),
                     "dtype": str(dtype).removeprefix("torch."), "max_think_tokens": request.max_think_tokens,
                     "think_temperature": request.think_temperature, "vae_transform": request.vae_transform,
                     "vit_transform": request.vit_transform,
                     "round_settings": [asdict(s) for s in request.round_settings],
                     "system_prompt_sha256": hashlib.sha256(request.system_prompt.encode()).hexdigest()},
        "texts": out.texts,
        "images": files,
        "timings_s": out.timings,
    }
    (args.out / "trace.json").write_text(json.dumps(trace, indent=2))
    print(f"wrote {', '.join(files)} and trace.json to {args.out}")
    return 0


def store_up(args: argparse.Namespace) -> int:
    from irg import embedded_store

    config = embedded_store.local_config(args.port, args.bucket) if args.bucket else None
    status = embedded_store.up(args.data_dir, config=config, s3_port=args.port)
    print(status)
    if args.data_dir is None:  # the default store becomes every command's default
        client = embedded_store.make_default(status.config)
        print(f"client settings in {client} (used when no other store is configured); for other tools:")
        for key, value in status.config.env().items():
            print(f"  export {key}={value}")
    return 0


def store_down(args: argparse.Namespace) -> int:
    from irg import embedded_store

    print(embedded_store.down(args.data_dir))
    if args.data_dir is None:
        embedded_store.forget_default()
    return 0


def store_status(args: argparse.Namespace) -> int:
    from irg import embedded_store

    status = embedded_store.status(args.data_dir)
    print(status)
    return 0 if status.healthy else 1


def data_synth(args: argparse.Namespace) -> int:
    from irg.data.synth import write_synthetic

    written = write_synthetic(args.out, rows=args.rows, seed=args.seed, image_size=args.image_size)
    print(f"wrote {sum(written.values())} rows ({args.rows} per mode, {len(written)} modes) to {args.out}")
    return 0


def data_import(args: argparse.Namespace) -> int:
    from irg.data.manifest import format_stats, import_dataset

    manifest = import_dataset(args.src, args.dst, strict=args.strict)
    print(format_stats(manifest))
    return 0


def data_stats(args: argparse.Namespace) -> int:
    from irg.data.manifest import dataset_stats, format_stats

    stats = dataset_stats(args.uri)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from irg.embedded_store import StoreError
    from irg.model import CheckpointError

    # Errors about the user's input end the command with a one-line message: the library raises
    # ValueError (and its kinds: RowError, InvalidName, InvalidRequestError...) for a value it cannot
    # use. Anything else is a bug and keeps its traceback; IRG_DEBUG=1 keeps it for these too.
    user_errors = (ValueError, CheckpointError, StoreError, FileNotFoundError, FileExistsError, PermissionError)
    try:
        from mlflow.exceptions import MlflowException  # unknown model or version, bad tracking URI

        user_errors += (MlflowException,)
    except ImportError:  # installed without the cluster extra
        pass
    try:
        return args.func(args)
    except user_errors as e:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"irg {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
