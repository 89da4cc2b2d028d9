"""Model configuration as plain dataclasses.

Two presets: ``tiny`` (the random test checkpoint in ``tests/fixtures/bagel_tiny``) and ``bagel-7b``
(BAGEL-7B-MoT: Qwen2.5-7B MoT LLM, SigLIP so400m/14 at 980 px, FLUX autoencoder). Configs can also be
read from the official checkpoint files (``llm_config.json``, ``vit_config.json``, ``ae_config.json``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def _known_fields(cls, d: dict) -> dict:
    """The entries of a config file that ``cls`` has fields for (HF files carry many more)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class LLMConfig:
    """Qwen2-shaped Mixture-of-Transformers language model."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_dict(cls, d: dict) -> LLMConfig:
        # The reference loaders force qk_norm=True, tie_word_embeddings=False and the MoT layer
        # whatever the file says; this architecture has no switches for them, so they are ignored.
        return cls(**_known_fields(cls, d))


@dataclass
class ViTConfig:
    """SigLIP vision tower. ``num_hidden_layers`` is the number of layers actually used."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 26
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 980
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @classmethod
    def from_hf_dict(cls, d: dict) -> ViTConfig:
        # BAGEL drops SigLIP's last layer (it uses penultimate features): the file's
        # num_hidden_layers counts it, the model does not.
        kwargs = _known_fields(cls, d)
        kwargs["num_hidden_layers"] = d["num_hidden_layers"] - 1
        return cls(**kwargs)

    def to_hf_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["num_hidden_layers"] = self.num_hidden_layers + 1
        d.update(model_type="siglip_vision_model", hidden_act="gelu_pytorch_tanh", attention_dropout=0.0)
        return d


@dataclass
class AEConfig:
    """FLUX autoencoder (16 latent channels, 8x downsampling)."""

    resolution: int = 256
    in_channels: int = 3
    downsample: int = 8
    ch: int = 128
    out_ch: int = 3
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @classmethod
    def from_dict(cls, d: dict) -> AEConfig:
        return cls(**_known_fields(cls, d))


@dataclass
class BagelConfig:
    """The whole unified model: LLM, ViT, autoencoder and the glue between them."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    ae: AEConfig = field(default_factory=AEConfig)
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    timestep_shift: float = 4.0  # training-time shift of sampled timesteps (IRG setting)
    # How training draws a target's timestep from its N(0, 1) draw: sigmoid (logit-normal, the reference) or
    # the normal CDF (uniform in (0, 1)); then shifted. A training setting, like timestep_shift.
    timestep_sampling: str = "logit_normal"
    # Token ids of <|vision_start|> / <|vision_end|>, which wrap every image block (Qwen2.5's by default;
    # a loaded checkpoint takes them from its tokenizer).
    image_start_token_id: int = 151652
    image_end_token_id: int = 151653
    # The short-side floor of images fed to the autoencoder / the ViT (BAGEL's 512 and 224 px).
    vae_image_min_size: int = 512
    vit_image_min_size: int = 224

    @property
    def latent_channels(self) -> int:
        """Features of one latent token: a p x p patch of the z_channels latent."""
        return self.latent_patch_size**2 * self.ae.z_channels

    @property
    def pixels_per_latent_token(self) -> int:
        return self.ae.downsample * self.latent_patch_size

    @property
    def vae_transform(self) -> tuple[int, int, int]:
        """(max size, min size, stride) of images encoded as latents: the latent grid's full size, on its stride."""
        unit = self.pixels_per_latent_token
        return self.max_latent_size * unit, self.vae_image_min_size, unit

    @property
    def vit_transform(self) -> tuple[int, int, int]:
        """(max size, min size, stride) of images the ViT reads: its position table's full size, on its patch."""
        patch = self.vit.patch_size
        return self.vit_max_num_patch_per_side * patch, self.vit_image_min_size, patch

    @classmethod
    def from_checkpoint_dir(cls, files: dict[str, dict]) -> BagelConfig:
        """Build from the parsed JSON files of an official checkpoint folder (name -> dict)."""
        scalars = {k: v for k, v in _known_fields(cls, files.get("bagel_config.json", {})).items()
                   if k not in ("llm", "vit", "ae")}
        return cls(
            llm=LLMConfig.from_hf_dict(files["llm_config.json"]),
            vit=ViTConfig.from_hf_dict(files["vit_config.json"]),
            ae=AEConfig.from_dict(files["ae_config.json"]) if "ae_config.json" in files else AEConfig(),
            **scalars,
        )


def tiny_config() -> BagelConfig:
    """The configuration of ``tests/fixtures/bagel_tiny``."""
    return BagelConfig(
        llm=LLMConfig(
            vocab_size=1344, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2,
        ),
        vit=ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        ae=AEConfig(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1),
        image_start_token_id=1306,
        image_end_token_id=1307,
    )


def bagel_7b_config() -> BagelConfig:
    """BAGEL-7B-MoT, the checkpoint IRG fine-tunes."""
    return BagelConfig()


def mot_1p5b_config() -> BagelConfig:
    """A Qwen2.5-1.5B-shaped MoT (1.3B weights per expert outside the embeddings) with BAGEL's ViT and
    autoencoder: the size the MISSION's training-throughput floor is stated for."""
    return BagelConfig(llm=LLMConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                     num_attention_heads=12, num_key_value_heads=2))


def shapes_config(vocab_size: int = 896, image_start_token_id: int = 865, image_end_token_id: int = 866) -> BagelConfig:
    """The shapes-world model (``irg:shapes``): BAGEL's architecture at the size a 2-core CPU trains in
    about two hours. 64 px images; a 4x autoencoder and 2x2 latent patches give an 8 x 8 grid of image
    tokens (one per 8 px, finer than the world's 3 x 3 layout); the ViT reads the same grid with 8 px
    patches. The vocabulary and the image-token ids are those of the world's own BPE tokenizer
    (:mod:`irg.data.tokenizer`); the recipe passes the ids of the tokenizer it trained."""
    return BagelConfig(
        llm=LLMConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
        vit=ViTConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                      image_size=64, patch_size=8),
        ae=AEConfig(resolution=64, downsample=4, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1,
                    scale_factor=1.0, shift_factor=0.0),
        latent_patch_size=2, max_latent_size=8, vit_max_num_patch_per_side=8, timestep_shift=1.0,
        vae_image_min_size=64, vit_image_min_size=64,
        image_start_token_id=image_start_token_id, image_end_token_id=image_end_token_id,
    )


PRESETS = {"tiny": tiny_config, "shapes": shapes_config, "mot-1.5b": mot_1p5b_config, "bagel-7b": bagel_7b_config}


def get_config(name: str) -> BagelConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None

