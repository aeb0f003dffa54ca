"""Speed of our model next to transformers' LlavaForConditionalGeneration, same machine, same run.

    python benchmarks/bench_model.py            # a 59M-parameter LLaVA, fp32, CPU
    python benchmarks/bench_model.py --dtype bfloat16 --steps 5

Both models hold the same weights (ours is loaded from the HF model's save_pretrained folder
through model.from_pretrained). Measures a training step (forward + backward, tokens/s) on a
batch with one image per row, and greedy decoding (new tokens/s) with the KV cache.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model  # noqa: E402
from special_ids import IGNORE_INDEX  # noqa: E402


def hf_model(vocab: int, image_token: int) -> transformers.LlavaForConditionalGeneration:
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            image_size=224, patch_size=14, hidden_size=256, intermediate_size=1024,
            num_hidden_layers=4, num_attention_heads=4),
        text_config=transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048),
        image_token_index=image_token, image_seq_length=256)
    return transformers.LlavaForConditionalGeneration(cfg)


def timed(fn, steps: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512, help="tokens per row, 256 of them image tokens")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    vocab, img = 32000, 31999
    hf = hf_model(vocab, img)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = model.from_pretrained(d, dtype=dtype)
    hf = hf.to(dtype)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"model: {n_params / 1e6:.0f}M parameters, {args.dtype}, {torch.get_num_threads()} threads")

    B, T = args.batch, args.seq
    ids = torch.randint(3, img, (B, T))
    ids[:, 1:257] = img
    labels = ids.masked_fill(ids == img, IGNORE_INDEX)
    px = torch.randn(B, 3, 224, 224, dtype=dtype)

    def step_hf():
        hf.zero_grad(set_to_none=True)
        hf(input_ids=ids, pixel_values=px, labels=labels).loss.backward()

    def step_ours():
        ours.zero_grad(set_to_none=True)
        loss_sum, n = ours(ids, pixel_values=px, labels=labels)
        (loss_sum / n).backward()

    hf.train(), ours.train()
    rows = []
    for name, fn in (("transformers", step_hf), ("ours", step_ours)):
        s = timed(fn, args.steps)
        rows.append((f"train step {B}x{T}", name, f"{B * T / s:,.0f} tokens/s", f"{s:.2f} s/step"))

    hf.eval(), ours.eval()
    prompt = torch.randint(3, img, (1, 300))
    prompt[:, 1:257] = img
    n_new = args.new_tokens

    def gen_hf():
        with torch.no_grad():
            hf.generate(input_ids=prompt, pixel_values=px[:1], max_new_tokens=n_new,
                        min_new_tokens=n_new, do_sample=False, pad_token_id=0)

    def gen_ours():
        ours.generate(prompt, px[:1], max_new_tokens=n_new, stop_token_ids=[])

    for name, fn in (("transformers", gen_hf), ("ours", gen_ours)):
        s = timed(fn, max(1, args.steps - 1))
        rows.append((f"greedy decode b=1, {n_new} new", name, f"{n_new / s:,.1f} tokens/s", f"{s:.2f} s"))

    w = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))


if __name__ == "__main__":
    main()
