"""An evaluation end to end: prompts, images (resumable), scores per round, report, MLflow.

Everything is keyed by the evaluation's ``name``: its output folder (``<store>/eval/<name>`` by
default) and its MLflow run (tag ``irg.run_key``). Running the same name again skips finished
samples and continues the same run; a different model or different settings under a used name are
refused, so one report never mixes two configurations.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import asdict, dataclass, field

from irg import storage
from irg.eval.benchmarks import EvalPrompt, load_benchmark
from irg.eval.generate import GenerationSettings, finished_samples, generate_samples, read_image
from irg.eval.report import Report, build_report, format_table, grid_image
from irg.eval.scorer_settings import DEFAULT_SCORER, ScorerSettings

log = logging.getLogger(__name__)
EXPERIMENT = "irg-eval"


@dataclass
class EvalConfig:
    model: str  # checkpoint folder, s3:// URI, irg:NAME or models:/NAME@ALIAS
    benchmark: str = "shapes"  # geneval | wise | shapes | a GenEval-format .jsonl
    name: str | None = None  # default: <benchmark>-<model>
    output: str | None = None  # default: <store>/eval/<name>, else $IRG_HOME/eval/<name>
    limit: int | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)  # None: the model's
    scorer: ScorerSettings | None = None  # default: the benchmark's own
    workers: int | None = None  # generator actors (default: one per GPU, else one)
    batch_size: int = 4
    score_workers: int = 1
    device: str = "auto"
    experiment: str = EXPERIMENT

    def __post_init__(self):
        if self.name is None:
            self.name = _slug(f"{self.benchmark.rsplit('/', 1)[-1].removesuffix('.jsonl')}-{self.model}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError(f"name: {self.name!r} must be letters, digits, '.', '_' or '-'")
        if self.scorer is None:
            self.scorer = ScorerSettings(kind=DEFAULT_SCORER.get(self.benchmark, "geneval"), device=self.device)
        if self.output is None:
            store = storage.configured_store()
            self.output = (store.uri(f"eval/{self.name}") if store is not None and store.endpoint_url
                           else str(storage.irg_home() / "eval" / self.name))
        if self.batch_size < 1 or self.score_workers < 1 or (self.workers is not None and self.workers < 1):
            raise ValueError("batch_size, workers and score_workers must be >= 1")


def evaluate(cfg: EvalConfig) -> Report:
    """Generate what is missing, score every round, log the report to MLflow and return it."""
    prompts = load_benchmark(cfg.benchmark, cfg.limit, seed=cfg.generation.seed)
    cfg.scorer.check()
    from irg.registry import checkpoint_uri

    model_path = checkpoint_uri(cfg.model)
    cfg = dataclasses.replace(cfg, generation=resolve_settings(model_path, cfg.generation))
    _claim_output(cfg)
    tracker = _Tracker(cfg)
    import ray

    if not ray.is_initialized():
        ray.init()
    try:
        counts = generate_samples(model_path, prompts, cfg.output, cfg.generation, workers=cfg.workers,
                                  batch_size=cfg.batch_size, device=cfg.device)
        rows = score_samples(cfg, prompts)
        report = build_report(cfg.name, cfg.scorer.kind, cfg.scorer.overall, prompts, rows,
                              cfg.generation.rounds)
        report.meta.update({"run_id": tracker.run_id, "model": cfg.model, "benchmark": cfg.benchmark,
                            "output": cfg.output, **counts})
        _write_outputs(cfg, report, rows)
        tracker.log(report, grid_image(cfg.output, prompts, rows, cfg.generation.rounds))
    except BaseException as e:
        tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    tracker.finish("FINISHED")
    print(format_table(report))
    return report


def score_samples(cfg: EvalConfig, prompts: list[EvalPrompt]) -> list[dict]:
    """Score every round of every finished sample on ``score_workers`` Ray Data actors."""
    import ray

    expected = [(p.id, k) for p in prompts for k in range(cfg.generation.samples)]
    missing = set(expected) - finished_samples(cfg.output)
    if missing:
        raise RuntimeError(f"{len(missing)} samples are missing under {cfg.output} after generation")
    items = [{"prompt_id": p, "sample": k, "round": r} for p, k in expected for r in range(cfg.generation.rounds)]
    gpus = int(ray.cluster_resources().get("GPU", 0)) if cfg.scorer.gpus else 0
    dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 16, 64)))
    scored = dataset.map_batches(
        ImageScorer, batch_size=16, compute=ray.data.ActorPoolStrategy(size=cfg.score_workers),
        fn_constructor_kwargs={"spec": cfg.scorer, "output": cfg.output, "prompts": prompts,
                               "cache": storage.join(cfg.output, "judge-cache")},
        **({"num_gpus": 1} if gpus else {"num_cpus": 1}))
    rows = list(scored.iter_rows())
    for row in rows:
        row["details"] = json.loads(row["details"])
    return sorted(rows, key=lambda r: (r["prompt_id"], r["sample"], r["round"]))


class ImageScorer:
    """A scoring actor: reads the images of a batch of (prompt, sample, round) rows and scores them."""

    def __init__(self, spec: ScorerSettings, output: str, prompts: list[EvalPrompt], cache: str):
        self.scorer = spec.build(cache)
        self.output = output
        self.prompts = {p.id: p for p in prompts}

    def __call__(self, batch) -> dict[str, list]:
        keys = list(zip(batch["prompt_id"], batch["sample"], batch["round"]))
        items = [(self.prompts[str(p)], read_image(self.output, str(p), int(k), int(r))) for p, k, r in keys]
        verdicts = self.scorer.score(items)
        return {"prompt_id": [str(p) for p, _, _ in keys], "sample": [int(k) for _, k, _ in keys],
                "round": [int(r) + 1 for _, _, r in keys], "score": [v.score for v in verdicts],
                "details": [json.dumps(v.details) for v in verdicts]}


def resolve_settings(model_path: str, settings: GenerationSettings) -> GenerationSettings:
    """The settings with the model's defaults in place of None, checked against its config before any
    worker starts: what the evaluation stores and reports names every value it generated with."""
    from irg.model.checkpoint import read_config
    from irg.pipeline import model_defaults, validate_request

    config = read_config(model_path)
    request = validate_request(config, "a prompt", height=settings.height, width=settings.width,
                               num_steps=settings.steps, rounds=settings.rounds,
                               max_think_tokens=settings.max_think_tokens, think_temperature=settings.think_temperature,
                               defaults=model_defaults(model_path, config))
    return dataclasses.replace(settings, height=request.height, width=request.width, steps=request.num_steps,
                               rounds=request.rounds, max_think_tokens=request.max_think_tokens,
                               think_temperature=request.think_temperature)


def _claim_output(cfg: EvalConfig) -> None:
    """Write ``eval.json`` (model, benchmark, settings), or check that the one there matches."""
    uri = storage.join(cfg.output, "eval.json")
    claim = {"name": cfg.name, "model": cfg.model, "benchmark": cfg.benchmark, "limit": cfg.limit,
             "generation": asdict(cfg.generation)}
    if storage.exists(uri):
        with storage.open_file(uri, "r") as f:
            existing = json.load(f)
        differs = sorted(k for k in claim if existing.get(k) != claim[k])
        if differs:
            raise ValueError(f"{cfg.output} holds evaluation {existing.get('name')!r} with a different "
                             f"{', '.join(differs)} ({', '.join(f'{k}={existing.get(k)!r}' for k in differs)}); "
                             "choose another --name or --output")
        return
    with storage.open_file(uri, "w") as f:
        json.dump(claim, f, indent=2)


def _write_outputs(cfg: EvalConfig, report: Report, rows: list[dict]) -> None:
    with storage.open_file(storage.join(cfg.output, "report.json"), "w") as f:
        json.dump(report.to_dict(), f, indent=2)
    with storage.open_file(storage.join(cfg.output, "scores.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


class _Tracker:
    """The evaluation's MLflow run: params at the start, the report when it is done."""

    def __init__(self, cfg: EvalConfig):
        from mlflow import MlflowClient

        from irg import tracking

        store = storage.configured_store()
        uri = tracking.configure(store=store)
        client = MlflowClient(uri)
        experiment = tracking.experiment_id(client, tracking.TrackingConfig(experiment=cfg.experiment), store)
        tags = {"irg.eval.model": cfg.model, "irg.eval.benchmark": cfg.benchmark, "irg.eval.scorer": cfg.scorer.kind}
        self.logger = tracking.RunLogger(uri, tracking.find_or_create_run(client, experiment, cfg.name, tags=tags))
        self.run_id = self.logger.run_id
        params = {"model": cfg.model, "benchmark": cfg.benchmark, "limit": str(cfg.limit), "output": cfg.output,
                  "scorer": cfg.scorer.kind, **{f"generation.{k}": str(v) for k, v in asdict(cfg.generation).items()}}
        self.logger.log_params(params)
        log.info("MLflow run %s (experiment %s)", self.run_id, cfg.experiment)

    def log(self, report: Report, grid) -> None:
        self.logger.log_metrics(report.metrics(), step=0)
        self.logger.log_dict(report.to_dict(), "report.json")
        self.logger.log_image(grid, "grid.png")

    def finish(self, status: str) -> None:
        self.logger.finish(status)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:120] or "eval"
