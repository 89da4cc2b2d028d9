"""Judges that say what is wrong with an image as flaws a reflection can name (:class:`irg.data.synth.Flaw`).

:class:`ShapesJudge` reads a shapes-world image with the palette detector and agrees with the GenEval
scorer by construction: it asks the scorer first, so a passing image has no flaws, and a failing one
gets the edits that turn it into the prompt's scene (:func:`irg.data.irgl_synthesis.correct`), which
are never none for an image the scorer fails. :class:`ChatJudge` asks an OpenAI-compatible
vision-language model for the same list, so real prompts can be judged where no detector can.
:func:`reflection_names_flaw` tells whether a model's own reflection names a flaw a judge found.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from irg.data.irgl_synthesis import correct
from irg.data.synth import FLAW_TITLES, NUMBERS, PALETTE, SHAPES, Detection, Flaw, measure, scene_from_metadata
from irg.eval.benchmarks import EvalPrompt
from irg.eval.geneval import shapes_scorer
from irg.eval.judge import JudgeClient, image_part
from irg.eval.wise import WISE_SYSTEM


@dataclass(frozen=True)
class Judgement:
    """What a judge found: ``flaws`` (none: the image matches its prompt) and, from a detector, the shapes
    it read (the corrected target keeps them in place); None from a judge that reads no boxes."""
    flaws: list[Flaw]
    detections: list[Detection] | None = None

    @property
    def matches(self) -> bool:
        return not self.flaws


class ImageJudge(Protocol):
    def judge(self, image: Image.Image, prompt: str, metadata: dict) -> Judgement:
        """The flaws of ``image`` for ``prompt``; ``metadata`` is its GenEval record (tag, include, exclude)."""
        ...


class ShapesJudge:
    """The shapes world's judge: the palette detector's reading, held against the record's scene."""

    def __init__(self):
        self.scorer = shapes_scorer()

    def judge(self, image: Image.Image, prompt: str, metadata: dict) -> Judgement:
        if metadata.get("prompt") != prompt:
            raise ValueError(f"prompt: {prompt!r} is not the record's ({metadata.get('prompt')!r})")
        scene = scene_from_metadata(metadata)
        [verdict] = self.scorer.score([(EvalPrompt("judge", prompt, metadata["tag"], metadata), image)])
        detections = measure(image)
        if verdict.score == 1.0:
            return Judgement([], detections)
        flaws = list(correct(scene, image, detections).flaws)
        if not flaws:
            raise RuntimeError(f"the scorer fails the image for {prompt!r} ({verdict.details['reasons']}) but "
                               "the correction finds nothing to mend: the judge and the scorer disagree")
        return Judgement(flaws, detections)


FLAWS_TEMPLATE = """\
Compare the image with the PROMPT it was generated from and list every way the image fails the prompt.

Answer with only a JSON list, one object per flaw, each with exactly these keys:
- "kind": one of {kinds}
- "description": what is wrong, e.g. "there are only two red circles instead of three"
- "fix": an imperative edit that repairs it, e.g. "add one more red circle in the empty space"
Kinds: count (how many), color, shape, missing (an object is not there), relation (where objects are relative \
to each other), extra (something the prompt does not ask for), style (noise, smears, unclear rendering).
Answer [] if the image shows exactly what the prompt asks for.

PROMPT: "{prompt}"
"""

FLAWS_REMINDER = ("Your answer could not be read: {problem}. Answer again with only a JSON list of objects with the "
                  "keys \"kind\", \"description\" and \"fix\", or [] if the image matches the prompt.")


class FlawsParseError(ValueError):
    """A judge's reply that is not a JSON list of well-formed flaws."""


def flaws_messages(prompt: str, image: Image.Image) -> list[dict]:
    """The chat that asks a vision-language judge for ``image``'s flaws."""
    text = FLAWS_TEMPLATE.format(kinds=", ".join(FLAW_TITLES), prompt=prompt)
    return [{"role": "system", "content": WISE_SYSTEM},
            {"role": "user", "content": [{"type": "text", "text": text}, image_part(image)]}]


def parse_flaws(text: str, prompt: str) -> list[Flaw]:
    """The flaws in a judge's reply: a JSON list (a markdown code fence around it is allowed) of objects
    with exactly the keys kind (one of :data:`~irg.data.synth.FLAW_TITLES`), description and fix, all
    non-empty strings. Each flaw's requirement is the prompt (the judge is not asked for one)."""
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        items = json.loads(body)
    except json.JSONDecodeError as e:
        raise FlawsParseError(f"judge reply: not JSON ({e}): {text[:300]!r}") from None
    if not isinstance(items, list):
        raise FlawsParseError(f"judge reply: not a JSON list: {text[:300]!r}")
    flaws = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"kind", "description", "fix"}:
            raise FlawsParseError(f"judge reply: flaw {i} must be an object with exactly the keys kind, description "
                                  f"and fix, got {json.dumps(item)[:200]}")
        if item["kind"] not in FLAW_TITLES:
            raise FlawsParseError(f"judge reply: flaw {i}: kind {item['kind']!r} is not one of {list(FLAW_TITLES)}")
        if not all(isinstance(item[k], str) and item[k].strip() for k in ("description", "fix")):
            raise FlawsParseError(f"judge reply: flaw {i}: description and fix must be non-empty strings")
        flaws.append(Flaw(item["kind"], item["description"].strip(), prompt, item["fix"].strip()))
    return flaws


class ChatJudge:
    """A vision-language model as the judge, behind a :class:`~irg.eval.judge.JudgeClient` (retries, rate
    limit, cache). A reply it cannot read is asked again ``parse_retries`` times, then raises
    :class:`FlawsParseError`; a :class:`~irg.eval.judge.JudgeError` (the endpoint fails) passes through."""

    def __init__(self, client: JudgeClient, parse_retries: int = 1):
        if parse_retries < 0:
            raise ValueError(f"parse_retries: must be >= 0, got {parse_retries}")
        self.client, self.parse_retries = client, parse_retries

    @property
    def max_concurrency(self) -> int:
        return self.client.max_concurrency

    def judge(self, image: Image.Image, prompt: str, metadata: dict) -> Judgement:
        messages = flaws_messages(prompt, image)
        reply = self.client.complete(messages)
        retries_left = self.parse_retries
        while True:
            try:
                return Judgement(parse_flaws(reply, prompt))
            except FlawsParseError as e:
                if retries_left == 0:
                    raise
                retries_left -= 1
                # Continue the conversation, which also gives the retry a cache key of its own.
                messages = [*messages, {"role": "assistant", "content": reply},
                            {"role": "user", "content": FLAWS_REMINDER.format(problem=e)}]
                reply = self.client.complete(messages)


# What a clause must say to name a flaw of each kind (besides the object it concerns); see reflection_names_flaw.
KIND_WORDS = {
    "count": {"count", "number", "many", "more", "fewer", "less", "only", "too"},
    "color": {"colour", "color", "colours", "colors", "coloured", "colored", "recolour", "recolor"},
    "shape": {"shape", "shapes", "shaped", "instead", "replace", "reshape"},
    "missing": {"missing", "absent", "lacks", "lacking", "add", "no", "none", "without", "omitted"},
    "relation": {"left", "right", "above", "below", "position", "positions", "swap", "swapped", "move", "side"},
    "extra": {"extra", "also", "remove", "unwanted", "additional", "superfluous", "too"},
    "style": {"noise", "noisy", "smeared", "smear", "smudged", "blurry", "blurred", "messy", "clutter", "cluttered",
              "unclean", "unreadable", "unclear"},
}
# Per kind, the vocabulary whose words a flaw's description adds to its requirement (the wrong value drawn).
DRAWN_WORDS = {"count": {*NUMBERS, *map(str, range(10))}, "color": set(PALETTE), "shape": set(SHAPES)}
KEEP_WORDS = {"keep", "kept", "already", "fine", "unchanged"}
FINAL_SECTION = "final comprehensive prompt"


def reflection_names_flaw(reflection: str, flaws: list[Flaw]) -> bool:
    """Whether ``reflection`` names at least one of ``flaws``.

    A clause (text between . ; ! ? and line breaks) names a flaw when it mentions the object the flaw
    concerns (a shape its description names; a flaw naming none, such as style, needs no object) and
    also a word of the flaw's kind (:data:`KIND_WORDS`) or a word its description adds to its
    requirement: the wrong colour, count or shape drawn ("the circle is blue instead of red" against
    "a red circle": blue). Quoted text (the prompt, which names every object and the wanted counts and
    relation), clauses that keep or praise (:data:`KEEP_WORDS`), and the final prompt section, which
    describes the improved image rather than the flaws, name nothing. It is a lexical test: it cannot
    tell a negated or mistaken mention from a true one.
    """
    analysis = re.sub(r'"[^"]*"', " ", reflection.lower().split(FINAL_SECTION)[0])
    clauses = [_words(c) for c in re.split(r"[.;!?\n]+", analysis)]
    return any(_names(words, f) for words in clauses if not words & KEEP_WORDS for f in flaws)


def _names(words: set[str], flaw: Flaw) -> bool:
    described = _words(flaw.description)
    cues = KIND_WORDS[flaw.kind] | ((described - _words(flaw.requirement)) & DRAWN_WORDS.get(flaw.kind, set()))
    objects = described & set(SHAPES)
    if not objects:
        return bool(words & cues)
    return any((cues - {obj}) & words for obj in objects & words)


def _words(text: str) -> set[str]:
    """Lower-case words, shape plurals made singular ("circles" -> "circle")."""
    words = re.findall(r"[a-z]+|\d+", text.lower())
    return {w[:-1] if w[:-1] in SHAPES else w for w in words}
