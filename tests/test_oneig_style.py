"""OneIG's style score on tiny random encoders saved to disk: CSD's OpenAI-layout backbone read into a
transformers CLIP vision model (checked against a forward written the OpenAI way), the style encoder,
and the score, the mean of each encoder's best match to the style's references, floored at 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from irg.eval.benchmarks import EvalPrompt
from irg.eval.oneig import OneIGScorer, summarize_oneig
from irg.eval.oneig_style import StyleScorer, check_style_folder, clip_vision_from_openai
from irg.eval.scorer_settings import ScorerSettings
from irg.eval.scoring import Verdict

WIDTH, LAYERS, PATCH, GRID = 128, 2, 8, 4  # two heads of 64, as OpenAI's towers have width // 64 heads


def openai_tower(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of an OpenAI-CLIP visual tower, in its own key layout."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    state = {"conv1.weight": rand(WIDTH, 3, PATCH, PATCH), "class_embedding": rand(WIDTH),
             "positional_embedding": rand(GRID * GRID + 1, WIDTH), "ln_pre.weight": 1 + rand(WIDTH),
             "ln_pre.bias": rand(WIDTH), "ln_post.weight": 1 + rand(WIDTH), "ln_post.bias": rand(WIDTH)}
    for i in range(LAYERS):
        b = f"transformer.resblocks.{i}."
        state.update({b + "attn.in_proj_weight": rand(3 * WIDTH, WIDTH), b + "attn.in_proj_bias": rand(3 * WIDTH),
                      b + "attn.out_proj.weight": rand(WIDTH, WIDTH), b + "attn.out_proj.bias": rand(WIDTH),
                      b + "ln_1.weight": 1 + rand(WIDTH), b + "ln_1.bias": rand(WIDTH),
                      b + "ln_2.weight": 1 + rand(WIDTH), b + "ln_2.bias": rand(WIDTH),
                      b + "mlp.c_fc.weight": rand(4 * WIDTH, WIDTH), b + "mlp.c_fc.bias": rand(4 * WIDTH),
                      b + "mlp.c_proj.weight": rand(WIDTH, 4 * WIDTH), b + "mlp.c_proj.bias": rand(WIDTH)})
    return state


def openai_forward(state: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """The tower's feature before ``proj``, computed as OpenAI's VisionTransformer does."""
    ln = torch.nn.functional.layer_norm
    x = torch.nn.functional.conv2d(pixels, state["conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([state["class_embedding"].expand(x.shape[0], 1, -1), x], 1) + state["positional_embedding"]
    x = ln(x, (WIDTH,), state["ln_pre.weight"], state["ln_pre.bias"])
    for i in range(LAYERS):
        b = f"transformer.resblocks.{i}."
        attention = torch.nn.MultiheadAttention(WIDTH, WIDTH // 64, batch_first=True)
        attention.load_state_dict({"in_proj_weight": state[b + "attn.in_proj_weight"],
                                   "in_proj_bias": state[b + "attn.in_proj_bias"],
                                   "out_proj.weight": state[b + "attn.out_proj.weight"],
                                   "out_proj.bias": state[b + "attn.out_proj.bias"]})
        h = ln(x, (WIDTH,), state[b + "ln_1.weight"], state[b + "ln_1.bias"])
        x = x + attention(h, h, h, need_weights=False)[0]
        h = ln(x, (WIDTH,), state[b + "ln_2.weight"], state[b + "ln_2.bias"])
        h = torch.nn.functional.linear(h, state[b + "mlp.c_fc.weight"], state[b + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + torch.nn.functional.linear(h, state[b + "mlp.c_proj.weight"], state[b + "mlp.c_proj.bias"])
    return ln(x[:, 0], (WIDTH,), state["ln_post.weight"], state["ln_post.bias"])


def test_an_openai_layout_tower_reads_into_a_transformers_clip_vision_model():
    state = openai_tower()
    model = clip_vision_from_openai(state).eval()
    assert model.config.image_size == GRID * PATCH and model.config.num_attention_heads == 2
    pixels = torch.randn(2, 3, GRID * PATCH, GRID * PATCH, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours = model(pixel_values=pixels).pooler_output
    torch.testing.assert_close(ours, openai_forward(state, pixels), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def style_dir(tmp_path_factory):
    """A style folder laid out as StyleScorer reads it, with references made to score a red image 0.5."""
    folder = tmp_path_factory.mktemp("style")
    (folder / "csd").mkdir()
    backbone = {f"module.backbone.{k}": v for k, v in openai_tower().items()}
    head = torch.randn(WIDTH, 8, generator=torch.Generator().manual_seed(2))
    torch.save({"epoch": 1, "model_state_dict": {**backbone, "module.last_layer_style": head,
                                                 "module.last_layer_content": head}}, folder / "csd/checkpoint.pth")
    torch.manual_seed(0)
    # 224 pixels: the official processor's size (CLIP's defaults), whatever the encoder's folder holds
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=32,
                                                             num_hidden_layers=1, num_attention_heads=2,
                                                             image_size=224, patch_size=32, projection_dim=12))
    encoder.save_pretrained(folder / "style_encoder")
    torch.save({"pixel_art": torch.zeros(3, 8)}, folder / "CSD_embed.pt")
    torch.save({"pixel_art": torch.zeros(3, 12)}, folder / "SE_embed.pt")
    scorer = StyleScorer(str(folder))
    csd, encoded = scorer.embeddings(Image.new("RGB", (48, 40), (220, 20, 20)))
    # CSD: the image's own embedding is among the references (best match 1); the style encoder: only
    # the opposite of it (best match -1, floored at 0). The style score: (1 + 0) / 2.
    torch.save({"pixel_art": torch.stack([-csd, csd, torch.zeros_like(csd)]), "ghibli": csd[None]},
               folder / "CSD_embed.pt")  # fp32, as OneIG's
    torch.save({"pixel_art": -encoded[None], "ghibli": encoded[None]}, folder / "SE_embed.pt")  # bf16, as OneIG's
    return folder


def test_the_image_is_scored_as_the_jpeg_the_official_script_saves():
    from irg.eval.oneig_style import as_saved_jpeg

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    saved = as_saved_jpeg(noise)
    assert saved.size == noise.size and saved.mode == "RGB"
    assert np.abs(np.asarray(saved, dtype=int) - np.asarray(noise, dtype=int)).mean() > 10  # lossy, as there


def test_the_style_score_is_the_mean_of_each_encoders_best_match_floored_at_zero(style_dir):
    scorer = StyleScorer(str(style_dir))
    red = Image.new("RGB", (48, 40), (220, 20, 20))
    assert scorer.embeddings(red)[1].dtype == torch.bfloat16
    assert scorer.score(red, "pixel_art") == pytest.approx(0.5, abs=1e-5)
    assert scorer.score(red, "ghibli") == pytest.approx(1.0, abs=4e-3)  # a bf16 product of unit vectors
    with pytest.raises(ValueError, match="style 'lego': no reference embeddings for it"):
        scorer.score(red, "lego")


def test_oneig_scores_style_beside_alignment_and_reports_it(style_dir, fake):
    from test_judge import ok

    from irg.eval.judge import JudgeClient

    fake.answer = lambda body: ok("Yes")
    prompt = EvalPrompt("Anime_Stylization-007", "a cat", "Anime_Stylization",
                        {"questions": {"1": "Is there a cat?"}, "dependency": {"1": [0]}, "style": "ghibli"})
    judge = JudgeClient(fake.base_url, "vl")
    [verdict] = OneIGScorer(judge, StyleScorer(str(style_dir))).score([(prompt, Image.new("RGB", (48, 40),
                                                                                           (220, 20, 20)))])
    assert verdict.score == 1.0 and verdict.details["style"] == pytest.approx(1.0, abs=4e-3)
    rows = [(prompt, verdict), (prompt, Verdict(0.5, {"alignment": 0.5, "style": 0.25}))]
    assert summarize_oneig(rows)["style"] == pytest.approx((verdict.details["style"] + 0.25) / 2)

    settings = ScorerSettings("oneig", style_model=str(style_dir), judge_url=fake.base_url, judge_model="vl")
    settings.check()
    assert settings.notes == ["OneIG-EN reasoning, diversity not scored here, reported absent (not zero): "
                              "reasoning needs LLM2CLIP; diversity needs DreamSim; so is the overall, the mean of "
                              "all five dimensions"]


def test_a_style_folder_missing_a_file_is_named_before_anything_loads(tmp_path):
    (tmp_path / "csd").mkdir()
    (tmp_path / "csd" / "checkpoint.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"lacks style_encoder/config.json \(xingpng/OneIG-StyleEncoder\); "
                                                r"CSD_embed.pt .*; SE_embed.pt"):
        check_style_folder(str(tmp_path))
    with pytest.raises(ValueError, match="scorer tiif does not use --style-model"):
        ScorerSettings("tiif", style_model=str(tmp_path), judge_url="http://vllm:8000/v1", judge_model="vl").check()
