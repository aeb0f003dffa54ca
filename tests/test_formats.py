"""formats.py: the translation of other projects' configs and key names, read and written by one table.

Loading whole foreign checkpoints against transformers is tested in test_model.py (reading) and
test_convert.py (writing); here, the config dialects and the tables' own invariants.
Meta's native Llama layout is checked here against llama_models' own reference model.
"""
import dataclasses
import json
import pickle

import pytest
import torch
import transformers

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
    with pytest.raises(pickle.UnpicklingError, match="NotATensor"):
        model.load_llm(tmp_path)
