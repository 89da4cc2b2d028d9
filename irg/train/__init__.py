"""IRGL training on Ray Train + DeepSpeed.

The driver builds the trainer in :mod:`irg.train.trainer`, every worker runs
:func:`irg.train.loop.train_loop_per_worker`, and :mod:`irg.train.checkpointing` says what a run's
checkpoints hold. Importing this package (the configuration, the checkpoint layout, export) imports
no Ray; only ``trainer`` and ``loop`` do.
"""

from irg.data.plan import DataPlanError
from irg.model.checkpoint import CheckpointError
from irg.names import InvalidName
from irg.train.config import ConfigError, TrainConfig, load_config

# Problems with what the user gave (settings, names, data, checkpoint, storage access), reported without a
# traceback.
INPUT_ERRORS = (ConfigError, InvalidName, DataPlanError, CheckpointError, FileNotFoundError, PermissionError)

__all__ = ["INPUT_ERRORS", "ConfigError", "TrainConfig", "load_config"]
