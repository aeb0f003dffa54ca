"""CLIP ViT vision tower, written out by hand: the image encoder of LLaVA / Doctor Sun.

pixels -> 14x14 patch conv -> [CLS] + patches + learned positions -> pre_layrnorm
       -> N pre-LN transformer blocks -> (post_layernorm, used only by CLIP's own pooled head)

LLaVA does not use CLIP's pooled output. It takes the hidden state after the second-to-last block
(`mm_vision_select_layer = -2`), before `post_layernorm`, and drops the class token: 576 patch
vectors of width 1024 for ViT-L/14 at 336 px. So `forward` runs only the blocks it needs (as
open_clip does) instead of asking for every hidden state and keeping one.

Parameter names are Hugging Face's `CLIPVisionModel` names without the "vision_model." prefix
(including the `pre_layrnorm` typo), so loading is a prefix rename.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import checkpoint


@dataclass
class ClipConfig:
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "quick_gelu"  # OpenAI weights were trained with QuickGELU; other CLIPs use "gelu"
    layer_norm_eps: float = 1e-5
    num_channels: int = 3
    select_layer: int = -2  # index into HF hidden_states: 0 = embeddings after pre_layrnorm, i = after layer i
    select_feature: str = "patch"  # "patch" drops the class token, "cls_patch" keeps it

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not supported (use one of {sorted(ACTIVATIONS)})")
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"select_feature must be 'patch' or 'cls_patch', got {self.select_feature!r}")
        n = self.num_hidden_layers
        if not -(n + 1) <= self.select_layer <= n:
            raise ValueError(f"select_layer {self.select_layer} out of range for {n} layers "
                             f"({n + 1} hidden states)")
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.num_patches = (self.image_size // self.patch_size) ** 2  # HF floors, the conv drops the rest
        self.num_positions = self.num_patches + 1
        # Blocks that must run to reach hidden_states[select_layer]; the rest are skipped.
        self.num_layers_used = self.select_layer % (n + 1)

    @property
    def num_tokens(self) -> int:
        """Feature vectors per image handed to the projector."""
        return self.num_patches + (self.select_feature == "cls_patch")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ClipConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown CLIP preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    # openai/clip-vit-large-patch14-336 config.json, "vision_config" (Doctor Sun's / LLaVA-1.5's tower)
    "clip-vit-large-patch14-336": dict(image_size=336, patch_size=14, hidden_size=1024, num_hidden_layers=24,
                                       num_attention_heads=16, intermediate_size=4096, hidden_act="quick_gelu"),
    # openai/clip-vit-large-patch14 config.json, "vision_config" (224 px, 256 patches; LLaVA-1)
    "clip-vit-large-patch14": dict(image_size=224, patch_size=14, hidden_size=1024, num_hidden_layers=24,
                                   num_attention_heads=16, intermediate_size=4096, hidden_act="quick_gelu"),
    # Ours, for tests and smoke runs: 4x4 = 16 patches.
    "tiny": dict(image_size=64, patch_size=16, hidden_size=128, num_hidden_layers=3,
                 num_attention_heads=4, intermediate_size=512, hidden_act="quick_gelu"),
}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU; its weights expect exactly this."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # HF "gelu" is the exact erf form


class Embeddings(nn.Module):
    def __init__(self, config: ClipConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(D))
        self.patch_embedding = nn.Conv2d(config.num_channels, D, config.patch_size, stride=config.patch_size,
                                         bias=False)
        self.position_embedding = checkpoint.embedding(config.num_positions, D)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        c = self.config
        want = (c.num_channels, c.image_size, c.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"expected pixel_values of shape (B, {c.num_channels}, {c.image_size}, "
                             f"{c.image_size}), got {tuple(pixel_values.shape)}")
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(w.dtype))  # (B, D, g, g), g = image_size // patch_size
        x = x.flatten(2).transpose(1, 2)  # (B, P, D), patches in row-major order
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)  # (B, P+1, D)
        return x + self.position_embedding.weight  # every position is used: no position_ids needed


class Attention(nn.Module):
    def __init__(self, config: ClipConfig):
        super().__init__()
        D = config.hidden_size
        self.n_head, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)
        # Kept as separate q/k/v (not fused) so LoRA can target each, as Doctor Sun's ViT LoRA does.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # bidirectional, no mask: every image has all tokens
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class MLP(nn.Module):
    def __init__(self, config: ClipConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN block. nn.LayerNorm accumulates its statistics in fp32 even for bf16 inputs."""

    def __init__(self, config: ClipConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, config: ClipConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: HF's name
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(
            EncoderLayer(config) for _ in range(config.num_hidden_layers))))
        # Unused by the LLaVA feature, but kept so checkpoints round-trip with every key.
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        if not self.embeddings.class_embedding.is_meta:  # built on meta when a checkpoint follows
            self.init_weights()

    def init_weights(self) -> None:
        """Only for random models (tests, the demo); real weights always come from a checkpoint.

        The class token follows CLIP's init; Linear/Conv/LayerNorm keep PyTorch's defaults. The position
        table is drawn N(0, 1), not CLIP's N(0, 0.02): that scale assumes the table is learned, and a ViT
        that is never pretrained (the demo's) needs positions as large as a patch's content, or
        `pre_layrnorm`, which removes scale, maps every uniform patch of one sign to the same vector.
        """
        nn.init.normal_(self.embeddings.class_embedding, std=self.config.hidden_size ** -0.5)
        with torch.no_grad():
            pe = self.embeddings.position_embedding.weight  # (1 + g*g, D); the class token's row is 0
            nn.init.normal_(pe)
            pe[0] = 0.0

    def _block(self, layer: EncoderLayer, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # Keep only the block input; recompute its activations during backward.
            return torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
        return layer(x)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_tokens, D): the LLaVA feature, hidden_states[select_layer].

        No torch.no_grad here: with LoRA on the ViT, gradients flow through this forward.
        """
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (B, P+1, D) = hidden_states[0]
        for layer in self.encoder.layers[: self.config.num_layers_used]:
            x = self._block(layer, x)
        return x[:, 1:] if self.config.select_feature == "patch" else x  # (B, P, D) or (B, P+1, D)

    def forward_hidden_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Every hidden state as in HF's `output_hidden_states`: num_hidden_layers + 1 of (B, P+1, D)."""
        hs = [self.pre_layrnorm(self.embeddings(pixel_values))]
        for layer in self.encoder.layers:
            hs.append(self._block(layer, hs[-1]))
        return hs


# ---- loading Hugging Face CLIP folders --------------------------------------------------------------
# Hub CLIPModel folders (openai/clip-vit-*) and older CLIPVisionModel saves prefix the tower with
# "vision_model."; transformers 5.x CLIPVisionModel saves it bare.
HF_KEY_MAP = {"vision_model.": "", "": ""}
HF_IGNORE = ("text_model.", "visual_projection.", "text_projection.", "logit_scale",
             "vision_model.embeddings.position_ids", "embeddings.position_ids")  # persistent in old saves
# Architecture fields with transformers' CLIPVisionConfig defaults (clip-vit-base-patch32).
HF_DEFAULTS = dict(image_size=224, patch_size=32, hidden_size=768, num_hidden_layers=12,
                   num_attention_heads=12, intermediate_size=3072, hidden_act="quick_gelu",
                   layer_norm_eps=1e-5, num_channels=3)



def config_from_hf(cfg: dict, **overrides) -> ClipConfig:
    """From a CLIPVisionConfig dict or a full CLIPModel config.json (its "vision_config").

    Keys a saved config omits take CLIPVisionConfig's defaults (hub configs store only what differs);
    `overrides` (select_layer, ...) are LLaVA's choices, not CLIP's.
    """
    cfg = cfg.get("vision_config", cfg)
    if not isinstance(cfg, dict):
        raise ValueError(f"config's vision_config must be a dict, got {type(cfg).__name__}")
    if cfg.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ValueError(f"vision config has model_type {cfg['model_type']!r}, expected 'clip_vision_model'")
    kw = {k: cfg.get(k, default) for k, default in HF_DEFAULTS.items()}
    for k in ("image_size", "patch_size"):  # transformers 5.x allows [h, w]
        if isinstance(kw[k], (list, tuple)):
            if len(set(kw[k])) != 1:
                raise ValueError(f"non-square {k} {kw[k]} is not supported")
            kw[k] = kw[k][0]
    return ClipConfig(**{**kw, **overrides})


def config_to_hf(c: ClipConfig) -> dict:
    """A CLIPVisionConfig-compatible dict (select_* are LLaVA settings, not CLIP's)."""
    return {"model_type": "clip_vision_model", **{k: getattr(c, k) for k in HF_DEFAULTS}}


def from_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device=None,
                    **overrides) -> VisionTransformer:
    """Load a HF CLIPVisionModel or full CLIPModel folder; overrides (select_layer, ...) go to ClipConfig."""
    config = config_from_hf(checkpoint.load_hf_config(path), **overrides)
    with torch.device("meta"):
        model = VisionTransformer(config)
    checkpoint.load_state(model, path, HF_KEY_MAP, ignore=HF_IGNORE, dtype=dtype)
    if device is not None:
        model.to(device)
    return model.eval()
