"""Presets: frozen dataclasses describing every FLUX.2 variant fluxrt knows.

A `ModelSpec` bundles the flow transformer, autoencoder and text-encoder configs with the sampling
defaults of a variant. Presets live in `PRESETS`; variants are made with `dataclasses.replace`, never
by mutation. Invariants are checked at construction so a bad config fails before any tensor exists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TransformerConfig:
    """Flow transformer hyper-parameters (field names follow the reference `Flux2Params`)."""

    in_channels: int = 128
    context_in_dim: int = 15360
    hidden_size: int = 6144
    num_heads: int = 48
    depth: int = 8
    depth_single_blocks: int = 48
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)
    theta: int = 2000  # RoPE base: FLUX.2 uses 2000, not 10000
    mlp_ratio: float = 3.0
    use_guidance_embed: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"sum(axes_dim)={sum(self.axes_dim)} must equal head_dim {self.head_dim}")
        if any(d % 2 for d in self.axes_dim):
            raise ValueError(f"every RoPE axis needs an even size, got {self.axes_dim}")
        if self.depth < 0 or self.depth_single_blocks < 0:
            raise ValueError(f"negative depth: {self.depth}, {self.depth_single_blocks}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@dataclass(frozen=True)
class AutoEncoderConfig:
    """VAE hyper-parameters (reference `AutoEncoderParams`); `norm_groups` only shrinks for tiny tests."""

    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 32
    norm_groups: int = 32
    bn_eps: float = 1e-4  # the latent BatchNorm statistics use eps 1e-4, not the usual 1e-5

    def __post_init__(self):
        for c in (self.ch * m for m in self.ch_mult):
            if c % self.norm_groups:
                raise ValueError(f"channel count {c} is not divisible by norm_groups {self.norm_groups}")

    @property
    def downscale(self) -> int:
        """Pixels per latent token side: 2**(levels-1) from the VAE, times 2 from the patchify."""
        return 2 ** (len(self.ch_mult) - 1) * 2

    @property
    def latent_channels(self) -> int:
        return self.z_channels * 4


@dataclass(frozen=True)
class TextEncoderConfig:
    """Which causal LM encodes prompts and which hidden states are concatenated per token."""

    family: str = "mistral3"  # "mistral3" (dev) or "qwen3" (klein)
    repo_id: str = "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
    tokenizer_repo_id: str = "mistralai/Mistral-Small-3.1-24B-Instruct-2503"
    hidden_size: int = 5120
    output_layers: tuple[int, ...] = (10, 20, 30)
    max_length: int = 512

    def __post_init__(self):
        if self.family not in ("mistral3", "qwen3"):
            raise ValueError(f"unknown text encoder family {self.family!r}")

    @property
    def out_dim(self) -> int:
        return self.hidden_size * len(self.output_layers)


@dataclass(frozen=True)
class ModelSpec:
    """One named variant: components, sampling policy and where official files are found."""

    name: str
    transformer: TransformerConfig
    autoencoder: AutoEncoderConfig = field(default_factory=AutoEncoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    guidance_mode: str = "embedded"  # "embedded" (dev), "distilled" (klein), "cfg" (klein base)
    default_steps: int = 50
    default_guidance: float = 4.0
    fixed_steps_guidance: bool = False
    use_kv_cache: bool = False
    default_size: tuple[int, int] = (1024, 1024)  # (width, height)
    repo_id: str | None = None
    flow_file: str | None = None
    ae_file: str = "ae.safetensors"

    def __post_init__(self):
        if self.guidance_mode not in ("embedded", "distilled", "cfg"):
            raise ValueError(f"unknown guidance_mode {self.guidance_mode!r}")
        if (self.guidance_mode == "embedded") != self.transformer.use_guidance_embed:
            raise ValueError(f"{self.name}: guidance_mode {self.guidance_mode!r} needs use_guidance_embed")
        if self.text_encoder.out_dim != self.transformer.context_in_dim:
            raise ValueError(
                f"{self.name}: text features {self.text_encoder.out_dim} != context_in_dim "
                f"{self.transformer.context_in_dim}"
            )


DEV = TransformerConfig()
KLEIN_9B = TransformerConfig(
    context_in_dim=12288, hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24, use_guidance_embed=False
)
KLEIN_4B = TransformerConfig(
    context_in_dim=7680, hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20, use_guidance_embed=False
)
MISTRAL_SMALL = TextEncoderConfig()
QWEN3_8B = TextEncoderConfig("qwen3", "Qwen/Qwen3-8B", "Qwen/Qwen3-8B", 4096, (9, 18, 27))
QWEN3_4B = TextEncoderConfig("qwen3", "Qwen/Qwen3-4B", "Qwen/Qwen3-4B", 2560, (9, 18, 27))


def _klein(name, cfg, te, repo, file, base=False, kv=False) -> ModelSpec:
    if base:
        return ModelSpec(name, cfg, text_encoder=te, guidance_mode="cfg", repo_id=repo, flow_file=file)
    return ModelSpec(
        name, cfg, text_encoder=te, guidance_mode="distilled", default_steps=4, default_guidance=1.0,
        fixed_steps_guidance=True, use_kv_cache=kv, repo_id=repo, flow_file=file,
    )  # fmt: skip


# A tiny model with every code path of dev (guidance embedding, 2 double + 2 single blocks, 4 RoPE axes).
TINY_TEXT = TextEncoderConfig("qwen3", "tiny", "tiny", 16, (1, 2, 3), max_length=32)
TINY = ModelSpec(
    "tiny",
    TransformerConfig(
        in_channels=128, context_in_dim=48, hidden_size=64, num_heads=4, depth=2, depth_single_blocks=2,
        axes_dim=(4, 4, 4, 4),
    ),
    autoencoder=AutoEncoderConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=8),
    text_encoder=TINY_TEXT,
    default_steps=4,
)  # fmt: skip

# The embedded default model (trained here on the shapes world; `fluxrt train shapes`): the [dev] code path
# (guidance embedding, Qwen3-family text encoder with three concatenated layers) at a size a CPU runs in seconds.
SHAPES_TEXT = TextEncoderConfig("qwen3", "embedded", "embedded", 128, (2, 4, 6), max_length=64)
SHAPES = ModelSpec(
    "fluxrt-shapes",
    TransformerConfig(
        in_channels=128, context_in_dim=SHAPES_TEXT.out_dim, hidden_size=256, num_heads=4, depth=2,
        depth_single_blocks=5, axes_dim=(16, 16, 16, 16),
    ),
    autoencoder=AutoEncoderConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=2, norm_groups=8),
    text_encoder=SHAPES_TEXT,
    default_steps=24,
    default_guidance=4.0,
    default_size=(256, 256),
)  # fmt: skip

PRESETS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("flux.2-dev", DEV, repo_id="black-forest-labs/FLUX.2-dev", flow_file="flux2-dev.safetensors"),
        _klein("flux.2-klein-4b", KLEIN_4B, QWEN3_4B, "black-forest-labs/FLUX.2-klein-4B", "flux-2-klein-4b.safetensors"),
        _klein("flux.2-klein-9b", KLEIN_9B, QWEN3_8B, "black-forest-labs/FLUX.2-klein-9B", "flux-2-klein-9b.safetensors"),
        _klein("flux.2-klein-9b-kv", KLEIN_9B, QWEN3_8B, "black-forest-labs/FLUX.2-klein-9B-kv",
               "flux-2-klein-9b-kv.safetensors", kv=True),
        _klein("flux.2-klein-base-4b", KLEIN_4B, QWEN3_4B, "black-forest-labs/FLUX.2-klein-base-4B",
               "flux-2-klein-base-4b.safetensors", base=True),
        _klein("flux.2-klein-base-9b", KLEIN_9B, QWEN3_8B, "black-forest-labs/FLUX.2-klein-base-9B",
               "flux-2-klein-base-9b.safetensors", base=True),
        TINY,
        SHAPES,
    )
}  # fmt: skip


def get_preset(name: str) -> ModelSpec:
    """Look a preset up by name; the error lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


def replace(spec, **changes):
    """`dataclasses.replace` re-exported so callers never mutate a preset."""
    return dataclasses.replace(spec, **changes)
