"""model.py against transformers' LlavaForConditionalGeneration, on tiny random models.

The HF model is saved with save_pretrained and loaded through our production loader
(`model.from_pretrained`), so the key table is tested too. Tolerances: fp32 max abs 1e-4,
bf16 6e-2 on logits of order 1 (bf16 keeps 8 mantissa bits; errors compound over layers).
"""
import dataclasses
import json
import re

import pytest
import torch
import transformers

import checkpoint
import data
import llama
import lora
import model
from conftest import tiny_model_config

V, IMG = 96, 95  # vocabulary (the last id is <image>, as after llava-hf conversion)


def hf_llava(tmp_path, act="quick_gelu", tie=False):
    torch.manual_seed(0)
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, hidden_act=act),
        text_config=transformers.LlamaConfig(
            vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, rope_theta=10000.0,
            max_position_embeddings=256, tie_word_embeddings=tie, eos_token_id=2, pad_token_id=0),
        image_token_index=IMG, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=16, tie_word_embeddings=tie)
    hf = transformers.LlavaForConditionalGeneration(cfg).eval()
    # Random init leaves logits nearly flat; scale up so greedy decoding is decisive.
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(3.0) if p.dim() > 1 else None
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


def prompt(n_text_before, n_text_after, gen, expanded=True, n_img=16):
    ids = torch.randint(3, IMG, (n_text_before,), generator=gen).tolist()
    ids += [IMG] * (n_img if expanded else 1)
    ids += torch.randint(3, IMG, (n_text_after,), generator=gen).tolist()
    return ids


def left_pad(rows, pad=0):
    T = max(map(len, rows))
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf, path = hf_llava(tmp_path_factory.mktemp("llava"))
    ours = model.from_pretrained(path, dtype=torch.float32)
    return hf, ours, path


def test_loads_llava_hf_config(pair):
    _, ours, _ = pair
    assert ours.image_token_id == IMG and ours.num_image_tokens == 16
    assert ours.config.vision.select_layer == -2 and ours.config.vision.select_feature == "patch"
    assert ours.config.llm.num_key_value_heads == 2


def test_logits_match_transformers_fp32(pair):
    hf, ours, _ = pair
    g = torch.Generator().manual_seed(1)
    rows = [prompt(3, 7, g), prompt(5, 2, g)]  # odd lengths, batch 2, different image offsets
    ids, mask = left_pad(rows)
    px = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        got = ours(ids, pixel_values=px, attention_mask=mask)
    real = mask.bool()
    err = (got[real] - ref[real]).abs().max().item()
    print(f"llava fp32 max abs err {err:.2e}")
    assert err <= 1e-4


def test_lone_placeholder_expands_like_processor(pair):
    """LLaVA's one-placeholder batches, expanded by data.expand_image_tokens, give the same logits."""
    _, ours, _ = pair
    g = torch.Generator().manual_seed(2)
    full = prompt(4, 6, g)
    lone = full[:4] + [IMG] + full[20:]
    px = torch.randn(1, 3, 32, 32, generator=g)
    lone_ids, _, _ = data.expand_image_tokens(torch.tensor([lone]), ours.num_image_tokens,
                                              image_token_id=ours.image_token_id)
    with torch.no_grad():
        a = ours(torch.tensor([full]), pixel_values=px)
        b = ours(lone_ids, pixel_values=px)
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_placeholder_count_mismatch_names_both_numbers(pair):
    _, ours, _ = pair
    ids = torch.tensor([[5, 6] + [IMG] * 15 + [7]])  # 15 placeholders, one image gives 16
    with pytest.raises(ValueError, match=r"15 placeholder.*16 features"):
        ours(ids, pixel_values=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="no pixel_values"):
        ours(ids)


def test_text_only_rows_skip_vision_and_match(pair):
    """A batch mixing an image row and a text-only row: pixel_values holds only the one image."""
    hf, ours, _ = pair
    g = torch.Generator().manual_seed(3)
    img_row, txt_row = prompt(2, 5, g), torch.randint(3, IMG, (9,), generator=g).tolist()
    px = torch.randn(1, 3, 32, 32, generator=g)
    calls = []
    h = ours.vision.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        with torch.no_grad():
            ids, mask = left_pad([img_row, txt_row])
            got = ours(ids, pixel_values=px, attention_mask=mask)
            alone = ours(torch.tensor([txt_row]))
    finally:
        h.remove()
    assert calls == [1]  # one image encoded, no dummy image for the text-only row
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max().item() <= 1e-4
    torch.testing.assert_close(got[1, -9:], alone[0], rtol=0, atol=1e-4)


def test_loss_sum_and_count_match_transformers(pair):
    hf, ours, _ = pair
    g = torch.Generator().manual_seed(4)
    ids = torch.tensor([prompt(3, 9, g), prompt(3, 9, g)])
    labels = ids.clone()
    labels[ids == IMG] = -100
    labels[:, :20] = -100
    labels[1, 22:] = -100  # the second row supervises fewer tokens
    px = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        loss_sum, n = ours(ids, pixel_values=px, labels=labels)
        ref = hf(input_ids=ids, pixel_values=px, labels=labels).loss
    assert n == int((labels[:, 1:] != -100).sum())
    assert abs(loss_sum.item() / n - ref.item()) <= 1e-5


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_generate_matches_transformers(pair, batch):
    hf, ours, _ = pair
    g = torch.Generator().manual_seed(10 + batch)
    rows = [prompt(2 + 3 * i, 3 + i, g) for i in range(batch)]
    ids, mask = left_pad(rows)
    px = torch.randn(batch, 3, 32, 32, generator=g)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=12,
                          do_sample=False, eos_token_id=2, pad_token_id=0)[:, ids.shape[1]:]
    got = ours.generate(ids, pixel_values=px, attention_mask=mask, max_new_tokens=12,
                        stop_token_ids=[2], pad_token_id=0)
    assert got.tolist() == ref.tolist()


def test_generate_with_lone_placeholders_equals_expanded(pair):
    _, ours, _ = pair
    g = torch.Generator().manual_seed(5)
    full = [prompt(2, 4, g), prompt(6, 1, g)]
    lone = [r[:r.index(IMG)] + [IMG] + r[r.index(IMG) + 16:] for r in full]
    px = torch.randn(2, 3, 32, 32, generator=g)
    (ids_a, mask_a), (ids_b, mask_b) = left_pad(full), left_pad(lone)
    ids_b, mask_b, _ = data.expand_image_tokens(ids_b, ours.num_image_tokens, mask_b,
                                                image_token_id=ours.image_token_id)
    a = ours.generate(ids_a, px, mask_a, max_new_tokens=8)
    b = ours.generate(ids_b, px, mask_b, max_new_tokens=8)
    assert a.tolist() == b.tolist()


def test_generate_rejects_right_padding(pair):
    _, ours, _ = pair
    with pytest.raises(ValueError, match="left padding"):
        ours.generate(torch.tensor([[5, 6, 0]]), attention_mask=torch.tensor([[1, 1, 0]]))


def test_sampling_is_seeded(pair):
    _, ours, _ = pair
    ids = torch.tensor([[5, 6, 7, 8]])
    run = lambda s: ours.generate(ids, max_new_tokens=10, do_sample=True, temperature=1.0, top_k=20,
                                  top_p=0.9, generator=torch.Generator().manual_seed(s))
    assert run(0).tolist() == run(0).tolist()
    assert any(run(0).tolist() != run(s).tolist() for s in range(1, 6))


def test_repetition_penalty_matches_transformers_processor():
    """model.apply_repetition_penalty over the tokens seen == RepetitionPenaltyLogitsProcessor, exactly."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, V, generator=g) * 4  # both signs
    ids = torch.randint(0, V, (3, 12), generator=g)
    ids[:, 6:] = ids[:, :6]  # repeats: a token seen twice is penalised once
    for penalty in (1.3, 0.7):
        ref = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        got = model.apply_repetition_penalty(logits, model._seen(ids, None, V), penalty)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        assert (got != logits).sum() == sum(len(set(r.tolist())) for r in ids) - int((logits == 0).sum())


@pytest.mark.parametrize("batch", [1, 2])
def test_generate_with_repetition_penalty_matches_transformers(pair, batch):
    """The whole prompt (image placeholders too, as transformers keeps them in input_ids) and the answer
    so far are penalised. Rows of equal length: transformers would also penalise a left pad's id."""
    hf, ours, _ = pair
    g = torch.Generator().manual_seed(20 + batch)
    ids = torch.tensor([prompt(3, 4, g) for _ in range(batch)])
    px = torch.randn(batch, 3, 32, 32, generator=g)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=px, max_new_tokens=12, do_sample=False,
                          repetition_penalty=1.8, eos_token_id=2, pad_token_id=0)[:, ids.shape[1]:]
    got = ours.generate(ids, px, max_new_tokens=12, stop_token_ids=[2], pad_token_id=0, repetition_penalty=1.8)
    plain = ours.generate(ids, px, max_new_tokens=12, stop_token_ids=[2], pad_token_id=0)
    assert got.tolist() == ref.tolist()
    assert got.tolist() != plain.tolist()  # the penalty changed the answer: the comparison means something


def llm_tokens_per_call(m):
    """A list that fills with the number of tokens each LLM forward processes, and the hook's handle."""
    calls = []
    return calls, m.llm.layers[0].register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[1]))


def test_session_turns_equal_generate_from_scratch():
    """Three turns through one Session (cache grown from 256 to 512 positions on the way) give what
    generate gives for each whole prompt; each turn prefills only its new tokens."""
    cfg = dataclasses.replace(tiny_model_config(V, max_position_embeddings=2048), image_token_id=IMG)
    m = model.build(cfg, seed=0).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0) if p.dim() > 1 else None
    g = torch.Generator().manual_seed(8)
    px = torch.randn(1, 3, 32, 32, generator=g)
    s = model.Session(m)
    ids, capacities = [], []
    for tail in (prompt(3, 5, g), torch.randint(3, IMG, (9,), generator=g).tolist(),
                 torch.randint(3, IMG, (230,), generator=g).tolist()):
        ids = ids + tail
        held = len(s.ids)
        calls, h = llm_tokens_per_call(m)
        try:
            got = s.generate(ids, px, max_new_tokens=8, stop_token_ids=[2], repetition_penalty=1.2)
        finally:
            h.remove()
        ref = m.generate(torch.tensor([ids]), px, max_new_tokens=8, stop_token_ids=[2], repetition_penalty=1.2)
        assert got == ref[0].tolist()
        assert calls[0] == len(ids) - held and set(calls[1:]) <= {1}
        capacities.append(s.capacity)
        ids = ids + got
    assert capacities == [256, 256, 512]
    with pytest.raises(ValueError, match="must extend"):
        s.generate([5, 6, 7], px)
    m.config.llm.max_position_embeddings = len(ids)
    with pytest.raises(ValueError, match=f"context is {len(ids)}: start a new conversation"):
        model.Session(m).generate(ids, px, max_new_tokens=8)


def test_bf16_within_documented_bound(pair):
    hf, _, path = pair
    ours = model.from_pretrained(path, dtype=torch.bfloat16)
    assert ours.llm.embed_tokens.weight.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(6)
    ids = torch.tensor([prompt(3, 8, g)])
    px = torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px).logits
        got = ours(ids, pixel_values=px).float()
    err = (got - ref).abs().max().item()
    print(f"llava bf16 max abs err {err:.2e} (logit scale {ref.abs().max().item():.1f})")
    assert err <= 0.1 * max(1.0, ref.abs().max().item() / 10)


def test_loading_imports_no_compiler(pair):
    """Built on meta, a model must not run nn.Embedding's random init: normal_ on the meta device imports
    torch._dynamo (about 1 s, then the whole load took 1.3 s instead of 0.05 s)."""
    import subprocess
    import sys
    code = (f"import sys, model; model.from_pretrained({str(pair[2])!r}); "
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo'))[:3])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_tied_embeddings_llava(tmp_path):
    hf, path = hf_llava(tmp_path, act="gelu", tie=True)
    ours = model.from_pretrained(path)
    assert ours.llm.lm_head.weight is ours.llm.embed_tokens.weight
    g = torch.Generator().manual_seed(7)
    ids = torch.tensor([prompt(2, 3, g)])
    px = torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        err = (ours(ids, pixel_values=px) - hf(input_ids=ids, pixel_values=px).logits).abs().max()
    assert err <= 1e-4


def original_llava_folder(hf, path, out):
    """Write the original LLaVA layout (LlavaLlamaForCausalLM names) by hand from the HF model's tensors."""
    sd = {}
    for k, v in hf.state_dict().items():
        k = (k.replace("model.language_model.", "model.")
              .replace("model.vision_tower.", "model.vision_tower.vision_tower.vision_model.")
              .replace("model.multi_modal_projector.linear_1.", "model.mm_projector.0.")
              .replace("model.multi_modal_projector.linear_2.", "model.mm_projector.2."))
        sd[k] = v
    checkpoint.save_state(sd, out)
    text = json.loads((path / "config.json").read_text())["text_config"]
    cfg = {**text, "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
           "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 32, "mm_vision_select_layer": -2,
           "mm_vision_select_feature": "patch", "mm_vision_tower": str(path / "vision"),
           "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "use_mm_proj": True}
    (out / "config.json").write_text(json.dumps(cfg))
    hf.model.vision_tower.save_pretrained(path / "vision")


def test_loads_original_llava_layout(pair, tmp_path):
    hf, ours, path = pair
    original_llava_folder(hf, path, tmp_path / "orig")
    m = model.from_pretrained(tmp_path / "orig")
    assert m.image_token_id == model.IMAGE_TOKEN_ID  # -200: no <image> in the original vocab
    g = torch.Generator().manual_seed(8)
    ids = torch.tensor([prompt(3, 4, g)])
    px = torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        ref = ours(ids, pixel_values=px)
        got = m(ids.masked_fill(ids == IMG, -200), pixel_values=px)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_own_format_round_trip_with_lora_and_bases(pair, tmp_path):
    """A partial checkpoint (base folders + trained weights + LoRA adapters) rebuilds the model."""
    hf, ours, path = pair
    hf.model.vision_tower.save_pretrained(tmp_path / "clip")
    llm_folder = tmp_path / "llm"
    llm_sd = {("lm_head." + k[len("lm_head."):] if k.startswith("lm_head.") else
               "model." + k[len("model.language_model."):]): v
              for k, v in hf.state_dict().items() if k.startswith(("model.language_model.", "lm_head."))}
    checkpoint.save_state(llm_sd, llm_folder)
    (llm_folder / "config.json").write_text(json.dumps(llama.config_to_hf(ours.config.llm)))

    m = model.from_pretrained(path)
    cfg = lora.LoRAConfig(r=4, alpha=8, dropout=0.0, targets=lora.VIT_TARGETS)
    lora.inject(m.vision, cfg)
    torch.manual_seed(0)
    for mod in lora.lora_modules(m.vision).values():
        torch.nn.init.normal_(mod.lora_B, std=0.5)
    torch.nn.init.normal_(m.projector[0].weight)
    trained = {k: v for k, v in m.state_dict().items() if k.startswith("projector.") or ".lora_" in k}
    model.save_pretrained(m, tmp_path / "ckpt", state_dict=trained,
                          base={"vision": str(tmp_path / "clip"), "llm": str(llm_folder)},
                          lora_configs={"vision": cfg})
    g = torch.Generator().manual_seed(9)
    ids = torch.tensor([prompt(3, 4, g)])
    px = torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        ref = m(ids, pixel_values=px)
        merged = model.from_pretrained(tmp_path / "ckpt")
        assert not lora.lora_modules(merged)
        unmerged = model.from_pretrained(tmp_path / "ckpt", merge_lora=False)
        assert lora.lora_modules(unmerged)
        torch.testing.assert_close(unmerged(ids, pixel_values=px), ref, rtol=0, atol=0)
        torch.testing.assert_close(merged(ids, pixel_values=px), ref, rtol=0, atol=1e-4)

    # A child checkpoint that names its parent ("init") and stores only the projector.
    child = {k: v + 1 for k, v in merged.state_dict().items() if k.startswith("projector.")}
    model.save_pretrained(merged, tmp_path / "child", state_dict=child,
                          base={"init": str(tmp_path / "ckpt")})
    c = model.from_pretrained(tmp_path / "child")
    for k, v in c.state_dict().items():
        want = child[k] if k in child else merged.state_dict()[k]
        assert torch.equal(v, want), k


def test_full_own_format_round_trip_is_bitwise(pair, tmp_path):
    _, ours, _ = pair
    model.save_pretrained(ours, tmp_path / "full", max_shard_bytes=20_000)
    assert (tmp_path / "full" / "model.safetensors.index.json").exists()
    again = model.from_pretrained(tmp_path / "full")
    a, b = ours.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_partial_checkpoint_without_base_is_an_error(pair, tmp_path):
    _, ours, _ = pair
    model.save_pretrained(ours, tmp_path / "p", state_dict={k: v for k, v in ours.state_dict().items()
                                                           if k.startswith("projector.")})
    with pytest.raises(checkpoint.CheckpointError, match="no weights were loaded"):
        model.from_pretrained(tmp_path / "p")


def test_unknown_layout_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="unknown checkpoint layout.*bert"):
        model.from_pretrained(tmp_path)


def test_presets_build_on_meta():
    """The real presets have the real shapes (Doctor Sun: 576 image tokens, 128256 vocab)."""
    cfg = model.ModelConfig.from_name("doctor-sun")
    with torch.device("meta"):
        m = model.DoctorSun(cfg)
    assert m.num_image_tokens == 576
    assert m.llm.embed_tokens.weight.shape == (128256, 4096)
    assert m.projector[0].weight.shape == (4096, 1024)
    n = sum(p.numel() for p in m.parameters())
    assert 8.3e9 < n < 8.4e9, n  # Llama-3.1-8B (8.03B) + CLIP-L (0.30B) + projector (0.02B)


# ---- refused input: unreadable weight files, non-finite weights ---------------------------------------

def small_checkpoint(folder, **save):
    m = model.build(tiny_model_config(64))
    model.save_pretrained(m, folder, **save)
    return m


@pytest.mark.parametrize("damage", ["cut header", "cut data", "empty", "bad index", "cut .bin"])
def test_unreadable_weight_file_is_named(tmp_path, damage):
    """safetensors' own error names no file ("Error while deserializing header: invalid header length")."""
    ckpt = tmp_path / "ckpt"
    m = small_checkpoint(ckpt, max_shard_bytes=20_000 if damage == "bad index" else None)
    f = ckpt / "model.safetensors"
    if damage == "bad index":
        f = ckpt / "model.safetensors.index.json"
        f.write_text(f.read_text()[:50])
    elif damage == "cut .bin":
        f.unlink()
        f = ckpt / "pytorch_model.bin"
        torch.save(m.state_dict(), f)
        f.write_bytes(f.read_bytes()[:3000])
    else:
        b = f.read_bytes()
        f.write_bytes({"cut header": b[:100], "cut data": b[:-1000], "empty": b""}[damage])
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(f"{f}: ")):
        model.from_pretrained(ckpt)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_is_refused_naming_the_tensor(tmp_path, value):
    """A NaN weight used to load without a word and turn every answer into '!!!!'."""
    m = model.build(tiny_model_config(64))
    with torch.no_grad():
        m.projector[2].weight[1, 2] = value
    model.save_pretrained(m, tmp_path / "ckpt")
    f = tmp_path / "ckpt" / "model.safetensors"
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(f"'projector.2.weight' in {f} holds NaN or Inf")):
        model.from_pretrained(tmp_path / "ckpt")


def test_weight_that_overflows_the_load_dtype_is_refused(tmp_path):
    m = model.build(tiny_model_config(64))
    with torch.no_grad():
        m.projector[0].weight[0, 0] = 1e6  # finite in fp32 and bf16; fp16 stops at 65504
    model.save_pretrained(m, tmp_path / "ckpt")
    assert model.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16).projector[0].weight[0, 0] > 9e5
    with pytest.raises(checkpoint.CheckpointError, match=r"'projector\.0\.weight' in .* overflows torch\.float16"):
        model.from_pretrained(tmp_path / "ckpt", dtype=torch.float16)
