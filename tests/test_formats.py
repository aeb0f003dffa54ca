"""formats.py: the translation of other projects' configs and key names, read and written by one table.

Loading whole foreign checkpoints against transformers is tested in test_model.py (reading) and
test_convert.py (writing); here, the config dialects and the tables' own invariants.
"""
import json

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
