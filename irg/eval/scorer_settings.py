"""Which scorer an evaluation uses, as plain settings: checked on the driver before any generation,
built again inside each scoring actor (a detector or a judge client does not travel well)."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

from irg.eval.benchmarks import EvalPrompt, geneval_object_names
from irg.eval.scoring import Scorer

SCORERS = ("shapes", "geneval", "wise")
DEFAULT_SCORER = {"shapes": "shapes", "geneval": "geneval", "wise": "wise"}


@dataclass(frozen=True)
class ScorerSettings:
    kind: str = "shapes"
    # geneval: local Hugging Face folders (no download at run time)
    detector: str | None = None  # Mask2Former, COCO instance segmentation
    color_classifier: str | None = None  # CLIP
    # wise: an OpenAI-compatible chat endpoint with images
    judge_url: str | None = None  # e.g. http://vllm:8000/v1
    judge_model: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never stored
    judge_requests_per_minute: float | None = None
    judge_concurrency: int = 4
    judge_cache: str | None = None  # folder or s3:// URI; default: <output>/judge-cache
    judge_template: str | None = None  # a file holding the judge prompt ({prompt}, {explanation})
    device: str = "auto"

    def check(self, prompts: Sequence[EvalPrompt] = ()) -> None:
        """Fail before generating anything when the scorer could not be built, or could not score ``prompts``."""
        if self.kind not in SCORERS:
            raise ValueError(f"scorer: unknown {self.kind!r}, expected one of {SCORERS}")
        if self.kind == "geneval":
            from irg.eval.hf_detection import ClipColorClassifier, Mask2FormerDetector, local_checkpoint

            for flag, path, model in (("--detector", self.detector, Mask2FormerDetector),
                                      ("--color-classifier", self.color_classifier, ClipColorClassifier)):
                if not path:
                    raise ValueError(f"scorer geneval needs {flag}: a local Hugging Face checkpoint folder")
                local_checkpoint(path, *model.CHECKPOINT)
        if self.kind == "wise":
            if not self.judge_url or not self.judge_model:
                raise ValueError("scorer wise needs --judge-url (an OpenAI-compatible /v1 endpoint) and --judge-model")
            if self.judge_template and not os.path.isfile(self.judge_template):
                raise FileNotFoundError(f"--judge-template {self.judge_template} does not exist")
            try:  # offline, as each scoring actor will: the judge's URL, rate and concurrency, the template's fields
                self.build()
            except ValueError as e:
                raise ValueError(f"scorer wise: {e}") from None
        for prompt in prompts:
            self._check_prompt(prompt)

    def _check_prompt(self, prompt: EvalPrompt) -> None:
        """WISE's judge needs a prompt's explanation; the GenEval rules need a record whose classes the
        detector knows (COCO's 80 for geneval, the shapes world's for shapes)."""
        where = f"scorer {self.kind} cannot score prompt {prompt.id} ({prompt.prompt[:60]!r})"
        if self.kind == "wise":
            if "Explanation" not in prompt.metadata:
                raise ValueError(f"{where}: it has no Explanation, so it is not a WISE prompt; "
                                 "choose the --scorer these prompts are for")
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
    def overall(self) -> str:
        """GenEval: the mean of the category means; WISE: categories weighted by their prompt counts."""
        return "prompts" if self.kind == "wise" else "categories"

    @property
    def gpus(self) -> int:
        """GPUs a scoring actor asks for where there are GPUs (the judge runs elsewhere)."""
        return 1 if self.kind == "geneval" and self.device != "cpu" else 0

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
        if self.kind == "wise":
            from irg.eval.judge import JudgeClient
            from irg.eval.wise import WiseScorer

            judge = JudgeClient(self.judge_url, self.judge_model, os.environ.get(self.judge_api_key_env) or None,
                                requests_per_minute=self.judge_requests_per_minute,
                                max_concurrency=self.judge_concurrency, cache_dir=self.judge_cache or cache)
            if not self.judge_template:
                return WiseScorer(judge)
            with open(self.judge_template) as f:
                template = f.read()
            try:
                return WiseScorer(judge, template=template)
            except ValueError as e:
                raise ValueError(f"--judge-template {self.judge_template}: {e}") from None
        raise ValueError(f"scorer: unknown {self.kind!r}, expected one of {SCORERS}")


@functools.cache
def _known_classes(kind: str) -> frozenset[str]:
    """The object classes the ``geneval`` or ``shapes`` scorer's detector can find."""
    if kind == "shapes":
        from irg.data.synth import SHAPES

        return frozenset(SHAPES)
    return frozenset(geneval_object_names())
