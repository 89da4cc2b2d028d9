"""Every round's image of every prompt, generated on a Ray Data actor pool and saved as it is made.

Layout under the evaluation's output folder or URI::

    samples/<prompt id>/<sample>/round1.png, round2.png, ...
    samples/<prompt id>/<sample>/record.json   prompt, think texts, seed, timings (written last)

``record.json`` is written after the images, so it marks a finished sample: a re-run skips every
sample that has one and generates only the rest.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
import zlib
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from irg import storage
from irg.device import dtype_name
from irg.eval.benchmarks import EvalPrompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """What decides the images; stored with the samples so a re-run cannot mix settings. None is the
    model's default (:attr:`irg.pipeline.IRGPipeline.defaults`); an evaluation fills those in from
    the model before it stores them (:func:`irg.eval.run.evaluate`)."""

    height: int | None = None
    width: int | None = None
    steps: int | None = None
    rounds: int | None = None
    samples: int = 1  # images per prompt (GenEval's protocol uses 4)
    seed: int = 0
    max_think_tokens: int | None = None
    think_temperature: float | None = None
    dtype: str = "auto"  # see irg.device: bf16 on GPU, fp32 on the CPU

    def __post_init__(self):
        if self.samples < 1 or (self.rounds is not None and self.rounds < 1):
            raise ValueError(f"samples and rounds must be >= 1, got {self.samples} and {self.rounds}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))  # one spelling in the stored claim


def sample_seed(seed: int, prompt_id: str, sample: int) -> int:
    """A seed per (prompt, sample) that does not depend on batching, workers or what is already done."""
    return zlib.crc32(f"{seed}:{prompt_id}:{sample}".encode())


def sample_uri(output: str, prompt_id: str, sample: int, name: str = "") -> str:
    return storage.join(output, "samples", prompt_id, str(sample), *([name] if name else []))


def finished_samples(output: str) -> set[tuple[str, int]]:
    """(prompt id, sample) pairs whose ``record.json`` exists."""
    fs, path = storage.filesystem(output)
    fs.invalidate_cache()  # s3fs caches listings: other processes (the generators) have written since
    done = set()
    for found in fs.glob(f"{path.rstrip('/')}/samples/*/*/record.json"):
        prompt_id, sample = found.rstrip("/").split("/")[-3:-1]
        if sample.isdigit():
            done.add((prompt_id, int(sample)))
    return done


def read_record(output: str, prompt_id: str, sample: int) -> dict:
    with storage.open_file(sample_uri(output, prompt_id, sample, "record.json"), "r") as f:
        return json.load(f)


def read_image(output: str, prompt_id: str, sample: int, round_index: int) -> Image.Image:
    with storage.open_file(sample_uri(output, prompt_id, sample, f"round{round_index + 1}.png")) as f:
        return Image.open(io.BytesIO(f.read())).convert("RGB")


class ImageGenerator:
    """One model replica (a Ray Data actor): a batch of (prompt, sample) rows in, files written, rows out."""

    def __init__(self, model: str, output: str, settings: GenerationSettings, device: str = "auto"):
        from irg.pipeline import IRGPipeline

        self.settings = settings
        self.pipe = IRGPipeline.from_pretrained(model, device=device, dtype=settings.dtype)
        self.output = output

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        s = self.settings
        start = time.perf_counter()
        outputs = self.pipe([str(p) for p in batch["prompt"]], seed=[int(x) for x in batch["seed"]],
                            height=s.height, width=s.width, num_steps=s.steps, rounds=s.rounds,
                            max_think_tokens=s.max_think_tokens, think_temperature=s.think_temperature)
        seconds = (time.perf_counter() - start) / len(outputs)
        for prompt_id, sample, out in zip(batch["prompt_id"], batch["sample"], outputs):
            for r, image in enumerate(out.images):
                with storage.open_file(sample_uri(self.output, str(prompt_id), int(sample), f"round{r + 1}.png"),
                                       "wb") as f:
                    image.save(f, format="PNG")
            record = {"prompt_id": str(prompt_id), "sample": int(sample), "prompt": out.prompt, "seed": out.seed,
                      "texts": out.texts, "timings_s": out.timings, "settings": asdict(s),
                      "device": str(self.pipe.device), "dtype": str(self.pipe.dtype).removeprefix("torch.")}
            with storage.open_file(sample_uri(self.output, str(prompt_id), int(sample), "record.json"), "w") as f:
                json.dump(record, f)
        return {"prompt_id": [str(p) for p in batch["prompt_id"]], "sample": [int(x) for x in batch["sample"]],
                "seconds": [seconds] * len(outputs)}


def generate_samples(model: str, prompts: list[EvalPrompt], output: str, settings: GenerationSettings, *,
                     workers: int | None = None, batch_size: int = 4, device: str = "auto") -> dict[str, int]:
    """Generate every (prompt, sample) not finished under ``output`` on ``workers`` actors (default: one
    per GPU, else one); returns counts of what was generated and what was already there."""
    import ray

    todo_all = [(p, k) for p in prompts for k in range(settings.samples)]
    done = finished_samples(output)
    todo = [{"prompt_id": p.id, "sample": k, "prompt": p.prompt, "seed": sample_seed(settings.seed, p.id, k)}
            for p, k in todo_all if (p.id, k) not in done]
    skipped = len(todo_all) - len(todo)
    if skipped:
        log.info("%d of %d samples are already in %s; generating the other %d", skipped, len(todo_all), output,
                 len(todo))
    if not todo:
        return {"generated": 0, "skipped": skipped}
    if not ray.is_initialized():
        ray.init()
    gpus = int(ray.cluster_resources().get("GPU", 0)) if device in ("auto", "cuda") else 0
    if device == "cuda" and not gpus:
        raise ValueError("device cuda: the Ray cluster has no GPUs (use --device auto or cpu)")
    workers = workers or max(gpus, 1)
    per_worker = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    dataset = ray.data.from_items(todo, override_num_blocks=max(1, math.ceil(len(todo) / batch_size)))
    generated = dataset.map_batches(
        ImageGenerator, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=min(workers, len(todo))),
        fn_constructor_kwargs={"model": model, "output": output, "settings": settings,
                               "device": "cuda" if gpus else "cpu"},
        **per_worker)
    seconds = [row["seconds"] for row in generated.iter_rows()]
    log.info("generated %d samples, %.2f s per sample per worker", len(seconds), float(np.mean(seconds)))
    return {"generated": len(seconds), "skipped": skipped}
