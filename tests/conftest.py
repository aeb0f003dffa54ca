"""Shared test sizes: the tiny CLIP and Llama several test files build (litgpt's tests/conftest.py shape).

Files that test a size on purpose keep their own: test_clip.py (28 px / patch 7, an odd token count),
test_llama.py (GQA, head_dim and rope variants), test_model.py (GQA 6:2, so a head-count mix-up
shows), test_lora.py. Import with `from conftest import ...` (pytest.ini puts tests/ on the path).
"""
import clip
import llama
import model

# ViT 32 px / patch 8 -> 16 image tokens. The same kwargs are valid for clip.ClipConfig and for
# transformers.CLIPVisionConfig, so our model and a Hugging Face one are the same shape.
TINY_VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64)

# Llama with GQA 4:2 (heads of 8); vocab_size is the test's tokenizer's, so it is not here.
# Valid for llama.LlamaConfig and transformers.LlamaConfig alike.
TINY_LLM = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64)


def tiny_model_config(vocab_size: int, **llm_overrides) -> model.ModelConfig:
    """Our ModelConfig at the tiny sizes; llm_overrides add Llama fields (rope, tied embeddings...)."""
    return model.ModelConfig(vision=clip.ClipConfig(**TINY_VISION),
                             llm=llama.LlamaConfig(vocab_size=vocab_size, **TINY_LLM, **llm_overrides))
