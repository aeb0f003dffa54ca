"""llama.py against transformers' LlamaForCausalLM: tiny random models saved with save_pretrained and
loaded through our from_pretrained (the same loader production uses). Run with -s to see the errors.

Tolerances: fp32 logits max abs err <= 1e-4 (measured <= 3.2e-6). bf16 (both models in bf16, same weights):
logits within 0.1 of HF's (measured 5.5e-2 vs HF bf16, 7.1e-2 vs HF fp32, logits up to 4.6 where a bf16
ulp is 0.03: SDPA vs HF's eager attention rounds differently). KV-cache vs full forward <= 1e-5 (measured 4e-6).
Gradients of every parameter: fp32 within 1e-4 of each tensor's largest (measured 1.3e-6); bf16 no further
from fp32 than HF's bf16 gradients x1.5 (measured 1.31).
"""
import gc
import json
import math
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import llama
import lora
from conftest import OpLog
from llama import Llama, LlamaConfig, from_pretrained

FP32_TOL = 1e-4
BF16_TOL = 1e-1

VARIANTS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    # head_dim 16: wavelengths 6, 20, 63, 199 against original context 64 / high 4 = 16 and 64 / low 1 = 64,
    # so one frequency is kept, two are interpolated and one is divided by the factor: every band is used.
    "llama31": dict(num_attention_heads=4, num_key_value_heads=2,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "head_dim": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),  # head_dim != hidden / heads
}


def make_hf(variant: str, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A tiny HF Llama with weights far from the init (std 0.02 makes every logit ~0 and hides bugs)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                                   max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                                   attn_implementation="eager", **VARIANTS[variant])
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.empty_like(p).uniform_(0.5, 1.5) if "norm" in name else torch.randn_like(p) * 0.15)
    return hf


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> (hf model, folder written by save_pretrained), built once per module."""
    cache = {}

    def get(variant):
        if variant not in cache:
            hf = make_hf(variant)
            folder = tmp_path_factory.mktemp(variant)
            hf.save_pretrained(folder)
            cache[variant] = hf, folder
        return cache[variant]
    return get


def batch(padding: str, lengths=(7, 11, 4), vocab=101, seed=1):
    """input_ids (B, T) and attention_mask (B, T) with odd lengths, padded on the given side."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        if padding == "right":
            mask[i, :n] = 1
        else:
            mask[i, T - n:] = 1
    return ids, mask


def max_err(a, b, mask=None):
    d = (a.float() - b.float()).abs()
    return (d[mask.bool()] if mask is not None else d).max().item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_fp32(saved, variant):
    hf, folder = saved(variant)
    ours = from_pretrained(folder)
    if variant == "tied":
        assert ours.lm_head.weight is ours.embed_tokens.weight
    errs = {}
    with torch.no_grad():
        ids, _ = batch("right", lengths=(9, 9))  # no padding: the is_causal=True path
        errs["unpadded"] = max_err(ours(ids), hf(ids).logits)
        for side in ("right", "left"):
            ids, mask = batch(side)
            ref = hf(ids, attention_mask=mask).logits
            out = ours(ids, attention_mask=mask)
            assert torch.isfinite(out).all(), "padded rows must not produce NaN/inf"
            errs[side] = max_err(out, ref, mask)
        # An all-ones mask drops to the unmasked path; an explicit position_ids is honoured.
        ids, mask = batch("right", lengths=(9, 9))
        pos = torch.arange(3, 12).expand(2, 9)
        errs["position_ids"] = max_err(ours(ids, mask, position_ids=pos), hf(ids, mask, position_ids=pos).logits)
    print(f"\n[llama fp32 {variant}] max abs err " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert max(errs.values()) <= FP32_TOL, errs


def test_rope_inv_freq_matches_transformers():
    """Our RoPE frequencies equal transformers' at real scale (head_dim 128, original context 8192)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    for name in ("Llama-3.1-8B-Instruct", "Llama-2-7b-chat-hf", "Llama-3-8B-Instruct"):
        cfg = LlamaConfig.from_name(name)
        hf_cfg = transformers.LlamaConfig(**llama.config_to_hf(cfg))
        rope_type = hf_cfg.rope_parameters["rope_type"]
        if rope_type == "default":
            ref, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_cfg)
        else:
            ref, _ = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg)
        torch.testing.assert_close(llama.rope_inv_freq(cfg), ref, rtol=1e-6, atol=0)
    scaled = llama.rope_inv_freq(LlamaConfig.from_name("Llama-3.1-8B-Instruct"))
    plain = llama.rope_inv_freq(LlamaConfig.from_name("Llama-3-8B-Instruct"))
    assert torch.equal(scaled[:10], plain[:10]) and torch.allclose(scaled[-5:], plain[-5:] / 8)  # the bands


@pytest.mark.parametrize("variant", ["gqa", "llama31"])
def test_logits_match_transformers_bf16(saved, variant):
    hf, folder = saved(variant)
    hf16 = make_hf(variant).to(torch.bfloat16)
    ours = from_pretrained(folder, dtype=torch.bfloat16)
    assert ours.embed_tokens.weight.dtype == torch.bfloat16 and ours.inv_freq.dtype == torch.float32
    ids, mask = batch("left")
    with torch.no_grad():
        ref32 = hf(ids, attention_mask=mask).logits
        err = max_err(ours(ids, attention_mask=mask), hf16(ids, attention_mask=mask).logits, mask)
        err32 = max_err(ours(ids, attention_mask=mask), ref32, mask)
        # .to(bf16) also casts buffers; the forward must restore fp32 frequencies.
        again = from_pretrained(folder).to(torch.bfloat16)
        err_to = max_err(again(ids, attention_mask=mask), ours(ids, attention_mask=mask), mask)
        assert again.inv_freq.dtype == torch.float32
    print(f"\n[llama bf16 {variant}] max abs err vs HF bf16 {err:.1e}, vs HF fp32 {err32:.1e} "
          f"(|logits| max {ref32.abs().max():.1f}); .to(bf16) vs dtype=bf16 load {err_to:.1e}")
    assert err <= BF16_TOL and err32 <= BF16_TOL and err_to == 0


@pytest.mark.parametrize("variant", ["gqa", "llama31"])
def test_kv_cache_incremental_equals_full_forward(saved, variant):
    """Left-padded prompts, prefilled in two chunks, then one token at a time == one full forward."""
    _, folder = saved(variant)
    model = from_pretrained(folder)
    ids, mask = batch("left", lengths=(13, 9, 6, 13))
    B, L = ids.shape
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        caches = model.make_kv_caches(B, max_seq_len=L + 3)
        steps = [(0, 5), (5, 8)] + [(t, t + 1) for t in range(8, L)]
        inc = torch.cat([model(ids[:, a:b], attention_mask=mask[:, :b], kv_caches=caches, input_pos=a)
                         for a, b in steps], dim=1)
        # Without padding: the first chunk takes is_causal, a later chunk of several tokens a causal mask
        # with an offset, and one token at a time no mask at all.
        caches = model.make_kv_caches(B, max_seq_len=L)
        unpadded = model(ids)
        inc2 = torch.cat([model(ids[:, :4], kv_caches=caches), model(ids[:, 4:7], kv_caches=caches, input_pos=4)] +
                         [model(ids[:, t:t + 1], kv_caches=caches, input_pos=t) for t in range(7, L)], dim=1)
    errs = max_err(inc, full, mask), max_err(inc2, unpadded)
    print(f"\n[llama kv-cache {variant}] incremental vs full: left-padded {errs[0]:.1e}, unpadded {errs[1]:.1e}")
    assert max(errs) <= 1e-5
    with pytest.raises(ValueError, match="KV cache holds"):
        model(ids[:, :1], kv_caches=caches, input_pos=L)
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(ids[:, :1], attention_mask=mask, kv_caches=caches, input_pos=3)


def test_sharded_and_bin_checkpoints_load_identically(saved, tmp_path):
    hf, folder = saved("gqa")
    ref = from_pretrained(folder).state_dict()
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="40KB")
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) == len(ref)
    assert len(list(sharded.glob("*.safetensors"))) > 2
    # transformers 5 dropped safe_serialization=False: write the legacy pickle ourselves, with the per-layer
    # rotary buffer that transformers < 4.36 saved (it must be ignored, not loaded).
    legacy = tmp_path / "bin"
    legacy.mkdir()
    (legacy / "config.json").write_text((folder / "config.json").read_text())
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(sd, legacy / "pytorch_model.bin")
    for path in (sharded, legacy):
        got = from_pretrained(path).state_dict()
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), path


def test_tied_checkpoint_with_redundant_lm_head(saved, tmp_path):
    """Some savers keep a copy of the tied weight as lm_head.weight: it loads, and stays tied."""
    hf, folder = saved("tied")
    sd = load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in sd  # transformers drops tied weights on save
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    model = from_pretrained(tmp_path)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert "lm_head.weight" in model.state_dict()  # the alias is back after loading


@pytest.mark.parametrize("edit, key", [
    ("missing", "model.layers.1.mlp.up_proj.weight"),
    ("extra", "model.layers.0.self_attn.q_proj.bias"),
    ("shape", "model.norm.weight"),
])
def test_loader_errors_name_the_key(saved, tmp_path, edit, key):
    _, folder = saved("gqa")
    sd = load_file(folder / "model.safetensors")
    if edit == "missing":
        del sd[key]
        key = key.removeprefix("model.")  # reported under our module name
    elif edit == "extra":
        sd[key] = torch.zeros(64)
    else:
        sd[key] = torch.ones(65)
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match=re.escape(key)):
        from_pretrained(tmp_path)


LLAMA31_HUB = {  # meta-llama/Llama-3.1-8B-Instruct/config.json (hub style)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}


def test_from_hf_reads_both_config_styles(tmp_path):
    expected = LlamaConfig.from_name("Llama-3.1-8B-Instruct")
    assert llama.config_from_hf(LLAMA31_HUB) == expected
    # transformers 5 rewrites it with rope_parameters = {rope_theta, rope_type, factor, ...}
    transformers.LlamaConfig(**LLAMA31_HUB).save_pretrained(tmp_path)
    v5 = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in v5 and "rope_scaling" not in v5
    assert llama.config_from_hf(v5) == expected
    # Llama-2 style: no scaling; rope_type "default" means none; old llava-hf text_configs omit defaults
    llama2 = LlamaConfig.from_name("Llama-2-7b-chat-hf")
    assert llama.config_from_hf({**llama.config_to_hf(llama2), "rope_scaling": {"rope_type": "default"}}) == llama2
    v5_default = {**llama.config_to_hf(llama2), "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}
    del v5_default["rope_theta"], v5_default["rope_scaling"]
    assert llama.config_from_hf(v5_default) == llama2
    sparse = llama.config_from_hf({"model_type": "llama", "vocab_size": 32064,
                                   "max_position_embeddings": 4096, "rms_norm_eps": 1e-5})
    assert sparse == LlamaConfig.from_name("Llama-2-7b-chat-hf", vocab_size=32064)
    with pytest.raises(ValueError, match="yarn"):
        llama.config_from_hf({**LLAMA31_HUB, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


@pytest.mark.parametrize("name, n_params", [
    ("Llama-3-8B-Instruct", 8_030_261_248), ("Llama-3.1-8B-Instruct", 8_030_261_248),
    ("Llama-2-7b-chat-hf", 6_738_415_616), ("tiny", None),
])
def test_presets_and_to_hf(name, n_params):
    cfg = LlamaConfig.from_name(name)
    assert llama.config_from_hf(llama.config_to_hf(cfg)) == cfg
    hf_cfg = transformers.LlamaConfig(**llama.config_to_hf(cfg))  # transformers accepts what the converter writes
    assert (hf_cfg.num_key_value_heads, hf_cfg.head_dim, hf_cfg.rope_parameters["rope_theta"]) == \
           (cfg.num_key_value_heads, cfg.head_dim, cfg.rope_theta)
    with torch.device("meta"):
        n = sum(p.numel() for p in Llama(cfg).parameters())
    if n_params is not None:
        assert n == n_params  # the published sizes: 8.03B and 6.74B
    assert LlamaConfig.from_name(name, vocab_size=77).vocab_size == 77
    with torch.device("meta"):
        tied = Llama(LlamaConfig.from_name(name, tie_word_embeddings=True))
    assert tied.lm_head.weight is tied.embed_tokens.weight


def test_unknown_preset_lists_presets():
    with pytest.raises(KeyError, match="Llama-3.1-8B-Instruct"):
        LlamaConfig.from_name("llama-3.1-8b")


def test_gradient_checkpointing_same_gradients(saved):
    _, folder = saved("gqa")
    ids, mask = batch("right")
    grads = []
    for ckpt in (False, True):
        model = from_pretrained(folder).train()
        model.gradient_checkpointing = ckpt
        model(ids, attention_mask=mask).float().logsumexp(-1)[mask.bool()].sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)


def test_tiny_preset_trains_a_step():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("tiny"))
    ids = torch.randint(0, 2048, (2, 16))
    loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    assert math.isfinite(loss.item()) and model.layers[0].self_attn.q_proj.weight.grad is not None


def token_loss(logits, ids, mask):
    """Summed next-token cross-entropy where both the token and its target are real (fp32): a padding
    position's hidden state is each implementation's own."""
    keep = (mask[:, :-1] * mask[:, 1:]).bool()
    return torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), ids[:, 1:][keep], reduction="sum")


def hf_grads(hf, ids, mask):
    hf.zero_grad(set_to_none=True)
    token_loss(hf(ids, attention_mask=mask).logits, ids, mask).backward()
    return {n.removeprefix("model."): p.grad.float() for n, p in hf.named_parameters()}


def our_grads(ours, ids, mask):
    ours.train()
    token_loss(ours(ids, attention_mask=mask), ids, mask).backward()
    return {n: p.grad.float() for n, p in ours.named_parameters()}


@pytest.mark.parametrize("variant", ["gqa", "llama31"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_gradients_match_transformers_fp32(saved, variant, side):
    """Every parameter's gradient (the hand-written RMSNorm and SwiGLU backwards included) against
    autograd through transformers, batch of 3 odd lengths, padded. max abs err <= 1e-4 of the
    largest gradient of that tensor."""
    hf, folder = saved(variant)
    ids, mask = batch(side)
    ref = hf_grads(hf, ids, mask)
    got = our_grads(from_pretrained(folder), ids, mask)
    assert got.keys() == ref.keys()
    errs = {n: (got[n] - ref[n]).abs().max().item() / ref[n].abs().max().item() for n in ref}
    worst = max(errs, key=errs.get)
    print(f"\n[llama grads fp32 {variant} {side}] worst relative err {errs[worst]:.1e} ({worst})")
    assert errs[worst] <= 1e-4, (worst, errs[worst])


def test_gradients_match_transformers_bf16(saved):
    """bf16, both models: our gradients no further from the fp32 reference than transformers' bf16
    gradients are (x1.5, relative to the tensor's largest gradient), tensor by tensor."""
    hf, folder = saved("gqa")
    ids, mask = batch("left")
    ref = hf_grads(hf, ids, mask)
    theirs = hf_grads(make_hf("gqa").to(torch.bfloat16), ids, mask)
    got = our_grads(from_pretrained(folder, dtype=torch.bfloat16), ids, mask)
    worst = 0.0
    for n in ref:
        scale = ref[n].abs().max().item()
        ours_err, hf_err = [(g[n] - ref[n]).abs().max().item() / scale for g in (got, theirs)]
        worst = max(worst, ours_err / max(hf_err, 1e-3))
        assert ours_err <= 1.5 * max(hf_err, 1e-3), (n, ours_err, hf_err)
    print(f"\n[llama grads bf16] worst ours/transformers distance to fp32: {worst:.2f}")


def test_norm_and_swiglu_backward_match_autograd():
    """The two hand-written backwards against autograd on the plain expressions: SwiGLU by float64
    gradcheck and bit for bit in fp32 and bf16; RMSNorm (which computes in fp32 whatever its input)
    within 1e-5 in fp32 and a bf16 rounding in bf16. Frozen weight or frozen input: no gradient."""
    torch.manual_seed(0)
    g, u = (torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(llama.SwiGLU.apply, (g, u))

    def plain_norm(x, w):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)

    def norm(x, w):
        return llama.RMSNormFunction.apply(x, w, 1e-5)

    def swiglu(g, u):
        return llama.SwiGLU.apply(g, u)

    cases = ((norm, plain_norm, ((4, 7, 64), (64,))),
             (swiglu, lambda g, u: torch.nn.functional.silu(g) * u, ((4, 7, 88),) * 2))
    for dtype in (torch.float32, torch.bfloat16):
        for fn, ref, shapes in cases:
            inputs = [(torch.randn(s) * 2 + (1 if len(s) == 1 else 0)).to(dtype) for s in shapes]
            grad_out = torch.randn(shapes[0]).to(dtype)
            outs = []
            for f in (fn, ref):
                leaves = [t.clone().requires_grad_() for t in inputs]
                y = f(*leaves)
                y.backward(grad_out)
                outs.append([y] + [t.grad for t in leaves])
            assert torch.equal(outs[0][0], outs[1][0])  # the forward is the same expression
            for a, b in zip(outs[0][1:], outs[1][1:]):
                if fn is swiglu:
                    assert torch.equal(a, b)
                elif dtype == torch.float32:
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
                else:
                    torch.testing.assert_close(a.float(), b.float(), rtol=1 / 128, atol=1e-2)
            for frozen in range(2):  # only the gradients asked for
                leaves = [t.clone().requires_grad_(i != frozen) for i, t in enumerate(inputs)]
                fn(*leaves).backward(grad_out)
                assert leaves[frozen].grad is None and leaves[1 - frozen].grad is not None


class StorageLog(TorchDispatchMode):
    """Every storage an operator creates inside `with StorageLog() as log:`, held weakly: which of them
    are still alive afterwards is what autograd keeps, whatever saved-tensor hooks did on the way."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.made.append((StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes()))
        return out

    def alive(self, *exclude: torch.Tensor, min_bytes: int = 0) -> int:
        gc.collect()
        skip = {StorageWeakRef(t.untyped_storage()).cdata for t in exclude}
        kept = {ref.cdata: n for ref, n in self.made if not ref.expired() and ref.cdata not in skip}
        return sum(n for n in kept.values() if n > min_bytes)


class DetachedAlias(torch.autograd.Function):
    """What DeepSpeed's ZeRO-3 puts after every module (parameter_offload.py, PreBackwardFunctionForModule):
    the output detached, a new tensor on the same memory, whose backward gathers the module's weights."""

    @staticmethod
    def forward(ctx, output):
        return output.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad


@pytest.mark.parametrize("selective, zero3_alias", [(True, False), (False, False), (True, True)])
def test_a_layer_keeps_only_what_its_backward_needs(selective, zero3_alias):
    """What the backward of forward_hidden (one layer) holds, per token: q and the attention output,
    the residual stream before the second norm and before the final norm (4 x hidden), k and v,
    gate and up; the input x, which its norm keeps too, is the test's own. The norm outputs and
    silu(gate) * up are recomputed in the backward (llama.Recipe); with selective_recompute off
    they are kept as well (+ 2 x hidden + 1 x intermediate). Plain autograd would also keep each
    norm's fp32 x and normalised x, and silu(gate) (tensors below 16 values per token, norm and
    attention statistics, are not counted)."""
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=88, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = Llama(cfg).to(dtype).train()
        model.selective_recompute = selective
        if zero3_alias:  # the projections then see aliases of the norm outputs, not the outputs themselves
            for m in model.modules():
                if isinstance(m, llama.RMSNorm):
                    m.register_forward_hook(lambda module, args, out: DetachedAlias.apply(out))
        h = torch.randn(2, 9, 64, dtype=dtype, requires_grad=True)
        with StorageLog() as log:
            y = model.forward_hidden(h)
        per_token = log.alive(y, *model.parameters(), min_bytes=2 * 9 * 16 * dtype.itemsize) / (2 * 9 * dtype.itemsize)
        expected = 4 * 64 + 2 * 32 + 2 * 88 + (2 * 64 + 88 if not selective else 0)
        assert per_token == expected, (dtype, per_token, expected)
        y.float().pow(2).sum().backward()  # and the recipes still serve the backward
        assert h.grad is not None and all(p.grad is not None for p in model.layers.parameters())


@pytest.mark.parametrize("adapters", [False, True])
def test_selective_recompute_gives_the_same_gradients_bit_for_bit(adapters):
    """The recomputed norm outputs and silu(gate) * up are the forward's own values, so every gradient is
    identical with selective_recompute on and off, in fp32 and bf16, padded, and through LoRA adapters
    (which keep their input too)."""
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ids = torch.randint(0, 101, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = mask[2, :7] = 0  # left padding
    for dtype in (torch.float32, torch.bfloat16):
        grads = []
        for selective in (True, False):
            torch.manual_seed(0)
            model = Llama(cfg).to(dtype).train()
            if adapters:
                lora.inject(model, lora.LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("*q_proj", "*v_proj", "*down_proj")))
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        torch.nn.init.normal_(p, std=0.1)
            model.selective_recompute = selective
            model(ids, attention_mask=mask).float().logsumexp(-1)[mask.bool()].sum().backward()
            grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
        for n in grads[0]:
            assert torch.equal(grads[0][n], grads[1][n]), (dtype, n)


@pytest.mark.parametrize("rows, kernel", [(1, "aten.mv.default"), (8, "aten.mm.default"), (40, None)])
def test_decoding_rows_take_the_weight_streaming_kernels(rows, kernel):
    """In bf16 on a CPU a projection's one row goes through torch.mv and 2-16 rows through W x^T (the
    weight as the GEMM's first operand), the kernels that read a weight fastest here; more rows (a
    prompt, training) through F.linear. Which kernel ran is read off the dispatched operators."""
    layer = llama.Linear(64, 300, bias=False).to(torch.bfloat16)
    x = torch.randn(rows, 1, 64).to(torch.bfloat16)
    with torch.no_grad(), OpLog() as log:
        y = layer(x)
    assert y.shape == (rows, 1, 300) and y.is_contiguous()  # a transposed view slows every later op
    products = [(f, [tuple(t.shape) for t in inputs]) for f, inputs, _ in log.calls
                if f in ("aten.mv.default", "aten.mm.default", "aten.addmm.default")]
    assert len(products) == 1, log.calls
    if kernel is None:
        assert products[0][1][0] == (rows, 64)  # x first: F.linear's GEMM
    else:
        assert products[0][0] == kernel and products[0][1][0] == (300, 64), products  # the weight first
