"""IRGL training on Ray Train + DeepSpeed (see :mod:`irg.train.loop` for the worker side)."""

from irg.data.stream import DataPlanError
from irg.model.checkpoint import CheckpointError
from irg.train.config import TrainConfig, load_config
from irg.train.trainer import StageResult, build_trainer, run_irgl, run_stage

# Problems with what the user gave (data, checkpoint, storage access), reported without a traceback.
INPUT_ERRORS = (DataPlanError, CheckpointError, FileNotFoundError, PermissionError)

__all__ = ["INPUT_ERRORS", "StageResult", "TrainConfig", "build_trainer", "load_config", "run_irgl", "run_stage"]
