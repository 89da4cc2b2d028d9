"""OneIG-Bench, English (Chang et al., 2025): five prompt categories, each scored on what it tests.

- Alignment (General_Object, Portrait, Anime_Stylization): a judge answers each of the prompt's
  questions yes or no; a question whose parent question was answered "no" counts as "no" (one level,
  on the unfiltered answers, as the official script applies it). Image score = mean over its
  questions; alignment = mean over all images of the three categories pooled.
- Text (Text_Rendering): the judge reads the image's text (OCR); OCR and ground truth keep letters,
  digits and spaces; ED is the character edit distance, CR whether it is 0, WAC the share of ground-truth
  words found (as multisets, pooled over images); text = 1 - min(100, mean ED)(1 - mean CR)(1 - WAC)/100.
- Style (the 114 stylised anime prompts): CSD and OneIG-StyleEncoder against OneIG's reference
  embeddings (:mod:`irg.eval.oneig_style`), where their folder is given.
- Reasoning (Knowledge_Reasoning: LLM2CLIP similarity to a reference answer) and diversity (every
  category: mean pairwise DreamSim distance between one prompt's images) are not scored here.
A dimension not scored is reported as absent (None), never as zero.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import re
from collections import Counter
from collections.abc import Sequence

from PIL import Image

from irg.eval.benchmarks import EvalPrompt, packaged
from irg.eval.judge import JudgeClient, image_part, judge_all
from irg.eval.scoring import Verdict

CATEGORIES = ("General_Object", "Portrait", "Anime_Stylization", "Text_Rendering", "Knowledge_Reasoning")
ALIGNMENT_FILES = {"Anime_Stylization": "anime", "Portrait": "human", "General_Object": "object"}
DIMENSIONS = ("alignment", "text", "reasoning", "style", "diversity")
MAX_ED = 100  # the English text score's cap on the mean edit distance

# The judge's instructions, as the official scripts word them for Qwen2.5-VL.
QUESTION_SUFFIX = " Please answer 'Yes' or 'No' only."
OCR_PROMPT = ("Recognize the text in the image, only reply with the text content, but avoid repeating previously "
              "mentioned content. If no text is recognized, please reply with 'No text recognized'.")
# What each dimension this scorer may leave out needs.
NEEDS = {"reasoning": "LLM2CLIP", "style": "CSD and OneIG-StyleEncoder (--style-model)", "diversity": "DreamSim"}
# What the official script strips from the OCR reply before comparing.
OCR_NOISE = ("addCriterion", "No text recognized.")


def load_oneig() -> list[EvalPrompt]:
    """The 1120 English prompts, in the CSV's order; a prompt's id is ``<category>-<id>``."""
    rows = list(csv.DictReader(io.StringIO(packaged("oneig/OneIG-Bench.csv"), newline="")))
    questions = {category: json.loads(packaged(f"oneig/alignment/Q_D/{name}.json"))
                 for category, name in ALIGNMENT_FILES.items()}
    texts = {r["id"]: ast.literal_eval(r["text_content"])
             for r in csv.DictReader(io.StringIO(packaged("oneig/text/text_content.csv"), newline=""))}
    styles = {r["id"]: r["class"]
              for r in csv.DictReader(io.StringIO(packaged("oneig/style/style.csv"), newline=""))}
    answers = json.loads(packaged("oneig/reasoning/gt_answer.json"))
    prompts = []
    for row in rows:
        category, key = row["category"], row["id"]
        meta = {"category": category, "id": key, "type": row["type"], "prompt_length": row["prompt_length"],
                "class": row["class"]}
        if category in questions:
            entry = questions[category][key]
            meta["questions"] = json.loads(entry["question"])
            meta["dependency"] = json.loads(entry["dependency"])
        if category == "Anime_Stylization" and styles.get(key):
            meta["style"] = styles[key].lower().replace(" ", "_")
        if category == "Text_Rendering":
            meta["text"] = texts[key]
        if category == "Knowledge_Reasoning":
            meta["answer"] = answers[key]
        prompts.append(EvalPrompt(f"{category}-{key}", row["prompt_en"], category, meta))
    return prompts


def is_yes(reply: str) -> bool:
    """A judge's reply counts as yes if it is "Yes" (the official rule: exactly that string), here also
    in any case and with surrounding spaces or a final full stop, as chat judges such as GPT-4o write it."""
    return reply.strip().rstrip(".").strip().lower() == "yes"


def alignment_score(yes: dict[str, bool], dependency: dict[str, list[int]]) -> float:
    """Share of questions answered yes once a question whose parent (any listed id but 0) was answered
    no is counted as no. Parents are read from the raw answers: one level, in any order, as officially."""
    filtered = [yes[q] and all(p == 0 or yes[str(p)] for p in dependency.get(q, [])) for q in yes]
    return sum(filtered) / len(filtered)


# Characters OCR and ground truth keep: letters, digits, whitespace, French accented letters and CJK.
_NOT_KEPT = re.compile(r"[^A-Za-z0-9\sàâäæçéèêëîïôöœùûüÿÀÂÄÆÇÉÈÊËÎÏÔÖŒÙÛÜŸ\u4e00-\u9fff]")
_CJK = re.compile(r"[\u4e00-\u9fff]")


def clean_text(text: str) -> str:
    """The official normalisation: drop other characters, no case folding, single spaces (none in Chinese)."""
    text = " ".join(_NOT_KEPT.sub("", text).split())
    return re.sub(r"\s", "", text) if _CJK.search(text) else text


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between two strings, one per inserted, deleted or substituted character."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def text_metrics(ocr: str, ground_truth: Sequence[str]) -> dict[str, int]:
    """One image's ED, CR (1 if ED is 0) and word matches: its ground-truth words found in the OCR,
    compared as multisets (order ignored), and how many ground-truth words there are."""
    for noise in OCR_NOISE:
        ocr = ocr.replace(noise, "")
    read, truth = clean_text(ocr), clean_text(" ".join(ground_truth))
    ed = edit_distance(read, truth)
    words = Counter(truth.split())
    return {"ed": ed, "cr": int(ed == 0), "matched": sum((Counter(read.split()) & words).values()),
            "words": sum(words.values())}


def text_score(metrics: Sequence[dict[str, int]]) -> dict[str, float]:
    """Over images: mean ED, mean CR, pooled WAC, and text = 1 - min(100, ED)(1 - CR)(1 - WAC)/100."""
    ed = sum(m["ed"] for m in metrics) / len(metrics)
    cr = sum(m["cr"] for m in metrics) / len(metrics)
    words = sum(m["words"] for m in metrics)
    wac = sum(m["matched"] for m in metrics) / words if words else 0.0
    return {"text": 1 - min(MAX_ED, ed) * (1 - cr) * (1 - wac) / MAX_ED, "text/ed": ed, "text/cr": cr,
            "text/wac": wac}


def absent_note(absent: Sequence[str]) -> str:
    """The report's note on the dimensions it lacks, and so its overall."""
    needs = "; ".join(f"{d} needs {NEEDS[d]}" for d in absent)
    return (f"OneIG-EN {', '.join(absent)} not scored here, reported absent (not zero): {needs}; so is the "
            "overall, the mean of all five dimensions")


class OneIGScorer:
    """Scores alignment and text through ``judge``, and style with ``style`` where given; an image whose
    dimension is not scored (reasoning; style without its models) gets None for it, never zero."""

    name = "oneig"

    def __init__(self, judge: JudgeClient, style=None):
        self.judge = judge
        self.style = style  # an irg.eval.oneig_style.StyleScorer, or None

    def score(self, items: Sequence[tuple[EvalPrompt, Image.Image]]) -> list[Verdict]:
        return judge_all(self.judge, self._score_one, items)

    def _score_one(self, prompt: EvalPrompt, image: Image.Image) -> Verdict:
        meta = prompt.metadata
        if "questions" in meta:
            replies = {q: self._ask(f"{text}.{QUESTION_SUFFIX}", image) for q, text in meta["questions"].items()}
            yes = {q: is_yes(reply) for q, reply in replies.items()}
            score = alignment_score(yes, meta["dependency"])
            details = {"alignment": score, "yes": yes}
            if self.style is not None and "style" in meta:
                details["style"] = self.style.score(image, meta["style"])
            return Verdict(score, details)
        if "text" in meta:
            reply = self._ask(OCR_PROMPT, image)
            metrics = text_metrics(reply, meta["text"])
            return Verdict(text_score([metrics])["text"], {**metrics, "ocr": reply})
        return Verdict(None, {})  # Knowledge_Reasoning: its embedding model is not given

    def _ask(self, text: str, image: Image.Image) -> str:
        return self.judge.complete([{"role": "user", "content": [image_part(image), {"type": "text", "text": text}]}])


def summarize_oneig(rows: Sequence[tuple[EvalPrompt, Verdict]]) -> dict[str, float | None]:
    """Each dimension over its images (absent ones None): ``alignment`` pooled over the three categories
    and ``alignment/<category>`` each, ``text`` with its ``text/ed``, ``text/cr`` and ``text/wac``,
    ``reasoning``, ``style`` and ``diversity``; ``overall``, the mean of the five (the paper's OneIG-EN
    figure), only when all five are there."""
    aligned: dict[str, list[float]] = {}
    texts, styles = [], []
    for prompt, verdict in rows:
        if "alignment" in verdict.details:
            aligned.setdefault(prompt.category, []).append(verdict.details["alignment"])
        elif "ed" in verdict.details:
            texts.append(verdict.details)
        if "style" in verdict.details:
            styles.append(verdict.details["style"])
    scores: dict[str, float | None] = dict.fromkeys(DIMENSIONS)
    pooled = [s for values in aligned.values() for s in values]
    if pooled:
        scores["alignment"] = sum(pooled) / len(pooled)
        for category in ALIGNMENT_FILES:
            if category in aligned:
                scores[f"alignment/{category}"] = sum(aligned[category]) / len(aligned[category])
    if texts:
        scores.update(text_score(texts))
    if styles:
        scores["style"] = sum(styles) / len(styles)
    dimensions = [scores[d] for d in DIMENSIONS]
    scores["overall"] = None if None in dimensions else sum(dimensions) / len(dimensions)
    return scores
