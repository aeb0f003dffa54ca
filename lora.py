"""LoRA (Hu et al. 2021, arXiv:2106.09685) for nn.Linear, injected after the base weights load.

    y = x W^T + b  +  (alpha / r) * dropout(x) A^T B^T        A: (r, in), B: (out, r)

A starts kaiming-uniform (a=sqrt(5), nn.Linear's own init, as in peft and the paper's code) and B
starts at zero, so an injected model computes exactly what the base computed until B trains.

Why a subclass of nn.Linear that *reuses* the base Parameters: the base keeps its names
(`...q_proj.weight`, `...q_proj.bias`), so base checkpoints, ZeRO partitions and optimiser
references are unaffected; the adapter only adds `...q_proj.lora_A` and `...q_proj.lora_B`.
(peft instead nests the base as `...q_proj.base_layer.weight`, which renames every key.)

Target matching rule: a pattern is an fnmatch pattern (`fnmatch.fnmatchcase`: case-sensitive,
`*` also matches dots) tested against the *whole* qualified module name relative to the module
passed to `inject` (the names of `module.named_modules()`). "*self_attn.q_proj" matches
"encoder.layers.7.self_attn.q_proj" and also "self_attn.q_proj"; "encoder.layers.0.mlp.fc1"
matches one module only. Every pattern must match at least one module, and everything it matches
must be a plain nn.Linear (or a subclass that declares itself one: `is_plain_linear`); both are
errors otherwise, because a typo would silently train nothing.

Doctor Sun's targets (its xtuner LLaVA-Llama-3 configs), r=64, alpha=16, dropout 0.05:
  - finetune: LoRA on "all linear layers" of the CLIP ViT = q_proj, k_proj, v_proj, out_proj,
    fc1, fc2 of every encoder layer (VIT_TARGETS; pass the vision tower to `inject`). The
    projector and the whole LLM train fully, so they get no adapters.
  - the LLM LoRA/QLoRA alternative: q/k/v/o/gate/up/down of every decoder layer, never lm_head
    (LLM_TARGETS; pass the LLM to `inject`).

dtype of the adapter: `inject` creates A and B on the base weight's device and, by default, in its
dtype, so the module stays uniform for `.to()` and DeepSpeed bf16 (whose optimiser keeps fp32
master copies of trainable parameters anyway). For plain-PyTorch training on a bf16 base pass
`dtype=torch.float32`: the tiny adapter (2 * r * (in + out) per layer) then accumulates updates in
fp32 (a bf16 step of lr 5e-6 on a weight near 1 rounds to zero), at negligible memory cost; the
forward casts x to the adapter dtype and the sum back to the base output dtype (as peft does).
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

VIT_TARGETS = ("*self_attn.q_proj", "*self_attn.k_proj", "*self_attn.v_proj", "*self_attn.out_proj",
               "*mlp.fc1", "*mlp.fc2")
LLM_TARGETS = ("*self_attn.q_proj", "*self_attn.k_proj", "*self_attn.v_proj", "*self_attn.o_proj",
               "*mlp.gate_proj", "*mlp.up_proj", "*mlp.down_proj")


@dataclass
class LoRAConfig:
    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.05  # on the LoRA input path only; the base path is never dropped
    targets: tuple[str, ...] = ()  # fnmatch patterns over qualified module names (module docstring)

    def __post_init__(self):
        self.targets = tuple(self.targets)  # a list from JSON/argparse still hashes and prints the same
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {self.r}")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1], got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoRALinear(nn.Linear):
    """An nn.Linear that shares `base`'s weight/bias Parameters and adds lora_A, lora_B."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype | None = None):
        # Build on meta (no allocation, no wasted init), then adopt the base's Parameter objects.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.base_type = type(base)  # merge_and_unload puts this class back
        self.r, self.alpha, self.scaling, self.dropout = r, alpha, alpha / r, dropout
        dev, dt = base.weight.device, dtype or base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev, dtype=dt))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=dt))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False
        # Exact copy of the weight taken at merge() time, so unmerge() is bitwise. A plain attribute,
        # not a buffer: it must never appear in state_dict. Costs one extra weight per merged layer.
        self._weight_before_merge: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # (..., out)
        if self.merged:
            return out  # the adapter is inside the weight (inference/export; no LoRA dropout)
        h = F.dropout(x, self.dropout, self.training).to(self.lora_A.dtype)
        lora = F.linear(F.linear(h, self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return out + (lora * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + scaling * B A, in place on the same Parameter (optimisers keep their reference)."""
        if self.merged:
            return
        self._weight_before_merge = self.weight.detach().clone()
        self.weight.copy_(merged_weight(self.weight, self.lora_A, self.lora_B, self.scaling))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the weight bitwise. Subtracting B A again would not: (W + D) - D != W in floats."""
        if not self.merged:
            return
        self.weight.copy_(self._weight_before_merge)
        self._weight_before_merge = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, dropout={self.dropout}, merged={self.merged}"


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A, summed in fp32 and cast back once (bf16 matmuls on CPU are slow and round twice)."""
    return (weight.float() + (lora_B.float() @ lora_A.float()) * scaling).to(weight.dtype)


def inject(module: nn.Module, config: LoRAConfig, *, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every nn.Linear whose qualified name matches a target by a LoRALinear; return the names.

    `dtype` is the adapter dtype (default: each base weight's own; see module docstring).
    """
    if not config.targets:
        raise ValueError("LoRAConfig.targets is empty: nothing to inject")
    names = [name for name, _ in module.named_modules() if name]  # "" (the root) cannot be replaced in place
    matched: list[str] = []
    for pattern in config.targets:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"LoRA target pattern {pattern!r} matches no module in {type(module).__name__}")
        matched += [n for n in hits if n not in matched]
    for name in matched:
        child = module.get_submodule(name)
        if not is_plain_linear(child):
            kind = "already a LoRALinear" if isinstance(child, LoRALinear) else f"a {type(child).__name__}"
            raise TypeError(f"LoRA target {name!r} is {kind}, not an nn.Linear (patterns {config.targets})")
    for name in matched:
        base = module.get_submodule(name)
        adapted = LoRALinear(base, config.r, config.alpha, config.dropout, dtype)
        _set_submodule(module, name, adapted.train(base.training))  # a new module would be in train mode
    return matched


def is_plain_linear(m: nn.Module) -> bool:
    """nn.Linear itself, or a subclass that says in its own class body (`plain_linear = True`, not
    inherited) that its forward is x W^T + b. Other subclasses are refused: nn.MultiheadAttention's
    out_proj is read as raw weights by its parent and never called, so an adapter there would do
    nothing; a subclass with another forward (an LM head computing a loss) would lose it."""
    return type(m) is nn.Linear or vars(type(m)).get("plain_linear", False)


def _set_submodule(module: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, child, new)


def lora_modules(module: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, LoRALinear)}


def merge(module: nn.Module) -> None:
    for m in lora_modules(module).values():
        m.merge()


def unmerge(module: nn.Module) -> None:
    for m in lora_modules(module).values():
        m.unmerge()


def merge_and_unload(module: nn.Module) -> None:
    """Fold every adapter into its weight and put back the base's class (export: no lora_* keys).

    Layer by layer, so the pre-merge copy costs one layer's weight at a time, not the model's.
    """
    for name, m in lora_modules(module).items():
        m.merge()
        plain = m.base_type(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias  # the same (now merged) Parameters
        m._weight_before_merge = None
        _set_submodule(module, name, plain)


def mark_only_lora_trainable(module: nn.Module) -> None:
    """requires_grad only for lora_A/lora_B *within this module* (e.g. the ViT; the LLM is separate)."""
    lora = {id(p) for m in lora_modules(module).values() for p in (m.lora_A, m.lora_B)}
    for p in module.parameters():
        p.requires_grad_(id(p) in lora)


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter-only state dict, keys as in module.state_dict() ("...q_proj.lora_A")."""
    out = {}
    for name, m in lora_modules(module).items():
        out[f"{name}.lora_A"] = m.lora_A.detach()
        out[f"{name}.lora_B"] = m.lora_B.detach()
    return out


@torch.no_grad()
def load_lora_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Strictly copy adapter weights into an injected module (in place; dtype/device kept)."""
    params = {}
    for name, m in lora_modules(module).items():
        params[f"{name}.lora_A"], params[f"{name}.lora_B"] = m.lora_A, m.lora_B
    missing = sorted(params.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - params.keys())
    if missing or unexpected:
        raise KeyError(f"LoRA state dict does not fit the injected module: missing {missing}, unexpected {unexpected}"
                       + ("" if params else " (the module has no LoRA layers: call inject first)"))
    for key, p in params.items():
        if state_dict[key].shape != p.shape:
            raise ValueError(f"LoRA key {key!r}: shape {tuple(state_dict[key].shape)} in the state dict, "
                             f"{tuple(p.shape)} in the module (different r or layer size?)")
    for key, p in params.items():
        p.copy_(state_dict[key])
    for m in lora_modules(module).values():
        if m.merged:  # a merged weight would silently keep the old adapter
            m.unmerge()
            m.merge()
