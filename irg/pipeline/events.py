"""Progress events of a generation, for progress bars and streaming servers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class PipelineEvent:
    """One thing that happened while generating.

    kinds: ``think_token`` (``text`` = decoded text so far of this round's think), ``think_done``
    (``text`` = the whole think), ``step`` (``step``/``num_steps`` of the denoising loop, ``detail``
    holding the step's tensors), ``image`` (``image`` = the round's PIL image), ``done``.
    ``prompt_index`` is the position in a batch of prompts (-1 for events about the whole batch).
    """

    kind: str
    round: int
    prompt_index: int = -1
    text: str | None = None
    step: int | None = None
    num_steps: int | None = None
    image: Any = None
    detail: Any = None
