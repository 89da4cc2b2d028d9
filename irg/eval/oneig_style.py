"""OneIG-Bench's style score: how close an image's style is to reference images of the style it was asked for.

Two style encoders embed the image: CSD (Somepalli et al., 2024; a CLIP ViT-L/14 fine-tuned for style,
whose style head projects the backbone's pooled feature) and OneIG-StyleEncoder (a CLIP vision model
with projection). Each gives the image's largest dot product with its reference embeddings of the
style, floored at 0; the score is the mean of the two (OneIG's ``style_score.py``, whose steps are
kept where they change the number: the image is scored as the JPEG the official script saves of it,
the style encoder runs in bf16 with CLIP's default preprocessing). Everything comes from one local
folder, nothing is downloaded::

    <folder>/csd/checkpoint.pth   CSD's checkpoint (a "model_state_dict" of backbone.* and last_layer_style)
    <folder>/style_encoder/       xingpng/OneIG-StyleEncoder, a Hugging Face folder
    <folder>/CSD_embed.pt         OneIG's reference embeddings: {style: [n, 768]} (scripts/style/)
    <folder>/SE_embed.pt          the same for the style encoder: {style: [n, 1280]}
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FILES = {"csd/checkpoint.pth": "CSD's checkpoint", "style_encoder/config.json": "xingpng/OneIG-StyleEncoder",
         "CSD_embed.pt": "OneIG's CSD reference embeddings (scripts/style/)",
         "SE_embed.pt": "OneIG's style-encoder reference embeddings (scripts/style/)"}
# CLIP's pixel statistics, which CSD normalises with.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def check_style_folder(folder: str) -> None:
    """Every file the style score needs is in ``folder``, or a FileNotFoundError naming what is missing."""
    missing = [f"{name} ({what})" for name, what in FILES.items() if not (Path(folder) / name).is_file()]
    if missing:
        raise FileNotFoundError(f"style folder {folder} lacks {'; '.join(missing)}")


def clip_vision_from_openai(state: dict[str, torch.Tensor]):
    """A transformers CLIPVisionModel holding the weights of an OpenAI-CLIP visual tower (the layout CSD
    saves its backbone in: conv1, class_embedding, transformer.resblocks.*, ln_post, ...); its pooled
    output is the tower's feature before ``proj``, which CSD's heads project."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    width, _, patch, _ = state["conv1.weight"].shape
    layers = 1 + max(int(m.group(1)) for key in state if (m := re.match(r"transformer\.resblocks\.(\d+)\.", key)))
    grid = round((state["positional_embedding"].shape[0] - 1) ** 0.5)
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"]
                              .shape[0], num_hidden_layers=layers, num_attention_heads=width // 64,
                              image_size=grid * patch, patch_size=patch, hidden_act="quick_gelu")
    mapped = {"embeddings.patch_embedding.weight": state["conv1.weight"],
              "embeddings.class_embedding": state["class_embedding"],
              "embeddings.position_embedding.weight": state["positional_embedding"],
              "pre_layrnorm.weight": state["ln_pre.weight"], "pre_layrnorm.bias": state["ln_pre.bias"],
              "post_layernorm.weight": state["ln_post.weight"], "post_layernorm.bias": state["ln_post.bias"]}
    for i in range(layers):
        block, layer = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[f"{block}attn.in_proj_{kind}"].chunk(3)  # nn.MultiheadAttention packs q, k, v
            mapped.update({f"{layer}self_attn.q_proj.{kind}": q, f"{layer}self_attn.k_proj.{kind}": k,
                           f"{layer}self_attn.v_proj.{kind}": v,
                           f"{layer}self_attn.out_proj.{kind}": state[f"{block}attn.out_proj.{kind}"],
                           f"{layer}layer_norm1.{kind}": state[f"{block}ln_1.{kind}"],
                           f"{layer}layer_norm2.{kind}": state[f"{block}ln_2.{kind}"],
                           f"{layer}mlp.fc1.{kind}": state[f"{block}mlp.c_fc.{kind}"],
                           f"{layer}mlp.fc2.{kind}": state[f"{block}mlp.c_proj.{kind}"]})
    model = CLIPVisionModel(config)
    tower = getattr(model, "vision_model", model)  # transformers 5 dropped the wrapper
    missing = set(tower.state_dict()) - set(mapped) - {"embeddings.position_ids"}
    if missing:
        raise ValueError(f"the CSD backbone lacks {sorted(missing)[:5]}")
    tower.load_state_dict({k: v.float() for k, v in mapped.items()}, strict=False)
    return model


def as_saved_jpeg(image: Image.Image) -> Image.Image:
    """``image`` after a round trip through JPEG at PIL's default quality: the official script scores the
    tiles it saves as ``.jpg``, and the compression moves the score of flat styles (pixel art, line art)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


class StyleScorer:
    """OneIG's style score of an image for a style name (lower case, ``_`` for spaces: ``pixel_art``)."""

    def __init__(self, folder: str, device: str = "cpu"):
        from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

        check_style_folder(folder)
        root = Path(folder)
        self.device = torch.device(device)
        # CSD's checkpoint is a pickle with more than tensors, read as the official script reads it:
        # point this only at a checkpoint you trust.
        checkpoint = torch.load(root / "csd/checkpoint.pth", map_location="cpu", weights_only=False)
        state = {k.removeprefix("module."): v for k, v in checkpoint["model_state_dict"].items()}
        backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        self.csd = clip_vision_from_openai(backbone).to(self.device).eval()
        self.csd_head = state["last_layer_style"].float().to(self.device)
        self.csd_size = self.csd.config.image_size
        self.encoder = CLIPVisionModelWithProjection.from_pretrained(
            root / "style_encoder", local_files_only=True, dtype=torch.bfloat16).to(self.device).eval()
        # The official script's processor: CLIP's defaults (224, bicubic), PIL-based as in its transformers.
        self.processor = CLIPImageProcessorPil()
        self.references = {name: torch.load(root / name, map_location="cpu", weights_only=True)
                           for name in ("CSD_embed.pt", "SE_embed.pt")}
        self.styles = set(self.references["CSD_embed.pt"]) & set(self.references["SE_embed.pt"])

    @torch.inference_mode()
    def embeddings(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """The image's unit-length CSD style embedding (fp32) and style-encoder embedding (bf16)."""
        image = as_saved_jpeg(image)
        pixels = self._csd_pixels(image).to(self.device)
        csd = torch.nn.functional.normalize(self.csd(pixel_values=pixels).pooler_output @ self.csd_head, dim=-1)
        inputs = self.processor(images=image, return_tensors="pt").pixel_values
        encoded = self.encoder(pixel_values=inputs.to(self.device, self.encoder.dtype)).image_embeds
        return csd[0].cpu(), torch.nn.functional.normalize(encoded, dim=-1)[0].cpu()

    def score(self, image: Image.Image, style: str) -> float:
        if style not in self.styles:
            raise ValueError(f"style {style!r}: no reference embeddings for it (they have {sorted(self.styles)})")
        csd, encoded = self.embeddings(image)
        # In the references' precision (the style encoder's are bf16), as the official product is taken.
        closest = [max(float((embedding.to(refs.dtype) @ refs.T).max()), 0.0) for embedding, refs in (
            (csd, self.references["CSD_embed.pt"][style]), (encoded, self.references["SE_embed.pt"][style]))]
        return sum(closest) / 2

    def _csd_pixels(self, image: Image.Image) -> torch.Tensor:
        """CSD's preprocessing: the shorter side resized to the model's size (bicubic), centre crop, CLIP's
        normalisation."""
        size = self.csd_size
        image = image.convert("RGB")
        short, long = sorted(image.size)
        scaled = (size, int(size * long / short))  # torchvision's Resize(size): the long side truncated
        resized = image.resize(scaled if image.width <= image.height else scaled[::-1], Image.BICUBIC)
        left, top = int(round((resized.width - size) / 2)), int(round((resized.height - size) / 2))
        array = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
        array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
        return torch.from_numpy(array).permute(2, 0, 1)[None]
