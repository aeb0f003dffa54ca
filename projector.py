"""The projector: maps vision features into the LLM's word-embedding space.

LLaVA names projector types by string: "linear" (LLaVA-1.0), "mlp2x_gelu" (LLaVA-1.5 and
Doctor Sun: Linear -> GELU -> Linear), and "mlpNx_gelu" generally (N linear layers).
The module is an `nn.Sequential` so its parameter names ("0.weight", "2.weight", ...) are exactly
the original LLaVA `mm_projector.*` and xtuner `projector.model.*` names; GELU is the exact
(erf) form, as in LLaVA and `transformers`' `projector_hidden_act="gelu"`.
"""
from __future__ import annotations

import re

import torch.nn as nn


def build(kind: str, in_dim: int, out_dim: int) -> nn.Sequential:
    """Build a LLaVA projector: (B, N, in_dim) -> (B, N, out_dim)."""
    if kind == "linear":
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if m is None:
        raise ValueError(f"unknown projector type {kind!r}: use 'linear' or 'mlpNx_gelu' "
                         f"(e.g. 'mlp2x_gelu')")
    depth = int(m.group(1))
    if depth < 1:
        raise ValueError(f"projector {kind!r} needs at least one layer")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)
