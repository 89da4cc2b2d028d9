"""TIIF-Bench (Wei et al., 2025): does the image follow the instruction? A judge answers yes/no questions.

Each row of the benchmark is one instruction written twice, as a short prompt and as a long,
rhetorically rich one; both are generated and scored, and reported apart (the paper's short and
long columns). A vision-language judge gets all of a row's yes/no questions about one image at once;
a type's accuracy is the share of its questions answered as expected, pooled over its images. Types
fall into nine groups (three of basic following, five of advanced, and real-world prompts); the
overall score is the mean of the nine group scores.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from PIL import Image

from irg.eval.benchmarks import EvalPrompt, packaged
from irg.eval.judge import JudgeClient, check_template, complete_readable, image_part, judge_all
from irg.eval.scoring import Verdict

SPLITS = {"testmini": "testmini", "full": "test"}  # our name (benchmarks.SPLITS) -> the official files' prefix
VARIANTS = ("short", "long")

_REASONING = ("numeracy", "comparison", "differentiation", "negation")
# The official grouping (eval/summary_dimension_results.py): group -> the types it averages.
GROUPS: dict[str, tuple[str, ...]] = {
    "basic/attribute": ("shape+color", "color+texture", "texture+color", "shape+texture"),
    "basic/relation": ("2d_spatial_relation", "3d_spatial_relation", "action+2d", "action+3d"),
    "basic/reasoning": _REASONING,
    "advanced/attribute+relation": ("action+color", "action+texture", "color+2d", "color+3d", "shape+2d",
                                    "shape+3d", "texture+2d", "texture+3d"),
    "advanced/attribute+reasoning": tuple(f"{r}+{a}" for r in _REASONING for a in ("color", "texture")),
    "advanced/relation+reasoning": tuple(f"{r}+{d}" for r in _REASONING for d in ("2d", "3d")),
    "advanced/style": ("style",),
    "advanced/text": ("text",),
    "real_world": ("real_world",),
}
TYPES = tuple(t for types in GROUPS.values() for t in types)


def load_tiif(split: str = "testmini") -> list[EvalPrompt]:
    """Two prompts per row (its short and its long description): type by type in group order, each
    type's rows in their file order.

    A prompt's id is ``<type>-<line>-<variant>`` (``+`` spelled ``-``), its category ``<variant>/<type>``,
    and its metadata the row's questions and expected answers.
    """
    folder = SPLITS[split]
    prompts = []
    for kind in TYPES:
        rows = _jsonl(f"tiif/{folder}_prompts/{kind}_prompts.jsonl")
        checks = _jsonl(f"tiif/{folder}_eval_prompts/{kind}_eval_prompts.jsonl")
        if len(rows) != len(checks):
            raise ValueError(f"tiif {split} {kind}: {len(rows)} prompts but {len(checks)} question sets")
        for line, (row, check) in enumerate(zip(rows, checks)):
            questions, answers = check["yn_question_list"], [a.lower() for a in check["yn_answer_list"]]
            if len(questions) != len(answers) or not questions:
                raise ValueError(f"tiif {split} {kind} line {line}: {len(questions)} questions, {len(answers)} answers")
            for variant in VARIANTS:
                prompts.append(EvalPrompt(
                    f"{kind.replace('+', '-')}-{line:03d}-{variant}", row[f"{variant}_description"],
                    f"{variant}/{kind}",
                    {"type": kind, "variant": variant, "line": line, "questions": questions, "answers": answers}))
    return prompts


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in packaged(name).splitlines() if line.strip()]


# Our wording of the official instructions (eval/eval_with_vlm.py draws one of three near-identical
# templates at random); the questions go in one per line, unnumbered, as there. Pass another template,
# e.g. an official one with ``{questions}`` in place of its placeholder, as TiifScorer(template=...).
TIIF_SYSTEM = "You are a professional image critic."
TIIF_TEMPLATE = """\
Look carefully at the image and answer each of the following yes-or-no questions about it.

Questions:
{questions}

How to answer:
- Give one answer per question, each on its own line, in the order of the questions.
- Start each line with "yes" or "no"; a short reason may follow on the same line.
- Write nothing else: exactly as many lines as there are questions.
"""
# Room for the answers: rows have up to 22 questions, each answered with a short reason.
TOKENS_PER_QUESTION = 64
FORMAT_REMINDER = ("Your answer could not be read: it needs exactly {count} lines, one per question in order, "
                   "each starting with \"yes\" or \"no\". Answer again in that form.")

# A line answers a question if it starts with yes or no (any case), after any list marker or bold.
_ANSWER = re.compile(r"^(?:[-*•]\s*|\(?\d+[.):]\s*)?[*_]*(yes|no)\b", re.IGNORECASE)


class TiifParseError(ValueError):
    """The judge's reply does not answer every question exactly once."""


def tiif_messages(prompt: EvalPrompt, image: Image.Image, template: str = TIIF_TEMPLATE) -> list[dict]:
    """The chat that asks the judge a row's questions about ``image``."""
    questions = "\n".join(q.strip() for q in prompt.metadata["questions"])
    return [{"role": "system", "content": TIIF_SYSTEM},
            {"role": "user", "content": [{"type": "text", "text": template.format(questions=questions)},
                                         image_part(image)]}]


def parse_answers(text: str, count: int) -> list[str]:
    """The ``count`` yes/no answers in the judge's reply, in order: lines that start with yes or no
    (as the official parser reads them, also after a list number or bold); other lines are skipped."""
    answers = [m.group(1).lower() for line in text.splitlines() if (m := _ANSWER.match(line.strip()))]
    if len(answers) != count:
        raise TiifParseError(f"judge reply: {len(answers)} yes/no lines for {count} questions: {text[:300]!r}")
    return answers


class TiifScorer:
    """Scores an image by the share of its row's questions the judge answers as expected; replies
    it cannot read are asked again ``parse_retries`` times (the official script retries until it can),
    then every question counts as missed, with a ``parse_error``."""

    name = "tiif"

    def __init__(self, judge: JudgeClient, template: str = TIIF_TEMPLATE, parse_retries: int = 3):
        check_template(template, {"questions"}, required={"questions"})
        if parse_retries < 0:
            raise ValueError(f"parse_retries: must be >= 0, got {parse_retries}")
        self.judge = judge
        self.template = template
        self.parse_retries = parse_retries

    def score(self, items: Sequence[tuple[EvalPrompt, Image.Image]]) -> list[Verdict]:
        return judge_all(self.judge, self._score_one, items)

    def _score_one(self, prompt: EvalPrompt, image: Image.Image) -> Verdict:
        expected = prompt.metadata["answers"]
        answers, reply, error = complete_readable(
            self.judge, tiif_messages(prompt, image, self.template), lambda text: parse_answers(text, len(expected)),
            TiifParseError, FORMAT_REMINDER.format(count=len(expected)), self.parse_retries,
            max_tokens=max(self.judge.max_tokens, TOKENS_PER_QUESTION * len(expected)))
        if error is not None:
            return Verdict(0.0, {"correct": 0, "questions": len(expected), "parse_error": error, "judge": reply})
        correct = sum(a == e for a, e in zip(answers, expected))
        return Verdict(correct / len(expected), {"correct": correct, "questions": len(expected), "answers": answers,
                                                 "judge": reply})


def summarize_tiif(rows: Sequence[tuple[EvalPrompt, Verdict]]) -> dict[str, float | None]:
    """Short and long apart: each type's accuracy pooled over its questions (``short/type/<type>``),
    group scores as means of their types' accuracies (``short/basic/attribute``, ...), the basic and
    advanced averages over their types, and ``short/overall``, the mean of the nine group scores.
    Types with no images (a ``--limit``) are left out of every mean."""
    pooled: dict[tuple[str, str], list[int]] = {}
    for prompt, verdict in rows:
        tally = pooled.setdefault((prompt.metadata["variant"], prompt.metadata["type"]), [0, 0])
        tally[0] += verdict.details["correct"]
        tally[1] += verdict.details["questions"]
    scores: dict[str, float | None] = {}
    for variant in VARIANTS:
        accuracy = {kind: c / n for (v, kind), (c, n) in pooled.items() if v == variant}
        if not accuracy:
            continue
        groups = {group: _mean([accuracy[t] for t in types if t in accuracy]) for group, types in GROUPS.items()}
        scores[f"{variant}/overall"] = _mean([g for g in groups.values() if g is not None])
        for level in ("basic", "advanced"):
            scores[f"{variant}/{level}"] = _mean([accuracy[t] for group, types in GROUPS.items()
                                                  if group.startswith(level) for t in types if t in accuracy])
        scores.update({f"{variant}/{group}": value for group, value in groups.items()})
        scores.update({f"{variant}/type/{kind}": accuracy[kind] for kind in TYPES if kind in accuracy})
    return scores


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
