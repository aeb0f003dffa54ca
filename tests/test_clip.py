"""clip.py against transformers' CLIP: tiny random models saved to disk, loaded by our loader.

Tolerances: fp32 max abs err <= 1e-4 (measured <= 3e-6). bf16 (weights and activations) is compared
with HF's fp32 output at atol 0.1, rtol 0.05, and must be no worse than 1.5x transformers' own bf16
error: bf16 keeps 8 mantissa bits (~4e-3 relative per rounding), accumulated through the residual
stream; measured 5-6e-2 max abs on activations up to ~6.5, the same as HF bf16."""
import copy
import json
import re

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, LlavaConfig

import checkpoint
import clip

# 28 px / patch 7 -> 16 patches + CLS = 17 tokens (odd); 3 layers so "-2" is not the last one.
TINY_HF = dict(image_size=28, patch_size=7, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
               intermediate_size=128, attn_implementation="eager")


def randomize(model: torch.nn.Module) -> None:
    """HF inits LayerNorms to 1/0 and biases to 0; perturb everything so a mis-mapped key shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))


def make_hf_vision(folder, hidden_act="quick_gelu"):
    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(hidden_act=hidden_act, **TINY_HF)).eval()
    randomize(hf)
    hf.save_pretrained(folder)
    return hf


def pixels(batch=2, size=28):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def hf_hidden(hf, x):
    return hf(pixel_values=x, output_hidden_states=True).hidden_states  # num_layers + 1 of (B, 17, D)


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def hf_vision(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"clip_{request.param}")
    return make_hf_vision(folder, request.param), folder


# (select_layer, select_feature, index into HF hidden_states, drop CLS)
SELECTIONS = [(-2, "patch", -2, True), (-1, "patch", -1, True), (1, "cls_patch", 1, False), (0, "patch", 0, True)]


@pytest.mark.parametrize("select_layer,select_feature,hf_index,drop_cls", SELECTIONS)
def test_features_match_hf_fp32(hf_vision, select_layer, select_feature, hf_index, drop_cls):
    hf, folder = hf_vision
    ours = clip.from_pretrained(folder, select_layer=select_layer, select_feature=select_feature)
    x = pixels()
    want = hf_hidden(hf, x)[hf_index]
    want = want[:, 1:] if drop_cls else want
    with torch.no_grad():
        got = ours(x)
    assert got.shape == (2, ours.config.num_tokens, 64) == want.shape
    err = (got - want).abs().max().item()
    print(f"{hf.config.hidden_act} select_layer={select_layer} {select_feature}: fp32 max abs err {err:.2e}")
    assert err <= 1e-4


def test_all_hidden_states_match_hf(hf_vision):
    hf, folder = hf_vision
    ours = clip.from_pretrained(folder)
    x = pixels()
    with torch.no_grad():
        got = ours.forward_hidden_states(x)
    want = hf_hidden(hf, x)
    assert len(got) == len(want) == 4
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0, msg=lambda m: f"hidden_states[{i}]: {m}")


def test_bf16_close_to_hf_fp32(hf_vision):
    hf, folder = hf_vision
    ours = clip.from_pretrained(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    x = pixels()  # fp32 pixels: forward casts them to the conv weight's dtype
    with torch.no_grad():
        got = ours(x)
        hf_bf16 = hf_hidden(copy.deepcopy(hf).to(torch.bfloat16), x.bfloat16())[-2][:, 1:]
    assert got.dtype == torch.bfloat16
    want = hf_hidden(hf, x)[-2][:, 1:]
    err = (got.float() - want).abs().max().item()
    err_hf = (hf_bf16.float() - want).abs().max().item()
    print(f"{hf.config.hidden_act} bf16 vs HF fp32: ours {err:.2e}, HF's own bf16 {err_hf:.2e} "
          f"(max |ref| {want.abs().max():.2f})")
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)
    assert err <= 1.5 * err_hf  # no worse than transformers' bf16 path


def test_only_needed_layers_run(tmp_path):
    hf = make_hf_vision(tmp_path)
    ours = clip.from_pretrained(tmp_path)  # select_layer -2 of 3 layers -> layers 0 and 1
    calls = []
    for i, layer in enumerate(ours.encoder.layers):
        layer.register_forward_hook(lambda m, inp, out, i=i: calls.append(i))
    x = pixels()
    with torch.no_grad():
        before = ours(x)
    assert calls == [0, 1]
    # The last layer and post_layernorm exist (checkpoints round-trip) but cannot affect the feature.
    with torch.no_grad():
        for p in list(ours.encoder.layers[-1].parameters()) + list(ours.post_layernorm.parameters()):
            p.fill_(float("nan"))
        after = ours(x)
    assert torch.equal(before, after)
    assert set(ours.state_dict()) == set(hf.state_dict()) - {"embeddings.position_ids"}


def test_full_clip_model_folder(tmp_path):
    """openai/clip-vit-* folders are full CLIPModels: vision_model.* plus a text tower to ignore."""
    torch.manual_seed(0)
    vision = {k: v for k, v in TINY_HF.items() if k != "attn_implementation"}
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    hf = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16,
                              attn_implementation="eager")).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)
    assert "vision_config" in json.loads((tmp_path / "config.json").read_text())
    ours = clip.from_pretrained(tmp_path)
    x = pixels()
    with torch.no_grad():
        want = hf.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        err = (ours(x) - want).abs().max().item()
    print(f"full CLIPModel folder: fp32 max abs err {err:.2e}")
    assert err <= 1e-4


def test_sharded_safetensors(tmp_path):
    hf = make_hf_vision(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    ours = clip.from_pretrained(tmp_path / "sharded")
    x = pixels()
    with torch.no_grad():
        assert (ours(x) - hf_hidden(hf, x)[-2][:, 1:]).abs().max() <= 1e-4


def test_pytorch_model_bin_old_layout(tmp_path):
    """Older transformers wrote pytorch_model.bin with "vision_model." keys and a persistent position_ids."""
    hf = make_hf_vision(tmp_path / "src")
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    sd = {f"vision_model.{k}": v for k, v in hf.state_dict().items()}
    sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    torch.save(sd, folder / "pytorch_model.bin")
    ours = clip.from_pretrained(folder)
    x = pixels()
    with torch.no_grad():
        assert (ours(x) - hf_hidden(hf, x)[-2][:, 1:]).abs().max() <= 1e-4


def _write_broken(tmp_path, edit):
    hf = make_hf_vision(tmp_path / "src")
    sd = {k: v.clone() for k, v in hf.state_dict().items() if k != "embeddings.position_ids"}
    edit(sd)
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    save_file(sd, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("edit,key,words", [
    (lambda sd: sd.pop("encoder.layers.1.mlp.fc1.bias"), "encoder.layers.1.mlp.fc1.bias", "missing"),
    (lambda sd: sd.__setitem__("encoder.layers.0.extra.weight", torch.zeros(2)), "encoder.layers.0.extra.weight",
     "unexpected"),
    (lambda sd: sd.__setitem__("pre_layrnorm.weight", torch.ones(63)), "pre_layrnorm.weight", "shape"),
])
def test_loader_errors_name_the_key(tmp_path, edit, key, words):
    folder = _write_broken(tmp_path, edit)
    with pytest.raises(checkpoint.CheckpointError, match=f"(?s){words}.*{re.escape(key)}"):
        clip.from_pretrained(folder)


def test_from_hf_config_variants():
    tiny = {k: v for k, v in TINY_HF.items() if k != "attn_implementation"}
    vis = CLIPVisionConfig(hidden_act="gelu", **tiny).to_dict()
    c = clip.config_from_hf(vis)
    assert (c.image_size, c.patch_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
            c.intermediate_size, c.hidden_act) == (28, 7, 64, 3, 4, 128, "gelu")
    assert (c.num_patches, c.num_tokens, c.select_layer) == (16, 16, -2)

    full = CLIPConfig(vision_config=tiny, text_config=dict(hidden_size=32, num_attention_heads=4)).to_dict()
    assert clip.config_from_hf(full).hidden_size == 64

    llava = LlavaConfig(vision_feature_select_strategy="full", vision_feature_layer=-3).to_dict()
    c = clip.config_from_hf(llava["vision_config"])  # llava-hf's default tower = ViT-L/14-336
    assert c == clip.ClipConfig.from_name("clip-vit-large-patch14-336")
    assert c.num_patches == 576 and c.num_tokens == 576
    assert clip.config_from_hf(llava["vision_config"], select_layer=-2).select_layer == -2  # overrides win

    # Hub configs store only non-default keys; missing ones take CLIPVisionConfig's defaults.
    sparse = {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336, "patch_size": 14,
              "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24}
    assert clip.config_from_hf(sparse) == clip.ClipConfig()

    # to_hf round-trips through transformers itself.
    c = clip.ClipConfig.from_name("tiny", hidden_act="gelu")
    hf = CLIPVisionConfig(**clip.config_to_hf(c))
    assert clip.config_from_hf(hf.to_dict()) == c
    assert hf.to_dict()["model_type"] == "clip_vision_model"


def test_presets_and_config_errors():
    c = clip.ClipConfig.from_name("clip-vit-large-patch14")
    assert (c.image_size, c.num_patches, c.num_positions, c.num_layers_used) == (224, 256, 257, 23)
    t = clip.ClipConfig.from_name("tiny")
    assert (t.num_patches, t.hidden_size, t.num_hidden_layers) == (16, 128, 3)
    with pytest.raises(ValueError, match="unknown CLIP preset 'clip-vit-large'"):
        clip.ClipConfig.from_name("clip-vit-large")
    with pytest.raises(ValueError, match="select_layer -5"):
        clip.ClipConfig.from_name("tiny", select_layer=-5)
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        clip.ClipConfig.from_name("tiny", hidden_act="relu")
    with pytest.raises(ValueError, match="siglip_vision_model"):
        clip.config_from_hf({"vision_config": {"model_type": "siglip_vision_model"}})


def test_tiny_preset_trains_and_checkpointing_matches():
    torch.manual_seed(0)
    model = clip.VisionTransformer(clip.ClipConfig.from_name("tiny")).train()
    x = torch.randn(3, 3, 64, 64)
    out = model(x)
    assert out.shape == (3, 16, 128)
    out.square().mean().backward()  # forward is not under no_grad: LoRA on the ViT trains through it
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert "encoder.layers.1.self_attn.q_proj.weight" in grads
    assert "encoder.layers.2.mlp.fc1.weight" not in grads  # the skipped last layer gets no gradient
    model.zero_grad()
    model.gradient_checkpointing = True
    torch.testing.assert_close(model(x), out.detach(), atol=0, rtol=0)
    model(x).square().mean().backward()
    for n, g in grads.items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, msg=lambda m: f"{n}: {m}")
    with pytest.raises(ValueError, match=re.escape("(B, 3, 64, 64), got (3, 3, 32, 32)")):
        model(torch.randn(3, 3, 32, 32))


def test_random_init_position_table():
    """A random ViT (the demo's) gets a unit-scale N(0, 1) position table, not CLIP's N(0, 0.02): the
    class row is zero, every patch's row is as large as a patch's content and far from every other
    row (nearly orthogonal), and the table follows the seed."""
    cfg = clip.ClipConfig(**{k: v for k, v in TINY_HF.items() if k != "attn_implementation"})
    torch.manual_seed(0)
    pe = clip.VisionTransformer(cfg).embeddings.position_embedding.weight.detach()
    g, D = cfg.image_size // cfg.patch_size, cfg.hidden_size
    assert pe.shape == (1 + g * g, D)
    assert torch.equal(pe[0], torch.zeros(D))
    assert pe[1:].std().item() == pytest.approx(1.0, abs=0.1)
    unit = torch.nn.functional.normalize(pe[1:], dim=-1)
    cos = unit @ unit.T - torch.eye(g * g)
    assert cos.abs().max() < 0.5  # distinct codes: independent Gaussian rows in D dims, |cos| ~ D**-0.5
    torch.manual_seed(0)
    assert torch.equal(clip.VisionTransformer(cfg).embeddings.position_embedding.weight.detach(), pe)
    torch.manual_seed(1)
    assert not torch.equal(clip.VisionTransformer(cfg).embeddings.position_embedding.weight.detach(), pe)
