"""Our model next to transformers' LlavaForConditionalGeneration: speed and memory, same weights,
same machine, same run. Every row is ours ÷ transformers.

    python benchmarks/bench_model.py                  # the full run: about 8 minutes on 2 CPU cores
    python benchmarks/bench_model.py --quick --json bench.json   # tiny sizes, < 1 minute (tests/test_bench.py)

One transformers LLaVA is built at random per vocabulary and saved with save_pretrained; both
implementations load that folder, so they hold the same weights. The shapes are the 59M-parameter
LLaVA at 32,000 words (ViT 256 wide, 4 layers, 224 px / patch 14 = 256 image positions; Llama 512
wide, 8 layers, GQA 8:2 heads); the vocabulary is the variable: Llama 2's 32,000 and Llama 3's 128,256,
where the LM head outweighs the rest of the model.

What each row measures:
- train step: forward + backward + AdamW step (fused, as train.py and transformers' Trainer by
  default run it) with the ViT frozen (train.py's finetune stage without
  ViT LoRA) on batch x seq tokens, num_image_tokens of them image positions in every row. Ours is
  train.py's path, model(..., labels=) -> (loss_sum, n), loss_sum / n, whose head computes logits only
  at supervised positions, a chunk at a time (cross_entropy.py); transformers is
  LlavaForConditionalGeneration(..., labels=).loss. "full logits" is ours computing every (B, T, V)
  logit and then F.cross_entropy, as transformers does. tokens/s = batch x seq / the fastest step
  after one warm-up step. bfloat16 = bf16 weights, gradients and AdamW states, no autocast and no
  fp32 master copy (DeepSpeed's bf16 would keep one).
  "of limit" = the step's FLOPs / time / the matmul FLOP/s measured below at that dtype, where the
  FLOPs are train.flops_model's (the MFU formula train.py logs): 2 x params x tokens forward for
  every weight matrix the tokens pass, + 4 x params x tokens backward for the trained ones (LLM,
  projector; the frozen ViT runs forward only), the LM head counted at supervised positions only;
  attention scores left out. The same FLOP count stands in both columns: it is the step's necessary
  work, so an implementation that does more (logits at image positions) shows as a lower fraction.
- train peak RSS: each (implementation, vocabulary, dtype) trains in a process of its own; the
  peak resident memory of its steps (VmHWM, reset through /proc/self/clear_refs once the model is
  loaded) minus its resident memory with the model loaded: gradients, AdamW states, activations.
- train peak live memory: what the step itself holds, without what the C allocator keeps resident
  after it is freed. One more step, untimed, samples glibc's count of bytes handed out and not yet
  freed (mallinfo2: heap blocks in use + mapped blocks) after every operator, backward and optimizer
  included; the peak minus the same count with the model loaded. glibc keeps freed blocks under
  32 MiB resident and the next step's allocations fit its holes unevenly, so RSS adds several
  hundred MiB to both implementations, by amounts that vary from run to run.
- load: from_pretrained(folder) at the start of the same process, seconds, and the peak resident
  memory while loading minus the memory before it (the weights themselves included).
- greedy decode: batch 1 and 8, a prompt of one image and text, new tokens/s between the first and
  the last new token (timestamped by a streamer, so the prefill is left out); both must give the
  same tokens. "of limit" = bytes a decoding step reads (every LLM weight but the embedding table,
  which is a row lookup, + the KV cache at the middle length) x steps/s / the matrix-vector bytes/s
  measured below.
- preprocess: data.preprocess_image (336 px, pad to square) vs transformers' LLaVA image processor
  with do_pad (the same expand2square, PIL backend), images/s on synthetic photographs; the pixels
  must agree within one grey level (1/255 / std in normalised units).
- machine limits: best of several 2048 x 2048 @ 2048 x 2048 matmuls (FLOP/s) and 8192 x 8192
  matrix-vector products (weight bytes/s, the rate decoding is bound by), measured at the start
  and the end of the run, the better kept.

Losses (ours, ours through full logits, transformers) and logits are checked equal within the
dtype's tolerance before any timing of that configuration; a mismatch stops the run.
Peak memory is read from /proc and from glibc (mallinfo2): Linux only. Run it on an otherwise idle
machine (the load average is printed): with another process on the cores, OpenMP threads wait for
each other at every operation, and decoding, hundreds of small operations per token, slowed
ten-fold on a busy 2-core machine.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import model  # noqa: E402
from special_ids import IGNORE_INDEX  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Equality tolerance of a loss (absolute, in nats) and of logits, per dtype. bf16 keeps 8 bits of
# mantissa: two correct implementations that round in different places differ by a few 1e-3.
LOSS_TOL = {"float32": 1e-4, "bfloat16": 3e-2}
LOGIT_TOL = {"float32": 1e-3, "bfloat16": 1e-1}


@dataclass(frozen=True)
class Sizes:
    vision: dict  # transformers.CLIPVisionConfig kwargs (valid for clip.ClipConfig too)
    llm: dict  # transformers.LlamaConfig kwargs, less vocab_size
    vocabs: tuple[int, ...]
    full_logits_vocab: int  # the vocabulary of the "full logits" rows
    batch: int  # training batch: rows x seq tokens
    seq: int
    train_steps: int  # timed steps per process, after one warm-up step
    reps: int  # processes per (implementation, vocabulary, dtype), ours and transformers alternating
    prompt: int  # decoding: prompt tokens (image positions included), new tokens, batch sizes
    new_tokens: int
    decode_batches: tuple[int, ...]
    images: tuple[tuple[int, int], ...]  # (width, height) of the preprocessing test images
    preprocess_reps: int
    matmul: int  # side of the square matmul / matrix-vector product of the machine limits
    matvec: int


FULL = Sizes(vision=dict(image_size=224, patch_size=14, hidden_size=256, intermediate_size=1024,
                         num_hidden_layers=4, num_attention_heads=4),
             llm=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2, max_position_embeddings=2048),
             vocabs=(32000, 128256), full_logits_vocab=32000, batch=4, seq=512, train_steps=2, reps=2,
             prompt=300, new_tokens=32, decode_batches=(1, 8), images=((512, 512), (1024, 768)),
             preprocess_reps=10, matmul=2048, matvec=8192)
QUICK = Sizes(vision=dict(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2),
              llm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256),
              vocabs=(1000,), full_logits_vocab=1000, batch=2, seq=48, train_steps=1, reps=1,
              prompt=24, new_tokens=6, decode_batches=(1, 8), images=((512, 512), (1024, 768)),
              preprocess_reps=2, matmul=512, matvec=2048)


def num_image_tokens(s: Sizes) -> int:
    return (s.vision["image_size"] // s.vision["patch_size"]) ** 2


# ---- memory (Linux /proc) -------------------------------------------------------------------------

def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS) or its peak since the last reset (VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak_rss() -> None:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (proc(5))


class _MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (malloc.h, glibc 2.33+)
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _mallinfo2():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2


def malloc_live_mb() -> float:
    """MiB the C allocator has handed out and not had back, over every arena: heap blocks in use
    (uordblks) + mapped blocks (hblkhd). Resident memory is this plus the freed blocks glibc keeps."""
    m = _mallinfo2()()
    return (m.uordblks + m.hblkhd) / 2 ** 20


class PeakLive(TorchDispatchMode):
    """The largest malloc_live_mb() seen after any operator run inside it (the backward's and the
    optimizer's too: autograd carries the mode into the backward)."""

    def __init__(self):
        super().__init__()
        self.peak = malloc_live_mb()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, malloc_live_mb())
        return out


# ---- the shared weights and inputs -------------------------------------------------------------------

def save_hf_model(s: Sizes, vocab: int, folder: Path) -> None:
    """A random transformers LLaVA at these sizes, saved; its last word is the image placeholder."""
    import transformers

    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**s.vision),
        text_config=transformers.LlamaConfig(vocab_size=vocab, **s.llm),
        image_token_index=vocab - 1, image_seq_length=num_image_tokens(s))
    torch.manual_seed(0)
    transformers.LlavaForConditionalGeneration(cfg).save_pretrained(folder)


def load(impl: str, folder: Path, dtype: torch.dtype):
    """from_pretrained, then every weight read once: a weight left memory-mapped is read from disk at
    its first use, which would otherwise count as training time and training memory."""
    if impl == "transformers":
        import transformers

        m = transformers.LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype)
        m.generation_config.eos_token_id = None  # decode every new token, as ours with stop_token_ids=[]
    else:
        m = model.from_pretrained(folder, dtype=dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.sum()
    return m


def prompts(s: Sizes, vocab: int, rows: int, length: int, dtype, seed: int):
    """(ids, labels, pixel_values): each row = a first token, one image's placeholders, random text;
    labels are the ids with the image positions ignored."""
    g = torch.Generator().manual_seed(seed)
    n_img, img = num_image_tokens(s), vocab - 1
    ids = torch.randint(3, img, (rows, length), generator=g)
    ids[:, 1:1 + n_img] = img
    labels = ids.masked_fill(ids == img, IGNORE_INDEX)
    size = s.vision["image_size"]
    px = torch.randn(rows, 3, size, size, generator=g).to(dtype)
    return ids, labels, px


def loss_of(impl: str, m, ids, labels, px) -> torch.Tensor:
    """The mean cross-entropy over supervised tokens, as each implementation computes it for training."""
    if impl == "ours":
        loss_sum, n = m(ids, pixel_values=px, labels=labels)
        return loss_sum / n
    if impl == "ours, full logits":
        logits = m(ids, pixel_values=px)  # (B, T, V)
        # The labels shift, not the logits (as transformers does): slicing (B, T, V) would copy it.
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
    return m(input_ids=ids, pixel_values=px, labels=labels).loss


def freeze_vision(impl: str, m) -> list[torch.nn.Parameter]:
    """ViT frozen, everything else trained; returns the trained parameters."""
    tower = "vision." if impl.startswith("ours") else "vision_tower."
    for name, p in m.named_parameters():
        p.requires_grad_(not name.startswith(tower) and f".{tower}" not in name)
    return [p for p in m.parameters() if p.requires_grad]


# ---- one training process -----------------------------------------------------------------------------

def train_process(impl: str, folder: Path, dtype_name: str, s: Sizes) -> dict:
    """Load, then time training steps; memory from this process alone. Run as `--one train`."""
    dtype = DTYPES[dtype_name]
    if impl == "transformers":
        import transformers

        transformers.LlavaForConditionalGeneration  # the lazy import of its modules: not part of loading
    before = rss_mb()
    reset_peak_rss()
    t = time.perf_counter()
    m = load(impl, folder, dtype)
    load_s = time.perf_counter() - t
    load_peak = rss_mb("VmHWM") - before
    vocab = m.config.text_config.vocab_size if impl == "transformers" else m.config.llm.vocab_size
    ids, labels, px = prompts(s, vocab, s.batch, s.seq, dtype, seed=1)
    opt = torch.optim.AdamW(freeze_vision(impl, m), lr=1e-5, fused=True)  # train.py's; Trainer's default too
    m.train()
    loaded = rss_mb()
    reset_peak_rss()
    loaded_live = malloc_live_mb()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_of(impl, m, ids, labels, px)
        loss.backward()
        opt.step()
        return loss.item()

    times, losses = [], []
    for _ in range(1 + s.train_steps):  # the first step is the warm-up
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
    train_peak = rss_mb("VmHWM") - loaded
    with PeakLive() as live:  # after the timed steps: the mode runs Python at every operator
        step()
    return dict(load_s=load_s, load_peak_mb=load_peak, loaded_mb=loaded, train_peak_mb=train_peak,
                train_live_peak_mb=live.peak - loaded_live, step_s=min(times[1:]), first_loss=losses[0])


def run_process(*args: str) -> dict:
    """This script as `--one ...` in a fresh process; its result is the last line it prints."""
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"`bench_model.py {' '.join(args)}` failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- machine limits ---------------------------------------------------------------------------------

def best_time(fn, reps: int) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def machine_limits(s: Sizes) -> dict:
    """{dtype: {"matmul_flops": FLOP/s, "matvec_bytes": bytes/s}}, each the best of several runs."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, dtype in DTYPES.items():
        n, k = s.matmul, s.matvec
        a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
        w, v = torch.randn(k, k, generator=g).to(dtype), torch.randn(k, generator=g).to(dtype)
        out[name] = {"matmul_flops": 2 * n ** 3 / best_time(lambda: a @ b, 5),
                     "matvec_bytes": w.numel() * w.element_size() / best_time(lambda: w @ v, 5)}
    return out


# ---- equality, then decoding, both models in this process ----------------------------------------------

def check_equal(s: Sizes, ours, hf, vocab: int, dtype_name: str, checks: list) -> None:
    """The training losses (and at full_logits_vocab, the full logits) of both, on the training batch."""
    ids, labels, px = prompts(s, vocab, s.batch, s.seq, DTYPES[dtype_name], seed=1)
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=px, labels=labels)
        pairs = [("loss", loss_of("ours", ours, ids, labels, px), out.loss, LOSS_TOL[dtype_name])]
        if vocab == s.full_logits_vocab:
            logits = ours(ids, pixel_values=px)
            pairs.append(("loss, full logits", loss_of("ours, full logits", ours, ids, labels, px), out.loss,
                          LOSS_TOL[dtype_name]))
            pairs.append(("logits, max |difference|", (logits.float() - out.logits.float()).abs().max(),
                          torch.zeros(()), LOGIT_TOL[dtype_name]))
    for what, a, b, tol in pairs:
        a, b = float(a), float(b)
        check(checks, f"{what}, vocab {vocab:,}, {dtype_name}", a, b, tol, abs(a - b) <= tol)


def greedy(impl: str, m, ids, px, n_new: int) -> tuple[torch.Tensor, float, float]:
    """(new tokens (B, n), seconds to the first new token, seconds per later step)."""
    stamps = []
    t0 = time.perf_counter()
    if impl == "ours":
        out = m.generate(ids, px, max_new_tokens=n_new, stop_token_ids=[],
                         streamer=lambda tok: stamps.append(time.perf_counter()))
    else:
        class Clock:  # transformers' streamer interface: put() the prompt, then each step's tokens
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        with torch.no_grad():
            out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px,
                             max_new_tokens=n_new, do_sample=False, pad_token_id=0, streamer=Clock())
        out, stamps = out[:, ids.shape[1]:], stamps[1:]
    return out, stamps[0] - t0, (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def decode_bytes_per_step(s: Sizes, ours, batch: int) -> float:
    """What one decoding step must read: every LLM weight but the embedding table, and the KV cache."""
    llm = ours.llm
    weights = sum(p.numel() * p.element_size() for n, p in llm.named_parameters() if not n.startswith("embed"))
    c = llm.config
    mid = s.prompt + s.new_tokens / 2
    kv_per_position = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim  # keys and values
    kv = kv_per_position * batch * mid * llm.embed_tokens.weight.element_size()
    return weights + kv


def bench_decode(s: Sizes, ours, hf, vocab: int, dtype_name: str, rows: list, checks: list) -> None:
    for batch in s.decode_batches:
        ids, _, px = prompts(s, vocab, batch, s.prompt, DTYPES[dtype_name], seed=2)
        best = {"ours": (math.inf, math.inf), "transformers": (math.inf, math.inf)}
        tokens = {}
        for _ in range(s.reps):
            for impl, m in (("ours", ours), ("transformers", hf)):
                tokens[impl], first, step = greedy(impl, m, ids, px, s.new_tokens)
                best[impl] = (min(best[impl][0], first), min(best[impl][1], step))
        check(checks, f"greedy tokens, batch {batch}, vocab {vocab:,}, {dtype_name}", tokens["ours"].tolist(),
              tokens["transformers"].tolist(), 0, torch.equal(tokens["ours"], tokens["transformers"]))
        label = f"greedy decode, batch {batch}, vocab {vocab:,}, {dtype_name}"
        step_bytes = decode_bytes_per_step(s, ours, batch)
        add_row(rows, label, "new tokens/s", batch / best["ours"][1], batch / best["transformers"][1],
                achieved=(step_bytes / best["ours"][1], step_bytes / best["transformers"][1]),
                limit=(dtype_name, "matvec_bytes"))
        add_row(rows, f"{label}: time to first token", "s", best["ours"][0], best["transformers"][0])


# ---- image preprocessing ----------------------------------------------------------------------------

def photo(width: int, height: int, seed: int) -> Image.Image:
    """A stand-in for a photograph: smooth shading, shapes with edges, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([120 + 80 * np.sin(6 * x + c) * np.cos(4 * y - c) for c in range(3)], -1)
    img = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(10, max(width, height) // 6))
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img.filter(ImageFilter.GaussianBlur(1))


def bench_preprocess(s: Sizes, rows: list, checks: list) -> None:
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    size = 336
    theirs = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": size},
                                    crop_size={"height": size, "width": size},
                                    image_mean=list(data.CLIP_MEAN), image_std=list(data.CLIP_STD))
    tol = max(1 / 255 / sd for sd in data.CLIP_STD) + 1e-5  # one grey level, in normalised units
    for w, h in s.images:
        imgs = [photo(w, h, seed) for seed in range(4)]
        ours_px = torch.stack([data.preprocess_image(im, size, pad_to_square=True) for im in imgs])
        their_px = theirs(imgs, return_tensors="pt")["pixel_values"]
        diff = float((ours_px - their_px).abs().max())
        check(checks, f"preprocessed pixels {w}x{h}, max |difference|", diff, 0.0, tol, diff <= tol)
        best = {"ours": math.inf, "transformers": math.inf}
        for _ in range(s.preprocess_reps):
            for impl in best:
                t = time.perf_counter()
                if impl == "ours":
                    torch.stack([data.preprocess_image(im, size, pad_to_square=True) for im in imgs])
                else:
                    theirs(imgs, return_tensors="pt")
                best[impl] = min(best[impl], time.perf_counter() - t)
        add_row(rows, f"preprocess {w}x{h} RGB -> 336 px, pad to square", "images/s",
                len(imgs) / best["ours"], len(imgs) / best["transformers"])


# ---- training rows, from one process per measurement --------------------------------------------------

def bench_train(s: Sizes, folders: dict, flops: dict, rows: list, checks: list, quick: bool) -> None:
    """Alternates ours and transformers process by process; keeps each one's fastest step, largest peak."""
    runs = [(v, d, impl) for v in s.vocabs for d in DTYPES for impl in ("ours", "transformers")]
    runs += [(s.full_logits_vocab, d, "ours, full logits") for d in DTYPES]
    got: dict = {}
    for rep in range(s.reps):
        for vocab, dtype_name, impl in runs:
            print(f"train {impl}, vocab {vocab:,}, {dtype_name} ({rep + 1}/{s.reps})", flush=True)
            r = run_process("--one", "train", "--impl", impl, "--folder", str(folders[vocab]),
                            "--dtype", dtype_name, *(["--quick"] if quick else []))
            old = got.setdefault((vocab, dtype_name, impl), r)
            for k in r:
                old[k] = max(old[k], r[k]) if k.endswith("_mb") else min(old[k], r[k])
    tokens = s.batch * s.seq
    for vocab in s.vocabs:
        for dtype_name in DTYPES:
            hf = got[(vocab, dtype_name, "transformers")]
            for impl in ("ours", "ours, full logits"):
                r = got.get((vocab, dtype_name, impl))
                if r is None:
                    continue
                tol = LOSS_TOL[dtype_name]
                check(checks, f"first training loss, {impl} process, vocab {vocab:,}, {dtype_name}",
                      r["first_loss"], hf["first_loss"], tol, abs(r["first_loss"] - hf["first_loss"]) <= tol)
                what = "train step" + (", full logits" if impl != "ours" else "")
                label = f"{what} {s.batch}x{s.seq}, vocab {vocab:,}, {dtype_name}"
                add_row(rows, label, "tokens/s", tokens / r["step_s"], tokens / hf["step_s"],
                        achieved=(flops[vocab] / r["step_s"], flops[vocab] / hf["step_s"]),
                        limit=(dtype_name, "matmul_flops"))
                add_row(rows, f"{label}: peak RSS over the loaded model", "MiB", r["train_peak_mb"],
                        hf["train_peak_mb"])
                add_row(rows, f"{label}: peak live memory over the loaded model", "MiB",
                        r["train_live_peak_mb"], hf["train_live_peak_mb"])
            r = got[(vocab, dtype_name, "ours")]
            add_row(rows, f"load (from_pretrained), vocab {vocab:,}, {dtype_name}", "s", r["load_s"], hf["load_s"])
            add_row(rows, f"load, vocab {vocab:,}, {dtype_name}: peak RSS while loading", "MiB",
                    r["load_peak_mb"], hf["load_peak_mb"])


def train_flops(s: Sizes, ours) -> float:
    """train.flops_model's count for one training batch (the ViT frozen)."""
    import train

    ours.vision.requires_grad_(False)
    f_tok, f_head, f_img = train.flops_model(ours)
    n_supervised = s.batch * (s.seq - 1 - num_image_tokens(s))  # every text token after the first
    return s.batch * s.seq * f_tok + n_supervised * f_head + s.batch * f_img


# ---- the table ----------------------------------------------------------------------------------------

def add_row(rows: list, measurement: str, unit: str, ours: float, theirs: float, *,
            achieved: tuple[float, float] | None = None, limit: tuple[str, str] | None = None) -> None:
    """achieved: (ours, transformers) FLOP/s or bytes/s, to be divided by the machine's
    limit = (dtype, "matmul_flops" | "matvec_bytes") once the run has measured it (`of_limit`)."""
    rows.append(dict(measurement=measurement, unit=unit, ours=ours, transformers=theirs, ratio=ours / theirs,
                     achieved=achieved, limit=limit, ours_of_limit=None, transformers_of_limit=None))


def of_limit(rows: list, limits: dict) -> None:
    for r in rows:
        if r["limit"] is not None:
            peak = limits[r["limit"][0]][r["limit"][1]]
            r["ours_of_limit"], r["transformers_of_limit"] = (x / peak for x in r["achieved"])


def check(checks: list, name: str, ours, theirs, tolerance: float, passed: bool) -> None:
    """Record an equality check; a failed one stops the run (nothing after it would be comparable)."""
    checks.append(dict(name=name, ours=ours, transformers=theirs, tolerance=tolerance, passed=passed))
    if isinstance(ours, list):  # tokens
        shown = "same" if passed else "DIFFERENT"
    else:
        shown = f"ours {ours:.6g}, transformers {theirs:.6g}"
    print(f"check {name}: {shown} (tolerance {tolerance:.3g})", flush=True)
    if not passed:
        raise SystemExit(f"the two implementations disagree: {checks[-1]}")


def fmt(x) -> str:
    if x is None:
        return ""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def markdown(rows: list) -> str:
    lines = ["| measurement | unit | ours | transformers | ours ÷ transformers | ours, of limit "
             "| transformers, of limit |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        pct = [f"{100 * r[k]:.1f}%" if r[k] is not None else "" for k in ("ours_of_limit", "transformers_of_limit")]
        lines.append(f"| {r['measurement']} | {r['unit']} | {fmt(r['ours'])} | {fmt(r['transformers'])} | "
                     f"{r['ratio']:.2f} | {pct[0]} | {pct[1]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, under a minute: checks the script runs")
    ap.add_argument("--json", type=Path, help="also write the table (and the checks) here")
    ap.add_argument("--reps", type=int,
                    help="processes per training measurement, runs per decoding one (default 2; --quick 1)")
    ap.add_argument("--one", choices=["train"], help=argparse.SUPPRESS)  # a child process's measurement
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args()
    s = QUICK if args.quick else FULL
    if args.reps:
        s = replace(s, reps=args.reps)
    if args.one == "train":
        print(json.dumps(train_process(args.impl, args.folder, args.dtype, s)))
        return

    import transformers

    transformers.utils.logging.disable_progress_bar()
    load_avg = [os.getloadavg()[0]]  # a busy machine slows both sides, unevenly: OpenMP threads wait on each other
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"load average {load_avg[0]:.2f}{', quick sizes' if args.quick else ''}", flush=True)
    limits = machine_limits(s)
    rows, checks, flops = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {v: Path(tmp) / f"llava-{v}" for v in s.vocabs}
        for vocab, folder in folders.items():
            save_hf_model(s, vocab, folder)
            for dtype_name, dtype in DTYPES.items():
                ours, hf = load("ours", folder, dtype), load("transformers", folder, dtype)
                check_equal(s, ours, hf, vocab, dtype_name, checks)
                bench_decode(s, ours, hf, vocab, dtype_name, rows, checks)
                flops[vocab] = train_flops(s, ours)
                del ours, hf
        bench_train(s, folders, flops, rows, checks, args.quick)
    bench_preprocess(s, rows, checks)
    for dtype_name, new in machine_limits(s).items():  # the machine at the end of the run: keep the better
        limits[dtype_name] = {k: max(v, new[k]) for k, v in limits[dtype_name].items()}
    of_limit(rows, limits)
    load_avg.append(os.getloadavg()[0])
    print(f"\nload average at the start and the end: {load_avg[0]:.2f}, {load_avg[1]:.2f}")
    for dtype_name, lim in limits.items():
        print(f"machine, {dtype_name}: matmul {s.matmul}^3 {lim['matmul_flops'] / 1e9:,.1f} GFLOP/s, "
              f"matrix-vector {s.matvec}^2 {lim['matvec_bytes'] / 1e9:,.2f} GB/s")
    print(markdown(rows))
    print("ours ÷ transformers above 1: ours faster (tokens/s, images/s); below 1: ours faster or smaller (s, MiB).")
    if args.json:
        args.json.write_text(json.dumps(dict(
            torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads(),
            load_average=load_avg,
            sizes=asdict(s), machine=limits, rows=rows, checks=checks), indent=1))


if __name__ == "__main__":
    main()
