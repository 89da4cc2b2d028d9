"""The shapes model from scratch: every step of its recipe, each resumable, in the order they run.

1. ``tokenizer``: byte-level BPE on the shapes world's text (:mod:`irg.data.tokenizer`);
2. ``autoencoder``: the FLUX-architecture autoencoder on renders (:mod:`irg.train.autoencoder`);
3. ``init``: the ``shapes`` preset's random LLM and ViT with that autoencoder and tokenizer, in the
   official BAGEL layout plus ``generation_config.json``;
4. ``base``: unified pretraining (text to image, image understanding, editing) on synthetic rows;
5. ``synthesis``: the base model draws round 1 for many prompts, a judge reads each image and the
   reflection and corrected target are written from what is actually wrong (:mod:`irg.data.irgl_synthesis`),
   next to synthetic flawed examples;
6. ``irgl``: IRGL stage 1 (six modes) and stage 2 (full modes) from the base model.

A step whose output exists is skipped, and the training steps resume their Ray Train runs, so running
the recipe again after an interruption continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from irg import storage
from irg.data.format import EDITING_MODE
from irg.data.synth import make_edit_example, make_example, write_synthetic
from irg.pipeline.prompts import SYSTEM_PROMPT

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
BASE_MODES = ("initial_full_learning", "initial_thinking_understanding_learning", EDITING_MODE)

# The shapes model is asked with a short system prompt of its own (carried in its generation_config.json):
# a constant prefix teaches a model trained from scratch nothing, and the IRG prompt's 270 tokens would
# triple the cost of every training row. What the IRG prompt asks for (think, draw, reflect in four
# parts, draw again) the model learns from the rows themselves.
SHAPES_SYSTEM_PROMPT = (
    "Think about the plan inside <think> </think>, then draw the image. After each image, reflect on it in "
    "four parts and draw an improved image.")

GENERATION_CONFIG = {
    "height": 64, "width": 64, "num_steps": 20, "rounds": 2, "max_think_tokens": 400, "think_temperature": 0.0,
    "system_prompt": SHAPES_SYSTEM_PROMPT,
    "round_settings": [{"timestep_shift": 1.0}, {"timestep_shift": 1.0}],
}


@dataclass
class RecipeSettings:
    work: str = "out/shapes"  # local folder for the tokenizer, autoencoder and initial checkpoint (the job: $IRG_HOME)
    data: str = ""  # where the base and IRGL rows go; default: s3://<bucket>/shapes on the configured store
    seed: int = 0
    tokenizer_scenes: int = 4000
    vocab_size: int = 1024
    base_rows: int = 25000  # per base mode (1200 steps of ~45 rows draw ~55 000)
    synthetic_rows: int = 2000  # per IRGL mode, synthetic flawed examples
    synthesis_prompts: int = 1024  # prompts the base model draws round 1 for
    synthesis_workers: int = 2
    image_size: int = 64
    ship_to: str | None = None  # copy the final model here (the package's irg/models/shapes)
    base: str | None = None  # a base model trained elsewhere (benchmarks/shapes_probe.py --save on a GPU)


def corpus(scenes: int, seed: int):
    """Every kind of text the world writes, for the tokenizer."""
    rng = random.Random(f"tokenizer:{seed}")
    yield SYSTEM_PROMPT
    yield SHAPES_SYSTEM_PROMPT
    for _ in range(scenes):
        example = make_example(rng, 64)
        yield example.prompt
        yield example.think
        yield example.reflection
        yield make_edit_example(rng, 64).reflection  # edits name extra shapes and keep what is right


def build_tokenizer(settings: RecipeSettings) -> str:
    from irg.data.tokenizer import train_tokenizer

    out = Path(settings.work) / "tokenizer"
    if not (out / "tokenizer.json").exists():
        tokenizer = train_tokenizer(corpus(settings.tokenizer_scenes, settings.seed), settings.vocab_size)
        tokenizer.save_pretrained(out)
        log.info("tokenizer: %d tokens -> %s", len(tokenizer), out)
    return str(out)


def build_autoencoder(settings: RecipeSettings) -> str:
    import yaml

    from irg.model.config import shapes_config
    from irg.train.autoencoder import AETrainConfig, train_autoencoder

    out = Path(settings.work) / "autoencoder"
    if not (out / "ae.safetensors").exists():
        with open(CONFIGS / "shapes-ae.yaml") as f:
            raw = yaml.safe_load(f)
        raw["ae"] = shapes_config().ae.__dict__ | raw.get("ae", {})
        metrics = train_autoencoder(AETrainConfig.from_dict(raw), str(out))
        log.info("autoencoder: %s -> %s", metrics, out)
    return str(out)


def init_weights(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """GPT-style initialisation for training from scratch: normal(0, std) weights, zero biases; norms keep 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()


def build_initial_checkpoint(settings: RecipeSettings, tokenizer_dir: str, autoencoder_dir: str) -> str:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from irg.model import AEConfig, AutoEncoder, build_model, save_pretrained
    from irg.model.config import shapes_config

    out = Path(settings.work) / "init"
    if (out / "ema.safetensors").exists():
        return str(out)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    start, end = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
    vocab = -(-len(tokenizer) // 64) * 64
    with open(Path(autoencoder_dir) / "ae_config.json") as f:
        ae_config = AEConfig.from_dict(json.load(f))
    config = shapes_config(vocab, start, end)
    config.ae = ae_config
    model = build_model(config)
    init_weights(model, seed=settings.seed)
    autoencoder = AutoEncoder(ae_config)
    autoencoder.load_state_dict(load_file(Path(autoencoder_dir) / "ae.safetensors"))
    save_pretrained(out, model, autoencoder, tokenizer, generation_config=GENERATION_CONFIG)
    log.info("initial checkpoint: %d parameters -> %s", sum(p.numel() for p in model.parameters()), out)
    return str(out)


def data_root(settings: RecipeSettings) -> str:
    return settings.data or storage.StoreConfig.load().uri("shapes")


def write_base_data(settings: RecipeSettings) -> str:
    root = storage.join(data_root(settings), "base")
    done = storage.join(root, "_SUCCESS")
    if not storage.exists(done):
        write_synthetic(root, settings.base_rows, seed=settings.seed, image_size=settings.image_size,
                        modes=BASE_MODES, system_prompt=SHAPES_SYSTEM_PROMPT)
        with storage.open_file(done, "w") as f:
            f.write(json.dumps({"rows_per_mode": settings.base_rows}))
    return root


def train_base(checkpoint: str, data_root: str, overrides: list[str] = ()) -> str:
    from irg.train.config import load_config
    from irg.train.trainer import run_stage

    cfg = load_config(CONFIGS / "shapes-base.yaml", 1,
                      [f"model.checkpoint={checkpoint}", f"data.root={data_root}", *overrides])
    return run_stage(cfg).model_uri



def synthesize_irgl_data(settings: RecipeSettings, base_model: str) -> str:
    """IRGL rows in one root: synthetic flawed examples (``part-*``) and the base model's own round-1
    images judged by the shapes detector (``model-part-*``), side by side in each mode's folder."""
    from irg.data.irgl_synthesis import ray_drawer, synthesize_from_model
    from irg.eval.shapes_judge import ShapesJudge
    from irg.pipeline.request import model_defaults

    system_prompt = model_defaults(base_model).system_prompt  # the rows ask as the model is asked

    root = storage.join(data_root(settings), "irgl")
    done = storage.join(root, "_SYNTHETIC")
    if not storage.exists(done):
        write_synthetic(root, settings.synthetic_rows, seed=settings.seed + 1, image_size=settings.image_size,
                        system_prompt=system_prompt)
        with storage.open_file(done, "w") as f:
            f.write(json.dumps({"rows_per_mode": settings.synthetic_rows}))
    drawer = ray_drawer(base_model, workers=settings.synthesis_workers, batch_size=8, device="cpu",
                        dtype="float32", system_prompt=system_prompt)
    summary = synthesize_from_model(root, ShapesJudge(), drawer, prompts=settings.synthesis_prompts,
                                    seed=settings.seed, system_prompt=system_prompt)
    log.info("synthesis: %s", summary)
    return root


def train_irgl(base_model: str, data: str, overrides: list[str] = ()):
    """IRGL stage 1 then stage 2 from the base model; the stage-2 model is registered as irg-shapes."""
    from irg.train.config import load_config
    from irg.train.trainer import run_irgl

    configs = {stage: load_config(CONFIGS / "shapes.yaml", stage,
                                  [f"model.checkpoint={base_model}", f"data.root={data}", *overrides])
               for stage in (1, 2)}
    results, version = run_irgl(configs, job_name=configs[1].run.name)
    return results[2].model_uri, version


def ship(model_uri: str, destination: str | Path) -> str:
    """The trained model as the package ships it: half-precision weights (a third of the size; the
    pipeline loads them in the dtype it is asked for) with its configs, tokenizer and generation_config.json."""
    import shutil
    import tempfile

    from irg.model import load_pretrained, save_pretrained

    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    pretrained = load_pretrained(model_uri)
    with tempfile.TemporaryDirectory(dir=destination.parent) as tmp:
        save_pretrained(tmp, pretrained.model, pretrained.autoencoder, pretrained.tokenizer, dtype=torch.float16,
                        generation_config=pretrained.generation_config)
        card = destination / "README.md"
        if card.exists():
            shutil.copy(card, Path(tmp) / "README.md")
        if destination.exists():
            shutil.rmtree(destination)
        shutil.copytree(tmp, destination)
    destination.chmod(0o755)  # a temporary folder is private; the package's is not
    return str(destination)


STEPS = ("tokenizer", "autoencoder", "init", "base", "synthesis", "irgl", "ship")


def run(settings: RecipeSettings, until: str = STEPS[-1], overrides: list[str] = ()) -> dict:
    """Every step up to ``until``; returns what each produced (paths and URIs) and how long it took."""
    from irg import embedded_store

    if storage.configured_store() is None:  # the embedded default, as `make demo` uses
        status = embedded_store.up()
        embedded_store.make_default(status.config)
    outputs = {}
    steps = {
        "tokenizer": lambda: build_tokenizer(settings),
        "autoencoder": lambda: build_autoencoder(settings),
        "init": lambda: build_initial_checkpoint(settings, outputs["tokenizer"], outputs["autoencoder"]),
        "base": lambda: settings.base or train_base(outputs["init"], write_base_data(settings), overrides),
        "synthesis": lambda: synthesize_irgl_data(settings, outputs["base"]),
        "irgl": lambda: train_irgl(outputs["base"], outputs["synthesis"], overrides)[0],
        "ship": lambda: ship(outputs["irgl"], settings.ship_to) if settings.ship_to else outputs["irgl"],
    }
    seconds = {}
    for name in STEPS[:STEPS.index(until) + 1]:
        log.info("recipe step %s", name)
        start = time.monotonic()
        outputs[name] = steps[name]()
        seconds[name] = round(time.monotonic() - start, 1)  # a skipped (already done) step takes ~0 s
    return outputs | {"seconds": seconds}
