"""The prompt sets: GenEval, WISE, TIIF-Bench, GenAI-Bench and OneIG-EN (shipped with the package, with
their licences in ``data/README.md``), the synthetic shapes world, or a file.

Every prompt becomes an :class:`EvalPrompt` with a stable ``id`` (the storage layout and the resume
logic key on it), the ``category`` reports group by (GenEval's tag, WISE's category, ...) and the
benchmark's own record as ``metadata`` (what the scorers read).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources

from irg import storage

BENCHMARKS = ("geneval", "wise", "tiif", "genai_bench", "oneig", "shapes")
# Benchmarks whose --limit takes rows from each category in turn: (category, row) of a prompt.
SPREAD = {"tiif": (lambda p: p.metadata["type"], lambda p: (p.metadata["type"], p.metadata["line"])),
          "oneig": (lambda p: p.category, lambda p: p.id)}
# Benchmarks with more than one official prompt set, and the one they load by default.
SPLITS = {"tiif": ("testmini", "full"), "genai_bench": ("1600", "527")}
SHAPES_DEFAULT_PER_CATEGORY = 10


@dataclass(frozen=True)
class EvalPrompt:
    id: str
    prompt: str
    category: str
    metadata: dict


def load_benchmark(name: str, limit: int | None = None, seed: int = 0, split: str | None = None) -> list[EvalPrompt]:
    """Prompts of ``name`` (one of :data:`BENCHMARKS`, or a GenEval-format ``.jsonl`` path or URI).

    ``split`` picks the prompt set of a benchmark that has several (:data:`SPLITS`; the first is the
    default). ``limit`` keeps the first N prompts, except where a benchmark's categories come one after
    another (TIIF's types, OneIG's categories): there it takes rows from each category in turn, so a
    small run covers all of them; for ``shapes`` it is the number of prompts to draw (default 10 per
    GenEval category), from ``seed``.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit: must be >= 1, got {limit}")
    if split is not None and split not in SPLITS.get(name, ()):
        choices = f"one of {', '.join(SPLITS[name])}" if name in SPLITS else "none: it has one prompt set"
        raise ValueError(f"split: {name} has no split {split!r}; it takes {choices}")
    split = split or SPLITS.get(name, (None,))[0]
    if name == "geneval":
        prompts = _geneval_prompts(packaged("geneval/evaluation_metadata.jsonl").splitlines(), "geneval")
    elif name == "wise":
        prompts = _wise_prompts(json.loads(packaged("wise/final_data.json")))
    elif name == "tiif":
        from irg.eval.tiif import load_tiif

        prompts = load_tiif(split)
    elif name == "genai_bench":
        from irg.eval.genai_bench import load_genai_bench

        prompts = load_genai_bench(split)
    elif name == "oneig":
        from irg.eval.oneig import load_oneig

        prompts = load_oneig()
    elif name == "shapes":
        return shapes_prompts(limit or SHAPES_DEFAULT_PER_CATEGORY * 6, seed)
    elif name.endswith(".jsonl"):
        if not storage.exists(name):
            raise FileNotFoundError(f"benchmark: {name} does not exist")
        with storage.open_file(name, "r") as f:
            prompts = _geneval_prompts(f.read().splitlines(), name)
    else:
        raise ValueError(f"benchmark: unknown {name!r}, expected one of {BENCHMARKS} or a GenEval-format .jsonl file")
    if limit and name in SPREAD:
        return spread(prompts, limit, *SPREAD[name])
    return prompts[:limit] if limit else prompts


def spread(prompts: list[EvalPrompt], limit: int, category, row) -> list[EvalPrompt]:
    """The first ``limit`` prompts taking rows (prompts sharing ``row(p)``, e.g. TIIF's short and long) from
    each ``category(p)`` in turn, each category's rows in their order."""
    queues: dict[object, list[list[EvalPrompt]]] = {}
    for prompt in prompts:
        rows = queues.setdefault(category(prompt), [])
        if rows and row(rows[-1][0]) == row(prompt):
            rows[-1].append(prompt)
        else:
            rows.append([prompt])
    taken: list[EvalPrompt] = []
    for depth in range(max(len(rows) for rows in queues.values())):
        for rows in queues.values():
            if depth < len(rows):
                taken += rows[depth]
            if len(taken) >= limit:
                return taken[:limit]
    return taken


def shapes_prompts(count: int, seed: int = 0) -> list[EvalPrompt]:
    """``count`` shapes-world prompts cycling through the six categories, as GenEval records."""
    from irg.data.synth import CATEGORIES, geneval_metadata, sample_scene

    rng = random.Random(f"shapes-eval:{seed}")
    prompts = []
    for i in range(count):
        record = geneval_metadata(sample_scene(rng, CATEGORIES[i % len(CATEGORIES)]))
        prompts.append(EvalPrompt(f"{i:05d}", record["prompt"], record["tag"], record))
    return prompts


def geneval_object_names() -> list[str]:
    """The 80 COCO classes GenEval's detector knows."""
    return [line.strip() for line in packaged("geneval/object_names.txt").splitlines() if line.strip()]


def packaged(name: str) -> str:
    """The text of a file shipped under ``irg/eval/data``."""
    return resources.files("irg.eval").joinpath("data", name).read_text(encoding="utf-8")


def _geneval_prompts(lines: list[str], source: str) -> list[EvalPrompt]:
    from irg.data.synth import CATEGORIES  # GenEval's tags, which the shapes world shares

    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            prompt, tag, include = record["prompt"], record["tag"], record["include"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{source} line {number}: not a GenEval record ({type(e).__name__}: {e})") from e
        if not isinstance(prompt, str) or not isinstance(include, list) or not include:
            raise ValueError(f"{source} line {number}: needs a string prompt and a non-empty include list")
        if tag not in CATEGORIES:  # the rules depend on it (counting's threshold) and the report groups by it
            raise ValueError(f"{source} line {number}: unknown tag {tag!r}, expected one of {', '.join(CATEGORIES)}")
        for req in include + record.get("exclude", []):
            if (not isinstance(req, dict) or not isinstance(req.get("class"), str)
                    or not isinstance(req.get("count"), int)):
                raise ValueError(f"{source} line {number}: each include/exclude needs a class and an int count")
        prompts.append(EvalPrompt(f"{len(prompts):05d}", prompt, tag, record))
    return prompts


def _wise_prompts(rows: list[dict]) -> list[EvalPrompt]:
    return [EvalPrompt(f"{int(r['prompt_id']):05d}", r["Prompt"], r["Category"], r) for r in rows]
