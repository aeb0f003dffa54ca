"""The LM head and its cross-entropy in one pass that never holds more than a chunk of logits.

With Llama 3's 128,256-word vocabulary the logits are the largest activation of a training step:
n supervised tokens x 128k x 4 bytes (fp32, as the loss wants them) is 2 GB for 4,000 tokens, and
autograd keeps them (and their softmax) until the backward. Fused linear-cross-entropy kernels
(Liger, Apple's Cut Cross-Entropy) avoid that by computing each chunk's gradient in the forward,
while its logits are at hand, and keeping only the gradients: d loss / d hidden (n, D) and
d loss / d weight (V, D), which the backward then only scales. The same FLOPs (three matmuls per
chunk), a fraction of the memory. Plain PyTorch here: a loop over row chunks.

For a chunk of hidden states h (c, D), weight W (V, D), targets y (c,):
    z = h W^T (c, V)                  logits, in fp32
    loss = sum(logsumexp(z) - z[y])
    g = softmax(z) - onehot(y)        d loss / d z
    dh = g W,   dW += g^T h
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_ELEMENTS = 1 << 26  # fp32 logits per chunk: 256 MiB (523 rows at a 128k vocabulary)
# Below this many logits (64 MiB in fp32) the plain path (F.linear, then F.cross_entropy) holds
# little, and it is the reference: small models (the demo) train bit for bit as autograd does.
FUSE_ABOVE = 1 << 24


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, need_h: bool, need_w: bool) -> Tensor:
        n = h.shape[0]
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        # In the weight's dtype, accumulated in place by addmm_ (Liger does the same): an fp32
        # accumulator would add 2 bytes per weight and a bf16 temporary per chunk; the cost is one
        # bf16 rounding per chunk (8 chunks: 1.6x the unfused path's distance to fp32, in the tests).
        grad_w = torch.zeros_like(weight) if need_w else None
        for i in range(0, n, rows):
            hc, yc = h[i:i + rows], targets[i:i + rows]
            z = (hc @ weight.t()).float()  # (c, V)
            lse = torch.logsumexp(z, dim=-1)  # (c,)
            loss += (lse - z.gather(1, yc[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                g = z.sub_(lse[:, None]).exp_()  # softmax, in z's memory
                g[torch.arange(len(yc), device=g.device), yc] -= 1
                g = g.to(h.dtype)
                if need_h:
                    grad_h[i:i + rows] = g @ weight
                if need_w:
                    grad_w.addmm_(g.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype),
                None if grad_w is None else grad_w * grad_loss.to(grad_w.dtype), None, None, None)


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """sum over rows of cross_entropy(h @ weight.T, targets), as an fp32 scalar. h (n, D), weight (V, D),
    targets (n,) of ids in [0, V). Equal to F.cross_entropy(F.linear(h, weight).float(), targets,
    reduction="sum") and its gradients (tests/test_cross_entropy.py)."""
    if h.shape[0] * weight.shape[0] <= FUSE_ABOVE:
        return F.cross_entropy(F.linear(h, weight).float(), targets, reduction="sum")
    grad = torch.is_grad_enabled()
    return LinearCrossEntropy.apply(h, weight, targets, grad and h.requires_grad, grad and weight.requires_grad)
