"""Shared test sizes: the tiny CLIP and Llama several test files build (litgpt's tests/conftest.py shape).

Files that test a size on purpose keep their own: test_clip.py (28 px / patch 7, an odd token count),
test_llama.py (GQA, head_dim and rope variants), test_model.py (GQA 6:2, so a head-count mix-up
shows), test_lora.py. Also Meta's reference Llama saved in its native layout
(`save_meta_llama`). Import with `from conftest import ...` (pytest.ini puts tests/ on the path).
"""
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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

def cli_error(script: str, *args, timeout: int = 120) -> str:
    """Run `python SCRIPT ARGS` from the repository root; it must stop as a user error does: exit status 2,
    exactly one stderr line `error: ...`, no traceback. Returns that line, for the test to check what it names."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, script, *map(str, args)], cwd=Path(__file__).resolve().parents[1], env=env,
                       capture_output=True, text=True, timeout=timeout)
    said = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(said) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    return said[0]


# ---- Meta's reference Llama 3, saved in its native layout (test_formats.py, test_convert.py) ----------


@contextlib.contextmanager
def model_parallel_of_one():
    """llama_models' reference layers are fairscale's model-parallel ones, which ask torch.distributed for
    their world: a gloo group of one process runs them on CPU. Torn down after, so no group leaks into
    other tests (train.py's DeepSpeed tests start their own)."""
    import torch.distributed as dist
    import fairscale.nn.model_parallel.initialize as fs_init

    with tempfile.TemporaryDirectory() as store:
        dist.init_process_group("gloo", init_method=f"file://{store}/rendezvous", rank=0, world_size=1)
        try:
            fs_init.initialize_model_parallel(1)
            yield
        finally:
            fs_init.destroy_model_parallel()
            dist.destroy_process_group()


def save_meta_llama(folder, params: dict, tokens, *, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Build llama_models' reference `Transformer` from `params` (a params.json dict) with random weights,
    save it as Meta does (its state dict as consolidated.00.pth, params.json), and return its fp32 logits
    (B, T, V) for `tokens` (B, T). fairscale leaves the weights uninitialised, so they are drawn here:
    N(0, 1/sqrt(fan_in)) for matrices, 1 + N(0, 0.1) for the norms (so a swapped norm shows)."""
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    with model_parallel_of_one():
        ref = Transformer(ModelArgs(**params, max_batch_size=tokens.shape[0], max_seq_len=tokens.shape[1]))
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if p.dim() == 1:
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        logits = ref(tokens, 0)  # (B, T, V) fp32
    torch.save({k: v.to(dtype) for k, v in ref.state_dict().items()}, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(params))
    return logits


def tiny_checkpoint(root, *, seed: int = 0):
    """A tiny random checkpoint in our format with the demo tokenizer recorded in its config (weights
    scaled up: random init gives nearly flat logits, and greedy choices should be decisive).
    Returns (checkpoint folder, demo folder)."""
    import demo

    root = Path(root)
    demo_dir = demo.build(root / "demo", n_train_images=2, n_test_images=2)
    m = model.build(tiny_model_config(2048), seed=seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    model.save_pretrained(m, root / "ckpt", extra={"tokenizer": str(demo_dir / "tokenizer"), "stage": "finetune"})
    return root / "ckpt", demo_dir


class OpLog(TorchDispatchMode):
    """Every aten operator dispatched inside `with OpLog() as log:`, as (name, input tensors, output
    tensors) in `log.calls`: what ran, on what, and which storages it made (the log keeps them alive,
    so no freed address is reused while it is read)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls.append((str(func), _tensors((args, kwargs)), _tensors(out)))
        return out


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]
