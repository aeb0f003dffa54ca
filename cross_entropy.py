"""The LM head and its cross-entropy in one pass that never holds more than a chunk of logits.

With Llama 3's 128,256-word vocabulary the logits are the largest activation of a training step:
n supervised tokens x 128k x 4 bytes (fp32, as the loss wants them) is 2 GB for 4,000 tokens, and
autograd keeps them (and their softmax) until the backward. Fused linear-cross-entropy kernels
(Liger, Apple's Cut Cross-Entropy) avoid that by computing each chunk's gradient in the forward,
while its logits are at hand, and keeping only the gradients: d loss / d hidden (n, D) and
d loss / d weight (V, D), which the backward then only scales. The same FLOPs (three matmuls per
chunk), a fraction of the memory. Plain PyTorch here: a loop over row chunks.

For a chunk of hidden states h (c, D), weight W (V, D), targets y (c,):
    z = h W^T (c, V)                  logits
    g = softmax(z)                    (sums in fp32)
    loss = sum(-log g[y])             in fp32
    g = g - onehot(y)                 d loss / d z
    dh = g W,   dW += g^T h
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows of logits per chunk. Each chunk's three matmuls read the whole (V, D) weight, so a chunk needs
# rows enough to keep them compute-bound, and no more: every row beyond that is memory and no speed.
# On a 2-core CPU, 256 rows were as fast as one chunk of all 1,024 (fwd + bwd of the loss at 32k:
# fp32 364 vs 374 ms, bf16 88 vs 113 ms) and hold 256 x V logits: 31 MiB at 32k in fp32, 63 MiB at
# 128k in bf16. A small vocabulary takes more rows, up to CHUNK_ELEMENTS logits (16 MiB in fp32).
CHUNK_ROWS = 256
CHUNK_ELEMENTS = 1 << 22


def chunk_rows(vocab_size: int) -> int:
    """Rows of the (rows, V) logits buffer the fused loss computes at a time."""
    return max(CHUNK_ROWS, CHUNK_ELEMENTS // vocab_size)


# Below this many logits (64 MiB in fp32) the plain path (F.linear, then F.cross_entropy) holds
# little, and it is the reference: small models (the demo) train bit for bit as autograd does.
FUSE_ABOVE = 1 << 24


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, need_h: bool, need_w: bool) -> Tensor:
        n = h.shape[0]
        rows = chunk_rows(weight.shape[0])
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        # In the weight's dtype, accumulated in place by addmm_ (Liger does the same): an fp32
        # accumulator would add 2 bytes per weight and a bf16 temporary per chunk; the cost is one
        # bf16 rounding per chunk (8 chunks: 1.6x the unfused path's distance to fp32, in the tests).
        grad_w = (torch.empty_like(weight) if n else torch.zeros_like(weight)) if need_w else None
        # One logits buffer for every chunk, and the softmax written over it: a fresh (c, V) tensor
        # per chunk is a fresh mmap from the C allocator, zeroed page by page by the kernel (a third
        # of the fp32 softmax's time), and a separate softmax output doubled the step's peak here.
        buf = torch.empty(min(rows, n), weight.shape[0], dtype=weight.dtype, device=h.device)
        for i in range(0, n, rows):
            hc, yc = h[i:i + rows], targets[i:i + rows]
            rows_c = torch.arange(len(yc), device=h.device)
            z = torch.mm(hc, weight.t(), out=buf[:len(yc)])  # (c, V) logits, in the weights' dtype
            # softmax in one kernel that reads z once and writes the gradient's dtype directly (it
            # sums in fp32 inside): in bf16, a quarter of the time of an fp32 copy and fp32 passes,
            # which on a CPU are memory-bound. The loss is -log p[target]: bf16 rounds p by 2^-9
            # relative, 0.002 nats, ten times less than rounding the logits to bf16 already did.
            g = torch.softmax(z, dim=-1, out=z)  # (c, V), in place: row by row, each read before written
            p = g[rows_c, yc].float()
            nll = -p.log()
            far = p < 1e-30  # a target so unlikely that p underflows: its exact loss, from fp32 logits
            if bool(far.any()):  # recomputed for those rows (the softmax overwrote them)
                zf = (hc[far] @ weight.t()).float()
                nll[far] = torch.logsumexp(zf, dim=-1) - zf.gather(1, yc[far, None]).squeeze(1)
            loss += nll.sum()
            if need_h or need_w:
                g[rows_c, yc] -= 1  # d loss / d z = softmax - onehot
                if need_h:
                    grad_h[i:i + rows] = g @ weight
                if need_w:  # the first chunk writes, the others add: no zero-filled (V, D) pass
                    torch.mm(g.t(), hc, out=grad_w) if i == 0 else grad_w.addmm_(g.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        # In place: the saved gradients serve this one backward, and a (V, D) copy would be the
        # largest allocation of the step's end.
        return (None if grad_h is None else grad_h.mul_(grad_loss.to(grad_h.dtype)),
                None if grad_w is None else grad_w.mul_(grad_loss.to(grad_w.dtype)), None, None, None)


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """sum over rows of cross_entropy(h @ weight.T, targets), as an fp32 scalar. h (n, D), weight (V, D),
    targets (n,) of ids in [0, V). Equal to F.cross_entropy(F.linear(h, weight).float(), targets,
    reduction="sum") and its gradients (tests/test_cross_entropy.py)."""
    if h.shape[0] * weight.shape[0] <= FUSE_ABOVE:
        return F.cross_entropy(F.linear(h, weight).float(), targets, reduction="sum")
    grad = torch.is_grad_enabled()
    return LinearCrossEntropy.apply(h, weight, targets, grad and h.requires_grad, grad and weight.requires_grad)
