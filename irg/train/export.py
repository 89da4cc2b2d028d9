"""Trained EMA weights -> a checkpoint in the official BAGEL layout.

Reads only the EMA shards of a training checkpoint (plain torch files, see :mod:`irg.train.ema`),
so it needs neither DeepSpeed nor the training cluster; the autoencoder, tokenizer and configs come
from the checkpoint training started from. The result loads with ``IRGPipeline.from_pretrained``.
"""

from __future__ import annotations

import io
import posixpath

import pyarrow.fs as pafs
import torch

from irg import storage
from irg.model import load_pretrained, save_pretrained
from irg.train.ema import assemble
from irg.train.loop import EMA_DIR


def read_ema(filesystem: pafs.FileSystem, checkpoint_path: str, dtype: torch.dtype = torch.float32) -> dict:
    """The full EMA state dict of a training checkpoint (``filesystem`` + path, as Ray's Checkpoint has)."""
    folder = posixpath.join(checkpoint_path, EMA_DIR)
    infos = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    files = sorted(i.path for i in infos if i.is_file and i.path.endswith(".pt"))
    if not files:
        raise FileNotFoundError(f"checkpoint {checkpoint_path!r} has no EMA shards in {EMA_DIR}/")
    shards = []
    for path in files:
        with filesystem.open_input_file(path) as f:
            shards.append(torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False))
    return assemble(shards, dtype)


def export_checkpoint(filesystem: pafs.FileSystem, checkpoint_path: str, base: str, out: str,
                      dtype: torch.dtype | None = None) -> str:
    """Write the EMA of a training checkpoint as a BAGEL checkpoint (folder or URI) at ``out``."""
    pretrained = load_pretrained(base, model_weights=read_ema(filesystem, checkpoint_path))
    save_pretrained(out, pretrained.model, pretrained.autoencoder, pretrained.tokenizer, dtype=dtype)
    return out


def export_checkpoint_uri(checkpoint_uri: str, base: str, out: str, dtype: torch.dtype | None = None,
                          store: storage.StoreConfig | None = None) -> str:
    """:func:`export_checkpoint` for a checkpoint given as a folder or ``s3://`` URI."""
    filesystem, path = storage.arrow_filesystem(checkpoint_uri, store)
    return export_checkpoint(filesystem, path, base, out, dtype)
