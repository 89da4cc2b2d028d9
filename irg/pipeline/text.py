"""Choosing the next token of a think text."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def next_tokens(logits: torch.Tensor, temperatures: float | Sequence[float],
                generators: Sequence[torch.Generator]) -> list[int]:
    """One token per row of logits [B, V]: greedy at temperature 0, else sampled with row i's generator
    (on the CPU, so a seed gives the same text on any device). ``temperatures``: one for all rows or
    one per row (rows of different requests share a decode step)."""
    if isinstance(temperatures, (int, float)):
        temperatures = [temperatures] * logits.shape[0]
    greedy = logits.argmax(-1).tolist()
    if all(t == 0 for t in temperatures):
        return greedy
    scale = torch.tensor([t if t > 0 else 1.0 for t in temperatures], device=logits.device)[:, None]
    probs = torch.softmax(logits.float() / scale, dim=-1).cpu()
    return [g if t == 0 else int(torch.multinomial(p, 1, generator=gen))
            for g, t, p, gen in zip(greedy, temperatures, probs, generators)]
