"""The transformers GenEval detector and colour classifier, on tiny random models saved to disk (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTokenizer,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    Mask2FormerImageProcessorPil,
    SwinConfig,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from irg.eval.detection import COLORS, Detection
from irg.eval.hf_detection import (
    BACKGROUND,
    COLOR_TEMPLATES,
    ClipColorClassifier,
    Mask2FormerDetector,
    masked_crop,
)

LABELS = {0: "dog", 1: "cat", 2: "bench"}
RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def mask2former_dir(tmp_path_factory) -> Path:
    """A random Mask2Former with a tiny Swin backbone (built from its config: no timm, no pretrained backbone)."""
    backbone = SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    # The pixel decoder's GroupNorm has 32 groups, so the feature sizes must be multiples of 32.
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=32, dim_feedforward=32, encoder_layers=1, decoder_layers=2,
                               num_attention_heads=2, num_queries=12,
                               id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("mask2former")
    Mask2FormerForUniversalSegmentation(config).save_pretrained(folder)
    Mask2FormerImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 128}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A random CLIP with a byte-level tokenizer (one token per character, no merges)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in bytes_to_unicode().values():
            vocab[char + suffix] = len(vocab)
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def detector(mask2former_dir) -> Mask2FormerDetector:
    return Mask2FormerDetector(mask2former_dir)


@pytest.fixture(scope="module")
def classifier(clip_dir) -> ClipColorClassifier:
    return ClipColorClassifier(clip_dir, batch_size=2)


@pytest.fixture(scope="module")
def noise() -> Image.Image:
    """Not square: the processor stretches it to 64 x 96, which the masks must undo."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))


def halves() -> tuple[Image.Image, Detection, Detection]:
    """A red-left, blue-right image and two detections on the whole of it, masked to the red and the blue half."""
    pixels = np.zeros((20, 30, 3), dtype=np.uint8)
    pixels[:, :15], pixels[:, 15:] = RED, BLUE
    left = np.zeros((20, 30), dtype=bool)
    left[:, :15] = True
    box = (0.0, 0.0, 30.0, 20.0)
    return Image.fromarray(pixels), Detection("dog", box, mask=left), Detection("dog", box, mask=~left)


@pytest.mark.parametrize("cls", [Mask2FormerDetector, ClipColorClassifier])
def test_missing_checkpoint_names_the_folder(cls, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist.*huggingface-cli download"):
        cls(missing)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path.name}.*has no config.json.*local Hugging Face"):
        cls(tmp_path)


def test_detections_are_well_formed(detector, noise):
    detections = detector.detect(noise, list(LABELS.values()))
    assert detections
    for d in detections:
        assert d.label in LABELS.values()
        assert 0.0 <= d.score <= 1.0
        assert d.mask.shape == (50, 70) and d.mask.dtype == bool
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 < x1 <= 70 and 0 <= y0 < y1 <= 50
        # The box is the mask's: it holds the whole mask and the mask touches each of its sides.
        ys, xs = np.nonzero(d.mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)


def test_detect_keeps_only_the_requested_classes(detector, noise):
    everything = detector.detect(noise, list(LABELS.values()))
    assert {"cat"} < {d.label for d in everything}  # the filter has something to remove
    cats = detector.detect(noise, ["cat"])
    assert [(d.label, d.score, d.box) for d in cats] == [(d.label, d.score, d.box) for d in everything
                                                         if d.label == "cat"]
    assert detector.detect(noise, ["zebra"]) == []


def test_masked_crop_greys_out_what_the_mask_leaves():
    image, red, _ = halves()
    crop = np.array(masked_crop(image, red))
    assert crop.shape == (20, 30, 3)
    assert (crop[:, :15] == RED).all() and (crop[:, 15:] == BACKGROUND).all()
    # Without a mask the box is cut as it is.
    plain = np.array(masked_crop(image, Detection("dog", (10.0, 5.0, 20.0, 15.0))))
    assert plain.shape == (10, 10, 3) and (plain[:, :5] == RED).all() and (plain[:, 5:] == BLUE).all()


def test_text_classifier_averages_the_templates(classifier):
    weights = classifier.text_classifier("dog")
    assert weights.shape == (len(COLORS), 8)
    assert torch.allclose(weights.norm(dim=1), torch.ones(len(COLORS)), atol=1e-5)
    assert classifier.text_classifier("dog") is weights  # cached per class
    assert not torch.allclose(classifier.text_classifier("cat"), weights)
    # Row i comes from COLORS[i]'s three prompts for this class.
    prompts = [t.format(color=COLORS[3], label="dog") for t in COLOR_TEMPLATES]
    assert prompts[1] == "a photo of a green-colored dog"
    tokens = classifier.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        embeddings = classifier.model.get_text_features(**tokens).pooler_output
    expected = torch.nn.functional.normalize(torch.nn.functional.normalize(embeddings, dim=-1).mean(0), dim=0)
    assert torch.allclose(weights[3], expected, atol=1e-5)


def test_classify_names_one_colour_per_detection(classifier):
    image, red, blue = halves()
    detections = [red, blue, Detection("dog", (0.0, 0.0, 15.0, 20.0))]
    colors = classifier.classify(image, detections, "dog")
    assert len(colors) == 3 and set(colors) <= set(COLORS)
    assert classifier.classify(image, [], "dog") == []


def test_similarities_follow_the_masks_and_not_the_batching(classifier):
    image, red, blue = halves()
    unmasked = Detection("dog", red.box)
    full = Detection("dog", red.box, mask=np.ones((20, 30), dtype=bool))
    # Three detections in batches of two: each row must match the detection scored alone.
    scores = classifier.similarities(image, [red, blue, full], "dog")
    assert scores.shape == (3, len(COLORS)) and scores.abs().max() <= 1 + 1e-5
    alone = torch.cat([classifier.similarities(image, [d], "dog") for d in (red, blue, full)])
    assert torch.allclose(scores, alone, atol=1e-5)
    # The same box reads differently through the red and the blue mask; a mask of everything changes nothing.
    assert not torch.allclose(scores[0], scores[1], atol=1e-4)
    assert torch.allclose(scores[2], classifier.similarities(image, [unmasked], "dog")[0], atol=1e-6)
