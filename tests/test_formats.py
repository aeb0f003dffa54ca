"""formats.py: the translation of other projects' configs and key names, read and written by one table.

Loading whole foreign checkpoints against transformers is tested in test_model.py (reading) and
test_convert.py (writing); here, the config dialects and the tables' own invariants.
Meta's native Llama layout is checked here against llama_models' own reference model.
"""
import dataclasses
import json
import re

import pytest
import torch
import transformers

import checkpoint
import clip
import formats
import llama


def test_llava_hf_config_carries_the_feature_choice_and_nests_the_llm(tmp_path):
    hf = transformers.LlavaConfig(vision_feature_select_strategy="full", vision_feature_layer=-3).to_dict()
    fields = formats.llava_hf_config(hf)
    c = fields["vision"]
    assert c == clip.ClipConfig.from_name("clip-vit-large-patch14-336", select_layer=-3, select_feature="cls_patch")
    assert (c.select_layer, c.select_feature, c.num_tokens) == (-3, "cls_patch", 577)
    assert fields["image_token_id"] == hf["image_token_index"]
    # llava-hf nests the LLM under text_config, in transformers 5's rope_parameters style
    expected = llama.LlamaConfig.from_name("Llama-3.1-8B-Instruct")
    transformers.LlamaConfig(**llama.config_to_hf(expected)).save_pretrained(tmp_path)
    v5 = json.loads((tmp_path / "config.json").read_text())
    assert formats.llava_hf_config({**hf, "text_config": v5})["llm"] == expected


def test_llava_hf_config_errors():
    hf = transformers.LlavaConfig().to_dict()
    with pytest.raises(ValueError, match="single layer"):
        formats.llava_hf_config({**hf, "vision_feature_layer": [-2, -5]})
    with pytest.raises(ValueError, match="'mean'"):
        formats.llava_hf_config({**hf, "vision_feature_select_strategy": "mean"})
    with pytest.raises(ValueError, match="siglip_vision_model"):
        formats.llava_hf_config({**hf, "vision_config": {"model_type": "siglip_vision_model"}})


def test_config_json_writers_read_back():
    vision = clip.ClipConfig.from_name("tiny", select_layer=-3, select_feature="cls_patch")
    llm = llama.LlamaConfig.from_name("tiny")
    hf = formats.llava_hf_config_json(vision, llm, image_token_id=2048, pad_token_id=2049,
                                      num_image_tokens=vision.num_tokens, dtype=torch.float32)
    assert formats.llava_hf_config(hf) == dict(vision=vision, llm=llm, projector_type="mlp2x_gelu",
                                               image_token_id=2048)
    # transformers accepts it as is
    assert transformers.LlavaConfig(**hf).vision_feature_select_strategy == "full"
    orig = formats.llava_config_json(vision, llm, projector_type="mlp2x_gelu", tower="openai/clip-vit-large-patch14-336",
                                     pad_to_square=True, dtype=torch.float16)
    assert llama.config_from_hf(orig) == llm and orig["mm_vision_select_layer"] == -3


@pytest.mark.parametrize("table, skip", [(formats.LLAVA_HF_KEYS, formats.LLAVA_HF_WRITE_SKIP),
                                         (formats.LLAVA_KEYS, ())])
def test_every_written_name_reads_back(table, skip):
    """The writer is the reader's table inverted: each of our names goes out and comes back unchanged."""
    import model
    m = model.build("tiny")
    out = formats.export_state(m.state_dict(), table, torch.float32, skip=skip)
    back = {formats.checkpoint.rename(k, table) for k in out}
    assert back == set(m.state_dict())
    with pytest.raises(ValueError, match="no foreign name"):
        formats.export_state({"nowhere.weight": torch.zeros(1)}, table, torch.float32, skip=skip)


# ---- Meta's native Llama 3 layout, against llama_models' reference model ----------------------------

# GQA 8:2 with head_dim 8: k has 16 rows, so the classic mistake (k permuted as if it had n_heads heads)
# still reshapes without error and only the logits can tell.
META_GQA = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=300, multiple_of=32,
                ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0)
# Llama 3.1's scaled RoPE; head_dim 16 and theta 10^4 put two frequencies in the rescaled bands.
META_SCALED = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=64,
                   norm_eps=1e-5, rope_theta=10000.0, use_scaled_rope=True)


def meta_logits(folder, tokens):
    import model
    return model.load_llm(folder)(tokens)


@pytest.mark.parametrize("params, shape", [(META_GQA, (3, 13)), (META_SCALED, (2, 37))], ids=["gqa", "scaled-rope"])
def test_meta_llama_matches_reference_model(tmp_path, params, shape):
    """Meta's Transformer saved in its own layout; model.load_llm gives its logits (fp32, atol 1e-4)."""
    import model
    from conftest import save_meta_llama
    tokens = torch.randint(0, params["vocab_size"], shape, generator=torch.Generator().manual_seed(1))
    ref = save_meta_llama(tmp_path, params, tokens)
    ours = meta_logits(tmp_path, tokens)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)
    assert model.llm_config(tmp_path) == model.load_llm(tmp_path).config
    if params.get("use_scaled_rope"):  # the test can see the scaling: without it the logits move
        plain = model.load_llm(tmp_path)
        plain.inv_freq = llama.rope_inv_freq(dataclasses.replace(plain.config, rope_scaling=None))
        assert (plain(tokens) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("mistake", ["no permutation", "k with n_heads"])
def test_meta_qk_permutation_mistakes_show_in_the_logits(tmp_path, monkeypatch, mistake):
    """The parity test above catches both classic mistakes at its GQA shape."""
    from conftest import save_meta_llama
    tokens = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    ref = save_meta_llama(tmp_path, META_GQA, tokens)
    right = formats.meta_interleaved_to_halves

    def wrong(w, n_heads):
        return w if mistake == "no permutation" else right(w, META_GQA["n_heads"])
    monkeypatch.setattr(formats, "meta_interleaved_to_halves", wrong)
    assert (meta_logits(tmp_path, tokens) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("name, params, intermediate", [
    ("Llama-3.1-8B", dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                          ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True), 14336),
    ("Llama-3.1-70B", dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256, multiple_of=4096,
                           ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True), 28672),
    ("Llama-3.1-405B", dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, vocab_size=128256,
                            multiple_of=4096, ffn_dim_multiplier=1.2, norm_eps=1e-5, rope_theta=500000.0,
                            use_scaled_rope=True), 53248),
    ("Llama-3-8B", dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                        ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0), 14336),
])
def test_meta_params_translate_to_the_hf_configs(name, params, intermediate):
    """Meta's params.json of the released sizes -> the intermediate_size of their HF config.json."""
    c = formats.meta_llama_config(params)
    assert c.intermediate_size == intermediate
    if name == "Llama-3.1-8B":  # the whole config, as Meta's HF repo states it
        assert c == llama.LlamaConfig.from_name("Llama-3.1-8B-Instruct")
    if name == "Llama-3-8B":
        assert c == dataclasses.replace(llama.LlamaConfig.from_name("Llama-3-8B-Instruct"),
                                        eos_token_id=[128001, 128008, 128009])


def test_meta_errors_name_the_file_and_key(tmp_path):
    import model
    from conftest import save_meta_llama
    save_meta_llama(tmp_path, META_GQA, torch.zeros(1, 3, dtype=torch.long))
    params = json.loads((tmp_path / "params.json").read_text())
    with pytest.raises(ValueError, match=r"unknown keys \['rope_scaling_factor'\]"):
        formats.meta_llama_config({**params, "rope_scaling_factor": 32})
    with pytest.raises(ValueError, match="vocab_size -1"):  # Llama 2's params.json
        formats.meta_llama_config({**params, "vocab_size": -1})
    (tmp_path / "params.json").write_text(json.dumps({**params, "n_kv_heads": 4}))
    with pytest.raises(ValueError, match=r"'layers.0.attention.wk.weight' in .*consolidated.00.pth"):
        model.load_llm(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps(params))
    sd = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    torch.save({**sd, "layers.0.attention.wqkv.weight": torch.zeros(1)}, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match="unexpected key 'layers.0.attention.wqkv.weight'"):
        model.load_llm(tmp_path)
    (tmp_path / "consolidated.01.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="2 model-parallel shards"):
        model.load_llm(tmp_path)


class NotATensor:  # what an untrusted pickle could carry
    pass


def test_meta_checkpoint_is_read_weights_only(tmp_path):
    import model
    from conftest import save_meta_llama
    save_meta_llama(tmp_path, META_GQA, torch.zeros(1, 3, dtype=torch.long))
    sd = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    torch.save({**sd, "norm.weight": NotATensor()}, tmp_path / "consolidated.00.pth")
    with pytest.raises(checkpoint.CheckpointError, match=r"consolidated\.00\.pth: cannot be read as a weights-only "
                                                         r"torch checkpoint \(WeightsUnpickler error: .*NotATensor"):
        model.load_llm(tmp_path)


# ---- OpenAI / OpenCLIP towers, against open_clip's own code -----------------------------------------
# open_clip builds, saves and loads the tower; its VisionTransformer.forward_intermediates computes the
# reference: the output of block layers-2 (HF's hidden_states[-2]), class token split off.
# fp32 tolerance 1e-5 (measured max abs 2.9e-6 to 5.2e-6 on activations up to ~11: the same fp32 ops,
# fused q/k/v in open_clip's nn.MultiheadAttention vs three projections here).

def import_open_clip():
    """open_clip, importable without torchvision, which only its image transforms and a ResNet norm use.

    torchvision's wheels are built against one torch build (a CPU torch cannot load the PyPI wheel's ops),
    and once installed it switches transformers' image processors to its own backend. Where it is
    missing, placeholders stand in for the names open_clip imports at load time, only during the import.
    """
    try:
        import torchvision  # noqa: F401
        return pytest.importorskip("open_clip")
    except ImportError:
        pass
    import sys
    import types
    names = {"torchvision": [], "torchvision.transforms.functional": [], "torchvision.ops": [],
             "torchvision.transforms": ["Normalize", "Compose", "RandomResizedCrop", "InterpolationMode", "ToTensor",
                                        "Resize", "CenterCrop", "ColorJitter", "Grayscale"],
             "torchvision.ops.misc": ["FrozenBatchNorm2d"]}
    placeholder = {"__init__": lambda self, *a, **k: None, "BICUBIC": "bicubic", "BILINEAR": "bilinear"}
    added = [n for n in names if n not in sys.modules]
    for n, attrs in names.items():
        mod = types.ModuleType(n)
        mod.__file__ = f"<placeholder {n}>"
        for a in attrs:
            setattr(mod, a, type(a, (), placeholder))
        sys.modules.setdefault(n, mod)
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    try:
        open_clip = pytest.importorskip("open_clip")
    finally:
        for n in added:  # transformers must still find no torchvision
            sys.modules.pop(n, None)
    return open_clip


TEXT_CFG = dict(context_length=8, vocab_size=64, width=64, heads=1, layers=1)  # ignored by our loader


class NoTokenizer:
    """open_clip's save_for_hf also saves the tokenizer; the vision tower does not need one."""

    def save_pretrained(self, folder):
        pass


def perturb(module: torch.nn.Module, seed: int = 1) -> None:
    """open_clip inits LayerNorms to 1/0: perturb every tensor so a mis-mapped key shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


def make_open_clip(tmp_path, open_clip, name, vision_cfg, quick_gelu):
    """A tiny CLIP built by open_clip from a registered model config (its add_model_config)."""
    cfg = dict(embed_dim=16, quick_gelu=quick_gelu, vision_cfg=vision_cfg, text_cfg=TEXT_CFG)
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    m = open_clip.create_model(name, precision="fp32").eval()
    perturb(m)
    return m, cfg


@torch.no_grad()
def open_clip_layer_minus_2(visual, x):
    """open_clip's own patch features after block layers-2 (= HF hidden_states[-2]), class token dropped."""
    n = len(visual.transformer.resblocks)
    out = visual.forward_intermediates(x, indices=[n - 2], intermediates_only=True, output_fmt="NLC")
    return out["image_intermediates"][0]  # (B, P, D)


# image px / patch -> patches; the second is ViT-L/14-336's patch size on a 6x6 grid (336 px: 24x24).
OPENCLIP_CASES = [  # (image, patch, width, layers, head_width, quick_gelu, weights file)
    (32, 8, 64, 3, 16, True, "open_clip_model.safetensors"),
    (84, 14, 48, 4, 12, False, "open_clip_pytorch_model.bin"),
]


@pytest.mark.parametrize("image,patch,width,layers,head_width,quick_gelu,weights", OPENCLIP_CASES)
def test_open_clip_folder_matches_open_clip(tmp_path, image, patch, width, layers, head_width, quick_gelu, weights):
    import model
    open_clip = import_open_clip()
    from open_clip.push_to_hf_hub import save_for_hf
    vision_cfg = dict(image_size=image, patch_size=patch, width=width, layers=layers, head_width=head_width)
    m, cfg = make_open_clip(tmp_path, open_clip, f"tiny-vit-{image}", vision_cfg, quick_gelu)
    folder = tmp_path / "saved"
    save_for_hf(m, NoTokenizer(), cfg, folder, safe_serialization=weights.endswith(".safetensors"))
    assert sorted(p.name for p in folder.iterdir()) == sorted(["open_clip_config.json", weights])
    # open_clip reads the folder back with its own loader: the reference is what it loads
    ref = open_clip.create_model(f"local-dir:{folder}", precision="fp32").eval()

    expect = clip.ClipConfig(image_size=image, patch_size=patch, hidden_size=width, num_hidden_layers=layers,
                             num_attention_heads=width // head_width, intermediate_size=4 * width,
                             hidden_act="quick_gelu" if quick_gelu else "gelu", select_layer=-2)
    assert model.vision_config(folder, select_layer=-2) == expect
    ours = model.load_vision(folder, torch.float32, select_layer=-2, select_feature="patch")
    assert ours.embeddings.position_embedding.weight.shape == ((image // patch) ** 2 + 1, width)
    x = torch.randn(3, 3, image, image, generator=torch.Generator().manual_seed(2))
    want = open_clip_layer_minus_2(ref.visual, x)
    with torch.no_grad():
        got = ours(x)
    assert got.shape == (3, (image // patch) ** 2, width)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_openai_state_dict_file_infers_the_architecture(tmp_path):
    """OpenAI's layout: one state dict (fp16, as OpenAI released it, text tower and all), no config."""
    import model
    open_clip = import_open_clip()
    vision_cfg = dict(image_size=42, patch_size=14, width=128, layers=3)  # heads = 128 / 64, OpenAI's rule
    m, _ = make_open_clip(tmp_path, open_clip, "tiny-openai", vision_cfg, quick_gelu=True)
    sd = {k: v.half() for k, v in m.state_dict().items()}
    sd.update(input_resolution=torch.tensor(42), context_length=torch.tensor(8), vocab_size=torch.tensor(64))
    torch.save(sd, tmp_path / "ViT-tiny.pt")
    ref = open_clip.model.build_model_from_openai_state_dict(dict(sd), quick_gelu=True).float().eval()

    cfg = model.vision_config(tmp_path / "ViT-tiny.pt")
    assert cfg == clip.ClipConfig(image_size=42, patch_size=14, hidden_size=128, num_hidden_layers=3,
                                  num_attention_heads=2, intermediate_size=512, hidden_act="quick_gelu")
    ours = model.load_vision(tmp_path / "ViT-tiny.pt", torch.float32)
    x = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = ours(x)
    torch.testing.assert_close(got, open_clip_layer_minus_2(ref.visual, x), atol=1e-5, rtol=1e-5)


def test_openai_statistics_are_the_pipelines():
    """formats.py cannot import data.py (model code knows nothing of the data pipeline), so the check
    that an OpenCLIP tower's normalisation is the one data.preprocess_image applies needs its own copy."""
    import data

    assert formats.OPENAI_MEAN == data.CLIP_MEAN and formats.OPENAI_STD == data.CLIP_STD


def test_open_clip_errors_name_the_file(tmp_path):
    import model
    vision_cfg = dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32)
    good = {"model_cfg": dict(embed_dim=16, quick_gelu=True, vision_cfg=vision_cfg, text_cfg=TEXT_CFG)}
    for change, match in [(dict(ls_init_value=0.1), "ls_init_value"), (dict(layers=[2, 2, 2, 2]), "layers"),
                          (dict(timm_model_name="vit_base_patch16_224"), "timm_model_name")]:
        bad = {"model_cfg": {**good["model_cfg"], "vision_cfg": {**vision_cfg, **change}}}
        with pytest.raises(ValueError, match=match):
            formats.openclip_config(bad, "x/open_clip_config.json")
    with pytest.raises(ValueError, match="mean"):
        formats.openclip_config({**good, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}})

    # A config whose grid disagrees with the weights: the position table's size is checked.
    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(good))
    with pytest.raises(FileNotFoundError, match="open_clip_model.safetensors"):
        model.load_vision(folder)
    sd = {"visual.positional_embedding": torch.zeros(10, 64), "visual.class_embedding": torch.zeros(64)}
    torch.save(sd, folder / "open_clip_pytorch_model.bin")
    with pytest.raises(checkpoint.CheckpointError, match=re.escape("'visual.positional_embedding'")):
        model.load_vision(folder)

    script = torch.jit.script(torch.nn.Linear(2, 2))  # OpenAI's released .pt files are TorchScript archives
    script.save(str(tmp_path / "jit.pt"))
    with pytest.raises(ValueError, match="jit.pt.*weights-only state dict"):
        model.vision_config(tmp_path / "jit.pt")
