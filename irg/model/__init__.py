"""The BAGEL-compatible unified model (plain PyTorch; no Ray here)."""

from irg.model.attention import KVCache
from irg.model.autoencoder import AutoEncoder
from irg.model.bagel import Bagel, ContextBlock, TrainingOutput
from irg.model.batch import PackedBatch
from irg.model.checkpoint import CheckpointError, Pretrained, load_pretrained, save_pretrained
from irg.model.config import AEConfig, BagelConfig, LLMConfig, ViTConfig, get_config


def build_model(config: str | BagelConfig = "tiny") -> Bagel:
    """A freshly initialised model from a preset name (``tiny``, ``bagel-7b``) or a config.

    Build under ``torch.device("meta")`` to get shapes without allocating weights.
    """
    if isinstance(config, str):
        config = get_config(config)
    return Bagel(config)


__all__ = [
    "AEConfig", "AutoEncoder", "Bagel", "BagelConfig", "CheckpointError", "ContextBlock", "KVCache", "LLMConfig",
    "PackedBatch", "Pretrained", "TrainingOutput", "ViTConfig", "build_model", "get_config", "load_pretrained",
    "save_pretrained",
]
