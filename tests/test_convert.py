"""Tests for convert.py, verified by loading the outputs with the installed transformers (5.24).

Tiny random models (ViT 32 px / patch 8 -> 16 image tokens, Llama 2 layers, GQA 4:2, Llama-3.1
rope scaling) and the demo's byte-level BPE tokenizer (Llama-3 special tokens), all built in
tmp_path. The transformers side uses only its public loaders: from_pretrained, AutoProcessor,
apply_chat_template, generate.
"""
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import checkpoint
import clip
import convert
import data
import demo
import llama
import lora
import model
from conftest import TINY_LLM, TINY_VISION, cli_error, tiny_model_config

REPO = Path(__file__).resolve().parent.parent

transformers = pytest.importorskip("transformers")
QUESTION = "Is there a lesion in this image?"
TEXTS = ["Is there a lesion in this image? yes no. CT MRI X-ray ultrasound upper left right lower",
         "What modality is this? The lesion is bright. 图像中有病灶吗？是 否 左上 右下 磁共振"] * 20


# ---- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    demo.train_tokenizer(TEXTS, folder)  # 2048 ids with the Llama-3 special tokens
    return folder


def tiny_config(tok, tie=False) -> model.ModelConfig:
    """The shared tiny sizes with Llama-3.1 rope scaling and the tokenizer's special ids."""
    return tiny_model_config(tok.vocab_size, rope_theta=500000.0, max_position_embeddings=2048,
                             tie_word_embeddings=tie,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                             bos_token_id=tok.bos_id, eos_token_id=tok.stop_ids)


def save_ours(folder, tok_dir, *, tie=False, with_lora=False, seed=0):
    """A random checkpoint in our format; with_lora: LoRA on every ViT and LLM linear, B != 0."""
    tok = data.load_tokenizer(tok_dir)
    m = model.build(tiny_config(tok, tie), seed=seed)
    configs = {}
    if with_lora:
        configs = {"vision": lora.LoRAConfig(r=4, alpha=8.0, dropout=0.0, targets=lora.VIT_TARGETS),
                   "llm": lora.LoRAConfig(r=4, alpha=8.0, dropout=0.0, targets=lora.LLM_TARGETS)}
        lora.inject(m.vision, configs["vision"])
        lora.inject(m.llm, configs["llm"])
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            for mod in lora.lora_modules(m).values():
                mod.lora_B.normal_(0, 0.2)
    model.save_pretrained(m, folder, lora_configs=configs, extra={"tokenizer": str(tok_dir)})
    return m.eval()


@pytest.fixture(scope="module")
def ours(tmp_path_factory, tok_dir):
    folder = tmp_path_factory.mktemp("ours") / "ckpt"
    return folder, save_ours(folder, tok_dir)


def make_image(w=40, h=56, seed=0) -> Image.Image:
    """Non-square, so the processor's pad-to-square and centre crop both matter."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / w, y * 255 / h, np.full_like(x, 90.0)], -1) + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype("uint8"))


@contextmanager
def transformers_warnings():
    """Collect what transformers logs at WARNING and above while loading."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger, handler = logging.getLogger("transformers"), Keep(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def load_hf(folder):
    """LlavaForConditionalGeneration + AutoProcessor; fails on any missing/unexpected/mismatched key."""
    with transformers_warnings() as logged:
        hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(
            folder, output_loading_info=True, dtype=torch.float32)
        proc = transformers.AutoProcessor.from_pretrained(folder)
    assert {k: v for k, v in info.items() if v} == {}, info
    bad = [r for r in logged if any(w in r.lower() for w in ("missing", "unexpected", "not initialized",
                                                             "newly initialized", "mismatch"))]
    assert not bad, bad
    return hf.eval(), proc


def processor_inputs(proc):
    """What a transformers user feeds the model: chat template + <image> expansion + pixels."""
    msgs = [{"role": "user", "content": [{"type": "image", "image": make_image()},
                                         {"type": "text", "text": QUESTION}]}]
    return proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                    return_tensors="pt")


def run(*argv):
    return convert.main([str(a) for a in argv])


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


# ---- ours -> llava-hf, checked by transformers -------------------------------------------------------

@pytest.mark.parametrize("with_lora", [False, True], ids=["plain", "lora-merged"])
def test_llava_hf_matches_transformers(tmp_path, tok_dir, with_lora):
    ref = save_ours(tmp_path / "ckpt", tok_dir, with_lora=with_lora, seed=3)
    # Shards capped small so the index path is exercised (the tiny model is ~0.6 MB in fp32).
    info = run("--to", "llava-hf", tmp_path / "ckpt", tmp_path / "hf", "--dtype", "float32",
               "--max-shard-size", "200KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    hf, proc = load_hf(tmp_path / "hf")
    print(f"\ntransformers {transformers.__version__}")
    assert hf.config.text_config.rope_parameters["rope_type"] == "llama3"  # Llama-3.1 scaling kept

    # Real <image> expansion and the real chat template: the ids must be the ones we train on.
    enc = processor_inputs(proc)
    tok = data.load_tokenizer(tok_dir)
    ids = data.encode_prompt(QUESTION, tok, has_image=True, num_image_tokens=ref.num_image_tokens)
    image_id = info["image_token_index"]
    assert enc["input_ids"][0].tolist() == [image_id if i == data.IMAGE_TOKEN_ID else i for i in ids]
    assert (enc["input_ids"] == image_id).sum() == ref.num_image_tokens == 16

    # The processor's pixels equal our preprocessing (pad to square, bicubic, crop, normalise).
    ours_px = data.preprocess_image(make_image(), size=32, pad_to_square=True)
    px_err = ((enc["pixel_values"][0] - ours_px) * torch.tensor(data.CLIP_STD)[:, None, None]).abs().max().item()
    assert px_err <= 1 / 255 + 1e-6, px_err

    x = torch.tensor([ids])
    with torch.no_grad():
        ours_logits = ref(x, pixel_values=enc["pixel_values"])  # LoRA unmerged, in memory
        hf_logits = hf(**enc).logits
    V = ours_logits.shape[-1]
    err = (hf_logits[..., :V] - ours_logits).abs().max().item()
    print(f"llava-hf {'LoRA merged' if with_lora else 'plain'}: max |logit diff| = {err:.2e}; "
          f"pixel diff {px_err * 255:.2f}/255")
    assert err <= 1e-4
    if with_lora:  # the adapters matter: without them the logits are far off
        base = model.build(ref.config, seed=3).eval()
        with torch.no_grad():
            assert (base(x, pixel_values=enc["pixel_values"]) - ours_logits).abs().max() > 1e-2

    new = hf.generate(**enc, max_new_tokens=12, do_sample=False)[0, x.shape[1]:].tolist()
    mine = ref.generate(x, pixel_values=enc["pixel_values"], max_new_tokens=12,
                        stop_token_ids=convert.generation_eos(tok_dir, ref))[0].tolist()
    assert new == mine, (new, mine)
    print(f"greedy generate: {len(new)} tokens, identical")


def test_llava_hf_default_bfloat16(tmp_path, ours):
    """The default export dtype; bf16 rounding of weights and activations makes the match looser."""
    folder, _ = ours
    run("--to", "llava-hf", folder, tmp_path / "hf")
    assert {t.dtype for t in load_file(tmp_path / "hf" / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).eval()
    proc = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    enc = processor_inputs(proc)
    m = model.from_pretrained(folder, dtype=torch.bfloat16)
    ids = enc["input_ids"].masked_fill(enc["input_ids"] == hf.config.image_token_id, m.image_token_id)
    with torch.no_grad():
        a = hf(**{**enc, "pixel_values": enc["pixel_values"].bfloat16()}).logits[..., :2048].float()
        b = m(ids, pixel_values=enc["pixel_values"].bfloat16()).float()
    err = (a - b).abs().max().item()
    print(f"\nllava-hf bf16: max |logit diff| = {err:.2e} (logit scale {b.abs().max().item():.2f})")
    assert err <= 2e-2


def test_vocab_arithmetic(tmp_path, ours, tok_dir):
    folder, ref = ours
    run("--to", "llava-hf", folder, tmp_path / "hf", "--dtype", "float32", "--pad-vocab-to", "64")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    old = ref.config.llm.vocab_size  # 2048 = the tokenizer's size before conversion
    added = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = added.convert_tokens_to_ids(["<image>", "<pad>"])
    assert len(added) == old + 2 and ids == [old, old + 1]  # two tokens added, right after the vocab
    assert cfg["image_token_index"] == cfg["image_token_id"] == ids[0]
    assert cfg["text_config"]["pad_token_id"] == ids[1] == added.pad_token_id
    rows = 2112  # 2050 rounded up to a multiple of 64
    assert cfg["text_config"]["vocab_size"] == rows
    for key, ours_w in (("language_model.model.embed_tokens.weight", ref.llm.embed_tokens.weight),
                        ("language_model.lm_head.weight", ref.llm.lm_head.weight)):
        w = sd[key]
        assert w.shape == (rows, 32)
        assert torch.equal(w[:old], ours_w)
        assert torch.allclose(w[old:], ours_w.mean(0).expand(rows - old, -1), atol=1e-7)
    proc = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    assert proc.image_token_id == ids[0]
    assert cfg["image_seq_length"] == ref.num_image_tokens
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert set(gen["eos_token_id"]) == {added.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")}
    # transformers sizes its model from text_config.vocab_size: every row is used, none missing.
    hf, _ = load_hf(tmp_path / "hf")
    assert hf.get_input_embeddings().weight.shape[0] == rows


# ---- round trips --------------------------------------------------------------------------------------

def assert_same_weights(a: model.DoctorSun, b: model.DoctorSun):
    """Bitwise equal on every tensor; b's vocabulary may be larger (llava-hf adds rows)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, t in sa.items():
        u = sb[k]
        if k in ("llm.embed_tokens.weight", "llm.lm_head.weight"):
            u = u[:t.shape[0]]
        assert u.dtype == t.dtype and torch.equal(u, t), k


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_round_trip_llava_hf(tmp_path, tok_dir, tie):
    ref = save_ours(tmp_path / "ckpt", tok_dir, tie=tie)
    run("--to", "llava-hf", tmp_path / "ckpt", tmp_path / "hf", "--dtype", "float32")
    run("--from", "llava-hf", tmp_path / "hf", tmp_path / "back", "--dtype", "float32")
    back = model.from_pretrained(tmp_path / "back")
    assert_same_weights(ref, back)
    assert back.config.llm.tie_word_embeddings == tie
    assert back.config.vision == ref.config.vision
    assert back.config.llm.rope_scaling == ref.config.llm.rope_scaling
    assert back.config.image_token_id == 2048 and back.config.llm.vocab_size == 2050
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    # Converting the import again reuses its <image>/<pad> ids: nothing is added twice.
    info = run("--to", "llava-hf", tmp_path / "back", tmp_path / "hf2", "--dtype", "float32")
    assert info["vocab_rows"] == (2050, 2050) and info["image_token_index"] == 2048

    # What transformers itself writes: 5.24's on-disk names (`vision_tower.*` without
    # `vision_model`), and the 5.x in-memory names (`model.language_model.*`, `lm_head.*`).
    hf, _ = load_hf(tmp_path / "hf")
    fresh = transformers.LlavaForConditionalGeneration(hf.config)  # (hf itself would save as it loaded)
    fresh.load_state_dict(hf.state_dict())
    fresh.save_pretrained(tmp_path / "hf_saved")
    keys = load_file(tmp_path / "hf_saved" / "model.safetensors").keys()
    assert any(k.startswith("vision_tower.embeddings.") for k in keys)
    (tmp_path / "hf_mem").mkdir()
    (tmp_path / "hf_mem" / "config.json").write_bytes((tmp_path / "hf" / "config.json").read_bytes())
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()
               if not (tie and k == "lm_head.weight")}, tmp_path / "hf_mem" / "model.safetensors")
    assert any(k.startswith("model.language_model.") for k in load_file(tmp_path / "hf_mem" / "model.safetensors"))
    for name in ("hf_saved", "hf_mem"):
        run("--from", "llava-hf", tmp_path / name, tmp_path / f"back_{name}", "--dtype", "float32")
        assert_same_weights(back, model.from_pretrained(tmp_path / f"back_{name}"))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_round_trip_llava(tmp_path, tok_dir, tie):
    ref = save_ours(tmp_path / "ckpt", tok_dir, tie=tie)
    out = tmp_path / "llava"
    # As a user runs it (argparse, __main__), once; the other tests call main() in-process.
    subprocess.run([sys.executable, str(REPO / "convert.py"), "--to", "llava", str(tmp_path / "ckpt"), str(out),
                    "--dtype", "float32", "--max-shard-size", "200KB"], check=True, cwd=tmp_path)
    keys = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    prefixes = {"model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.",
                "model.vision_tower.vision_tower.vision_model.", "model.mm_projector.0.", "model.mm_projector.2."}
    present = {p for p in prefixes if any(k.startswith(p) for k in keys)}
    assert present == prefixes - ({"lm_head."} if tie else set())
    assert not any("inv_freq" in k or "rotary" in k for k in keys)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mm_projector_type"] == "mlp2x_gelu" and cfg["mm_vision_select_layer"] == -2
    assert cfg["mm_vision_select_feature"] == "patch" and cfg["image_aspect_ratio"] == "pad"
    assert cfg["mm_hidden_size"] == 32 and cfg["use_mm_proj"] and not cfg["mm_use_im_start_end"]
    assert cfg["vocab_size"] == 2048  # no <image> in this vocabulary: -200 at run time
    assert cfg["rope_scaling"]["rope_type"] == "llama3"
    assert Path(cfg["mm_vision_tower"], "config.json").is_file()  # not a public CLIP: its config is written
    assert (out / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    assert json.loads((out / "preprocessor_config.json").read_text())["crop_size"] == {"height": 32, "width": 32}
    run("--from", "llava", out, tmp_path / "back", "--dtype", "float32")
    back = model.from_pretrained(tmp_path / "back")
    assert_same_weights(ref, back)
    assert back.config.to_dict() == ref.config.to_dict()


def test_llava_default_dtype_and_known_tower(tmp_path, ours):
    """fp16 by default (Doctor Sun's release); a tower equal to a public CLIP is recorded by hub name."""
    folder, ref = ours
    run("--to", "llava", folder, tmp_path / "llava")
    sd = load_file(tmp_path / "llava" / "model.safetensors")
    assert {t.dtype for t in sd.values()} == {torch.float16}
    assert convert.vision_tower_name(clip.ClipConfig.from_name("clip-vit-large-patch14-336")) == \
        "openai/clip-vit-large-patch14-336"
    assert convert.vision_tower_name(ref.config.vision) is None


# ---- xtuner -------------------------------------------------------------------------------------------

def _peft_lora(hf_module, targets, folder, seed, rename=None):
    """Attach a peft LoRA (B != 0), save it; return the peft-merged HF module (the reference)."""
    import peft

    pm = peft.get_peft_model(hf_module, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                        target_modules=targets))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(folder)
    if rename:  # xtuner ran on transformers 4.x: CLIPVisionModel names carried "vision_model."
        f = Path(folder) / "adapter_model.safetensors"
        save_file({rename(k): v for k, v in load_file(f).items()}, f)
    return pm.merge_and_unload()


@pytest.mark.parametrize("llm_form", ["llm", "llm_adapter"])
def test_xtuner_import(tmp_path, llm_form):
    torch.manual_seed(0)
    vcfg = transformers.CLIPVisionConfig(**TINY_VISION)
    tcfg = transformers.LlamaConfig(vocab_size=300, **TINY_LLM)
    vit_hf = transformers.CLIPVisionModel(vcfg)
    vit_hf.save_pretrained(tmp_path / "clip")
    llm_hf = transformers.LlamaForCausalLM(tcfg)
    llm_hf.save_pretrained(tmp_path / "base_llm")
    src = tmp_path / "xtuner"
    vit_ref = _peft_lora(vit_hf, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
                         src / "visual_encoder_adapter", seed=1,
                         rename=lambda k: k.replace("base_model.model.", "base_model.model.vision_model.", 1))
    if llm_form == "llm_adapter":
        llm_ref = _peft_lora(llm_hf, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                             src / "llm_adapter", seed=2)
    else:
        llm_ref = llm_hf
        llm_hf.save_pretrained(src / "llm")
    proj = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    (src / "projector").mkdir()
    save_file({f"model.{k}": v for k, v in proj.state_dict().items()}, src / "projector" / "model.safetensors")
    (src / "projector" / "config.json").write_text(json.dumps(
        {"model_type": "projector", "visual_hidden_size": 32, "llm_hidden_size": 32, "depth": 2,
         "hidden_act": "gelu", "bias": True}))

    args = ["--from", "xtuner", src, tmp_path / "ours", "--vision", tmp_path / "clip", "--dtype", "float32"]
    run(*args, *(["--llm", tmp_path / "base_llm"] if llm_form == "llm_adapter" else []))
    m = model.from_pretrained(tmp_path / "ours")

    # Reference by hand: peft's own merge, renamed to our names.
    expected = {f"vision.{k}": v for k, v in vit_ref.state_dict().items() if "position_ids" not in k}
    expected |= {"llm." + checkpoint.rename(k, llama.HF_KEY_MAP): v for k, v in llm_ref.state_dict().items()}
    expected |= {f"projector.{k}": v for k, v in proj.state_dict().items()}
    got = m.state_dict()
    assert got.keys() == expected.keys()
    err = max((got[k] - v).abs().max().item() for k, v in expected.items())
    print(f"\nxtuner ({llm_form}) vs peft-merged reference: max |weight diff| = {err:.2e}")
    assert err <= 1e-6, err  # the same fp32 formula as peft's merge
    assert m.image_token_id == model.IMAGE_TOKEN_ID and m.config.projector_type == "mlp2x_gelu"


# ---- ours -> a standalone CLIP, checked by transformers' CLIPVisionModel ---------------------------------

def test_to_clip_is_the_tuned_tower(tmp_path, tok_dir):
    """What xtuner's `convert merge --is-clip` gives: transformers loads the LoRA-merged tower, and its
    CLIPImageProcessor makes our pixels. fp32: features within 1e-5 (the same ops, HF's eager attention)."""
    save_ours(tmp_path / "ckpt", tok_dir, with_lora=True, seed=5)
    out = tmp_path / "clip"
    info = run("--to", "clip", tmp_path / "ckpt", out)  # float32 by default
    assert info == {"image_size": 32, "select_layer": -2, "select_feature": "patch"}
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    with transformers_warnings() as logged:
        hf, loading = transformers.CLIPVisionModel.from_pretrained(out, output_loading_info=True)
        proc = transformers.AutoImageProcessor.from_pretrained(out)
    assert {k: v for k, v in loading.items() if v} == {}, loading
    assert not [r for r in logged if "missing" in r.lower() or "unexpected" in r.lower()], logged
    assert hf.dtype == torch.float32 and type(proc).__name__.startswith("CLIPImageProcessor")

    images = [make_image(), make_image(56, 40, seed=1)]  # non-square both ways: resize + centre crop
    px = proc(images=images, return_tensors="pt")["pixel_values"]  # (2, 3, 32, 32)
    ours_px = torch.stack([data.preprocess_image(im, size=32, pad_to_square=False) for im in images])
    px_err = ((px - ours_px) * torch.tensor(data.CLIP_STD)[:, None, None]).abs().max().item()
    assert px_err <= 1 / 255 + 1e-6, px_err

    merged = model.from_pretrained(tmp_path / "ckpt")  # LoRA merged on load
    untuned = model.from_pretrained(tmp_path / "ckpt", merge_lora=False)
    for mod in lora.lora_modules(untuned.vision).values():
        mod.lora_B.data.zero_()  # the base tower the LoRA was trained on
    with torch.no_grad():
        got = hf(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]  # LLaVA's feature
        want, base = merged.vision(px), untuned.vision(px)
    err = (got - want).abs().max().item()
    print(f"--to clip: max |feature diff| = {err:.2e}; the LoRA moves them by {(want - base).abs().max():.2f}; "
          f"pixel diff {px_err * 255:.2f}/255")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - base).abs().max() > 1e-2  # the adapters are in the exported weights

    with pytest.raises(SystemExit):  # a CLIP folder has no tokenizer and no LLaVA image policy
        run("--to", "clip", tmp_path / "ckpt", tmp_path / "o1", "--tokenizer", tok_dir)
    assert not (tmp_path / "o1").exists() and leftovers(tmp_path) == []


# ---- errors -------------------------------------------------------------------------------------------

def test_errors_name_the_problem_and_leave_nothing(tmp_path, ours, tok_dir, monkeypatch):
    folder, _ = ours
    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        run("--to", "llava-hf", bad, tmp_path / "o1")

    run("--to", "llava", folder, tmp_path / "llava", "--dtype", "float32")
    with pytest.raises(ValueError, match="'llava' checkpoint, not 'llava-hf'"):
        run("--from", "llava-hf", tmp_path / "llava", tmp_path / "o2")

    # Missing vision tower: an original-LLaVA folder without tower weights, pointing nowhere.
    novis = tmp_path / "novis"
    novis.mkdir()
    sd = load_file(tmp_path / "llava" / "model.safetensors")
    save_file({k: v for k, v in sd.items() if "vision_tower" not in k}, novis / "model.safetensors")
    cfg = json.loads((tmp_path / "llava" / "config.json").read_text())
    (novis / "config.json").write_text(json.dumps({**cfg, "mm_vision_tower": str(tmp_path / "nowhere")}))
    with pytest.raises(ValueError, match="mm_vision_tower"):
        run("--from", "llava", novis, tmp_path / "o3")
    xt = tmp_path / "xt"
    xt.mkdir()
    with pytest.raises(ValueError, match="vision tower is missing"):
        run("--from", "xtuner", xt, tmp_path / "o4")

    # Shape mismatch: a config that disagrees with the weights.
    run("--to", "llava-hf", folder, tmp_path / "hf", "--dtype", "float32")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 48
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(checkpoint.CheckpointError, match=r"wrong shape for 'language_model\.model\.layers\.0"):
        run("--from", "llava-hf", tmp_path / "hf", tmp_path / "o5")

    # A failure after files were written: the partial folder is removed.
    def fail(path, obj):
        if path.name == "processor_config.json":
            raise OSError("disk full")
        path.write_text(json.dumps(obj))
    monkeypatch.setattr(convert, "write_json", fail)
    with pytest.raises(OSError, match="disk full"):
        run("--to", "llava-hf", folder, tmp_path / "o6")
    monkeypatch.undo()

    with pytest.raises(FileExistsError, match="already exists"):  # never overwrites
        run("--to", "llava", folder, tmp_path / "llava")
    assert (tmp_path / "llava" / "model.safetensors").is_file()
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))
    assert leftovers(tmp_path) == []
    with pytest.raises(SystemExit):  # an option of another direction is refused, not ignored
        run("--from", "llava-hf", tmp_path / "hf", tmp_path / "o8", "--pad-vocab-to", "64")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        run("--to", "llava-hf", folder, tmp_path / "o7", "--tokenizer", tmp_path / "bert")
    assert not (tmp_path / "o7").exists() and not (tmp_path / "o8").exists() and leftovers(tmp_path) == []


# ---- the prompt policy survives every import and export ---------------------------------------------

def test_llava_hf_round_trip_keeps_preprocessing_and_logits(tmp_path, tok_dir):
    """A llava-hf model whose processor does not pad (CLIPImageProcessor): imported and exported
    again, transformers' processor gives the same pixels and the model the same logits."""
    save_ours(tmp_path / "ckpt", tok_dir, seed=5)
    policy = data.PromptPolicy("llama3", "", pad_to_square=False)
    run("--to", "llava-hf", tmp_path / "ckpt", tmp_path / "x", "--dtype", "float32", "--image-aspect-ratio", "square")
    proc_cfg = json.loads((tmp_path / "x" / "preprocessor_config.json").read_text())
    # As llava-hf models on the hub ship it: a plain CLIPImageProcessor, no policy of ours.
    proc_cfg = {k: v for k, v in proc_cfg.items() if k != "do_pad"} | {"image_processor_type": "CLIPImageProcessor"}
    convert.write_json(tmp_path / "x" / "preprocessor_config.json", proc_cfg)
    cfg = json.loads((tmp_path / "x" / "config.json").read_text())
    del cfg[data.POLICY_KEY]
    convert.write_json(tmp_path / "x" / "config.json", cfg)
    assert data.prompt_policy(tmp_path / "x")[0].pad_to_square is False  # read from the processor

    run("--from", "llava-hf", tmp_path / "x", tmp_path / "ours", "--dtype", "float32")
    run("--to", "llava-hf", tmp_path / "ours", tmp_path / "y", "--dtype", "float32")
    (hx, px), (hy, py) = load_hf(tmp_path / "x"), load_hf(tmp_path / "y")
    ex, ey = processor_inputs(px), processor_inputs(py)
    assert torch.equal(ex["pixel_values"], ey["pixel_values"])  # a padding processor would differ
    assert ex["input_ids"].tolist() == ey["input_ids"].tolist()
    with torch.no_grad():
        lx, ly = hx(**ex).logits, hy(**ey).logits
    print(f"\nllava-hf -> ours -> llava-hf: max |logit diff| {(lx - ly).abs().max():.1e}")
    assert torch.equal(lx, ly)
    assert data.prompt_policy(tmp_path / "ours")[0] == data.prompt_policy(tmp_path / "y")[0] == policy


def test_system_prompt_is_the_checkpoints_in_every_container(tmp_path, tok_dir):
    """The policy travels with the weights: eval's default prompt is the same for our checkpoint, its
    llava-hf export and its original-LLaVA export; a recorded system prompt is the export's chat
    template default, rendered by transformers to the ids we build."""
    import eval as E

    ref = save_ours(tmp_path / "ckpt", tok_dir, seed=6)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    system = "You are a careful radiologist. 请用中文或英文回答。"
    cfg[data.POLICY_KEY] = data.PromptPolicy("llama3", system, True).to_dict()
    convert.write_json(tmp_path / "ckpt" / "config.json", cfg)
    run("--to", "llava-hf", tmp_path / "ckpt", tmp_path / "hf", "--dtype", "float32")
    run("--to", "llava", tmp_path / "ckpt", tmp_path / "llava", "--dtype", "float32")
    policies = {p: data.prompt_policy(tmp_path / p)[0] for p in ("ckpt", "hf", "llava")}
    assert len(set(policies.values())) == 1 and policies["hf"].system == system, policies
    args = E.parse_args(["--model", str(tmp_path / "hf"), "--question", "q"])
    assert E.load_model(args)[2].system == system

    _, proc = load_hf(tmp_path / "hf")
    enc = processor_inputs(proc)
    ids = data.encode_prompt(QUESTION, data.load_tokenizer(tok_dir), system=system, has_image=True,
                             num_image_tokens=ref.num_image_tokens)
    image_id = json.loads((tmp_path / "hf" / "config.json").read_text())["image_token_index"]
    assert enc["input_ids"][0].tolist() == [image_id if i == data.IMAGE_TOKEN_ID else i for i in ids]


def test_vicuna_llava_is_asked_as_llava_1_5(tmp_path):
    """A LLaVA-1.5 folder (no Llama-3 chat tokens, no recorded policy) gets LLaVA's conv_vicuna_v1:
    the prompt llava/conversation.py's SeparatorStyle.TWO builds, and our llava-hf export renders it
    through transformers' chat template to the same ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXTS + [data.VICUNA_V1_SYSTEM] * 5, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(tok_dir / "tokenizer.json"))
    convert.write_json(tok_dir / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>"})
    tok = data.load_tokenizer(tok_dir)

    m = model.build(tiny_model_config(tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id), seed=7)
    model.save_pretrained(m, tmp_path / "ckpt", extra={"tokenizer": str(tok_dir)})
    run("--to", "llava", tmp_path / "ckpt", tmp_path / "llava15", "--dtype", "float32")
    cfg = json.loads((tmp_path / "llava15" / "config.json").read_text())
    del cfg[data.POLICY_KEY]  # as LLaVA-1.5 releases are: image_aspect_ratio only
    convert.write_json(tmp_path / "llava15" / "config.json", cfg)
    run("--from", "llava", tmp_path / "llava15", tmp_path / "ours", "--dtype", "float32")
    policy, _ = data.prompt_policy(tmp_path / "ours")
    assert policy == data.PromptPolicy("vicuna_v1", data.VICUNA_V1_SYSTEM, True)

    # llava/conversation.py, Conversation.get_prompt for SeparatorStyle.TWO (sep " ", sep2 "</s>"):
    # system + sep, then "ROLE: message" + seps[i % 2] per message, and "ROLE:" for the open answer.
    msgs = [("USER", "<image>\n" + QUESTION), ("ASSISTANT", "yes"), ("USER", "Where?"), ("ASSISTANT", None)]
    llava = data.VICUNA_V1_SYSTEM + " "
    for i, (role, text) in enumerate(msgs):
        llava += f"{role}: {text}" + [" ", "</s>"][i % 2] if text else f"{role}:"
    conv = [{"from": "human", "value": "<image>\n" + QUESTION}, {"from": "gpt", "value": "yes"},
            {"from": "human", "value": "Where?"}]
    ids, _ = data.encode_conversation(conv + [{"from": "gpt", "value": "x"}], tok, policy.template,
                                      system=policy.system, num_image_tokens=1)
    ours = tok.decode(ids[:ids.index(data.IMAGE_TOKEN_ID)], skip_special_tokens=False) + "<image>" + \
        tok.decode(ids[ids.index(data.IMAGE_TOKEN_ID) + 1:], skip_special_tokens=False)
    assert ours == "<s>" + llava + " x</s>"

    run("--to", "llava-hf", tmp_path / "ours", tmp_path / "hf", "--dtype", "float32")
    proc = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    enc = processor_inputs(proc)
    prompt = data.encode_prompt(QUESTION, tok, policy.template, system=policy.system, has_image=True,
                                num_image_tokens=m.num_image_tokens)
    image_id = json.loads((tmp_path / "hf" / "config.json").read_text())["image_token_index"]
    assert enc["input_ids"][0].tolist() == [image_id if i == data.IMAGE_TOKEN_ID else i for i in prompt]


# ---- Meta's native Llama 3 -> transformers LlamaForCausalLM ------------------------------------------

# Llama 3.1's shape at toy width: GQA 4:2, scaled RoPE, and Llama 3's real vocabulary so the real
# tokenizer.model (128,000 ranks + 256 specials) fits it.
META_TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                 ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
MEDICAL = "患者胸痛3小时，心电图示ST段抬高。Chest pain for 3 h; BP 150/95 mmHg — suspect STEMI?! 🫀\n\n建议：急诊PCI。"


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory):
    """(folder, tokens, Meta's reference logits): a tiny model saved by llama_models + the real tokenizer."""
    import llama_models.llama3.tokenizer as meta_tokenizer
    from conftest import save_meta_llama

    folder = tmp_path_factory.mktemp("meta") / "Llama3.1-tiny"
    tokens = torch.randint(0, 128256, (2, 11), generator=torch.Generator().manual_seed(0))
    ref = save_meta_llama(folder, META_TINY, tokens)
    shutil.copy(Path(meta_tokenizer.__file__).parent / "tokenizer.model", folder / "tokenizer.model")
    return folder, tokens, ref


def test_from_meta_is_a_transformers_llama(tmp_path, meta_dir):
    """transformers loads the folder: logits = our loader's = Meta's reference; AutoTokenizer's ids and
    chat template = Meta's Tokenizer and ChatFormat."""
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    src, tokens, ref = meta_dir
    info = run("--from", "meta", src, tmp_path / "hf")
    assert info["dtype"] == "float32"  # the source's dtype, not rounded to bf16
    with transformers_warnings() as logged:
        hf, loading = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True,
                                                                       dtype=torch.float32)
    assert type(hf).__name__ == "LlamaForCausalLM" and {k: v for k, v in loading.items() if v} == {}, loading
    assert not [r for r in logged if any(w in r.lower() for w in ("missing", "unexpected", "initialized"))], logged
    with torch.no_grad():
        theirs = hf.eval()(tokens).logits
    ours = model.load_llm(src)(tokens)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(theirs, ref, atol=1e-4, rtol=1e-5)

    meta_tok = Tokenizer(src / "tokenizer.model")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert auto(MEDICAL).input_ids == meta_tok.encode(MEDICAL, bos=True, eos=False)
    assert auto.decode(auto(MEDICAL).input_ids, skip_special_tokens=True) == MEDICAL
    msgs = [("system", "Answer the questions."), ("user", "这张CT有结节吗？Is there a nodule?")]
    chat = auto.apply_chat_template([{"role": r, "content": c} for r, c in msgs], add_generation_prompt=True,
                                    tokenize=True, return_dict=False)
    assert chat == ChatFormat(meta_tok).encode_dialog_prompt([RawMessage(role=r, content=c) for r, c in msgs]).tokens
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == meta_tok.stop_tokens and gen["bos_token_id"] == meta_tok.bos_id
    # our tokenizer reads both folders alike
    assert data.load_tokenizer(tmp_path / "hf").encode(MEDICAL) == data.load_tokenizer(src).encode(MEDICAL)


def test_from_meta_keeps_bf16_and_refuses_what_it_cannot_read(tmp_path, meta_dir):
    src = meta_dir[0]
    bf16 = tmp_path / "bf16"
    shutil.copytree(src, bf16)
    sd = torch.load(src / "consolidated.00.pth", weights_only=True)
    torch.save({k: v.bfloat16() for k, v in sd.items()}, bf16 / "consolidated.00.pth")
    run("--from", "meta", bf16, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(tmp_path / "hf" / "model.safetensors").values()} == {torch.bfloat16}
    run("--from", "meta", bf16, tmp_path / "hf32", "--dtype", "float32")
    assert {t.dtype for t in load_file(tmp_path / "hf32" / "model.safetensors").values()} == {torch.float32}

    (bf16 / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tiktoken tokenizer.model is missing"):
        run("--from", "meta", bf16, tmp_path / "o1")
    (bf16 / "tokenizer.model").write_bytes(b"IQ== 0\nIg== 1\n")  # another model's (tiny) vocabulary
    with pytest.raises(ValueError, match="258 ids but .*vocab_size 128256"):
        run("--from", "meta", bf16, tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists() and leftovers(tmp_path) == []


# ---- a training chain, as train.py writes it -------------------------------------------------------------

def _finetune(folder, parent, *, llm_lora: bool, seed: int):
    """A finetune stage on `parent`: LoRA on the ViT (B != 0), the projector trained, and the LLM
    trained fully (train.py's finetune) or through LoRA (--llm-lora); saves what train.py saves."""
    m = model.from_pretrained(parent)
    r = dict(r=4, alpha=8.0, dropout=0.0)
    configs = {"vision": lora.LoRAConfig(**r, targets=lora.VIT_TARGETS),
               "llm": lora.LoRAConfig(**r, targets=lora.LLM_TARGETS) if llm_lora else None}
    for part, lcfg in configs.items():
        if lcfg:
            lora.inject(getattr(m, part), lcfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for mod in lora.lora_modules(m).values():
            mod.lora_B.normal_(0, 0.2)
        for p in list(m.projector.parameters()) + ([] if llm_lora else list(m.llm.parameters())):
            p.add_(torch.randn_like(p) * 0.02)
    trained = ("projector.",) + (() if llm_lora else ("llm.",))
    sd = {k: v for k, v in m.state_dict().items() if ".lora_" in k or k.startswith(trained)}
    model.save_pretrained(m, folder, state_dict=sd, base={"init": str(parent)}, lora_configs=configs)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tok_dir):
    """A stock CLIP and Llama saved by transformers; a pretrain checkpoint on them (projector only,
    bases = those folders); a finetune with ViT LoRA and the LLM trained fully; one with LoRA on both."""
    root = tmp_path_factory.mktemp("chain")
    torch.manual_seed(0)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VISION)).save_pretrained(root / "clip")
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(root / "clip")
    llm_cfg = tiny_config(data.load_tokenizer(tok_dir)).llm
    llm_hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama.config_to_hf(llm_cfg)))
    llm_hf.save_pretrained(root / "llm")
    vision, llm = model.load_vision(root / "clip"), model.load_llm(root / "llm")
    torch.manual_seed(1)
    m = model.DoctorSun(model.ModelConfig(vision=vision.config, llm=llm.config), vision=vision, llm=llm)
    model.save_pretrained(m, root / "pretrain", state_dict={k: v for k, v in m.state_dict().items()
                                                           if k.startswith("projector.")},
                          base={"vision": str(root / "clip"), "llm": str(root / "llm")},
                          extra={"tokenizer": str(tok_dir)})
    _finetune(root / "finetune", root / "pretrain", llm_lora=False, seed=2)
    _finetune(root / "both_lora", root / "pretrain", llm_lora=True, seed=3)
    return root


# ---- ours -> original LLaVA, read by LLaVA's own loading rules -----------------------------------------

def llava_vision_tower(folder: Path):
    """The CLIPVisionModel that original LLaVA's load_pretrained_model ends up using for `folder`, decided
    step by step as haotian-liu/LLaVA's code decides (no installable package exists); transformers'
    public loaders do the loading."""
    cfg = json.loads((folder / "config.json").read_text())
    # llava/model/llava_arch.py, LlavaMetaModel.__init__: a config with mm_vision_tower builds the tower
    # by build_vision_tower(config, delay_load=True).
    name = cfg["mm_vision_tower"]
    # llava/model/multimodal_encoder/builder.py, build_vision_tower: an existing path, or a name starting
    # with "openai" / "laion" or containing "ShareGPT4V", becomes a CLIPVisionTower; anything else fails.
    if not (os.path.exists(name) or name.startswith(("openai", "laion")) or "ShareGPT4V" in name):
        raise ValueError(f"Unknown vision tower: {name}")

    def load_model():  # llava/model/multimodal_encoder/clip_encoder.py, CLIPVisionTower.load_model
        transformers.CLIPImageProcessor.from_pretrained(name)
        tower, info = transformers.CLIPVisionModel.from_pretrained(name, output_loading_info=True)
        assert not any(info.values()), info
        return tower

    # clip_encoder.py, CLIPVisionTower.__init__ with delay_load=True: the CLIPVisionModel exists before
    # the checkpoint's weights load only if unfreeze_mm_vision_tower; otherwise just its config (cfg_only).
    tower = load_model() if cfg.get("unfreeze_mm_vision_tower", False) else None
    # llava/model/builder.py, load_pretrained_model -> LlavaLlamaForCausalLM.from_pretrained(model_path):
    # the folder's weights fill the modules that exist. The tower's are model.vision_tower.vision_tower.
    # <transformers 4.x CLIPVisionModel key>; with no tower module they are unexpected, and dropped.
    if tower is not None:
        prefix = "model.vision_tower.vision_tower."
        sd = {k[len(prefix):].removeprefix("vision_model."): t  # transformers 5: no vision_model level
              for k, t, _ in checkpoint.iter_tensors(folder) if k.startswith(prefix)}
        tower.load_state_dict(sd, strict=True)
    # builder.py, load_pretrained_model: `if not vision_tower.is_loaded: vision_tower.load_model()`, i.e.
    # the CLIP named by mm_vision_tower, as it is on disk.
    return (tower if tower is not None else load_model()).eval()


@pytest.mark.parametrize("tower", ["written", "named"])
def test_llava_loader_uses_tuned_tower(tmp_path, chain, tower):
    """--to llava of a finetune whose ViT carries LoRA: the tower LLaVA's loader uses is our merged one.
    "written": the tower is no public CLIP, so OUT/vision_tower is a real CLIP folder; "named":
    mm_vision_tower names the stock CLIP (as the hub name openai/clip-vit-large-patch14-336 would)."""
    ckpt = chain / "finetune"
    run("--to", "llava", ckpt, tmp_path / "llava", "--dtype", "float32",
        *(["--vision-tower", chain / "clip"] if tower == "named" else []))
    used = llava_vision_tower(tmp_path / "llava")
    ours = model.from_pretrained(ckpt)  # LoRA merged
    stock = transformers.CLIPVisionModel.from_pretrained(chain / "clip")
    got, want = used.state_dict(), ours.vision.state_dict()
    assert got.keys() == want.keys()  # our names are transformers 5's CLIPVisionModel names
    assert all(torch.equal(got[k], want[k]) for k in want)  # fp32: the merged weights, exactly
    moved = max((got[k] - t).abs().max().item() for k, t in stock.state_dict().items())
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = used(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
        err = (feats - ours.vision(px)).abs().max().item()
    print(f"\nLLaVA's tower ({tower}): max |feature diff| vs ours = {err:.2e}; "
          f"max |weight - stock| = {moved:.2e}")
    assert err <= 1e-5 and moved > 1e-2


# ---- ours -> peft adapters, loaded by peft ------------------------------------------------------------------

def _peft_load(base_cls, folder: Path):
    """peft.PeftModel.from_pretrained on the base its adapter_config names; fails on any key warning."""
    import peft

    base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(base_cls.from_pretrained(base), folder).eval()
    bad = [str(w.message) for w in caught if "keys" in str(w.message).lower()]
    assert not bad, bad
    return pm, Path(base)


@pytest.mark.parametrize("stage", ["finetune", "both_lora", "self_contained"])
def test_peft_adapters_match_merged_model(tmp_path, chain, tok_dir, stage):
    """peft, on the transformers base named in adapter_config.json, computes what our merged model does.
    finetune: ViT adapter on the chain's CLIP, no LLM adapter (the LLM trained fully); both_lora: both
    adapters on the chain's folders; self_contained: no base folder exists, so OUT holds the bases."""
    pytest.importorskip("peft")
    src = chain / stage
    if stage == "self_contained":
        src = tmp_path / "ckpt"
        save_ours(src, tok_dir, with_lora=True, seed=5)
    out = tmp_path / "peft"
    info = run("--to", "peft", src, out)
    assert info["dtype"] == "float32"  # the adapters' own dtype
    ours = model.from_pretrained(src)  # LoRA merged
    bases = {"finetune": (chain / "clip", None), "both_lora": (chain / "clip", chain / "llm"),
             "self_contained": (out / "visual_encoder", out / "llm")}[stage]

    vit, base = _peft_load(transformers.CLIPVisionModel, out / "visual_encoder_adapter")
    acfg = json.loads((out / "visual_encoder_adapter" / "adapter_config.json").read_text())
    assert base == bases[0].resolve() and acfg["r"] == 4 and acfg["lora_alpha"] == 8.0
    assert acfg["target_modules"] == ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"]
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = vit(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
        with vit.disable_adapter():
            plain = vit(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
        want = ours.vision(px)
    v_err, v_off = (feats - want).abs().max().item(), (plain - want).abs().max().item()
    print(f"\npeft ViT adapter ({stage}): max |feature diff| = {v_err:.2e} (without it: {v_off:.2e})")
    assert v_err <= 1e-5 and v_off > 1e-2

    if bases[1] is None:
        assert not (out / "llm_adapter").exists() and info["llm_adapter"].startswith("none")
        return
    llm, base = _peft_load(transformers.LlamaForCausalLM, out / "llm_adapter")
    assert base == bases[1].resolve()
    ids = torch.tensor([[1, 5, 9, 200, 31, 7, 1000, 42]])
    with torch.no_grad():
        logits, want = llm(input_ids=ids).logits, ours.llm(ids)
        with llm.disable_adapter():
            off = (llm(input_ids=ids).logits - want).abs().max().item()
    err = (logits - want).abs().max().item()
    print(f"peft LLM adapter ({stage}): max |logit diff| = {err:.2e} (without it: {off:.2e})")
    assert err <= 1e-5 and off > 1e-2


def test_peft_needs_adapters(tmp_path, ours):
    folder, _ = ours
    with pytest.raises(ValueError, match="records no LoRA adapter"):
        run("--to", "peft", folder, tmp_path / "peft")
    assert not (tmp_path / "peft").exists() and leftovers(tmp_path) == []

def test_non_finite_weights_are_never_written(tmp_path, ours, tok_dir):
    """NaN/Inf used to be copied silently. A NaN in the source is refused where it is read (exit 2, one
    `error:` line naming the tensor and file); a weight that becomes Inf on the way (a LoRA merge past fp16's
    65504, the llava default) is refused before it is written. OUT never appears."""
    folder, _ = ours
    nan = tmp_path / "nan"
    shutil.copytree(folder, nan)
    sd = load_file(nan / "model.safetensors")
    sd["llm.norm.weight"][7] = float("nan")
    save_file(sd, nan / "model.safetensors")
    line = cli_error("convert.py", "--to", "llava-hf", nan, tmp_path / "o1", "--dtype", "float32")
    assert f"'llm.norm.weight' in {nan / 'model.safetensors'} holds NaN or Inf" in line

    save_ours(tmp_path / "lora", tok_dir, with_lora=True)
    f = tmp_path / "lora" / "model.safetensors"
    sd = load_file(f)
    w = "llm.layers.0.mlp.down_proj"
    sd[f"{w}.weight"][0, 0] = 65000.0  # fits fp16
    sd[f"{w}.lora_A"][:, 0], sd[f"{w}.lora_B"][0, :] = 1.0, 100.0  # + 2 * 4 * 100: past 65504
    save_file(sd, f)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"refusing to write 'model\.layers\.0\.mlp\.down_proj\.weight' \(our 'llm\.layers\.0"
                             r"\.mlp\.down_proj\.weight'\): it holds NaN or Inf in torch\.float16"):
        run("--to", "llava", tmp_path / "lora", tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists() and leftovers(tmp_path) == []


# ---- --from keeps the source's dtype -----------------------------------------------------------------------


def test_from_keeps_source_dtype(tmp_path, ours):
    """An fp32 llava-hf folder imported without --dtype stays fp32, bit for bit; a bf16 one stays bf16."""
    folder, ref = ours
    for dtype in ("float32", "bfloat16"):
        run("--to", "llava-hf", folder, tmp_path / f"hf_{dtype}", "--dtype", dtype)
        info = run("--from", "llava-hf", tmp_path / f"hf_{dtype}", tmp_path / f"back_{dtype}")
        floats = {t.dtype for t in load_file(tmp_path / f"back_{dtype}" / "model.safetensors").values()
                  if t.is_floating_point()}
        assert floats == {getattr(torch, dtype)} and info["dtype"] == dtype
    assert_same_weights(ref, model.from_pretrained(tmp_path / "back_float32"))
