"""The main job end to end on one machine, on the embedded defaults (what `make demo` runs).

1. the embedded object store (SeaweedFS on 127.0.0.1) and synthetic IRGL data on it;
2. IRGL stage 1 and stage 2 on the tiny model with Ray Train + DeepSpeed (2 CPU workers), tracked
   in MLflow (sqlite, artifacts on the store); the result registered and promoted to @champion;
3. the registered model evaluated on shapes-world prompts (a Ray Data actor pool draws both rounds,
   the shapes scorer grades each round in GenEval's categories, the report goes to MLflow);
4. the registered model deployed on Ray Serve from ``models:/irgl-demo@champion``, one streamed
   request, its images and texts saved to ``out/demo/``;
5. where to look next.

Run again, it resumes: the data is kept, finished stages return at once.
"""

import argparse
import base64
import json
import socket
import sys
import time
from pathlib import Path

import ray
import requests
from ray import serve

from irg import cli, registry, storage
from irg.data.synth import write_synthetic
from irg.eval.generate import GenerationSettings
from irg.eval.run import EvalConfig, evaluate
from irg.serve.api import parse_sse
from irg.train import load_config, run_irgl

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a red cube on the left of a blue ball"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "demo")
    parser.add_argument("--rows", type=int, default=64, help="synthetic rows per learning mode")
    parser.add_argument("--name", default="irgl-demo", help="run name (the same name resumes)")
    parser.add_argument("--eval-prompts", type=int, default=12, help="shapes-world prompts to evaluate")
    args = parser.parse_args()

    say("object store")
    if cli.main(["store", "up"]) != 0:  # idempotent; makes the embedded store the default
        sys.exit("demo: the embedded object store did not start (see above)")
    config = storage.StoreConfig.load()
    data = config.uri("demo", "irgl-synth")
    if not storage.exists(storage.join(data, "improving_full_learning")):
        write_synthetic(data, rows=args.rows, seed=0, image_size=64)
    print(f"synthetic IRGL data: {data}")

    say("IRGL training: stage 1 (six modes), stage 2 (full modes) with Ray Train + DeepSpeed")
    overrides = [f"data.root={data}", f"run.name={args.name}", f"tracking.registered_model={args.name}",
                 "tracking.experiment=irgl-demo"]
    configs = {stage: load_config(REPO / "jobs" / "configs" / "tiny.yaml", stage, overrides) for stage in (1, 2)}
    ray.init(num_cpus=2, include_dashboard=False)  # worker logs shown: the training progress bars
    results, version = run_irgl(configs, job_name=args.name)
    for stage, result in results.items():
        print(f"stage {stage}: MLflow run {result.run_id}, final loss {result.metrics.get('loss', float('nan')):.3f}, "
              f"model {result.model_uri}")
    registry.promote(version.name, str(version.version), "champion")
    model = f"models:/{version.name}@champion"
    print(f"registered {version.name} version {version.version} and promoted it: {model}")

    say(f"evaluating {model}: round 1 against round 2 on shapes-world prompts")
    generation = GenerationSettings(height=64, width=64, steps=16, rounds=2, max_think_tokens=48)
    evaluation = EvalConfig(model=model, benchmark="shapes", name=f"{args.name}-shapes", limit=args.eval_prompts,
                            generation=generation, batch_size=4)
    evaluate(evaluation)  # prints the table

    say(f"serving {model} on Ray Serve")
    from serve_apps.irg_app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": model, "device": "cpu"}), name="irg", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    body = {"prompt": PROMPT, "size": "64x64", "steps": 16, "rounds": 2, "max_think_tokens": 48, "seed": 0}
    args.out.mkdir(parents=True, exist_ok=True)
    trace = {"prompt": PROMPT, "model": model, "events": []}
    start = time.monotonic()
    with requests.post(f"{url}/v1/images/generations/stream", json=body, stream=True, timeout=300) as response:
        response.raise_for_status()
        for name, event in parse_sse(response.iter_lines(decode_unicode=True)):
            at = time.monotonic() - start
            if name == "think":
                print(f"[{at:5.1f}s] round {event['round']} {'think' if event['round'] == 1 else 'reflection'}: "
                      f"{event['text'][:100]!r}")
            elif name == "image":
                path = args.out / f"round{event['round']}.png"
                path.write_bytes(base64.b64decode(event.pop("b64_png")))
                event["file"] = str(path)
                print(f"[{at:5.1f}s] round {event['round']} image -> {path}")
            elif name == "error":
                sys.exit(f"demo: the server answered an error: {event}")
            trace["events"].append({"event": name, "at_s": round(at, 3), **event})
    (args.out / "trace.json").write_text(json.dumps(trace, indent=2))
    serve.shutdown()
    ray.shutdown()

    say("where to look")
    env = " ".join(f"{k}={v}" for k, v in config.env().items() if k in ("MLFLOW_S3_ENDPOINT_URL",
                                                                         "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
    print(f"images and events:  {args.out}/")
    print(f"MLflow UI:          {env} .venv/bin/mlflow ui --backend-store-uri "
          f"sqlite:///{storage.irg_home()}/mlflow/mlflow.db   (then http://127.0.0.1:5000)")
    print(f"playground:         .venv/bin/serve run serve_apps.irg_app:app model={model} device=cpu   "
          f"(then http://127.0.0.1:8000/)")
    print(f"registry:           .venv/bin/irg registry list {version.name}")
    print(f"evaluation:         .venv/bin/irg eval show {evaluation.name}   (images: {evaluation.output}/samples)")
    print("object store:       .venv/bin/irg store status   (stop it with: .venv/bin/irg store down)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
