"""The main job end to end on one machine, on the embedded defaults (what `make demo` runs).

1. the embedded object store (SeaweedFS on 127.0.0.1) and synthetic IRGL data on it;
2. IRGL stage 1 and stage 2 fine-tuning the shipped shapes model (``irg:shapes``) with Ray Train +
   DeepSpeed (2 CPU workers), tracked in MLflow (sqlite, artifacts on the store);
3. the result registered and promoted to @champion;
4. the registered model evaluated on shapes-world prompts (a Ray Data actor pool draws both rounds,
   the shapes scorer grades each round in GenEval's categories, the report goes to MLflow);
5. the registered model deployed on Ray Serve from ``models:/irgl-demo@champion``, one streamed
   request, its images and texts saved to ``out/demo/``;
6. where to look next.

The console shows these steps, a progress bar per long one and the results; Ray's, DeepSpeed's and
MLflow's output goes to ``out/demo/demo.log``. Run again, it resumes: the data is kept, finished
stages return at once, finished samples are not drawn again.
"""

import argparse
import base64
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from irg.console import Bar, Console, first_line, library_output_to
from irg.embedded_store import free_port

REPO = Path(__file__).resolve().parent.parent
BASE_MODEL = "irg:shapes"
PROMPT = "a photo of a red circle to the left of a blue square"
STEPS = 6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "demo")
    parser.add_argument("--rows", type=int, default=64, help="synthetic rows per learning mode")
    parser.add_argument("--name", default="shapes-demo", help="run name (the same name resumes)")
    parser.add_argument("--eval-prompts", type=int, default=24, help="shapes-world prompts to evaluate")
    args = parser.parse_args()
    log_path = args.out / "demo.log"
    with library_output_to(log_path) as terminal:
        log_path = shown(log_path)
        console = Console(STEPS, terminal)
        console.say(f"IRG demo {args.name!r}: fine-tune, register, evaluate and serve the shapes model (5-8 minutes)",
                    indent=False)
        console.say(f"log: {log_path}  (Ray's, DeepSpeed's and MLflow's output, with the workers' logs)",
                    indent=False)
        try:
            demo(args, console)
        except KeyboardInterrupt:
            console.error(f"demo: interrupted; log: {log_path}")
            return 130
        except Exception as e:
            logging.getLogger("demo").exception("the demo failed")
            console.error(f"demo: failed at step {console.index}/{STEPS}: {first_line(e)}\n"
                          f"      details: {log_path}")
            return 1
        finally:
            shutdown_ray()
        console.say(f"done in {console.elapsed()}; log: {log_path}", indent=False)
    return 0


def demo(args: argparse.Namespace, console: Console) -> None:
    """The six steps. Each imports what it uses: after the redirection, since importing Ray, DeepSpeed
    or MLflow alone prints warnings."""
    console.step("object store and synthetic IRGL data")
    store, data, note = object_store_and_data(args.rows)
    console.say(store)
    console.say(f"data: {data} ({note})")

    console.step(f"IRGL fine-tuning of {BASE_MODEL} on Ray Train + DeepSpeed (2 CPU workers): stage 1, then stage 2")
    results, version = train(args.name, data, console)

    console.step("MLflow model registry")
    from irg import registry

    registry.promote(version.name, str(version.version), "champion")
    model = f"models:/{version.name}@champion"
    console.say(f"registered {version.name} version {version.version} and promoted it to @champion: {model}")

    console.step(f"evaluation of {model} on {args.eval_prompts} shapes-world prompts (Ray Data actor pool)")
    evaluation = evaluate(model, args, console)

    console.step(f"Ray Serve: {model}, one streamed request")
    serve_one_request(model, args.out, console)

    console.step("where to look")
    where_to_look(args.out, model, version.name, evaluation, console)


def object_store_and_data(rows: int) -> tuple[str, str, str]:
    """The embedded store up (idempotent; it becomes the default store) and the synthetic data on it.
    Returns the store's status line, the data's URI and what was done about it."""
    from irg import embedded_store, storage
    from irg.data.synth import write_synthetic
    from irg.pipeline.request import model_defaults

    status = embedded_store.up()  # what `irg store up` does
    embedded_store.make_default(status.config)
    data = status.config.uri("demo", "shapes-synth")
    if storage.exists(storage.join(data, "improving_full_learning"), status.config):
        return str(status), data, "kept from an earlier run"
    defaults = model_defaults(BASE_MODEL)  # rows are asked as the model is: its image size and system prompt
    written = write_synthetic(data, rows=rows, seed=0, image_size=defaults.height, system_prompt=defaults.system_prompt)
    return str(status), data, f"{sum(written.values())} rows written"


def train(name: str, data: str, console: Console):
    import ray
    from mlflow import MlflowClient

    from irg.train.config import load_config
    from irg.train.trainer import run_irgl

    overrides = [f"data.root={data}", f"run.name={name}", f"tracking.registered_model={name}",
                 "tracking.experiment=irgl-demo"]
    configs = {stage: load_config(REPO / "jobs" / "configs" / "shapes-finetune.yaml", stage, overrides)
               for stage in (1, 2)}
    context = ray.init(num_cpus=2, include_dashboard=False)  # the workers' logs come to the log file too
    console.say(f"Ray's logs: {context.address_info['session_dir']}/logs")
    bars = [Bar(f"stage {stage}", cfg.run.max_steps, poll=stage_step(cfg), unit="steps")
            for stage, cfg in configs.items()]
    with console.progress(*bars):
        results, version = run_irgl(configs, job_name=name)
    client = MlflowClient()  # run_irgl pointed MLflow at the tracking store
    for stage, result in results.items():
        loss = client.get_run(result.run_id).data.metrics.get("loss", float("nan"))
        console.say(f"stage {stage}: final loss {loss:.3f}  (MLflow run {result.run_id})")
    console.say(f"model: {results[2].model_uri}")
    return results, version


def stage_step(cfg):
    """A poll for a stage's progress as its MLflow run shows it: the last step with a loss, that loss, and
    whether the run has finished since now (a resumed stage shows its old steps at once, then restores and exports)."""
    import mlflow
    from mlflow import MlflowClient

    from irg import tracking

    since_ms, found = int(time.time() * 1000), {}

    def poll():
        if not mlflow.is_tracking_uri_set():  # the job has not configured MLflow yet
            return 0
        client = MlflowClient()
        if "run" not in found:
            exp = client.get_experiment_by_name(cfg.tracking.experiment)
            run = tracking.find_run(client, exp.experiment_id, cfg.run_name) if exp else None
            if run is None:
                return 0
            found["run"] = run.info.run_id
        info = client.get_run(found["run"]).info
        finished = info.status == "FINISHED" and (info.end_time or 0) >= since_ms
        history = client.get_metric_history(found["run"], "loss")
        if not history:
            return 0, "", finished
        last = max(history, key=lambda m: (m.step, m.timestamp))
        saving = ", finishing up" if last.step >= cfg.run.max_steps and not finished else ""
        return last.step, f"loss {last.value:.3f}{saving}", finished

    return poll


def evaluate(model: str, args: argparse.Namespace, console: Console):
    from irg.eval.benchmarks import load_benchmark
    from irg.eval.generate import GenerationSettings, finished_samples
    from irg.eval.report import format_table
    from irg.eval.run import EvalConfig
    from irg.eval.run import evaluate as run_evaluation

    generation = GenerationSettings()  # the model's own defaults (its generation_config.json)
    evaluation = EvalConfig(model=model, benchmark="shapes", name=f"{args.name}-shapes", limit=args.eval_prompts,
                            generation=generation, batch_size=4)
    samples = len(load_benchmark(evaluation.benchmark, evaluation.limit, seed=generation.seed)) * generation.samples
    with console.progress(Bar("generate", samples, poll=lambda: len(finished_samples(evaluation.output)),
                              unit="samples"), Bar("score", None, unit="every round of every sample")):
        report = run_evaluation(evaluation)
    console.say(format_table(report))
    console.say(f"images: {evaluation.output}/samples")
    return evaluation


def serve_one_request(model: str, out: Path, console: Console) -> None:
    import requests
    from ray import serve

    from irg.serve.api import parse_sse
    from irg.serve.options import AppArgs
    from serve_apps.irg_app import build_app

    port = free_port()
    with console.progress(Bar("deploy", None, unit="generator replica loading the model")):
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(AppArgs(model=model, device="cpu")), name="irg", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    console.say(f"serving on {url}; streaming {PROMPT!r}")
    from irg.pipeline.request import model_defaults

    defaults = model_defaults(BASE_MODEL)
    body = {"prompt": PROMPT, "seed": 0}  # everything else: the model's defaults
    out.mkdir(parents=True, exist_ok=True)
    trace = {"prompt": PROMPT, "model": model, "events": []}
    bar = Bar("request", defaults.rounds * (defaults.num_steps - 1), unit="steps")
    start = time.monotonic()
    with console.progress(bar, interval=0.5), \
            requests.post(f"{url}/v1/images/generations/stream", json=body, stream=True, timeout=300) as response:
        response.raise_for_status()
        for name, event in parse_sse(response.iter_lines(decode_unicode=True)):
            at = time.monotonic() - start
            if name == "think":
                kind = "think" if event["round"] == 1 else "reflection"
                console.say(f"[{at:5.1f}s] round {event['round']} {kind}: {event['text'][:60]!r}")
            elif name == "step":
                bar.set(bar.done + 1)
            elif name == "image":
                path = out / f"round{event['round']}.png"
                path.write_bytes(base64.b64decode(event.pop("b64_png")))
                event["file"] = str(path)
                console.say(f"[{at:5.1f}s] round {event['round']} image -> {shown(path)}")
            elif name == "error":
                raise RuntimeError(f"the server answered an error: {event}")
            trace["events"].append({"event": name, "at_s": round(at, 3), **event})
    (out / "trace.json").write_text(json.dumps(trace, indent=2))
    serve.shutdown()


def where_to_look(out: Path, model: str, name: str, evaluation, console: Console) -> None:
    import mlflow

    from irg import storage

    env = " ".join(f"{k}={v}" for k, v in storage.StoreConfig.load().env().items()
                   if k in (storage.MLFLOW_ENDPOINT_ENV, storage.ACCESS_KEY_ENV, storage.SECRET_KEY_ENV))
    console.say(f"images and events:  {shown(out)}/  (round1.png, round2.png, trace.json)")
    console.say(f"MLflow UI:          {env} .venv/bin/mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}")
    console.say("                    (then http://127.0.0.1:5000; experiments irgl-demo and irg-eval)")
    console.say(f"playground:         .venv/bin/serve run serve_apps.irg_app:app model={model} device=cpu")
    console.say("                    (then http://127.0.0.1:8000/)")
    console.say(f"registry:           .venv/bin/irg registry list {name}")
    console.say(f"evaluation:         .venv/bin/irg eval show {evaluation.name}")
    console.say("object store:       .venv/bin/irg store status   (stop it with: .venv/bin/irg store down)")


def shutdown_ray() -> None:
    """Serve and Ray down while the output still goes to the log (their shutdown talks too)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    with contextlib.suppress(Exception):
        from ray import serve

        serve.shutdown()
    ray.shutdown()


def shown(path: Path) -> Path:
    """``path`` relative to the working directory when it is under it: shorter to read and to copy."""
    return path.resolve().relative_to(Path.cwd()) if path.resolve().is_relative_to(Path.cwd()) else path


if __name__ == "__main__":
    sys.exit(main())
