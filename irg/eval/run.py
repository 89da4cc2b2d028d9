"""An evaluation end to end: prompts, images (resumable), scores per round, report, MLflow.

Everything is keyed by the evaluation's ``name``: its output folder (``<store>/eval/<name>`` by
default) and its MLflow run (tag ``irg.run_key``). Running the same name again skips finished
samples and continues the same run; another checkpoint, other prompts or other settings under a used
name are refused, so one report never mixes two configurations. A registered model is keyed on the
version its alias names when the evaluation starts (and the default name includes it), so promoting
a new version never resumes from the old one's images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field

from irg import storage
from irg.eval.benchmarks import SPLITS, EvalPrompt, load_benchmark
from irg.eval.generate import GenerationSettings, finished_samples, generate_samples, read_image
from irg.eval.report import Report, build_report, format_table, grid_image
from irg.eval.scorer_settings import DEFAULT_SCORER, ScorerSettings
from irg.names import check_name

log = logging.getLogger(__name__)
EXPERIMENT = "irg-eval"
REGISTRY_PREFIX = "models:/"
# Checkpoint files a digest identifies by size and ETag (or modification time) rather than by content.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class EvalConfig:
    model: str  # checkpoint folder, s3:// URI, irg:NAME or models:/NAME@ALIAS
    benchmark: str = "shapes"  # geneval | wise | tiif | genai_bench | oneig | shapes | a GenEval-format .jsonl
    split: str | None = None  # tiif: testmini (default) or full; genai_bench: 1600 (default) or 527
    name: str | None = None  # default (filled in by evaluate()): <benchmark>-<model>, or -<NAME>-v<VERSION>
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
        if self.split is None and self.benchmark in SPLITS:
            self.split = SPLITS[self.benchmark][0]  # one name for the default set, whether given or not
        if self.scorer is None:
            self.scorer = ScorerSettings(kind=DEFAULT_SCORER.get(self.benchmark, "geneval"), device=self.device)
        if self.name is not None:
            check_name(self.name, "--name")  # it becomes a folder and a value in MLflow filter strings
        if self.name is not None and self.output is None:
            store = storage.configured_store()
            self.output = (store.uri(f"eval/{self.name}") if store is not None and store.endpoint_url
                           else str(storage.irg_home() / "eval" / self.name))
        if self.batch_size < 1 or self.score_workers < 1 or (self.workers is not None and self.workers < 1):
            raise ValueError("batch_size, workers and score_workers must be >= 1")


def evaluate(cfg: EvalConfig) -> Report:
    """Generate what is missing, score every round, log the report to MLflow and return it."""
    prompts = checked_prompts(cfg)
    from irg.registry import checkpoint_uri

    model = pinned_model(cfg.model)
    model_path = checkpoint_uri(model)
    if cfg.name is None:
        cfg = dataclasses.replace(cfg, name=default_name(cfg.benchmark, model, cfg.split))
    cfg = dataclasses.replace(cfg, generation=resolve_settings(model_path, cfg.generation))
    checkpoint = model if model.startswith(REGISTRY_PREFIX) else checkpoint_digest(model_path)
    _claim_output(cfg, prompts, checkpoint)
    tracker = _Tracker(cfg)
    import ray

    if not ray.is_initialized():
        ray.init()
    try:
        counts = generate_samples(model_path, prompts, cfg.output, cfg.generation, workers=cfg.workers,
                                  batch_size=cfg.batch_size, device=cfg.device)
        rows = score_samples(cfg, prompts)
        report = build_report(cfg.name, cfg.scorer, prompts, rows, cfg.generation.rounds)
        report.meta.update({"run_id": tracker.run_id, "model": cfg.model, "checkpoint": checkpoint,
                            "benchmark": cfg.benchmark, "split": cfg.split, "output": cfg.output, **counts})
        _write_outputs(cfg, report, rows)
        tracker.log(report, grid_image(cfg.output, prompts, rows, cfg.generation.rounds))
    except BaseException as e:
        tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    tracker.finish("FINISHED")
    print(format_table(report))
    return report


def checked_prompts(cfg: EvalConfig) -> list[EvalPrompt]:
    """The benchmark's prompts, with the scorer built offline and checked against them: a mistake in the
    scorer's settings fails here, not after hours of generation."""
    prompts = load_benchmark(cfg.benchmark, cfg.limit, seed=cfg.generation.seed, split=cfg.split)
    cfg.scorer.check(prompts)
    return prompts


def pinned_model(model: str) -> str:
    """``models:/NAME@ALIAS`` as the version the alias names now (``models:/NAME/VERSION``); any other
    model as given."""
    if not model.startswith(REGISTRY_PREFIX):
        return model
    from irg.registry import model_version

    version = model_version(model)
    return f"{REGISTRY_PREFIX}{version.name}/{version.version}"


def default_name(benchmark: str, model: str, split: str | None = None) -> str:
    """``<benchmark>-<model>`` (``<benchmark>-<split>-<model>`` for a set other than the default), a pinned
    registered model as ``<NAME>-v<VERSION>``."""
    if model.startswith(REGISTRY_PREFIX):
        name, _, version = model.removeprefix(REGISTRY_PREFIX).rpartition("/")
        model = f"{name}-v{version}"
    benchmark = benchmark.rsplit("/", 1)[-1].removesuffix(".jsonl")
    other_set = split is not None and split != SPLITS.get(benchmark, (None,))[0]
    return _slug(f"{benchmark}-{split}-{model}" if other_set else f"{benchmark}-{model}")


def checkpoint_digest(path: str) -> str:
    """sha256 of a checkpoint folder's small files and of its weights' names, sizes and ETags (or
    modification times): a retrained checkpoint at the same path gets a new digest, without reading
    gigabytes of weights."""
    from irg.model.checkpoint import resolve_model

    fs, root = storage.filesystem(resolve_model(path))
    digest = hashlib.sha256()
    for info in sorted(fs.ls(root, detail=True), key=lambda i: i["name"]):
        if info["type"] != "file":
            continue
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(WEIGHT_SUFFIXES):
            stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified")
            digest.update(f"{name} {info['size']} {stamp}\n".encode())
        else:
            digest.update(f"{name} {hashlib.sha256(fs.cat_file(info['name'])).hexdigest()}\n".encode())
    return f"sha256:{digest.hexdigest()}"


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


def _claim_output(cfg: EvalConfig, prompts: list[EvalPrompt], checkpoint: str) -> None:
    """Write ``eval.json``, or check that the one there is this evaluation's: the same ``checkpoint``
    (a pinned registry version or :func:`checkpoint_digest`), prompts and generation settings."""
    uri = storage.join(cfg.output, "eval.json")
    listed = json.dumps([asdict(p) for p in prompts], sort_keys=True).encode()
    claim = {"name": cfg.name, "model": cfg.model, "benchmark": cfg.benchmark, "split": cfg.split, "limit": cfg.limit,
             "checkpoint": checkpoint, "prompts": {"count": len(prompts), "sha256": hashlib.sha256(listed).hexdigest()},
             "generation": asdict(cfg.generation)}
    if storage.exists(uri):
        with storage.open_file(uri, "r") as f:
            existing = json.load(f)
        differs = [f"{key} {old!r} there, {new!r} now" for key, old, new in _changes(existing, claim)]
        if differs:
            raise ValueError(f"{cfg.output} holds evaluation {existing.get('name')!r} of {existing.get('model')!r} "
                             f"made differently ({'; '.join(differs)}): its images are not this evaluation's; "
                             "choose another --name or --output")
        return
    with storage.open_file(uri, "w") as f:
        json.dump(claim, f, indent=2)


def _changes(existing: dict, claim: dict) -> list[tuple[str, object, object]]:
    """(key, there, now) for each value deciding the images that differs (``generation.steps``, ...)."""
    changes = []
    for key in ("checkpoint", "prompts", "generation"):
        old, new = existing.get(key), claim[key]
        if isinstance(old, dict):
            changes += [(f"{key}.{k}", old.get(k), v) for k, v in new.items() if old.get(k) != v]
        elif old != new:
            changes.append((key, old, new))
    return changes


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
        params = {"model": cfg.model, "benchmark": cfg.benchmark, "split": str(cfg.split), "limit": str(cfg.limit),
                  "output": cfg.output,
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
    """``text`` as a name :func:`irg.names.check_name` allows (a model path's ``/`` and ``:`` become ``-``)."""
    return check_name(re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:120] or "eval")
