"""GenAI-Bench (Li et al., 2024): VQAScore, the probability that a VQA model answers "Yes" to
'Does this figure show "{prompt}"? Please answer yes or no.', reported per skill tag.

The official scoring model is CLIP-FlanT5-XXL (t2v_metrics' own architecture, not in transformers);
:class:`HFVQAScore` runs a decoder-only Hugging Face image-text-to-text model from a local folder
(Qwen2.5-VL, LLaVA), which is what a lab can point at its own copy. Without one, an OpenAI-compatible judge that returns
log-probabilities may stand in (:class:`JudgeVQAScore`, as t2v_metrics scores GPT-4o); its numbers
are labelled as not comparable with published VQAScores.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from PIL import Image

from irg.eval.benchmarks import EvalPrompt, packaged
from irg.eval.judge import JudgeClient, image_part, judge_all
from irg.eval.scoring import Verdict

SPLITS = {"1600": "GenAI1600", "527": "GenAI527"}  # our name (benchmarks.SPLITS) -> the folder
BASIC_SKILLS = ("attribute", "scene", "spatial relation", "action relation", "part relation")
ADVANCED_SKILLS = ("counting", "comparison", "differentiation", "negation", "universal")
QUESTION = 'Does this figure show "{prompt}"? Please answer yes or no.'
ANSWER = "Yes"
# How many alternatives t2v_metrics asks GPT-4o for; "Yes" outside them scores 0.
TOP_LOGPROBS = 20
NOT_COMPARABLE = ("VQAScore from {source}, not from the benchmark's scoring model (CLIP-FlanT5-XXL): "
                  "not comparable with published GenAI-Bench numbers")


def load_genai_bench(split: str = "1600") -> list[EvalPrompt]:
    """Every prompt with its skill tags (``metadata["skills"]``); category ``basic``, ``advanced`` or
    ``untagged`` (7 of the 1600). The skill files index prompts by ``int(key)`` in both sets (0-based
    keys in the 1600, 1-based in the 527)."""
    folder = SPLITS[split]
    images = json.loads(packaged(f"genai_bench/{folder}/genai_image.json"))
    skills: dict[int, list[str]] = {}
    for skill, indices in json.loads(packaged(f"genai_bench/{folder}/genai_skills.json")).items():
        for index in indices:
            skills.setdefault(index, []).append(skill)
    prompts = []
    for key, record in images.items():
        tags = sorted(skills.get(int(key), []))
        category = "advanced" if "advanced" in tags else "basic" if "basic" in tags else "untagged"
        prompts.append(EvalPrompt(key, record["prompt"], category, {"skills": tags, "index": int(key)}))
    return prompts


def yes_probability(top: Sequence[tuple[str, float]]) -> float:
    """P("Yes") from a first token's top log-probabilities: exp of the first alternative's that reads "yes";
    0 if none does, as t2v_metrics scores GPT-4o. Its published run matched exactly "Yes"; any case and
    spaces are accepted here, as in its later version, since a chat model may answer " yes"."""
    for token, logprob in top:
        if token.strip().lower() == "yes":
            return math.exp(logprob)
    return 0.0


class JudgeVQAScore:
    """VQAScore from an OpenAI-compatible judge's first-token log-probabilities."""

    name = "genai_bench"

    def __init__(self, judge: JudgeClient):
        self.judge = judge

    def score(self, items: Sequence[tuple[EvalPrompt, Image.Image]]) -> list[Verdict]:
        return judge_all(self.judge, self._score_one, items)

    def _score_one(self, prompt: EvalPrompt, image: Image.Image) -> Verdict:
        top = self.judge.top_logprobs(vqa_messages(prompt.prompt, image), TOP_LOGPROBS)
        return Verdict(yes_probability(top), {"top": top[:5]})

    def probe(self) -> None:
        """Ask one question about a blank image: a JudgeError names an endpoint that gives no log-probabilities."""
        self.judge.top_logprobs(vqa_messages("a white square", Image.new("RGB", (64, 64), "white")), TOP_LOGPROBS,
                                cache=False)


def vqa_messages(prompt: str, image: Image.Image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": QUESTION.format(prompt=prompt)},
                                         image_part(image)]}]


class HFVQAScore:
    """VQAScore from a local decoder-only Hugging Face image-text-to-text model (Qwen2.5-VL, LLaVA): the
    probability of the answer "Yes" (all of its tokens) right after the question, asked through the
    processor's chat template, from the full-vocabulary softmax (as t2v_metrics scores Qwen2-VL)."""

    name = "genai_bench"
    CHECKPOINT = ("a Hugging Face image-text-to-text model to compute VQAScore with", "Qwen/Qwen2.5-VL-7B-Instruct")

    def __init__(self, folder: str, device: str = "cpu"):
        import torch
        from transformers import AutoModelForImageTextToText

        self.processor = self.load_processor(folder)
        self.tokenizer = self.processor.tokenizer
        self.device = torch.device(device)
        self.model = AutoModelForImageTextToText.from_pretrained(
            folder, local_files_only=True, dtype=torch.bfloat16 if self.device.type == "cuda" else torch.float32
        ).to(self.device).eval()

    @classmethod
    def load_processor(cls, folder: str):
        """The folder's processor, once its config and processor show the model can give VQAScores here (a
        decoder-only model with a chat template that keeps "Yes" after the question): checked without
        loading the weights, so a wrong folder fails before any image is drawn."""
        from transformers import AutoConfig, AutoProcessor

        from irg.eval.hf_detection import local_checkpoint

        local_checkpoint(folder, *cls.CHECKPOINT)
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        if getattr(config, "is_encoder_decoder", False) or getattr(config.get_text_config(), "is_encoder_decoder",
                                                                   False):
            raise ValueError(f"{folder}: an encoder-decoder model; VQAScore here takes a decoder-only one "
                             "(Qwen2.5-VL, LLaVA)")
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        if not getattr(processor, "chat_template", None):
            raise ValueError(f"{folder}: its processor has no chat template to ask the question with")
        answer_tokens(processor.tokenizer, vqa_question(processor, "a cat"))
        return processor

    def score(self, items: Sequence[tuple[EvalPrompt, Image.Image]]) -> list[Verdict]:
        return [Verdict(self.probability(prompt.prompt, image), {}) for prompt, image in items]

    def probability(self, prompt: str, image: Image.Image) -> float:
        """P("Yes") for one image (one at a time: processors pad and place image tokens differently)."""
        import torch

        question = vqa_question(self.processor, prompt)
        answer = torch.tensor(answer_tokens(self.tokenizer, question), device=self.device)
        n = len(answer)
        inputs = self.processor(images=image, text=question + ANSWER, return_tensors="pt").to(self.device)
        if not torch.equal(inputs["input_ids"][0, -n:], answer):
            raise ValueError(f"the processor did not keep {ANSWER!r} as the last tokens of the prompt")
        with torch.inference_mode():
            logits = self.model(**inputs).logits[0, -n - 1:-1]  # each answer token predicted from before it
        return float(torch.log_softmax(logits.float(), dim=-1).gather(1, answer[:, None]).sum().exp())


def vqa_question(processor, prompt: str) -> str:
    """The VQAScore question about ``prompt`` in the processor's chat template, the image first."""
    question = {"type": "text", "text": QUESTION.format(prompt=prompt)}
    return processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, question]}],
                                         add_generation_prompt=True)


def answer_tokens(tokenizer, question: str) -> list[int]:
    """The tokens of "Yes" as they follow ``question`` (a tokenizer may merge or prefix a space)."""
    asked = tokenizer(question, add_special_tokens=False)["input_ids"]
    full = tokenizer(question + ANSWER, add_special_tokens=False)["input_ids"]
    if full[:len(asked)] != asked or len(full) == len(asked):
        raise ValueError(f"the tokenizer does not keep the question's tokens when {ANSWER!r} follows it")
    return full[len(asked):]


def summarize_genai_bench(rows: Sequence[tuple[EvalPrompt, Verdict]]) -> dict[str, float | None]:
    """Mean VQAScore over the prompts of each skill tag (each prompt's images averaged first), the
    ``basic`` and ``advanced`` tags' own means, and ``overall`` over every tagged prompt."""
    per_prompt: dict[str, list[float]] = {}
    tags: dict[str, list[str]] = {}
    for prompt, verdict in rows:
        per_prompt.setdefault(prompt.id, []).append(verdict.score)
        tags[prompt.id] = prompt.metadata["skills"]
    means = {p: sum(s) / len(s) for p, s in per_prompt.items()}
    scores: dict[str, float | None] = {}
    for level, skills in (("basic", BASIC_SKILLS), ("advanced", ADVANCED_SKILLS)):
        for skill in (level, *skills):
            values = [means[p] for p in means if skill in tags[p]]
            scores[level if skill == level else f"{level}/{skill}"] = sum(values) / len(values) if values else None
    tagged = [means[p] for p in means if tags[p]]
    scores["overall"] = sum(tagged) / len(tagged) if tagged else None
    return scores

