"""Trained EMA weights -> a checkpoint in the official BAGEL layout, streamed tensor by tensor.

Reads only the EMA shards of a training checkpoint (plain torch files, see :mod:`irg.train.checkpointing`),
so it needs neither DeepSpeed nor the training cluster. The shards are memory-mapped and each weight is
put together from its ranks' pieces, cast to the export dtype and written into ``ema.safetensors`` on
its own: the model is never built (only on the meta device, for its names and shapes), so the peak is
about one tensor (:func:`export_peak_bytes`), not two fp32 copies of the model. The autoencoder,
tokenizer, configs and generation defaults (``generation_config.json``) are the base checkpoint's
files, copied as they are. The result loads with ``IRGPipeline.from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Iterable

import pyarrow.fs as pafs
import torch

from irg import storage
from irg.model.bagel import Bagel
from irg.model.checkpoint import MODEL_CONFIG_FILES, TOKENIZER_FILES, check_keys, read_config, resolve_model
from irg.model.safetensors_stream import write_safetensors
from irg.train.checkpointing import ema_shards
from irg.train.ema import assemble_lazily

WEIGHTS_FILE = "ema.safetensors"
BASE_FILES = (*MODEL_CONFIG_FILES, "ae.safetensors", *TOKENIZER_FILES)  # copied from the base as they are
PROCESS_BYTES = 2**30  # the exporting process itself: torch and the store clients, upload buffers


def model_shapes(base: str) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the weights of the base checkpoint's model, in its state-dict order
    (the order the old export wrote), from its configs alone: the model is built on the meta device."""
    config = read_config(resolve_model(base))
    # the image token ids come from the tokenizer (load_pretrained) and shape no weight: any valid id does
    config = dataclasses.replace(config, image_start_token_id=0, image_end_token_id=0)
    with torch.device("meta"):
        model = Bagel(config)
    return {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}


def export_peak_bytes(shapes: Iterable[tuple[int, ...]], dtype: torch.dtype = torch.bfloat16) -> int:
    """The memory an export of weights of these ``shapes`` (:func:`model_shapes`) needs at most: the
    largest weight in ``dtype``, its fp32 pieces mapped in from the shards, and the process itself."""
    largest = max(math.prod(shape) for shape in shapes)
    return PROCESS_BYTES + largest * (dtype.itemsize + torch.float32.itemsize)


def export_checkpoint(filesystem: pafs.FileSystem, checkpoint_path: str, base: str, out: str,
                      dtype: torch.dtype = torch.bfloat16) -> str:
    """Write the EMA of a training checkpoint as a BAGEL checkpoint (folder or URI) at ``out``, its
    floating-point weights in ``dtype`` (the training dtype; float32 keeps the EMA's full precision)."""
    if not dtype.is_floating_point:
        raise ValueError(f"export dtype must be a floating-point dtype, got {dtype}")
    base = resolve_model(base)
    expected = model_shapes(base)
    # Staged, then moved into place whole: an export that fails halfway leaves nothing at ``out`` to be
    # registered; a rerun (a resubmitted job) replaces its own earlier export.
    with storage.staged_folder(out, overwrite=True) as staging, ema_shards(filesystem, checkpoint_path) as shards:
        weights = assemble_lazily(shards, dtype)
        check_keys(expected, {name: t.shape for name, t in weights.items()}, f"the EMA of {checkpoint_path}")
        with storage.open_file(storage.join(staging, WEIGHTS_FILE), "wb") as f:
            write_safetensors(f, {name: weights[name] for name in expected})
        for name in BASE_FILES:
            if storage.exists(storage.join(base, name)):
                with storage.open_file(storage.join(base, name)) as src, \
                        storage.open_file(storage.join(staging, name), "wb") as dst:
                    shutil.copyfileobj(src, dst)
    return out


def export_checkpoint_uri(checkpoint_uri: str, base: str, out: str, dtype: torch.dtype = torch.bfloat16,
                          store: storage.StoreConfig | None = None) -> str:
    """:func:`export_checkpoint` for a checkpoint given as a folder or ``s3://`` URI."""
    filesystem, path = storage.arrow_filesystem(checkpoint_uri, store)
    return export_checkpoint(filesystem, path, base, out, dtype)
