"""Training configuration: dataclasses read from one YAML file per model size.

A file holds the settings shared by both IRGL stages plus a ``stages`` table whose entries override
them per stage, for example::

    model: {checkpoint: tests/fixtures/bagel_tiny, dtype: float32}
    run: {max_steps: 30}
    stages:
      1: {optim: {warmup_steps: 5}}
      2: {run: {max_steps: 60}}

``--set section.key=value`` on the command line overrides either (values parse as YAML).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field

import torch
import yaml

from irg.data.format import STAGE_WEIGHTS
from irg.data.sequence import PreprocessConfig
from irg.device import resolve_dtype
from irg.model.checkpoint import resolve_model
from irg.names import check_name
from irg.tracking import TrackingConfig


@dataclass
class ModelSettings:
    checkpoint: str = "tests/fixtures/bagel_tiny"  # official BAGEL layout (folder, s3:// or irg:NAME)
    dtype: str = "float32"  # float32 or bfloat16, any spelling irg.device takes (DeepSpeed bf16: fp32 master weights)
    freeze_vit: bool = False
    freeze_und: bool = False  # the understanding expert of the LLM (and the token embeddings / LM head)
    activation_checkpointing: bool = False
    timestep_shift: float = 4.0

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


@dataclass
class DeepSpeedSettings:
    zero_stage: int = 2
    extra: dict = field(default_factory=dict)  # merged into the generated DeepSpeed config

    def build(self, model: ModelSettings, optim: OptimSettings) -> dict:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 0-3, got {self.zero_stage}")
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


@dataclass
class RunSettings:
    name: str = "irgl"  # the Ray Train run name (stage runs add "-stage1" / "-stage2")
    storage: str | None = None  # checkpoint root (folder or s3://); default: s3://<bucket>/runs on the store
    max_steps: int = 2000
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    max_failures: int = 3
    log_every: int = 1
    fault_drill_step: int | None = None  # once per run, the last worker SIGKILLs itself at this step


@dataclass
class TrackingSettings(TrackingConfig):
    """Where to track (:class:`irg.tracking.TrackingConfig`) plus what only training logs."""

    registered_model: str = "irg"
    sample_prompt: str = "a red cube on the left of a blue ball"
    sample_size: int | None = None  # None: the model's default (its generation_config.json, else the pipeline's)
    sample_steps: int | None = None  # None: the model's default
    sample_max_think_tokens: int | None = None  # None: the model's default
    sample_images: bool = True  # at each checkpoint, from the EMA weights (rank 0 holds a full copy)
    peak_tflops: float | None = None  # per worker, for MFU; default: known GPUs, or a measured CPU matmul


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
        self.model.torch_dtype  # noqa: B018 - validates the name early
        check_name(self.run.name, "run.name")  # becomes a storage folder and an MLflow filter value
        for name in ("max_steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self.run, name) < 1:
                raise ValueError(f"run.{name} must be >= 1, got {getattr(self.run, name)}")

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
    """The stage's configuration: the file's shared settings, its ``stages[stage]`` entry, then overrides."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    stages = raw.pop("stages", {}) or {}
    unknown_stages = set(stages) - set(STAGE_WEIGHTS)
    if unknown_stages:
        raise ValueError(f"{path}: stages {sorted(unknown_stages)} do not exist (IRGL has stages 1 and 2)")
    merged = _merge(raw, stages.get(stage, {}) or {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        node = merged
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(value)
    merged["stage"] = stage
    try:
        config = TrainConfig.from_dict(merged)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    # Local paths are relative to where the job starts; Ray Train runs workers in another directory.
    # A packaged model (irg:NAME) becomes its folder, so an unknown name fails here.
    config.model.checkpoint = _absolute(resolve_model(config.model.checkpoint))
    config.data.root = _absolute(config.data.root)
    config.run.storage = _absolute(config.run.storage)
    return config


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
    """A dataclass from a nested dict, naming the first unknown key."""
    if not isinstance(d, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown setting {where + '.' if where else ''}{unknown[0]} "
                         f"(known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in d.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING \
            else fields[name].default
        path = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, path)
        elif isinstance(value, list) and str(fields[name].type).startswith("tuple"):
            kwargs[name] = tuple(value)  # YAML has lists only
        else:
            kwargs[name] = value
    return cls(**kwargs)
