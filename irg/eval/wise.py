"""WISE (Niu et al. 2025): a vision-language judge marks each image 0-2 for consistency, realism and aesthetics.

WISE's prompts name things indirectly ("the traditional food of the Mid-Autumn Festival"), so the
judge also gets the benchmark's explanation of what the image should show. The marks combine into
WiScore, which weights consistency (world knowledge) most. The judge is any OpenAI-compatible
endpoint behind a :class:`~irg.eval.judge.JudgeClient`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from PIL import Image

from irg.eval.benchmarks import EvalPrompt
from irg.eval.judge import JudgeClient, check_template, complete_readable, image_part, judge_all
from irg.eval.scoring import Verdict

WISE_SYSTEM = ("You are a strict, meticulous auditor of generated images. You judge each image only by what "
               "it shows and answer in exactly the format you are asked for.")

# The rubric (our wording of WISE's criteria); pass another, e.g. the official one, as WiseScorer(template=...).
# It is filled with str.format, so literal braces in a custom template must be doubled.
WISE_TEMPLATE = """\
Rate the generated image below against the PROMPT it was made from. The EXPLANATION says what the \
prompt really asks for: prompts often name a thing only indirectly, and the image must show what the \
explanation describes.

Mark each of three criteria 0, 1 or 2.

Consistency: does the image show what the prompt asks for, accurately and completely, as the explanation \
interprets it?
0 = the subject is wrong or missing
1 = the main idea is there, but details are wrong or missing
2 = everything the prompt and the explanation call for is there and correct

Realism: does the image look like a real photograph, with plausible physics, light, materials and anatomy?
0 = clearly artificial or physically impossible
1 = mostly plausible, with visible flaws
2 = as convincing as a real photograph

Aesthetic Quality: how appealing is the image in composition, colour, lighting and detail?
0 = poor or unpleasant
1 = acceptable but ordinary
2 = striking, of professional quality

Be strict: give 2 only when there is nothing to object to; it should be rare.

Answer with exactly these three lines, each N replaced by your mark, and nothing else:
Consistency: N
Realism: N
Aesthetic Quality: N

PROMPT: "{prompt}"
EXPLANATION: "{explanation}"
"""

# What the judge is told when its answer could not be read.
FORMAT_REMINDER = ("Your answer could not be read. Answer again with exactly these three lines, each N replaced "
                   "by 0, 1 or 2, and nothing else:\nConsistency: N\nRealism: N\nAesthetic Quality: N")

# Each criterion's name in the reply, matched in any case, in markdown bold or italics, before an ASCII or
# full-width colon.
_MARKS = {"consistency": "Consistency", "realism": "Realism", "aesthetic_quality": "Aesthetic Quality"}
_PATTERNS = {
    key: re.compile(r"\b" + label.replace(" ", r"[\s_]+") + r"[\s*_]*[:：][\s*_]*(\d+(?:\.\d+)?)", re.IGNORECASE)
    for key, label in _MARKS.items()
}


class WiseParseError(ValueError):
    """The judge's reply lacks a mark or has one outside 0, 1, 2."""


def wise_messages(prompt: EvalPrompt, image: Image.Image, template: str = WISE_TEMPLATE) -> list[dict]:
    """The chat that asks the judge to mark ``image``: the system role, then the rubric and the image."""
    if "Explanation" not in prompt.metadata:
        raise ValueError(f"prompt {prompt.id}: no Explanation in its metadata (WISE prompts have one)")
    text = template.format(prompt=prompt.prompt, explanation=prompt.metadata["Explanation"])
    return [{"role": "system", "content": WISE_SYSTEM},
            {"role": "user", "content": [{"type": "text", "text": text}, image_part(image)]}]


def parse_wise_scores(text: str) -> dict[str, int]:
    """The three marks in the judge's reply, keyed consistency, realism, aesthetic_quality.

    Where a mark appears more than once the last counts: a judge that thinks aloud ends with its answer.
    """
    marks: dict[str, int] = {}
    missing, bad = [], []
    for key, pattern in _PATTERNS.items():
        found = pattern.findall(text)
        if not found:
            missing.append(_MARKS[key])
            continue
        value = float(found[-1])
        if value not in (0, 1, 2):
            bad.append(f"{_MARKS[key]} {found[-1]}")
            continue
        marks[key] = int(value)
    if missing or bad:
        problems = ([f"no {', '.join(missing)} mark"] if missing else []) + (
            [f"{', '.join(bad)} not 0, 1 or 2"] if bad else [])
        raise WiseParseError(f"judge reply: {'; '.join(problems)}: {text[:300]!r}")
    return marks


def wiscore(consistency: int, realism: int, aesthetic_quality: int) -> float:
    """WISE's weighted score in [0, 1]: (0.7 consistency + 0.2 realism + 0.1 aesthetics) / 2."""
    # In integer tenths, so whole marks give exact decimals (0.8, not 0.7999999999999999).
    return (7 * consistency + 2 * realism + aesthetic_quality) / 20


class WiseScorer:
    """Scores images by WiScore from ``judge``; replies it cannot read are asked again ``parse_retries``
    times, then score 0 (as the official scorer treats missing marks) with a ``parse_error``."""

    name = "wise"

    def __init__(self, judge: JudgeClient, template: str = WISE_TEMPLATE, parse_retries: int = 2):
        check_template(template, {"prompt", "explanation"}, required={"prompt"})
        if parse_retries < 0:
            raise ValueError(f"parse_retries: must be >= 0, got {parse_retries}")
        self.judge = judge
        self.template = template
        self.parse_retries = parse_retries

    def score(self, items: Sequence[tuple[EvalPrompt, Image.Image]]) -> list[Verdict]:
        """One verdict per item, in order. A :class:`~irg.eval.judge.JudgeError` stops the whole run."""
        return judge_all(self.judge, self._score_one, items)

    def _score_one(self, prompt: EvalPrompt, image: Image.Image) -> Verdict:
        marks, reply, error = complete_readable(self.judge, wise_messages(prompt, image, self.template),
                                                parse_wise_scores, WiseParseError, FORMAT_REMINDER,
                                                self.parse_retries)
        if error is not None:
            return Verdict(0.0, {"parse_error": error, "judge": reply})
        return Verdict(wiscore(**marks), {**marks, "judge": reply})
