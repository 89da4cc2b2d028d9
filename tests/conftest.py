"""Shared test helpers: where the tiny checkpoint lives and how to read its golden outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "bagel_tiny"
GOLDEN_DIR = FIXTURE_DIR / "golden"


def load_golden(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and JSON scalars of one golden file, e.g. ``load_golden("irg_turn2")``."""
    tensors = load_file(str(GOLDEN_DIR / f"{name}.safetensors"))
    with open(GOLDEN_DIR / f"{name}.json") as f:
        meta = json.load(f)
    return tensors, meta


def load_case() -> dict:
    with open(FIXTURE_DIR / "case.json") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURE_DIR


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # The goldens were computed with 2 CPU threads; keep results independent of the host's core count.
    torch.set_num_threads(2)
    yield
