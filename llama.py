"""LLaMA decoder (Llama 2, Llama 3, Llama 3.1): the language model of Doctor Sun.

Pre-norm decoder: RMSNorm -> GQA attention with rotary positions -> residual, RMSNorm -> SwiGLU MLP
-> residual; a final RMSNorm and an LM head. Parameter names are those of Hugging Face's
`LlamaForCausalLM` minus the leading "model.", so an HF checkpoint loads through a two-entry prefix
map and HF's q/k weights (already in rotate-half layout) need no permutation.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

from checkpoint import embedding, load_hf_config, load_state
from cross_entropy import linear_cross_entropy


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    head_dim: int | None = None  # hidden_size // num_attention_heads when None

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                                 f"{self.num_attention_heads}; set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads} (GQA needs equal groups)")
        if self.rope_scaling is not None:
            rs = dict(self.rope_scaling)
            rs.setdefault("rope_type", rs.pop("type", "default"))  # very old configs say "type"
            if rs["rope_type"] == "default":
                rs = None
            elif rs["rope_type"] == "llama3":
                # transformers falls back to max_position_embeddings when the original length is absent
                rs.setdefault("original_max_position_embeddings", self.max_position_embeddings)
                missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in rs]
                if missing:
                    raise ValueError(f"rope_scaling of type llama3 lacks {missing}: {self.rope_scaling}")
            else:
                raise ValueError(f"rope_type {rs['rope_type']!r} is not supported (only 'default' and 'llama3'): "
                                 f"{self.rope_scaling}")
            self.rope_scaling = rs

    @classmethod
    def from_name(cls, name: str, **overrides) -> LlamaConfig:
        if name not in presets:
            raise KeyError(f"unknown Llama preset {name!r}; choose one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


_LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, intermediate_size=14336, rms_norm_eps=1e-5, rope_theta=500000.0,
                  bos_token_id=128000)
presets = {
    # meta-llama/Meta-Llama-3-8B-Instruct/config.json
    "Llama-3-8B-Instruct": dict(_LLAMA3_8B, max_position_embeddings=8192, eos_token_id=128009),
    # meta-llama/Llama-3.1-8B-Instruct/config.json
    "Llama-3.1-8B-Instruct": dict(
        _LLAMA3_8B, max_position_embeddings=131072, eos_token_id=[128001, 128008, 128009],
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}),
    # meta-llama/Llama-2-7b-chat-hf/config.json
    "Llama-2-7b-chat-hf": dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=32, intermediate_size=11008, rms_norm_eps=1e-5,
                               rope_theta=10000.0, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2),
    # Ours: a Llama-3-shaped demo model (GQA 8:4, theta 500000) small enough to train on a 2-core CPU.
    "tiny": dict(vocab_size=2048, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, intermediate_size=688, rope_theta=500000.0, max_position_embeddings=2048),
}


def rope_inv_freq(config: LlamaConfig, device=None) -> Tensor:
    """Inverse frequencies (head_dim/2,) in fp32, with Llama-3.1 wavelength-band scaling if configured.

    Llama 3.1 stretches context 8x by dividing the low frequencies (wavelengths longer than the original
    context / low_freq_factor) by `factor`, keeping the high ones (shorter than context / high_freq_factor)
    and interpolating between; mirrors `_compute_llama3_parameters` in transformers' modeling_rope_utils.
    """
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE: x (B, nh, T, hd), cos/sin (B, T, hd). Dims i and i + hd/2 form a rotating pair."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd will record an operation on these: the hand-written backwards below are used
    only then, so inference calls the plain expressions, with no autograd.Function per call."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(weight * x / rms(x), 1 / rms(x)); the statistics in fp32 because bf16 sums of squares lose too
    much precision, and the normalised x cast back before the weight, as HF does (bit-level parity)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
    return weight * (xf * rstd).to(x.dtype), rstd


# ---- selective recomputation -------------------------------------------------------------------------
# A projection keeps its input for its weight's gradient. Two of those inputs are cheap to rebuild from
# tensors the backward keeps anyway: a norm's output (from the norm's input x, which the norm keeps) and
# silu(gate) * up (from gate and up, which SwiGLU keeps). Keeping a recipe instead of the tensor saves
# 2 x hidden + 1 x intermediate values per token and layer, a third of a layer's activations (Llama 3 8B,
# one 4k-token bf16 sample: 5.9 GB), for one element-wise pass each in the backward; the recomputed
# values are bit for bit the ones the forward made. Megatron's "selective recomputation" idea, applied to
# the element-wise outputs. The mechanism is autograd's saved-tensor hooks: while `Llama.forward_hidden`
# runs the layers, every tensor autograd saves passes through `_pack`, which swaps any tensor sharing a
# marked tensor's memory (the tensor itself, the 2-D view F.linear saves, the detached alias DeepSpeed's
# ZeRO-3 hands on from each module) for (recipe, view geometry); `_unpack` rebuilds it in the backward,
# once per recipe however many projections share it (q, k and v; gate and up).


class Recipe:
    """fn(*args), computed at most once: the first projection's backward to need it computes it, and it
    lives until the last such backward has run (when autograd drops the recipe)."""

    __slots__ = ("fn", "args", "value")

    def __init__(self, fn, *args):
        self.fn, self.args, self.value = fn, args, None

    def get(self) -> Tensor:
        if self.value is None:  # under the backward's grad mode: a graph only for a double backward
            self.value = self.fn(*self.args)
        return self.value


class _Rebuilt(NamedTuple):
    """What autograd keeps for a saved alias of a marked tensor: its recipe, and which view was saved."""
    recipe: Recipe
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


# Inside recompute_cheap(): memory address -> (a weak reference to the marked tensor's storage, recipe).
# The weak reference tells a live marked tensor from a later one the allocator put at the same address.
_marked: dict[int, tuple[StorageWeakRef, Recipe]] | None = None


def recomputable(y: Tensor, fn, *args) -> Tensor:
    """Mark y = fn(*args) as rebuildable: inside `recompute_cheap()` autograd keeps the recipe wherever it
    would keep y. args must be tensors autograd keeps anyway, and y must not change in place."""
    if _marked is not None:
        storage = y.untyped_storage()
        _marked[storage.data_ptr()] = (StorageWeakRef(storage), Recipe(fn, *args))
    return y


def _pack(t: Tensor):
    storage = t.untyped_storage()
    found = _marked.get(storage.data_ptr()) if _marked else None
    if found is None or found[0].expired() or found[0].cdata != StorageWeakRef(storage).cdata:
        return t
    return _Rebuilt(found[1], t.size(), t.stride(), t.storage_offset())


def _unpack(saved):
    if isinstance(saved, _Rebuilt):
        return saved.recipe.get().as_strided(saved.size, saved.stride, saved.offset)
    return saved


@contextlib.contextmanager
def recompute_cheap():
    """Context in which autograd keeps recipes instead of the tensors marked `recomputable` in it."""
    global _marked
    outer, _marked = _marked, {}
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _marked = outer


class RMSNormFunction(torch.autograd.Function):
    """rms_norm keeping x and 1/rms(x) for the backward. Autograd would keep x in fp32 and the
    normalised x as well: 3x the memory in bf16, 2x in fp32 (Llama 3 8B, one 4k-token sample: 4 GB
    less), and the backward written out is no slower."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        y, rstd = rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, rstd = ctx.saved_tensors
        x_hat = x * rstd  # fp32 (type promotion)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_y * x_hat.to(x.dtype)).flatten(0, -2).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:  # d/dx of x * rstd(x): rstd * (g - x_hat * mean(g * x_hat)), g = d/dx_hat
            g = (grad_y * weight).float()
            grad_x = (g - x_hat * (g * x_hat).mean(-1, keepdim=True)).mul_(rstd).to(x.dtype)
        return grad_x, grad_w, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if needs_grad(x, self.weight):
            y = RMSNormFunction.apply(x, self.weight, self.eps)
            # The recipe keeps a copy of the weight (hidden-size values): ZeRO-3 releases a module's
            # weights after its forward and gathers them again only for that module's own backward,
            # which runs after the projections' backwards that rebuild y.
            return recomputable(y, normed, x, self.weight.detach().clone(), self.eps)
        return rms_norm(x, self.weight, self.eps)[0]


def normed(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return rms_norm(x, weight, eps)[0]


def default_positions(attention_mask: Tensor | None, input_pos: int, B: int, T: int, device) -> Tensor:
    """Positions (B, T) of this chunk, counting real tokens only (a left-padded row starts at 0)."""
    if attention_mask is None:
        return torch.arange(input_pos, input_pos + T, device=device).expand(B, T)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, input_pos:]


def attention_bias(attention_mask: Tensor | None, input_pos: int, T: int, cached: bool, device) -> Tensor | None:
    """Boolean SDPA mask (B or 1, 1, T, S) = causal and key-is-real; None when there is nothing to mask
    beyond causality (no padding) and SDPA can apply causality itself: without a cache or from position
    0 (T == S, its fused causal path), or for one new token, which sees every key there is (decoding).
    """
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    if attention_mask is None and (not cached or input_pos == 0 or T == 1):
        return None
    S = input_pos + T
    q_pos = torch.arange(input_pos, S, device=device)[:, None]  # (T, 1) absolute query positions
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S) causal
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S) and the key is not padding
        # A pad query (the first columns of a left-padded row) would otherwise see no key at all; some SDPA
        # backends return NaN for a fully masked row, and NaN spreads. Seeing itself changes no real query.
        mask = mask | (k_pos == q_pos)
    return mask


class Linear(nn.Linear):
    """nn.Linear whose few rows in bf16/fp16 on a CPU (decoding) take a faster kernel: oneDNN's
    small-M bf16 GEMM reads the weight slowly, and decoding is reading weights. One row goes through
    torch.mv (a 32k batch-1 step: 8.6 -> 7.2 ms), 2-16 rows through the transposed product W x^T
    (the 128k head at 8 rows: 7.6 -> 4.7 ms; a 128k batch-8 step: 19.8 -> 17.1 ms). LoRA may wrap
    it (`plain_linear`: its forward is x W^T + b, only the kernel differs)."""

    plain_linear = True

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        if self.bias is None and 0 < rows <= 16 and x.dtype != torch.float32 and x.device.type == "cpu":
            if rows == 1:
                return torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], -1)
            y = torch.mm(self.weight, x.reshape(rows, -1).t())  # (out, rows)
            return y.t().contiguous().view(*x.shape[:-1], -1)  # a transposed view would slow what follows
        return super().forward(x)


class KVCache(nn.Module):
    """Keys/values of every position decoded so far, for one layer. Created only by generation."""

    def __init__(self, batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v (B, n_kv, T, hd) at [input_pos, input_pos+T); return the filled prefix [0, input_pos+T)."""
        end = input_pos + k.shape[2]
        if end > self.k_cache.shape[2] or k.shape[0] != self.k_cache.shape[0]:
            raise ValueError(f"KV cache holds batch {self.k_cache.shape[0]} x {self.k_cache.shape[2]} positions; "
                             f"got batch {k.shape[0]} writing positions [{input_pos}, {end})")
        self.k_cache[:, :, input_pos:end] = k
        self.v_cache[:, :, input_pos:end] = v
        return self.k_cache[:, :, :end], self.v_cache[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.q_proj = Linear(d, self.n_head * self.head_dim, bias=False)
        self.k_proj = Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_head * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache=None, input_pos=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(input_pos, k, v)  # (B, n_kv, S, hd), S = input_pos + T
        # No mask: causal (T == S), or one query that sees every key (decoding), which is_causal would not do.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv_head != self.n_head)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up for the backward and recomputing silu(gate) there: autograd
    would keep silu(gate) as well, one more (tokens, intermediate) tensor per layer (Llama 3 8B, one
    4k-token sample: 3.8 GB in bf16), for one element-wise pass more in the backward. Bit for bit
    autograd's gradients."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return swiglu_plain(gate, up)

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    if needs_grad(gate, up):
        return recomputable(SwiGLU.apply(gate, up), swiglu_plain, gate, up)
    return swiglu_plain(gate, up)


def swiglu_plain(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache=None, input_pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class LMHead(Linear):
    """The output projection. Given `targets` (n,) for hidden states (n, D) it returns their summed
    cross-entropy instead of the logits, never holding more than a chunk of them (cross_entropy.py).
    The loss is computed inside this module's forward so that ZeRO-3, which gathers a module's
    partitioned weight around its forward, has the whole weight at hand. Not a `plain_linear`: LoRA
    never wraps it."""

    def forward(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
        if targets is not None:
            return linear_cross_entropy(x, self.weight, targets)
        return super().forward(x)


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_weights()
        # A plain fp32 tensor, not a buffer: derived from the config, never in a checkpoint, and left
        # alone by model.to(bf16) (bf16 frequencies put far positions off by whole rotations).
        self.inv_freq = rope_inv_freq(config, device="cpu")  # (hd/2,); explicit device: also under meta
        self.gradient_checkpointing = False  # recompute whole layers in the backward (train.py --gradient-checkpointing)
        self.selective_recompute = True  # recompute norm outputs and silu(gate) * up (see Recipe)
        if not self.embed_tokens.weight.is_meta:  # built on meta when a checkpoint follows
            self.init_weights()

    def init_weights(self, std: float | None = None):
        """Only for models trained from scratch (the tiny demo); every real model loads its weights.

        Normal(0, std) for every Linear and Embedding, std = hidden_size ** -0.5 by default: HF's
        `initializer_range` = 0.02 is about that for the 2-4k-wide models it was chosen for, but 3x too
        small at the demo's width 256 (word embeddings far smaller than the image features beside them).
        """
        std = self.config.hidden_size ** -0.5 if std is None else std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)

    def tie_weights(self):
        """Make lm_head share embed_tokens' Parameter (again after anything that replaces either one)."""
        self.lm_head.weight = self.embed_tokens.weight

    def make_kv_caches(self, batch_size, max_seq_len, dtype=None, device=None) -> nn.ModuleList:
        w = self.embed_tokens.weight
        c = self.config
        return nn.ModuleList(KVCache(batch_size, max_seq_len, c.num_key_value_heads, c.head_dim,
                                     dtype or w.dtype, device or w.device) for _ in self.layers)

    def forward_hidden(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None,
                       position_ids: Tensor | None = None, kv_caches=None, input_pos: int = 0) -> Tensor:
        """inputs_embeds (B, T, D) -> final hidden states (B, T, D), after the final norm.

        attention_mask (B, S): 1 = real token, 0 = pad, over ALL key positions S = input_pos + T (with a cache,
        everything written so far plus this chunk). Default positions count real tokens only, so a left-padded
        row starts at 0 and generation continues the positions its prompt used.
        """
        B, T, _ = inputs_embeds.shape
        if kv_caches is None and input_pos != 0:
            raise ValueError(f"input_pos={input_pos} needs kv_caches (without a cache the keys start at 0)")
        if attention_mask is not None and attention_mask.shape != (B, input_pos + T):
            raise ValueError(f"attention_mask must be (batch, input_pos + T) = {(B, input_pos + T)}, "
                             f"got {tuple(attention_mask.shape)}")
        if position_ids is None:
            position_ids = default_positions(attention_mask, input_pos, B, T, inputs_embeds.device)
        mask = attention_bias(attention_mask, input_pos, T, kv_caches is not None, inputs_embeds.device)
        cos, sin = self.rope(position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        recompute = self.selective_recompute and torch.is_grad_enabled()
        with recompute_cheap() if recompute else contextlib.nullcontext():
            for i, layer in enumerate(self.layers):
                cache = kv_caches[i] if kv_caches is not None else None
                if self.gradient_checkpointing and self.training:  # its own hooks take over inside each layer
                    x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache, input_pos,
                                                          use_reentrant=False)
                else:
                    x = layer(x, cos, sin, mask, cache, input_pos)
        return self.norm(x)

    def rope(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin (B, T, hd) for these positions: angles in fp32, cast once for every layer."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd): rotate-half pairs dim i with i + hd/2
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                kv_caches=None, input_pos: int = 0) -> Tensor:
        """input_ids (B, T) -> logits (B, T, vocab)."""
        h = self.forward_hidden(self.embed_tokens(input_ids), attention_mask, position_ids, kv_caches, input_pos)
        return self.lm_head(h)


# ---- loading Hugging Face Llama folders -------------------------------------------------------------
# transformers' LlamaConfig defaults (configuration_llama.py, 5.24), for keys a config.json omits.
_HF_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)



def config_from_hf(cfg: dict) -> LlamaConfig:
    """Read a LlamaForCausalLM config.json dict.

    RoPE settings come in two styles: hub files have top-level `rope_theta` and `rope_scaling`;
    transformers 5 writes `rope_parameters` = {rope_theta, rope_type, factor, ...}. Keys a file
    omits take transformers' LlamaConfig defaults, as transformers itself would.
    """
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError("only the standard Llama (silu MLP, no attention/MLP biases) is supported; got "
                         f"hidden_act={cfg.get('hidden_act')}, attention_bias={cfg.get('attention_bias')}, "
                         f"mlp_bias={cfg.get('mlp_bias')}")
    kw = {k: cfg.get(k, default) for k, default in _HF_DEFAULTS.items()}
    rope = cfg.get("rope_parameters")
    if rope:
        rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    else:
        rope_theta, rope_scaling = cfg.get("rope_theta", 10000.0), cfg.get("rope_scaling")
    return LlamaConfig(**kw, num_key_value_heads=cfg.get("num_key_value_heads") or kw["num_attention_heads"],
                       rope_theta=float(rope_theta), rope_scaling=rope_scaling, head_dim=cfg.get("head_dim"))


def config_to_hf(c: LlamaConfig) -> dict:
    """A config.json dict for transformers' LlamaForCausalLM, in hub style (what Meta's repos hold)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim, "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": dict(c.rope_scaling) if c.rope_scaling else None,  # a copy: transformers edits it
        "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "initializer_range": 0.02, "use_cache": True,
    }


# HF LlamaForCausalLM checkpoint -> our names (prefix map for checkpoint.load_state).
HF_KEY_MAP = {"model.": "", "lm_head.": "lm_head."}


def hf_ignore(config: LlamaConfig) -> tuple[str, ...]:
    """Rotary buffers that transformers saved in some versions (per layer before 4.36); derived, never loaded."""
    per_layer = tuple(f"model.layers.{i}.self_attn.rotary_emb." for i in range(config.num_hidden_layers))
    return ("model.rotary_emb.",) + per_layer


def from_pretrained(path, dtype=torch.float32, device=None) -> Llama:
    """Load an HF LlamaForCausalLM folder (config.json + safetensors shards or pytorch_model.bin).

    Built on meta and filled by assignment from memory-mapped tensors, so peak memory is about one copy
    of the weights, not two.
    """
    config = config_from_hf(load_hf_config(path))
    with torch.device("meta"):
        model = Llama(config)
    # Tied checkpoints hold only embed_tokens.weight (some older savers add a copy as lm_head.weight).
    tied = ("lm_head.",) if config.tie_word_embeddings else ()
    load_state(model, path, HF_KEY_MAP, ignore=hf_ignore(config) + tied, dtype=dtype, allow_missing=tied)
    if config.tie_word_embeddings:
        model.tie_weights()  # the embedding was replaced by assignment: share it again
    if device is not None:
        model.to(device)
    return model.eval()
