"""cross_entropy.linear_cross_entropy against the unfused reference (F.linear, then
F.cross_entropy on fp32 logits): loss and both gradients. fp32: 1e-5 of the largest value (sums
in another order). bf16: distance to the fp32 reference, fused vs unfused bf16: the loss and the
input gradient within 1.5x; the weight gradient within 2x, since it is rounded to bf16 once per
chunk (8 chunks here: measured 1.6x) where the unfused path rounds one matmul once. Shapes: an odd
row count, chunks that do not divide it, one row, none."""
import pytest
import torch
import torch.nn.functional as F

import cross_entropy
import llama
import model
from conftest import OpLog
from special_ids import IGNORE_INDEX


def reference(h, w, y):
    return F.cross_entropy(F.linear(h, w).float(), y, reduction="sum")


def loss_and_grads(fn, h32, w32, y, dtype, need=(True, True)):
    h = h32.to(dtype).detach().requires_grad_(need[0])
    w = w32.to(dtype).detach().requires_grad_(need[1])
    loss = fn(h, w, y)
    if loss.requires_grad:
        loss.backward()
    return loss.item(), [None if t.grad is None else t.grad.float() for t in (h, w)]


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(cross_entropy, "CHUNK_ROWS", 100)  # 100 rows a chunk
    monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", 0)
    monkeypatch.setattr(cross_entropy, "FUSE_ABOVE", 0)  # the fused path even at these sizes


@pytest.mark.parametrize("n", [0, 1, 100, 777])
def test_fp32_matches_unfused(small_chunks, n):
    torch.manual_seed(n)
    h, w, y = torch.randn(n, 64), torch.randn(5003, 64) * 0.1, torch.randint(0, 5003, (n,))
    ref, (gh, gw) = loss_and_grads(reference, h, w, y, torch.float32)
    got, (fh, fw) = loss_and_grads(cross_entropy.linear_cross_entropy, h, w, y, torch.float32)
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-5)
    for a, b in ((fh, gh), (fw, gw)):  # sums in another order (chunks): 1e-5 of the largest gradient
        assert a.shape == b.shape and (a.numel() == 0 or (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max()))


def test_bf16_no_further_from_fp32_than_unfused(small_chunks):
    torch.manual_seed(0)
    h, w, y = torch.randn(777, 64), torch.randn(5003, 64) * 0.1, torch.randint(0, 5003, (777,))
    ref, ref_g = loss_and_grads(reference, h, w, y, torch.float32)
    unf, unf_g = loss_and_grads(reference, h, w, y, torch.bfloat16)
    fus, fus_g = loss_and_grads(cross_entropy.linear_cross_entropy, h, w, y, torch.bfloat16)
    assert abs(fus - ref) <= 1.5 * abs(unf - ref) + 1e-4 * abs(ref)
    for r, u, f, bound in zip(ref_g, unf_g, fus_g, (1.5, 2.0)):
        assert (f - r).norm() <= bound * (u - r).norm(), ((f - r).norm(), (u - r).norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_target_whose_probability_underflows_keeps_its_exact_loss(small_chunks, dtype):
    """The loss is -log softmax[target]; where that probability underflows to 0 (a target ~100 nats or
    more below the best logit) it must come from logsumexp instead, not be inf."""
    torch.manual_seed(0)
    h, w = torch.randn(7, 64), torch.randn(5003, 64) * 0.1
    w[0] = h[0] * 300 / h[0].square().sum()  # row 0: logit 300 at class 0
    y = torch.randint(1, 5003, (7,))
    ref, (rh, rw) = loss_and_grads(reference, h, w, y, dtype)
    got, (gh, gw) = loss_and_grads(cross_entropy.linear_cross_entropy, h, w, y, dtype)
    assert ref > 290 and got == pytest.approx(ref, rel=1e-5 if dtype == torch.float32 else 2e-3)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (gh - rh).abs().max() <= tol * rh.abs().max() and (gw - rw).abs().max() <= tol * rw.abs().max()


@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_only_the_gradients_asked_for(small_chunks, need):
    """A frozen LM head (pretrain, LoRA) gets no weight gradient computed; a frozen input none either."""
    torch.manual_seed(0)
    h, w, y = torch.randn(50, 16), torch.randn(5003, 16) * 0.1, torch.randint(0, 5003, (50,))
    _, (gh, gw) = loss_and_grads(reference, h, w, y, torch.float32, need)
    _, (fh, fw) = loss_and_grads(cross_entropy.linear_cross_entropy, h, w, y, torch.float32, need)
    assert (fh is None) == (gh is None) and (fw is None) == (gw is None)
    for a, b in ((fh, gh), (fw, gw)):
        if a is not None:
            assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max())


def test_model_loss_and_gradients_match_logits_path(small_chunks):
    """DoctorSun.forward(labels=) goes through llama.LMHead: same loss sum and parameter gradients as
    cross-entropy on the logits forward() returns, with padding, ignored labels and GQA (fp32)."""
    torch.manual_seed(0)
    cfg = model.ModelConfig.from_name("tiny")
    m = model.DoctorSun(cfg).float()
    assert isinstance(m.llm.lm_head, llama.LMHead)
    ids = torch.randint(0, cfg.llm.vocab_size, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    labels[mask == 0] = IGNORE_INDEX
    loss, n = m(ids, attention_mask=mask, labels=labels)
    loss.backward()
    fused = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    logits = m(ids, attention_mask=mask)[:, :-1]
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    ref.backward()
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for k, p in m.named_parameters():
        if p.grad is not None:
            assert (fused[k] - p.grad).abs().max() <= 1e-5 * max(1.0, p.grad.abs().max()), k


@pytest.mark.parametrize("cls", [llama.LMHead, llama.Linear])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 8), (1, 1, 8), (1, 8), (8, 1, 8), (3, 7, 8), (0, 1, 8)])
def test_lm_head_without_targets_is_a_linear(cls, dtype, shape):
    """Every shape, the few-row (decoding) kernels in bf16 included (torch.mv for one row, W x^T for
    2-16), gives the logits of a linear layer: within one bf16 rounding of the fp32 product. The same
    for every projection."""
    torch.manual_seed(0)
    head = cls(8, 1001, bias=False).to(dtype)
    x = torch.randn(*shape).to(dtype)
    with torch.no_grad():
        got = head(x)
    ref = x.float() @ head.weight.float().t()
    assert got.shape == ref.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, **({} if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)))
    assert list(head.state_dict()) == ["weight"]  # the checkpoint name is unchanged


def test_small_logits_take_the_plain_path_bit_for_bit():
    """Under FUSE_ABOVE logits the loss and gradients are autograd's own, exactly (the demo trains
    as it did before the fused path existed)."""
    torch.manual_seed(0)
    h, w, y = torch.randn(300, 64), torch.randn(2048, 64) * 0.1, torch.randint(0, 2048, (300,))
    assert 300 * 2048 <= cross_entropy.FUSE_ABOVE
    ref, (gh, gw) = loss_and_grads(reference, h, w, y, torch.float32)
    got, (fh, fw) = loss_and_grads(cross_entropy.linear_cross_entropy, h, w, y, torch.float32)
    assert got == ref and torch.equal(fh, gh) and torch.equal(fw, gw)


def test_a_chunk_holds_256_rows_of_a_32k_vocabulary():
    """The logits buffer holds CHUNK_ROWS rows, not every supervised row (31 MiB at a 32k vocabulary in
    fp32, where a chunk of 2,097 rows was 256 MiB): as fast, and the step's peak 90 MiB lower in the
    benchmark's training step. A small vocabulary takes more rows, up to CHUNK_ELEMENTS logits."""
    torch.manual_seed(0)
    h = torch.randn(1000, 16, requires_grad=True)
    w = (torch.randn(32000, 16) * 0.1).requires_grad_()
    y = torch.randint(0, 32000, (1000,))
    with OpLog() as log:
        loss = cross_entropy.linear_cross_entropy(h, w, y)  # 4 chunks: 256, 256, 256, 232 rows
    buffers = [tuple(t.shape) for name, _, outputs in log.calls for t in outputs
               if name == "aten.empty.memory_format" and t.dim() == 2 and t.shape[1] == 32000]
    assert buffers == [(256, 32000)], buffers
    loss.backward()
    assert torch.allclose(loss, reference(h.detach(), w.detach(), y), rtol=1e-5)
    assert cross_entropy.chunk_rows(2048) == 2048  # CHUNK_ELEMENTS (16 MiB of fp32 logits) at a small vocabulary


def test_one_logits_buffer_for_every_chunk(small_chunks):
    """The fused loss allocates one (chunk, V) tensor in all, whatever the number of chunks, and
    writes the logits, then their softmax, over it: a tensor per logits and per softmax would double
    the step's peak and pay the kernel's page zeroing on every chunk."""
    torch.manual_seed(0)
    h = torch.randn(777, 64, requires_grad=True)
    w = (torch.randn(5003, 64) * 0.1).requires_grad_()
    y = torch.randint(0, 5003, (777,))
    with OpLog() as log:
        loss = cross_entropy.linear_cross_entropy(h, w, y)  # 8 chunks of 100 rows
    new = [(name, tuple(t.shape)) for name, inputs, outputs in log.calls for t in outputs  # new (rows, V) storages
           if t.dim() == 2 and t.shape[1] == 5003
           and t.untyped_storage().data_ptr() not in {i.untyped_storage().data_ptr() for i in inputs}]
    assert new == [("aten.empty.memory_format", (100, 5003))], new
    loss.backward()
    assert torch.allclose(loss, reference(h.detach(), w.detach(), y), rtol=1e-5)
