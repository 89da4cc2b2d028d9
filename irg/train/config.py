"""Training configuration: dataclasses read from one YAML file per model size.

A file holds the settings shared by both IRGL stages plus a ``stages`` table whose entries override
them per stage, for example::

    model: {checkpoint: tests/fixtures/bagel_tiny, dtype: float32}
    run: {max_steps: 30}
    stages:
      1: {optim: {warmup_steps: 5}}
      2: {run: {max_steps: 60}}

``--set section.key=value`` on the command line overrides either (values parse as YAML). Every value
is checked when the file loads: it is converted to its field's annotated type (``1e-5``, which YAML
reads as a string, becomes a float; lists become tuples) and held to its range, so a bad setting fails
as one :class:`ConfigError` naming the dotted field before any worker starts. ``run.name`` and
``tracking.registered_model`` become storage folders and MLflow filter values: they take letters,
digits, ``.``, ``_`` and ``-``, starting with a letter or digit (:mod:`irg.names`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field

import torch
import yaml

from irg.data.format import MODES, STAGE_WEIGHTS
from irg.data.sequence import PreprocessConfig
from irg.device import resolve_dtype
from irg.model.checkpoint import resolve_model
from irg.model.latents import TIMESTEP_SAMPLING
from irg.names import check_name
from irg.tracking import TrackingConfig


class ConfigError(ValueError):
    """A training setting of the wrong type or out of its range; the message names the dotted field."""


def _require(ok: bool, name: str, value, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {rule}, got {value!r}")


@dataclass
class ModelSettings:
    checkpoint: str = "tests/fixtures/bagel_tiny"  # official BAGEL layout (folder, s3:// or irg:NAME)
    dtype: str = "float32"  # float32 or bfloat16, any spelling irg.device takes (DeepSpeed bf16: fp32 master weights)
    freeze_vit: bool = False
    freeze_und: bool = False  # the understanding expert of the LLM (and the token embeddings / LM head)
    activation_checkpointing: bool = False
    timestep_shift: float = 4.0
    timestep_sampling: str = "logit_normal"  # or uniform (irg.model.latents.sample_timesteps)

    def __post_init__(self):
        _require(self.timestep_shift > 0, "timestep_shift", self.timestep_shift, "> 0")
        _require(self.timestep_sampling in TIMESTEP_SAMPLING, "timestep_sampling", self.timestep_sampling,
                 f"one of {TIMESTEP_SAMPLING}")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":  # the workers' device is not known here
            raise ValueError("model.dtype: say float32 or bfloat16 (auto is not decided for training)")
        dtype = resolve_dtype(self.dtype, argument="model.dtype")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"model.dtype: training runs in float32 or bfloat16, got {self.dtype!r}")
        return dtype


@dataclass
class OptimSettings:
    """The reference recipe: AdamW, constant LR after a linear warm-up, clipping, EMA."""

    lr: float = 2e-5
    warmup_steps: int = 500
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-15
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ce_weight: float = 1.0
    mse_weight: float = 1.0
    ema_decay: float = 0.995

    def __post_init__(self):
        _require(self.lr > 0, "lr", self.lr, "> 0")
        _require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        _require(all(0 <= b < 1 for b in self.betas), "betas", self.betas, "two numbers in [0, 1)")
        _require(self.eps > 0, "eps", self.eps, "> 0")
        for name in ("weight_decay", "grad_clip", "ce_weight", "mse_weight"):  # grad_clip 0: no clipping
            _require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        _require(self.ce_weight + self.mse_weight > 0, "ce_weight", self.ce_weight, "> 0 when mse_weight is 0")
        _require(0 < self.ema_decay < 1, "ema_decay", self.ema_decay, "between 0 and 1 (exclusive)")


@dataclass
class DataSettings:
    root: str = ""  # folder or s3:// URI with one parquet folder per learning mode
    weights: dict[str, float] | None = None  # per-mode sampling weights; default: the stage's (see STAGE_WEIGHTS)
    mandatory: list[str] = field(default_factory=list)
    expected_tokens: int = 32768  # packed tokens per worker per step
    max_tokens: int = 36864
    max_tokens_per_sample: int = 16384
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    epoch_rows: int | None = None
    shuffle_buffer: int = 256  # records each worker mixes locally: units are whole row groups of one mode
    seed: int = 0
    prepare_concurrency: int = 2  # Ray Data actors decoding and tokenising
    prepare_cpus: float = 1.0  # CPUs each of them reserves
    strict: bool = False

    def __post_init__(self):
        _require(self.expected_tokens >= 1, "expected_tokens", self.expected_tokens, ">= 1")
        _require(self.max_tokens >= self.expected_tokens, "max_tokens", self.max_tokens,
                 f">= expected_tokens ({self.expected_tokens}), the tokens a batch is packed to")
        _require(1 <= self.max_tokens_per_sample <= self.max_tokens, "max_tokens_per_sample",
                 self.max_tokens_per_sample, f"in 1..max_tokens ({self.max_tokens}): one sample must fit a batch")
        _require(self.epoch_rows is None or self.epoch_rows >= 1, "epoch_rows", self.epoch_rows, ">= 1 or null")
        _require(self.shuffle_buffer >= 0, "shuffle_buffer", self.shuffle_buffer, ">= 0")
        _require(self.seed >= 0, "seed", self.seed, ">= 0")
        _require(self.prepare_concurrency >= 1, "prepare_concurrency", self.prepare_concurrency, ">= 1")
        _require(self.prepare_cpus > 0, "prepare_cpus", self.prepare_cpus, "> 0")


@dataclass
class DeepSpeedSettings:
    zero_stage: int = 2
    extra: dict = field(default_factory=dict)  # merged into the generated DeepSpeed config

    def __post_init__(self):
        _require(self.zero_stage in (0, 1, 2, 3), "zero_stage", self.zero_stage, "0, 1, 2 or 3 (a ZeRO stage)")

    def build(self, model: ModelSettings, optim: OptimSettings) -> dict:
        config = {
            "train_micro_batch_size_per_gpu": 1,  # one packed batch per worker per step
            "gradient_accumulation_steps": 1,
            "gradient_clipping": optim.grad_clip,
            "zero_optimization": {"stage": self.zero_stage, "contiguous_gradients": True, "overlap_comm": False},
            "bf16": {"enabled": model.torch_dtype == torch.bfloat16},
            "steps_per_print": 1 << 30,
            "zero_allow_untested_optimizer": True,
        }
        return _merge(config, self.extra)


@dataclass
class ScalingSettings:
    num_workers: int = 2
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1})
    # CPU threads per worker. Ray gives a worker with fewer than 2 CPUs one thread; a CPU-only run with
    # one worker per machine trains faster on all its cores than on two single-thread workers.
    torch_threads: int | None = None

    def __post_init__(self):
        _require(self.num_workers >= 1, "num_workers", self.num_workers, ">= 1")
        _require(all(math.isfinite(v) and v >= 0 for v in self.resources_per_worker.values()),
                 "resources_per_worker", self.resources_per_worker, "amounts >= 0")
        _require(self.use_gpu or not self.resources_per_worker.get("GPU"), "resources_per_worker",
                 self.resources_per_worker, "without GPUs when use_gpu is false")
        _require(self.torch_threads is None or self.torch_threads >= 1, "torch_threads", self.torch_threads,
                 ">= 1 or null")


@dataclass
class RunSettings:
    name: str = "irgl"  # the Ray Train run name (stage runs add "-stage1" / "-stage2"); see irg.names
    storage: str | None = None  # checkpoint root (folder or s3://); default: s3://<bucket>/runs on the store
    max_steps: int = 2000
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    max_failures: int = 3
    log_every: int = 1
    fault_drill_step: int | None = None  # once per run, the last worker SIGKILLs itself at this step

    def __post_init__(self):
        check_name(self.name, "name")  # becomes a storage folder and an MLflow filter value
        for name in ("max_steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        _require(self.max_failures >= -1, "max_failures", self.max_failures, ">= 0, or -1 for no limit")
        _require(self.fault_drill_step is None or 1 <= self.fault_drill_step <= self.max_steps, "fault_drill_step",
                 self.fault_drill_step, f"in 1..max_steps ({self.max_steps}) or null")


@dataclass
class TrackingSettings(TrackingConfig):
    """Where to track (:class:`irg.tracking.TrackingConfig`) plus what only training logs."""

    registered_model: str = "irg"  # a name as irg.names allows
    sample_prompt: str = "a red cube on the left of a blue ball"
    sample_size: int | None = None  # None: the model's default (its generation_config.json, else the pipeline's)
    sample_steps: int | None = None  # None: the model's default
    sample_max_think_tokens: int | None = None  # None: the model's default
    sample_images: bool = True  # at each checkpoint, from the EMA weights (rank 0 holds a full copy)
    score_prompts: int = 0  # with sample_images, round 1 of this many shapes-world prompts scored at each checkpoint
    peak_tflops: float | None = None  # per worker, for MFU; default: known GPUs, or a measured CPU matmul
    outage_drill_step: int | None = None  # rank 0's logging of this step goes to a closed port (an MLflow outage)

    def __post_init__(self):
        check_name(self.registered_model, "registered_model")  # an MLflow filter value
        _require(bool(self.sample_prompt.strip()), "sample_prompt", self.sample_prompt, "a non-empty prompt")
        _require(self.score_prompts >= 0, "score_prompts", self.score_prompts, ">= 0")
        for name in ("sample_size", "sample_steps", "sample_max_think_tokens"):  # the model's bounds: preflight
            value = getattr(self, name)
            _require(value is None or value >= 1, name, value, ">= 1 or null")
        _require(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops", self.peak_tflops, "> 0 or null")


@dataclass
class TrainConfig:
    stage: int = 1
    model: ModelSettings = field(default_factory=ModelSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    data: DataSettings = field(default_factory=DataSettings)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    run: RunSettings = field(default_factory=RunSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    # Filled in by the driver: the MLflow runs this stage logs to.
    mlflow_run_id: str | None = None
    mlflow_parent_run_id: str | None = None

    def __post_init__(self):
        if self.stage not in STAGE_WEIGHTS:
            raise ValueError(f"stage must be one of {sorted(STAGE_WEIGHTS)}, got {self.stage}")
        if self.data.weights is None:
            self.data.weights = dict(STAGE_WEIGHTS[self.stage])
        weights = self.data.weights
        unknown = sorted(set(weights) - set(MODES))
        _require(not unknown, "data.weights", weights, f"keyed by the modes {list(MODES)} ({unknown} is not one)")
        _require(all(math.isfinite(w) and w >= 0 for w in weights.values()) and any(weights.values()),
                 "data.weights", weights, "weights >= 0, at least one of them positive")
        _require(all(weights.get(m, 0) > 0 for m in self.data.mandatory), "data.mandatory", self.data.mandatory,
                 "modes with a positive weight")
        self.model.torch_dtype  # noqa: B018 - validates the name early

    @property
    def run_name(self) -> str:
        return f"{self.run.name}-stage{self.stage}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return _build(cls, d, "")

    def flat(self) -> dict[str, str]:
        """Dotted keys -> values, for MLflow params."""
        out = {}

        def walk(prefix, value):
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = str(value)

        walk("", {k: v for k, v in self.to_dict().items() if not k.startswith("mlflow_")})
        return out


def load_config(path: str | os.PathLike, stage: int, overrides: list[str] = ()) -> TrainConfig:
    """The stage's configuration: the file's shared settings, its ``stages[stage]`` entry, then overrides.
    A bad file, override or setting is a :class:`ConfigError` starting with the file's path."""
    try:
        return _load(path, stage, overrides)
    except (ConfigError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {' '.join(str(e).split())}") from None


def _load(path, stage: int, overrides) -> TrainConfig:
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError("expected a mapping at the top level")
    stages = raw.pop("stages", {}) or {}
    if not isinstance(stages, dict) or not all(isinstance(v, dict | None) for v in stages.values()):
        raise ConfigError(f"stages must map a stage to its settings, got {stages!r}")
    unknown_stages = set(stages) - set(STAGE_WEIGHTS)
    if unknown_stages:
        raise ConfigError(f"stages {sorted(unknown_stages)} do not exist (IRGL has stages 1 and 2)")
    merged = _merge(raw, stages.get(stage) or {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        node = merged
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: {value!r} does not parse as YAML (quote a string)") from None
    merged["stage"] = stage
    config = TrainConfig.from_dict(merged)
    # Local paths are relative to where the job starts; Ray Train runs workers in another directory.
    # A packaged model (irg:NAME) becomes its folder, so an unknown name fails here.
    config.model.checkpoint = _absolute(resolve_model(config.model.checkpoint))
    config.data.root = _absolute(config.data.root)
    config.run.storage = _absolute(config.run.storage)
    return config


def name_override(name: str) -> str:
    """The override a job's ``--name`` stands for: checked (:mod:`irg.names`), then quoted so that YAML
    keeps a name such as ``2024`` or ``no`` a string."""
    return f"run.name='{check_name(name, '--name')}'"


def _absolute(path: str | None) -> str | None:
    if not path or "://" in path:
        return path
    return os.path.abspath(path)


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _build(cls, d: dict, where: str):
    """A dataclass from a nested dict, each value converted to its field's type; a ConfigError names the
    first unknown key, wrong type or value out of range by its dotted path."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown setting {where + '.' if where else ''}{unknown[0]} "
                          f"(known: {', '.join(sorted(known))})")
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}" if where else name) for name, value in d.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:  # the section's own checks name its fields without the section
        raise ConfigError(f"{where}.{e}" if where else str(e)) from None


def _coerce(value, hint, path: str):
    """``value`` as the annotated type ``hint``: YAML 1.1 reads ``1e-5`` as a string and has no tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, path)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if hint is bool and isinstance(value, bool) or hint is str and isinstance(value, str):
        return value
    if hint in (int, float):
        number = _number(value)
        if number is not None and (hint is float and math.isfinite(number) or hint is int and number % 1 == 0):
            return hint(number)
    elif (origin or hint) is dict and isinstance(value, dict):
        if not args:
            return value
        return {_coerce(k, args[0], f"{path} key"): _coerce(v, args[1], f"{path}.{k}") for k, v in value.items()}
    elif origin is list and isinstance(value, (list, tuple)):
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple and isinstance(value, (list, tuple)) and len(value) == len(args):
        return tuple(_coerce(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, args)))
    raise ConfigError(f"{path}: expected {_type_name(hint)}, got {value!r}")


def _number(value) -> int | float | None:
    """An int or float, or a string spelling one (``"1e-5"``); None for anything else (booleans too)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value)
            except ValueError:
                pass
    return None


def _type_name(hint) -> str:
    return hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else str(hint)
