"""How well the shapes scorer separates right from wrong, and how fast it is.

For each GenEval category it scores the synthetic world's correct images and its deliberately flawed
first images (the ones the reflections of the training data fix), clean and degraded (blurred, with
Gaussian noise, as a generator's images are), and prints one JSON object: per image size and
degradation, the mean score of the correct and of the flawed images per category, and images/s.

    PYTHONPATH=. python benchmarks/shapes_scorer.py --per-category 100
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
from PIL import Image, ImageFilter

from irg.data.synth import CATEGORIES, flaw, geneval_metadata, render, sample_scene
from irg.eval import EvalPrompt
from irg.eval.geneval import shapes_scorer


def degrade(image: Image.Image, blur: float, noise: float, rng: np.random.Generator) -> Image.Image:
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, dtype=np.float32)
    if noise:
        pixels = pixels + rng.normal(0, noise, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-category", type=int, default=50)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    args = parser.parse_args()
    scorer = shapes_scorer()
    conditions = {"clean": (0, 0), "blur1": (1, 0), "blur1+noise10": (1, 10), "blur1+noise25": (1, 25)}
    results = []
    for size in args.sizes:
        for condition, (blur, noise) in conditions.items():
            rng = np.random.default_rng(0)
            scores = {c: {"correct": [], "flawed": []} for c in CATEGORIES}
            start, images = time.perf_counter(), 0
            for category in CATEGORIES:
                for i in range(args.per_category):
                    draw = random.Random(f"bench:{category}:{i}")
                    scene = sample_scene(draw, category)
                    flawed_scene, _ = flaw(scene, draw)
                    seed = draw.getrandbits(64)
                    prompt = EvalPrompt(str(i), "", category, geneval_metadata(scene))
                    pair = [degrade(render(s, size, random.Random(seed)), blur, noise, rng)
                            for s in (scene, flawed_scene)]
                    good, bad = scorer.score([(prompt, pair[0]), (prompt, pair[1])])
                    scores[category]["correct"].append(good.score)
                    scores[category]["flawed"].append(bad.score)
                    images += 2
            seconds = time.perf_counter() - start
            results.append({"size": size, "condition": condition, "images_per_s": round(images / seconds, 1),
                            "correct": {c: round(float(np.mean(s["correct"])), 3) for c, s in scores.items()},
                            "flawed": {c: round(float(np.mean(s["flawed"])), 3) for c, s in scores.items()}})
    print(json.dumps({"benchmark": "shapes_scorer", "per_category": args.per_category, "results": results}, indent=1))


if __name__ == "__main__":
    main()
