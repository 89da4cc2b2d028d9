"""Which scorer an evaluation uses, as plain settings: checked on the driver before any generation,
built again inside each scoring actor (a detector or a judge client does not travel well)."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

from irg.eval.benchmarks import EvalPrompt, geneval_object_names
from irg.eval.scoring import Scorer, Verdict, summarize

SCORERS = ("shapes", "geneval", "wise", "tiif", "genai_bench", "oneig")
DEFAULT_SCORER = {name: name for name in SCORERS}  # each benchmark is scored by its own rules
# Scorers whose verdicts come from an OpenAI-compatible judge (genai_bench's only without --vqa-model).
JUDGED = ("wise", "tiif", "oneig")
# The metadata key that marks a prompt as one the scorer can read, and what it is called.
PROMPT_RECORD = {"wise": ("Explanation", "a WISE prompt"), "tiif": ("answers", "a TIIF-Bench row"),
                 "genai_bench": ("skills", "a GenAI-Bench prompt"), "oneig": ("prompt_length", "a OneIG-Bench prompt")}


@dataclass(frozen=True)
class ScorerSettings:
    kind: str = "shapes"
    # geneval: local Hugging Face folders (no download at run time)
    detector: str | None = None  # Mask2Former, COCO instance segmentation
    color_classifier: str | None = None  # CLIP
    # genai_bench: a local Hugging Face image-text-to-text model for VQAScore
    vqa_model: str | None = None
    # oneig: a folder with CSD, OneIG-StyleEncoder and their reference embeddings (irg.eval.oneig_style)
    style_model: str | None = None
    # wise, tiif, oneig (and genai_bench without vqa_model): an OpenAI-compatible chat endpoint with images
    judge_url: str | None = None  # e.g. http://vllm:8000/v1
    judge_model: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never stored
    judge_requests_per_minute: float | None = None
    judge_concurrency: int = 4
    judge_cache: str | None = None  # folder or s3:// URI; default: <output>/judge-cache
    judge_template: str | None = None  # a file with the judge prompt (wise: {prompt}, {explanation}; tiif: {questions})
    device: str = "auto"

    def check(self, prompts: Sequence[EvalPrompt] = ()) -> None:
        """Fail before generating anything when the scorer could not be built, or could not score ``prompts``."""
        if self.kind not in SCORERS:
            raise ValueError(f"scorer: unknown {self.kind!r}, expected one of {SCORERS}")
        unused = [flag for flag, value, used in (
            ("--detector", self.detector, self.kind == "geneval"),
            ("--color-classifier", self.color_classifier, self.kind == "geneval"),
            ("--vqa-model", self.vqa_model, self.kind == "genai_bench"),
            ("--style-model", self.style_model, self.kind == "oneig"),
            ("--judge-url", self.judge_url, self.uses_judge),
            ("--judge-template", self.judge_template, self.kind in ("wise", "tiif"))) if value and not used]
        if unused:
            also = "; genai_bench takes --vqa-model or a judge, not both" if self.vqa_model and self.judge_url else ""
            raise ValueError(f"scorer {self.kind} does not use {', '.join(unused)}{also}")
        if self.kind == "geneval":
            from irg.eval.hf_detection import ClipColorClassifier, Mask2FormerDetector, local_checkpoint

            for flag, path, model in (("--detector", self.detector, Mask2FormerDetector),
                                      ("--color-classifier", self.color_classifier, ClipColorClassifier)):
                if not path:
                    raise ValueError(f"scorer geneval needs {flag}: a local Hugging Face checkpoint folder")
                local_checkpoint(path, *model.CHECKPOINT)
        if self.uses_judge:
            flag = " (or --vqa-model, a local VQA model folder)" if self.kind == "genai_bench" else ""
            if not self.judge_url or not self.judge_model:
                raise ValueError(f"scorer {self.kind} needs --judge-url (an OpenAI-compatible /v1 endpoint) and "
                                 f"--judge-model{flag}")
            if self.judge_template and not os.path.isfile(self.judge_template):
                raise FileNotFoundError(f"--judge-template {self.judge_template} does not exist")
            try:  # offline, as each scoring actor will: the judge's URL, rate and concurrency, the template's fields
                scorer = self._judged(None, load_models=False)
            except ValueError as e:
                raise ValueError(f"scorer {self.kind}: {e}") from None
            if self.kind == "genai_bench":
                from irg.eval.judge import JudgeError

                try:  # the one scorer that needs more than chat: an endpoint without log-probabilities cannot score
                    scorer.probe()
                except JudgeError as e:
                    raise ValueError(f"scorer genai_bench without --vqa-model needs a judge that returns "
                                     f"log-probabilities: {e}") from None
        if self.kind == "genai_bench" and self.vqa_model:
            from irg.eval.genai_bench import HFVQAScore

            HFVQAScore.load_processor(self.vqa_model)
        if self.kind == "oneig" and self.style_model:
            from irg.eval.oneig_style import check_style_folder

            check_style_folder(self.style_model)
        for prompt in prompts:
            self._check_prompt(prompt)

    def _check_prompt(self, prompt: EvalPrompt) -> None:
        """Each benchmark's scorer reads its own records (WISE's explanation, TIIF's questions, ...); the
        GenEval rules need a record whose classes the detector knows (COCO's 80 for geneval, the shapes
        world's for shapes)."""
        where = f"scorer {self.kind} cannot score prompt {prompt.id} ({prompt.prompt[:60]!r})"
        if self.kind in PROMPT_RECORD:
            key, what = PROMPT_RECORD[self.kind]
            if key not in prompt.metadata:
                raise ValueError(f"{where}: it is not {what} (no {key}); choose the --scorer these prompts are for")
            return
        if "include" not in prompt.metadata:
            raise ValueError(f"{where}: it is not a GenEval record (no include list); "
                             "choose the --scorer these prompts are for")
        known = _known_classes(self.kind)
        for req in prompt.metadata["include"] + prompt.metadata.get("exclude", []):
            if req["class"] not in known:
                raise ValueError(f"{where}: its detector does not know class {req['class']!r}; "
                                 "choose the --scorer these prompts are for")

    @property
    def uses_judge(self) -> bool:
        return self.kind in JUDGED or (self.kind == "genai_bench" and not self.vqa_model)

    def summarize(self, rows: Sequence[tuple[EvalPrompt, Verdict]]) -> dict[str, float | None]:
        """One round's report lines by the benchmark's own rules."""
        if self.kind == "tiif":
            from irg.eval.tiif import summarize_tiif

            return summarize_tiif(rows)
        if self.kind == "genai_bench":
            from irg.eval.genai_bench import summarize_genai_bench

            return summarize_genai_bench(rows)
        if self.kind == "oneig":
            from irg.eval.oneig import summarize_oneig

            return summarize_oneig(rows)
        return summarize([(prompt.category, verdict.score) for prompt, verdict in rows], self.overall)

    @property
    def notes(self) -> list[str]:
        """What a reader of the report must know about how it was scored."""
        if self.kind == "genai_bench":
            from irg.eval.genai_bench import NOT_COMPARABLE

            source = (f"the local model {self.vqa_model}" if self.vqa_model
                      else f"the judge's log-probabilities ({self.judge_model})")
            return [NOT_COMPARABLE.format(source=source)]
        if self.kind == "oneig":
            from irg.eval.oneig import absent_note

            return [absent_note(["reasoning", "diversity"] if self.style_model else ["reasoning", "style",
                                                                                     "diversity"])]
        return []

    @property
    def overall(self) -> str:
        """GenEval, shapes: the mean of the category means; WISE: categories weighted by their prompt counts
        (the other benchmarks' overalls are their own: :meth:`summarize`)."""
        return "prompts" if self.kind == "wise" else "categories"

    @property
    def gpus(self) -> int:
        """GPUs a scoring actor asks for where there are GPUs (the judge runs elsewhere)."""
        local_model = (self.kind == "geneval" or (self.kind == "genai_bench" and self.vqa_model)
                       or (self.kind == "oneig" and self.style_model))
        return 1 if local_model and self.device != "cpu" else 0

    def build(self, cache: str | None = None) -> Scorer:
        if self.kind == "shapes":
            from irg.eval.geneval import shapes_scorer

            return shapes_scorer()
        if self.kind == "geneval":
            from irg.device import resolve_device
            from irg.eval.geneval import GenEvalScorer
            from irg.eval.hf_detection import ClipColorClassifier, Mask2FormerDetector

            device = resolve_device(self.device)
            return GenEvalScorer(Mask2FormerDetector(self.detector, device), ClipColorClassifier(self.color_classifier,
                                                                                                 device))
        if self.kind == "genai_bench" and self.vqa_model:
            from irg.device import resolve_device
            from irg.eval.genai_bench import HFVQAScore

            return HFVQAScore(self.vqa_model, resolve_device(self.device))
        if self.uses_judge:
            return self._judged(cache)
        raise ValueError(f"scorer: unknown {self.kind!r}, expected one of {SCORERS}")

    def _judged(self, cache: str | None, load_models: bool = True) -> Scorer:
        """The judge-based scorer; without ``load_models``, without its local models (the driver's check)."""
        from irg.eval.judge import JudgeClient

        judge = JudgeClient(self.judge_url, self.judge_model, os.environ.get(self.judge_api_key_env) or None,
                            requests_per_minute=self.judge_requests_per_minute,
                            max_concurrency=self.judge_concurrency, cache_dir=self.judge_cache or cache)
        if self.kind == "genai_bench":
            from irg.eval.genai_bench import JudgeVQAScore

            return JudgeVQAScore(judge)
        if self.kind == "oneig":
            from irg.device import resolve_device
            from irg.eval.oneig import OneIGScorer
            from irg.eval.oneig_style import StyleScorer

            load = self.style_model and load_models
            style = StyleScorer(self.style_model, resolve_device(self.device)) if load else None
            return OneIGScorer(judge, style)
        from irg.eval.tiif import TiifScorer
        from irg.eval.wise import WiseScorer

        scorer_class = TiifScorer if self.kind == "tiif" else WiseScorer
        if not self.judge_template:
            return scorer_class(judge)
        with open(self.judge_template) as f:
            template = f.read()
        try:
            return scorer_class(judge, template=template)
        except ValueError as e:
            raise ValueError(f"--judge-template {self.judge_template}: {e}") from None


@functools.cache
def _known_classes(kind: str) -> frozenset[str]:
    """The object classes the ``geneval`` or ``shapes`` scorer's detector can find."""
    if kind == "shapes":
        from irg.data.synth import SHAPES

        return frozenset(SHAPES)
    return frozenset(geneval_object_names())
