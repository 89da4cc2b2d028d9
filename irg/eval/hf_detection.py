"""GenEval's detector and colour classifier on Hugging Face transformers, loaded from local folders.

GenEval detects objects with Mask2Former (Swin-S, COCO instances) and names their colours by zero-shot
CLIP ViT-L/14. :class:`Mask2FormerDetector` and :class:`ClipColorClassifier` do the same from local
copies of the transformers ports (nothing is downloaded), and fit the :class:`~irg.eval.detection.Detector`
and :class:`~irg.eval.detection.ColorClassifier` protocols.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPModel,
    Mask2FormerForUniversalSegmentation,
)

from irg.eval.detection import COLORS, Detection

# GenEval's prompts for its colour classifier (the text embeddings of the three are averaged per colour).
COLOR_TEMPLATES = (
    "a photo of a {color} {label}",
    "a photo of a {color}-colored {label}",
    "a photo of a {color} object",
)
# What replaces the pixels outside a detection's mask, so the background's colour does not leak into the crop.
BACKGROUND = (0x99, 0x99, 0x99)


def local_checkpoint(path: str | Path, what: str, repo: str) -> Path:
    """``path`` as a folder holding a saved checkpoint, or a FileNotFoundError that says how to get one."""
    folder = Path(path)
    if (folder / "config.json").is_file():
        return folder
    problem = "has no config.json" if folder.is_dir() else "does not exist"
    raise FileNotFoundError(
        f"{str(folder)!r} {problem}: expected {what}, e.g. downloaded on a machine with internet by "
        f"`huggingface-cli download {repo} --local-dir {folder}`")


def _mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The bounding box (x0, y0, x1, y1), ends exclusive, of a non-empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


class Mask2FormerDetector:
    """GenEval's detector: Mask2Former instance segmentation, every query's best guesses with their scores.

    ``path`` is a local transformers Mask2Former COCO-instance checkpoint (GenEval uses the Swin-S one,
    ported as facebook/mask2former-swin-small-coco-instance) with its image processor.
    """

    CHECKPOINT = ("a local Hugging Face Mask2Former COCO-instance checkpoint",
                  "facebook/mask2former-swin-small-coco-instance")  # what the folder holds, where to get it

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        folder = local_checkpoint(path, *self.CHECKPOINT)
        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(
            folder, local_files_only=True, dtype=dtype).to(device).eval()
        self.device, self.dtype = torch.device(device), dtype

    @torch.inference_mode()
    def detect(self, image: Image.Image, classes: Sequence[str]) -> list[Detection]:
        image = image.convert("RGB")
        inputs = self.processor(images=image, return_tensors="pt")
        outputs = self.model(pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                             pixel_mask=inputs["pixel_mask"].to(self.device))
        # The post-processing builds its maps on the CPU, and scores near GenEval's thresholds deserve float32.
        outputs.class_queries_logits = outputs.class_queries_logits.float().cpu()
        outputs.masks_queries_logits = outputs.masks_queries_logits.float().cpu()
        # Threshold 0 keeps every candidate (the GenEval rules threshold); binary maps keep overlapping instances
        # whole, where a single segment-id map would let later instances overwrite earlier ones.
        result = self.processor.post_process_instance_segmentation(
            outputs, threshold=0.0, target_sizes=[(image.height, image.width)], return_binary_maps=True)[0]
        wanted = set(classes)
        detections = []
        for segment in result["segments_info"]:
            label = self.model.config.id2label[segment["label_id"]]
            if label not in wanted:
                continue
            mask = result["segmentation"][segment["id"]].numpy() > 0
            detections.append(Detection(label, _mask_box(mask), float(segment["score"]), mask))
        return detections


def masked_crop(image: Image.Image, detection: Detection) -> Image.Image:
    """The detection's box cut from ``image``, pixels outside its mask (if any) turned to :data:`BACKGROUND`."""
    pixels = np.array(image.convert("RGB"))
    if detection.mask is not None:
        pixels[~detection.mask] = BACKGROUND
    height, width = pixels.shape[:2]
    x0, y0, x1, y1 = (round(v) for v in detection.box)
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    x1, y1 = min(max(x1, x0 + 1), width), min(max(y1, y0 + 1), height)  # at least one pixel for CLIP
    return Image.fromarray(pixels[y0:y1, x0:x1])


class ClipColorClassifier:
    """GenEval's colour classifier: zero-shot CLIP over :data:`COLORS`, one text classifier per object class.

    ``path`` is a local transformers CLIP checkpoint (GenEval uses ViT-L/14, ported as
    openai/clip-vit-large-patch14) with its tokenizer and image processor.
    """

    CHECKPOINT = ("a local Hugging Face CLIP checkpoint", "openai/clip-vit-large-patch14")

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 16):
        folder = local_checkpoint(path, *self.CHECKPOINT)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.image_processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=dtype).to(device).eval()
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        self._classifiers: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def text_classifier(self, label: str) -> torch.Tensor:
        """One unit row per colour of :data:`COLORS`: its templates' normalised text embeddings, averaged."""
        if label not in self._classifiers:
            prompts = [t.format(color=c, label=label) for c in COLORS for t in COLOR_TEMPLATES]
            tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
            embeddings = self.model.get_text_features(**tokens).pooler_output.float()
            embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
            means = embeddings.view(len(COLORS), len(COLOR_TEMPLATES), -1).mean(dim=1)
            self._classifiers[label] = torch.nn.functional.normalize(means, dim=-1)
        return self._classifiers[label]

    @torch.inference_mode()
    def similarities(self, image: Image.Image, detections: Sequence[Detection], label: str) -> torch.Tensor:
        """Cosine similarity of each detection's masked crop to each colour (detections x :data:`COLORS`)."""
        classifier = self.text_classifier(label)
        crops = [masked_crop(image, d) for d in detections]
        features = []
        for start in range(0, len(crops), self.batch_size):
            pixels = self.image_processor(images=crops[start:start + self.batch_size], return_tensors="pt")
            batch = self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device, self.dtype))
            features.append(torch.nn.functional.normalize(batch.pooler_output.float(), dim=-1))
        if not features:
            return classifier.new_zeros(0, len(COLORS))
        return torch.cat(features) @ classifier.T

    def classify(self, image: Image.Image, detections: Sequence[Detection], label: str) -> list[str]:
        return [COLORS[i] for i in self.similarities(image, detections, label).argmax(dim=1).tolist()]
