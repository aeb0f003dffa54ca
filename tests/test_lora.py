"""Tests for lora.py: parity with peft 0.21.2, exact merge/unmerge, training, adapter state dicts.

Tolerances: fp32 outputs vs peft max abs err <= 1e-5 (same math, different op order); merged vs
unmerged fp32 <= 1e-5 (W x + s B A x vs (W + s B A) x re-associates the sums); bf16 merged vs
unmerged <= 3e-2 (the merged weight is rounded to bf16 once, ~2^-8 relative).
"""
import copy

import pytest
import torch
import torch.nn as nn

import lora
from lora import LoRAConfig, LoRALinear

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


class Block(nn.Module):
    """ViT-shaped names: self_attn.{q,k,v,out}_proj (bias) and mlp.fc1/fc2, plus a LayerNorm."""

    def __init__(self, d=24, hidden=40):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.self_attn = nn.Module()
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, n, nn.Linear(d, d))
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        a = self.self_attn
        h = self.norm(x)
        x = x + a.out_proj(torch.tanh(a.q_proj(h) * a.k_proj(h)) + a.v_proj(h))
        return x + self.mlp.fc2(torch.relu(self.mlp.fc1(x)))


class Tiny(nn.Module):
    def __init__(self, n_layers=2):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(n_layers))
        self.head = nn.Linear(24, 8)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _randomise(module, std=0.1):
    """Give every adapter non-zero A and B (B starts at zero, which would hide any bug)."""
    with torch.no_grad():
        for m in lora.lora_modules(module).values():
            m.lora_A.normal_(0, std)
            m.lora_B.normal_(0, std)


def _injected(seed=0, r=4, alpha=8.0, dropout=0.0, targets=lora.VIT_TARGETS):
    torch.manual_seed(seed)
    model = Tiny()
    lora.inject(model, LoRAConfig(r=r, alpha=alpha, dropout=dropout, targets=targets))
    _randomise(model)
    return model.eval()


def _copy_adapters_from_peft(ours, peft_model):
    """peft keeps A/B as nn.Linear weights under lora_A.default / lora_B.default: same shapes."""
    with torch.no_grad():
        peft_mods = dict(peft_model.named_modules())
        for name, m in lora.lora_modules(ours).items():
            p = peft_mods["base_model.model." + name]
            m.lora_A.copy_(p.lora_A["default"].weight)
            m.lora_B.copy_(p.lora_B["default"].weight)


# ----------------------------------------------------------------------------- parity with peft

def test_parity_with_peft_tiny_block():
    torch.manual_seed(0)
    base = Tiny()
    ours = copy.deepcopy(base)
    names = lora.inject(ours, LoRAConfig(r=4, alpha=8.0, dropout=0.0, targets=lora.VIT_TARGETS))
    assert len(names) == 12 and "head" not in names
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                          target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    ref = peft.get_peft_model(copy.deepcopy(base), cfg)
    torch.manual_seed(1)
    for n, p in ref.named_parameters():
        if "lora_" in n:
            p.data.normal_(0, 0.1)
    _copy_adapters_from_peft(ours, ref)
    ours.eval(), ref.eval()
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)
        lora.merge(ours)
        merged_ref = ref.merge_and_unload()
        for name in names:  # same merged weights as peft
            torch.testing.assert_close(ours.get_submodule(name).weight, merged_ref.get_submodule(name).weight,
                                       atol=1e-6, rtol=0)


def test_parity_with_peft_hf_llama_gqa():
    """LLM_TARGETS on a real (tiny, random) HF Llama with GQA: 7 adapters per layer, none on lm_head."""
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).eval()
    ours = copy.deepcopy(base)
    names = lora.inject(ours, LoRAConfig(r=8, alpha=16.0, dropout=0.0, targets=lora.LLM_TARGETS))
    assert len(names) == 14 and not any("lm_head" in n for n in names)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    torch.manual_seed(1)
    for n, p in ref.named_parameters():
        if "lora_" in n:
            p.data.normal_(0, 0.1)
    _copy_adapters_from_peft(ours, ref)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    assert (a - base(ids).logits).abs().max() > 1e-2  # the adapters really change the output
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_our_llama_projections_take_adapters_and_come_back():
    """Our Llama's projections are llama.Linear (x W^T by another kernel for one bf16 row): LoRA wraps
    them and computes the base product with that kernel, merge_and_unload puts llama.Linear back, and
    the LM head (whose forward computes a loss) is refused."""
    import llama

    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    m = llama.Llama(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 64, (1, 1))  # one row: the torch.mv path
    with torch.no_grad():
        base = m(ids)
    assert len(lora.inject(m, LoRAConfig(r=4, alpha=8.0, targets=lora.LLM_TARGETS))) == 14
    assert all(lm.base_type is llama.Linear for lm in lora.lora_modules(m).values())
    with torch.no_grad():
        assert torch.equal(m(ids), base)  # B = 0
        for lm in lora.lora_modules(m).values():
            lm.lora_B.normal_(0, 0.1)
        adapted = m(ids)
    assert (adapted.float() - base.float()).abs().max() > 0.05
    lora.merge_and_unload(m)
    assert not lora.lora_modules(m) and type(m.layers[1].mlp.down_proj) is llama.Linear
    with torch.no_grad():  # merged weights are rounded to bf16 once
        torch.testing.assert_close(m(ids).float(), adapted.float(), atol=5e-2, rtol=2e-2)
    with pytest.raises(TypeError, match="'lm_head' is a LMHead"):
        lora.inject(m, LoRAConfig(targets=("lm_head",)))


def test_vit_targets_on_hf_clip_and_zero_init_is_identity():
    """VIT_TARGETS names every ViT linear (HF names == ours); with B = 0 the output is bitwise the base."""
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                        num_attention_heads=4, image_size=28, patch_size=14)
    torch.manual_seed(0)
    base = transformers.CLIPVisionModel(cfg).eval()
    ours = copy.deepcopy(base)
    # transformers 5.x CLIPVisionModel has no .vision_model wrapper: encoder.layers.N... at the top.
    names = lora.inject(ours, LoRAConfig(targets=lora.VIT_TARGETS))  # Doctor Sun: r=64, alpha=16
    assert len(names) == 6 * 3
    assert names[0] == "encoder.layers.0.self_attn.q_proj"
    px = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(ours(pixel_values=px).last_hidden_state, base(pixel_values=px).last_hidden_state)


# ----------------------------------------------------------------------------- structure

def test_shares_base_parameters_and_names():
    torch.manual_seed(0)
    model = Tiny()
    q = model.layers[0].self_attn.q_proj
    w, b = q.weight, q.bias
    base_keys = set(model.state_dict())
    lora.inject(model, LoRAConfig(r=4, targets=("layers.0.self_attn.q_proj",)))
    new = model.layers[0].self_attn.q_proj
    assert isinstance(new, LoRALinear) and new.weight is w and new.bias is b  # no copy
    assert set(model.state_dict()) - base_keys == {"layers.0.self_attn.q_proj.lora_A", "layers.0.self_attn.q_proj.lora_B"}
    assert new.lora_A.shape == (4, 24) and new.lora_B.shape == (24, 4)
    assert new.scaling == 16.0 / 4 and torch.count_nonzero(new.lora_B) == 0
    assert new.lora_A.abs().max() <= 1 / 24 ** 0.5 + 1e-6  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(in)


def test_pattern_errors():
    model = Tiny()
    with pytest.raises(ValueError, match=r"'\*qkv_proj' matches no module"):
        lora.inject(model, LoRAConfig(targets=("*q_proj", "*qkv_proj")))
    with pytest.raises(TypeError, match=r"'layers.0.norm' is a LayerNorm"):
        lora.inject(model, LoRAConfig(targets=("*.norm",)))
    with pytest.raises(TypeError, match=r"'layers.0.self_attn' is a Module"):
        lora.inject(model, LoRAConfig(targets=("*self_attn",)))
    assert not lora.lora_modules(model)  # a failed inject changed nothing
    lora.inject(model, LoRAConfig(targets=("*q_proj",)))
    with pytest.raises(TypeError, match="already a LoRALinear"):
        lora.inject(model, LoRAConfig(targets=("*q_proj",)))
    mha = nn.Sequential(nn.MultiheadAttention(8, 2))  # out_proj is a Linear subclass MHA never calls
    with pytest.raises(TypeError, match="NonDynamicallyQuantizableLinear"):
        lora.inject(mha, LoRAConfig(targets=("*out_proj",)))
    with pytest.raises(ValueError, match="empty"):
        lora.inject(Tiny(), LoRAConfig())


def test_injected_into_an_eval_model_stays_in_eval():
    """An adapter injected into a model in eval mode (inference on a loaded model) must not apply its
    dropout: a new module starts in train mode, so inject takes the mode of the layer it replaces."""
    model = Tiny().eval()
    lora.inject(model, LoRAConfig(targets=("*q_proj",), dropout=0.5))
    layer = model.layers[0].self_attn.q_proj
    assert not layer.training
    x = torch.randn(2, 3, 24)
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))


def test_dropout_only_on_lora_path():
    model = _injected(dropout=1.0).train()  # p=1 zeroes the whole LoRA input: only the base remains
    x = torch.randn(2, 3, 24)
    layer = model.layers[0].self_attn.q_proj
    base_out = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert torch.equal(layer(x), base_out)
    layer.eval()
    assert not torch.equal(layer(x), base_out)


# ----------------------------------------------------------------------------- merge

def test_merge_unmerge_exact_and_idempotent():
    model = _injected()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        y = model(x)
        lora.merge(model)
        once = {k: v.clone() for k, v in model.state_dict().items()}
        lora.merge(model)  # second merge is a no-op
        assert all(torch.equal(once[k], v) for k, v in model.state_dict().items())
        assert all(m.merged for m in lora.lora_modules(model).values())
        err = (model(x) - y).abs().max().item()
        assert err <= 1e-5, err
        assert not torch.equal(once["layers.0.mlp.fc1.weight"], before["layers.0.mlp.fc1.weight"])
        lora.unmerge(model)
        lora.unmerge(model)
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k  # bitwise
        assert torch.equal(model(x), y)


def test_merge_bf16_base_fp32_adapter():
    torch.manual_seed(0)
    model = Tiny().to(torch.bfloat16)
    lora.inject(model, LoRAConfig(r=4, alpha=8.0, dropout=0.0, targets=lora.VIT_TARGETS), dtype=torch.float32)
    _randomise(model)
    m = model.layers[1].mlp.fc1
    assert m.weight.dtype == torch.bfloat16 and m.lora_A.dtype == m.lora_B.dtype == torch.float32
    w0 = m.weight.clone()
    x = torch.randn(2, 5, 24, dtype=torch.bfloat16)
    with torch.no_grad():
        y = model.eval()(x)
        assert y.dtype == torch.bfloat16
        lora.merge(model)
        assert (model(x).float() - y.float()).abs().max() <= 3e-2
        lora.unmerge(model)
        assert torch.equal(m.weight, w0)


def test_merge_and_unload_leaves_plain_linears():
    model = _injected()
    x = torch.randn(2, 3, 24)
    with torch.no_grad():
        y = model(x)
        lora.merge_and_unload(model)
        assert not lora.lora_modules(model)
        assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("_proj", "fc1", "fc2")))
        assert not any("lora" in k for k in model.state_dict())
        assert set(model.state_dict()) == set(Tiny().state_dict())
        assert (model(x) - y).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- training

def test_only_lora_trains():
    torch.manual_seed(0)
    model = Tiny()
    base = copy.deepcopy(model)
    lora.inject(model, LoRAConfig(r=4, alpha=8.0, dropout=0.05, targets=lora.VIT_TARGETS))
    lora.mark_only_lora_trainable(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 24 and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    x = torch.randn(4, 3, 24)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), base.eval()(x))  # B = 0: the base model exactly
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    A0 = {n: p.clone() for n, p in model.named_parameters() if n.endswith("lora_A")}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    for step in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        if step == 0:  # B was 0, so dL/dA = 0 on the first step: only B moves
            assert all(torch.equal(p, A0[n]) for n, p in model.named_parameters() if n in A0)
            assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))
    assert all(not torch.equal(p, A0[n]) for n, p in model.named_parameters() if n in A0)
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n


# ----------------------------------------------------------------------------- adapter state dicts

def test_lora_state_dict_roundtrip_and_errors():
    src = _injected(seed=0)
    sd = lora.lora_state_dict(src)
    assert len(sd) == 24 and all(k.endswith((".lora_A", ".lora_B")) for k in sd)
    dst = copy.deepcopy(src)
    for m in lora.lora_modules(dst).values():
        nn.init.kaiming_uniform_(m.lora_A)
        nn.init.zeros_(m.lora_B)
    x = torch.randn(2, 3, 24)
    with torch.no_grad():
        assert not torch.allclose(dst(x), src(x))
        lora.load_lora_state_dict(dst, sd)
        assert torch.equal(dst(x), src(x))

        bad = dict(sd)
        bad["layers.0.self_attn.q_proj.lora_C"] = bad.pop("layers.0.self_attn.q_proj.lora_A")
        with pytest.raises(KeyError, match=r"missing \['layers.0.self_attn.q_proj.lora_A'\], "
                                           r"unexpected \['layers.0.self_attn.q_proj.lora_C'\]"):
            lora.load_lora_state_dict(dst, bad)
        bad = dict(sd, **{"layers.1.mlp.fc2.lora_B": torch.zeros(24, 8)})
        with pytest.raises(ValueError, match=r"'layers.1.mlp.fc2.lora_B': shape \(24, 8\) .* \(24, 4\)"):
            lora.load_lora_state_dict(dst, bad)
        with pytest.raises(KeyError, match="call inject first"):
            lora.load_lora_state_dict(Tiny(), sd)

        other = lora.lora_state_dict(_injected(seed=3))  # same shapes, different values
        lora.merge(dst)  # loading into a merged module re-merges the new adapter
        lora.load_lora_state_dict(dst, other)
        lora.load_lora_state_dict(src, other)
        torch.testing.assert_close(dst(x), src(x), atol=1e-5, rtol=0)
        lora.unmerge(dst)
        assert torch.equal(dst(x), src(x))
