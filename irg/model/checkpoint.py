"""Read and write checkpoints in the official BAGEL layout, from a local folder or an ``s3://`` URI.

Layout: ``llm_config.json``, ``vit_config.json``, ``ema.safetensors`` (the whole unified model),
``ae.safetensors`` (FLUX autoencoder), tokenizer files; optional ``ae_config.json`` (autoencoder
widths, when not the real FLUX ones), ``bagel_config.json`` (latent grid, patch sizes) and
``generation_config.json`` (the model's default generation settings, read by :mod:`irg.pipeline.request`).

A model path is a folder, an ``s3://`` URI or ``irg:NAME``, a model the package ships in
``irg/models/NAME`` (:func:`resolve_model`, which every reader here calls).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from irg import storage
from irg.model.autoencoder import AutoEncoder
from irg.model.bagel import Bagel
from irg.model.config import BagelConfig
from irg.model.safetensors_stream import SafetensorsReader, write_safetensors

PACKAGED_MODELS = Path(__file__).resolve().parent.parent / "models"  # irg/models: what irg:NAME names
PACKAGED_PREFIX = "irg:"
GENERATION_CONFIG = "generation_config.json"
MODEL_CONFIG_FILES = ("llm_config.json", "vit_config.json", "ae_config.json", "bagel_config.json")
REQUIRED_FILES = ("llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors")
TOKENIZER_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", GENERATION_CONFIG, "chat_template.jinja",
)


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it is loaded into; the message names the keys."""


@dataclass
class Pretrained:
    """Everything a checkpoint folder holds, ready to use."""

    model: Bagel
    autoencoder: AutoEncoder
    tokenizer: Any
    config: BagelConfig
    generation_config: dict = field(default_factory=dict)  # generation_config.json as written ({}: none)


def packaged_models() -> list[str]:
    """The names ``irg:NAME`` may take: the model folders installed under ``irg/models``."""
    if not PACKAGED_MODELS.is_dir():
        return []
    return sorted(p.name for p in PACKAGED_MODELS.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def resolve_model(path: str | os.PathLike) -> str:
    """The folder or URI a model path names: ``irg:NAME`` is the package's ``irg/models/NAME``; any
    other path is itself. Every reader of this module calls it, so ``irg:NAME`` works wherever a
    checkpoint path does."""
    path = str(path)
    if not path.startswith(PACKAGED_PREFIX):
        return path
    name = path.removeprefix(PACKAGED_PREFIX)
    known = packaged_models()
    if name not in known:
        installed = f"packaged models: {', '.join(known)}" if known else "no packaged model is installed"
        raise FileNotFoundError(f"model {path} is not installed: {PACKAGED_MODELS} has no folder {name!r} "
                                f"({installed})")
    return str(PACKAGED_MODELS / name)


def read_config(path: str | os.PathLike) -> BagelConfig:
    """The model configuration of a checkpoint, from its JSON files alone (no weights read).

    Checks that every file of the layout is there, so a broken checkpoint fails before any loading.
    """
    path = resolve_model(path)
    for name in REQUIRED_FILES:
        if not storage.exists(storage.join(path, name)):
            raise FileNotFoundError(f"checkpoint {path!r} has no {name} (expected the official BAGEL layout)")
    if not any(all(storage.exists(storage.join(path, f)) for f in files) for files in TOKENIZER_SETS):
        raise FileNotFoundError(f"checkpoint {path!r} has no tokenizer: expected tokenizer.json, "
                                "or vocab.json and merges.txt")
    return BagelConfig.from_checkpoint_dir(_read_configs(path))


def load_pretrained(path: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32,
                    model_weights: dict[str, torch.Tensor] | None = None) -> Pretrained:
    """The checkpoint at ``path``; ``model_weights`` (a full state dict, e.g. trained EMA weights)
    replaces its ``ema.safetensors`` while the autoencoder, tokenizer and configs still come from it."""
    path = resolve_model(path)
    config = read_config(path)
    tokenizer = load_tokenizer(path)
    start_id, end_id = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
    config = dataclasses.replace(config, image_start_token_id=start_id, image_end_token_id=end_id)
    with torch.device("meta"):
        model = Bagel(config)
        autoencoder = AutoEncoder(config.ae)
    if model_weights is None:
        load_weights(model, storage.join(path, "ema.safetensors"), device, dtype)
    else:
        expected = {name: tuple(p.shape) for name, p in model.state_dict(keep_vars=True).items()}
        check_keys(expected, {k: tuple(v.shape) for k, v in model_weights.items()}, "the given model weights")
        for name, tensor in model_weights.items():
            _assign(model, name, tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device))
    load_weights(autoencoder, storage.join(path, "ae.safetensors"), device, dtype)
    model.eval()
    autoencoder.eval().requires_grad_(False)
    return Pretrained(model, autoencoder, tokenizer, config, read_generation_config(path))


def read_generation_config(path: str | os.PathLike) -> dict:
    """The checkpoint's ``generation_config.json`` as written, {} when it has none. What its keys mean
    is the pipeline's business (:meth:`irg.pipeline.GenerationDefaults.from_generation_config`)."""
    return _read_configs(resolve_model(path), (GENERATION_CONFIG,)).get(GENERATION_CONFIG, {})


def _read_configs(path: str, names: tuple[str, ...] = MODEL_CONFIG_FILES) -> dict[str, dict]:
    files = {}
    for name in names:
        uri = storage.join(path, name)
        if storage.exists(uri):
            with storage.open_file(uri, "r") as f:
                try:
                    files[name] = json.load(f)
                except json.JSONDecodeError as e:
                    raise CheckpointError(f"{uri}: invalid JSON ({e})") from None
            if not isinstance(files[name], dict):
                raise CheckpointError(f"{uri}: expected a JSON object, got {type(files[name]).__name__}")
    return files


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's Hugging Face tokenizer (remote files are copied to a temporary folder first)."""
    from transformers import AutoTokenizer

    path = resolve_model(path)
    if not storage.is_remote(path):
        return AutoTokenizer.from_pretrained(path)
    with tempfile.TemporaryDirectory() as tmp:
        for name in TOKENIZER_FILES:
            uri = storage.join(path, name)
            if storage.exists(uri):
                with storage.open_file(uri) as src, open(os.path.join(tmp, name), "wb") as dst:
                    shutil.copyfileobj(src, dst)
        return AutoTokenizer.from_pretrained(tmp)


def load_weights(module: nn.Module, uri: str, device="cpu", dtype: torch.dtype | None = None) -> None:
    """Fill ``module`` (typically built on the meta device) from a safetensors file, tensor by tensor.

    Every key must match: missing keys, unexpected keys and shape mismatches raise
    :class:`CheckpointError` naming them, before any weight is read.
    """
    with storage.open_file(uri, "rb") as f:
        reader = SafetensorsReader(f, uri)
        expected = {name: tuple(p.shape) for name, p in module.state_dict(keep_vars=True).items()}
        names = reader.keys()  # a reader, not a dict: it has no __iter__
        check_keys(expected, {k: reader.shape(k) for k in names}, uri)
        for name in names:
            tensor = reader.get(name)
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            _assign(module, name, tensor.to(device))


def check_keys(expected: dict[str, tuple], found: dict[str, tuple], source: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [f"{k}: checkpoint {found[k]} vs model {expected[k]}"
                  for k in sorted(set(expected) & set(found)) if tuple(found[k]) != tuple(expected[k])]
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            shown = ", ".join(items[:10]) + (f", ... ({len(items)} in all)" if len(items) > 10 else "")
            problems.append(f"{title}: {shown}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))


def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    old = getattr(owner, attr)
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(tensor, requires_grad=old.requires_grad))
    else:
        owner.register_buffer(attr, tensor)


def save_pretrained(
    path: str | os.PathLike, model: Bagel, autoencoder: AutoEncoder, tokenizer, dtype: torch.dtype | None = None,
    generation_config: dict | None = None, overwrite: bool = False,
) -> None:
    """Write the official layout (plus ``ae_config.json`` and ``bagel_config.json``) to a folder or URI,
    and ``generation_config.json`` when ``generation_config`` is not empty.

    The tokenizer is required: a checkpoint without one cannot be loaded. The files are staged and
    moved into place together (:func:`irg.storage.staged_folder`), so a write that fails halfway leaves
    nothing at ``path``; a ``path`` with content is refused unless ``overwrite``.
    """
    config = model.config
    llm = asdict(config.llm) | {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "qk_norm": True, "layer_module": "Qwen2MoTDecoderLayer", "tie_word_embeddings": False,
    }
    bagel = {
        "visual_gen": True, "visual_und": True, "latent_patch_size": config.latent_patch_size,
        "max_latent_size": config.max_latent_size, "vit_max_num_patch_per_side": config.vit_max_num_patch_per_side,
        "connector_act": "gelu_pytorch_tanh", "interpolate_pos": False, "timestep_shift": config.timestep_shift,
        "image_start_token_id": config.image_start_token_id, "image_end_token_id": config.image_end_token_id,
        "vae_image_min_size": config.vae_image_min_size, "vit_image_min_size": config.vit_image_min_size,
    }
    files = [("llm_config.json", llm), ("vit_config.json", config.vit.to_hf_dict()),
             ("ae_config.json", asdict(config.ae)), ("bagel_config.json", bagel)]
    if generation_config:
        files.append((GENERATION_CONFIG, generation_config))
    with storage.staged_folder(path, overwrite=overwrite) as staging:
        for name, content in files:
            with storage.open_file(storage.join(staging, name), "w") as f:
                json.dump(content, f, indent=2)
        for name, module in (("ema.safetensors", model), ("ae.safetensors", autoencoder)):
            with storage.open_file(storage.join(staging, name), "wb") as f:
                write_safetensors(f, module.state_dict(), dtype)
        _save_tokenizer(tokenizer, staging)


def _save_tokenizer(tokenizer, path: str) -> None:
    if not storage.is_remote(path):
        tokenizer.save_pretrained(path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as src, storage.open_file(storage.join(path, name), "wb") as dst:
                shutil.copyfileobj(src, dst)
