"""Choosing the next token of a think text."""

from __future__ import annotations

import torch


def next_tokens(logits: torch.Tensor, temperature: float, generators: list[torch.Generator]) -> list[int]:
    """One token per row of logits [B, V]: greedy at temperature 0, else sampled with row i's generator
    (on the CPU, so a seed gives the same text on any device)."""
    if temperature == 0:
        return logits.argmax(-1).tolist()
    probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
    return [int(torch.multinomial(p, 1, generator=g)) for p, g in zip(probs, generators)]
