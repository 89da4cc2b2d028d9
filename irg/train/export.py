"""Trained EMA weights -> a checkpoint in the official BAGEL layout.

Reads only the EMA shards of a training checkpoint (plain torch files, see :mod:`irg.train.checkpointing`),
so it needs neither DeepSpeed nor the training cluster; the autoencoder, tokenizer, configs and
generation defaults (``generation_config.json``) come from the checkpoint training started from. The
result loads with ``IRGPipeline.from_pretrained``.
"""

from __future__ import annotations

import pyarrow.fs as pafs
import torch

from irg import storage
from irg.model import load_pretrained, save_pretrained
from irg.train.checkpointing import read_ema


def export_checkpoint(filesystem: pafs.FileSystem, checkpoint_path: str, base: str, out: str,
                      dtype: torch.dtype | None = None) -> str:
    """Write the EMA of a training checkpoint as a BAGEL checkpoint (folder or URI) at ``out``."""
    pretrained = load_pretrained(base, model_weights=read_ema(filesystem, checkpoint_path))
    save_pretrained(out, pretrained.model, pretrained.autoencoder, pretrained.tokenizer, dtype=dtype,
                    generation_config=pretrained.generation_config)
    return out


def export_checkpoint_uri(checkpoint_uri: str, base: str, out: str, dtype: torch.dtype | None = None,
                          store: storage.StoreConfig | None = None) -> str:
    """:func:`export_checkpoint` for a checkpoint given as a folder or ``s3://`` URI."""
    filesystem, path = storage.arrow_filesystem(checkpoint_uri, store)
    return export_checkpoint(filesystem, path, base, out, dtype)
