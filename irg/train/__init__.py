"""IRGL training on Ray Train + DeepSpeed (see :mod:`irg.train.loop` for the worker side)."""

from irg.train.config import TrainConfig, load_config
from irg.train.trainer import StageResult, build_trainer, run_irgl, run_stage

__all__ = ["StageResult", "TrainConfig", "build_trainer", "load_config", "run_irgl", "run_stage"]
