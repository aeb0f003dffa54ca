"""Train every Doctor Sun stage under DeepSpeed: text -> pretrain -> finetune (reference §2).

    python train.py --stage text        # continued pretraining of the LLM on (medical) text
    python train.py --stage pretrain    # feature alignment: only the projector trains
    python train.py --stage finetune    # instruction tuning: LLM + projector + LoRA on the ViT

With no other argument each stage runs the tiny preset on the embedded demo dataset (demo.py).
A stage continues from the previous one's checkpoint where that stage writes it (runs/text/final,
runs/pretrain/final; --init overrides); for the demo a missing one is trained first, because
aligning a projector to a random LLM teaches nothing. Real weights (reference §2's settings):

    python train.py --stage pretrain --vision CLIP_DIR --llm LLAMA_DIR --data pretrain.json@image_pretrain.zip
    python train.py --stage finetune --data finetune.json@image_finetune.zip    # from runs/pretrain/final

(An optional text stage, `--stage text --vision CLIP_DIR --llm LLAMA_DIR --data text.jsonl`, records
the CLIP folder too, so that `--stage pretrain` can then start from it with no --vision/--llm.)

Launchers: `python train.py` (one process: this script sets up the rendezvous itself, gloo on CPU),
`torchrun --nproc_per_node N train.py`, `deepspeed train.py`. `--deepspeed configs/zero{2,3}.json`
are the upstream settings for GPUs (bf16, overlap_comm); configs/zero{0,2,3}_cpu.json run on CPU
in fp32 (fp16 does not work there). The optimizer is always a client `torch.optim.AdamW`, so
DeepSpeed compiles no optimizer op; batch sizes and clipping come from the command line.

The loss (torchtitan's rule; pitfalls "Training"): the summed cross-entropy over supervised tokens
divided by the number of supervised tokens of the whole global batch (every micro-batch of the step
on every rank), counted before the first forward of the step. Each micro-batch backpropagates
loss_sum / global_count * world_size with `scale_wrt_gas=False`: DeepSpeed sums gradients over
micro-batches when not told to scale and averages them over ranks (checked in tests/test_train.py).

Checkpoints (`out/step-000050`, `out/final`) are written to `out/.tmp-*` and renamed; each holds
our model format (model.save_pretrained: the trained weights, plus every weight that cannot be
re-created from a base path, with the resolved run config), DeepSpeed's engine state and
trainer_state.json, written last, listing every file with its size. `--resume` takes the newest
checkpoint whose files are all there, so a kill at any moment costs at most the steps since it.
"""
from __future__ import annotations

import argparse
import base64
import collections
import functools
import gc
import json
import math
import os
import random
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import torch

import checkpoint
import clip
import data
import llama
import lora
import model

ROOT = Path(__file__).resolve().parent

# ---- stages -------------------------------------------------------------------------------------
# What trains in each stage (reference §2). Everything not listed is frozen (requires_grad=False);
# `vision_lora` is the default LoRA rank on every ViT linear layer (0: none).
STAGES = {
    "text": dict(train=("llm",), template="text", pad_to_square=False, vision_lora=0, parent=None,
                 demo_data="text.jsonl"),
    "pretrain": dict(train=("projector",), template="caption", pad_to_square=False, vision_lora=0,
                     parent="text", demo_data="pretrain.json"),
    "finetune": dict(train=("llm", "projector"), template="llama3", pad_to_square=True, vision_lora=64,
                     parent="pretrain", demo_data="finetune.json"),
}
# Hyper-parameters for real models: Doctor Sun's xtuner configs (reference §2: 1 epoch, global
# batch 16, max 4096 tokens = 3520 text + 576 image positions). The text stage ran outside xtuner;
# it gets the finetune settings of a full-LLM run. LLM LoRA uses upstream's lr 2e-4.
HPARAMS = {
    "text": dict(lr=2e-5, global_batch=16, micro_batch=1, max_length=4096, epochs=1.0, max_steps=0),
    "pretrain": dict(lr=1e-3, global_batch=16, micro_batch=1, max_length=4096, epochs=1.0, max_steps=0),
    "finetune": dict(lr=5e-6, global_batch=16, micro_batch=1, max_length=4096, epochs=1.0, max_steps=0),
}
LLM_LORA_LR = 2e-4
# The embedded demo (tiny preset, 2-core CPU, one sample per ~70 tokens): the chain text ->
# pretrain -> finetune runs in ~8 minutes. Pretrain uses upstream's lr 1e-3: at 1e-2 the projector's
# outputs grew to norm 150 (400x the word embeddings) and finetune then read the modality right 79%
# of the time instead of 97%. With the LLM init of llama.Llama.init_weights, finetune 600 / 1000 /
# 1200 steps gave closed accuracy 64 / 74 / 73% and open recall 83 / 85 / 86% (English and Chinese
# 4 / 14 / 4 points apart on closed questions); lr 2e-3 learned less than 1e-3. (With the former 0.02
# init: finetune lr 3e-4 or 3e-3, a 10x projector lr, or a fully trained ViT changed nothing.)
# Pretrain runs 960 steps (80 s; caption loss 0.50 -> 0.36 at the end instead of 240 steps): from
# the same text-stage LLM, finetune then scored closed 77.5 / open 84.7 instead of 66.9 / 67.2, and
# 76.9 / 88.8 instead of 81.2 / 84.4 from another (runs vary by 10-15 points on lesion questions).
DEMO_HPARAMS = {
    "text": dict(lr=3e-3, global_batch=16, micro_batch=16, max_length=256, epochs=0.0, max_steps=240),
    "pretrain": dict(lr=1e-3, global_batch=16, micro_batch=16, max_length=256, epochs=0.0, max_steps=960),
    "finetune": dict(lr=1e-3, global_batch=16, micro_batch=16, max_length=256, epochs=0.0, max_steps=1200),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stage", required=True, choices=list(STAGES))
    g = p.add_argument_group("model")
    g.add_argument("--model-preset", default="tiny", help=f"one of {sorted(model.presets)}")
    g.add_argument("--vision", help="HF CLIP folder (CLIPVisionModel or CLIPModel)")
    g.add_argument("--llm", help="HF Llama folder (LlamaForCausalLM)")
    g.add_argument("--init", help="start from this checkpoint (a previous stage's out/final); "
                                  "default for the demo: runs/<previous stage>/final")
    g.add_argument("--tokenizer", help="default: --init's tokenizer, else --llm, else the demo's")
    g.add_argument("--llm-lora", type=int, default=0, help="LoRA rank on the LLM (0: train it fully)")
    g.add_argument("--vision-lora", type=int, default=None,
                   help="LoRA rank on every ViT linear (default: 64 in finetune, else 0)")
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute LLM/ViT layers in backward")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="file[:ratio][@image_root],... (data.parse_data_spec); default: the demo")
    g.add_argument("--max-length", type=int, help="tokens per sample, image positions included")
    g.add_argument("--on-bad", default="skip", choices=["skip", "error"], help="bad samples: count and skip, or stop")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g = p.add_argument_group("optimisation (defaults per stage: HPARAMS, DEMO_HPARAMS for the tiny preset)")
    g.add_argument("--lr", type=float)
    g.add_argument("--global-batch", type=int, help="samples per optimizer step, all ranks together")
    g.add_argument("--micro-batch", type=int, help="samples per forward on one rank")
    g.add_argument("--epochs", type=float)
    g.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs when > 0)")
    g.add_argument("--warmup-ratio", type=float, default=0.03)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1024)
    g.add_argument("--deepspeed", help="DeepSpeed JSON (default: configs/zero2.json on GPU, "
                                       "configs/zero0_cpu.json on CPU)")
    g = p.add_argument_group("output")
    g.add_argument("--runs", default="runs", help="root of the default output folders")
    g.add_argument("--out", help="default: <runs>/<stage>")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--keep", type=int, default=2, help="step checkpoints kept (final is always kept)")
    g.add_argument("--save-full", action="store_true", help="save every weight, not only the trained ones")
    g.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    g.add_argument("--peak-tflops", type=float, help="device peak for the MFU estimate (default: table/measured)")
    g.add_argument("--dry-run", action="store_true", help="print sizes and memory estimates, then exit")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def resolve(args) -> argparse.Namespace:
    """Fill stage/preset defaults, so the checkpoint records exactly what ran."""
    stage = STAGES[args.stage]
    if args.init and (args.vision or args.llm):
        raise SystemExit("--init already holds the whole model: do not combine it with --vision/--llm")
    args.build_parent = False
    if stage["parent"] and not (args.init or args.vision or args.llm):
        # A stage continues from the previous one's output, found where that stage writes it.
        parent = Path(args.runs) / stage["parent"] / "final"
        if is_complete(parent):
            args.init = str(parent)
        elif args.model_preset == "tiny":
            args.build_parent = not args.dry_run  # the demo chain: run() trains the previous stage first
        elif not args.dry_run:  # a dry run describes the preset instead
            raise SystemExit(f"{parent} does not exist: run `--stage {stage['parent']}` first, or pass "
                             f"--init CHECKPOINT (or --vision/--llm to start from HF folders)")
    tiny = model.ModelConfig.from_name("tiny").to_dict()
    # The demo: the tiny preset built here, or a checkpoint of it.
    demo = (model_config(args).to_dict() == tiny) if args.init else (args.model_preset == "tiny"
                                                                     and not (args.vision or args.llm))
    hp = (DEMO_HPARAMS if demo else HPARAMS)[args.stage]
    if args.lr is None:
        args.lr = LLM_LORA_LR if args.llm_lora and not demo else hp["lr"]
    for k, v in hp.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.vision_lora is None:
        args.vision_lora = stage["vision_lora"]
    if args.deepspeed is None:
        args.deepspeed = str(ROOT / "configs" / ("zero2.json" if torch.cuda.is_available() else "zero0_cpu.json"))
    args.out = args.out or str(Path(args.runs) / args.stage)
    args.demo = demo
    if args.data is None:
        if not demo:
            raise SystemExit("--data is required with real models (file[:ratio][@image_root],...)")
        root = demo_root()
        f = root / stage["demo_data"]
        args.data = str(f) if args.stage == "text" else f"{f}@{root}"
    return args


def demo_root() -> Path:
    import demo  # only the demo needs it

    return Path(demo.ensure())


# ---- distributed ----------------------------------------------------------------------------------

def init_distributed():
    """Rank, world size and device. A plain `python train.py` gets a one-process rendezvous here;
    without it DeepSpeed falls back to MPI discovery and fails on mpi4py (environment.md)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def ds_config(args, world: int) -> dict:
    cfg = json.loads(Path(args.deepspeed).read_text())
    if args.global_batch % (args.micro_batch * world):
        raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of micro-batch "
                         f"{args.micro_batch} x {world} processes")
    want = {"train_batch_size": args.global_batch, "train_micro_batch_size_per_gpu": args.micro_batch,
            "gradient_accumulation_steps": args.global_batch // (args.micro_batch * world),
            "gradient_clipping": args.grad_clip}
    for k, v in want.items():
        if cfg.get(k, "auto") not in ("auto", v):
            raise SystemExit(f"{args.deepspeed}: {k}={cfg[k]} conflicts with the command line ({v}); "
                             f"leave it out of the JSON")
    if (cfg.get("fp16") or {}).get("enabled") is True and not torch.cuda.is_available():
        raise SystemExit(f"{args.deepspeed}: fp16 does not work on CPU; use a *_cpu.json config (fp32 or bf16)")
    return {**cfg, **want}


def zero_stage(cfg: dict) -> int:
    return int((cfg.get("zero_optimization") or {}).get("stage", 0))


def bf16(cfg: dict) -> bool:
    return (cfg.get("bf16") or {}).get("enabled") is True


# ---- model --------------------------------------------------------------------------------------

def model_config(args) -> model.ModelConfig:
    if args.init:
        cfg = checkpoint.load_hf_config(args.init)
        if cfg.get("format") != model.FORMAT:
            raise SystemExit(f"--init {args.init}: not a checkpoint of this project (train.py output)")
        return model.ModelConfig.from_dict(cfg["model"])
    preset = model.ModelConfig.from_name(args.model_preset)
    vision = preset.vision
    if args.vision:
        vision = clip.ClipConfig.from_hf(checkpoint.load_hf_config(args.vision),
                                         select_layer=vision.select_layer, select_feature=vision.select_feature)
    llm = llama.LlamaConfig.from_hf(checkpoint.load_hf_config(args.llm)) if args.llm else preset.llm
    return model.ModelConfig(vision=vision, llm=llm, projector_type=preset.projector_type,
                             image_token_id=preset.image_token_id)


def build_model(args, cfg: model.ModelConfig, dtype) -> model.DoctorSun:
    """Parts with a source are loaded from it; the rest are randomly initialised (seeded)."""
    if args.init:
        return model.from_pretrained(args.init, dtype=dtype, merge_lora=True)
    if not (args.vision or args.llm):
        return model.build(cfg, seed=args.seed, dtype=dtype)
    torch.manual_seed(args.seed)
    vision = (clip.from_pretrained(args.vision, dtype, select_layer=cfg.vision.select_layer,
                                   select_feature=cfg.vision.select_feature) if args.vision else None)
    llm = llama.from_pretrained(args.llm, dtype) if args.llm else None
    return model.DoctorSun(cfg, vision=vision, llm=llm).to(dtype)


def apply_stage(m: model.DoctorSun, args) -> dict:
    """The stage table made real: freeze everything, then unfreeze/inject what this stage trains.
    Returns the LoRA configs (recorded in the checkpoint)."""
    stage = STAGES[args.stage]
    m.requires_grad_(False)
    lcfg = {"vision": None, "llm": None}
    if "projector" in stage["train"]:
        m.projector.requires_grad_(True)
    if "llm" in stage["train"]:
        if args.llm_lora:
            lcfg["llm"] = lora.LoRAConfig(args.llm_lora, args.lora_alpha, args.lora_dropout, lora.LLM_TARGETS)
            lora.inject(m.llm, lcfg["llm"])
            lora.mark_only_lora_trainable(m.llm)
        else:
            m.llm.requires_grad_(True)
    elif args.llm_lora:
        raise SystemExit(f"--llm-lora: the LLM does not train in the {args.stage} stage")
    if args.vision_lora:
        lcfg["vision"] = lora.LoRAConfig(args.vision_lora, args.lora_alpha, args.lora_dropout, lora.VIT_TARGETS)
        lora.inject(m.vision, lcfg["vision"])
        lora.mark_only_lora_trainable(m.vision)
    m.llm.gradient_checkpointing = m.vision.gradient_checkpointing = args.gradient_checkpointing
    return lcfg


def param_counts(m: model.DoctorSun) -> dict:
    out = {}
    for part in ("vision", "projector", "llm"):
        ps = list(getattr(m, part).parameters())
        out[part] = (sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad))
    return out


def flops_model(m: model.DoctorSun) -> tuple[float, float, float]:
    """FLOPs per (token, supervised token, image) for the MFU estimate. A matmul with N weights
    costs 2N forward, 2N to backpropagate to its input and 2N for its weight gradient (PaLM's 6N);
    a frozen part in front of every trainable one (the ViT without LoRA) costs its forward only;
    the LM head runs at supervised positions only (model.forward). Attention scores are left out."""
    def cost(mod, backprop, skip=("embed", "lm_head")):
        mats = [(n, p) for n, p in mod.named_parameters() if p.dim() == 2 and not any(s in n for s in skip)]
        n, t = sum(p.numel() for _, p in mats), sum(p.numel() for _, p in mats if p.requires_grad)
        return 2 * n + (2 * n if backprop else 0) + 2 * t
    vc = m.config.vision
    vision = cost(m.vision, any(p.requires_grad for p in m.vision.parameters()), skip=("embed",))
    image = vision * vc.num_layers_used / vc.num_hidden_layers * vc.num_positions
    image += cost(m.projector, True) * m.num_image_tokens
    head = cost(m.llm.lm_head, True, skip=())
    return float(cost(m.llm, True)), float(head), float(image)


# ---- dry run ------------------------------------------------------------------------------------

def dry_run(args) -> None:
    """Sizes and a memory estimate per device, without allocating the model (built on meta)."""
    cfg = model_config(args)
    with torch.device("meta"):
        m = model.DoctorSun(cfg)
    apply_stage(m, args)
    dsc = json.loads(Path(args.deepspeed).read_text())
    b = 2 if bf16(dsc) else 4
    counts = param_counts(m)
    print(f"stage {args.stage}   preset {args.model_preset}   dtype {'bf16' if b == 2 else 'fp32'}   "
          f"config {args.deepspeed}")
    print(f"{'module':<10}{'params':>16}{'trainable':>16}")
    for part, (n, t) in counts.items():
        print(f"{part:<10}{n:>16,}{t:>16,}")
    P, T = sum(n for n, _ in counts.values()), sum(t for _, t in counts.values())
    print(f"{'total':<10}{P:>16,}{T:>16,}")
    L = args.max_length
    print(f"tokens per step: <= {args.global_batch} samples x {L} = {args.global_batch * L:,} "
          f"(a sample holds {m.num_image_tokens} image positions when it has an image)")
    try:
        ds = data.SupervisedDataset(data.parse_data_spec(args.data), None, template=STAGES[args.stage]["template"],
                                    num_image_tokens=m.num_image_tokens)
        mean = sum(ds.lengths) / max(1, len(ds))
        print(f"data: {len(ds):,} samples, ~{mean:.0f} tokens each (estimate) -> ~{args.global_batch * mean:,.0f} "
              f"tokens per step, {len(ds) / args.global_batch:,.0f} steps per epoch")
    except (OSError, ValueError) as e:
        print(f"data: not read ({e})")
    # Activations (Korthikanti et al. 2022, 34·s·h bytes per layer and sample in 16-bit without the
    # s² attention term, which SDPA/flash does not store); checkpointing keeps 2·s·h per layer plus
    # one layer's worth. Logits are computed in 4096-row chunks (model.forward).
    lc, vc = cfg.llm, cfg.vision
    per_layer = 34 * L * lc.hidden_size * b / 2
    kept = 2 * L * lc.hidden_size * b / 2
    act = args.micro_batch * (lc.num_hidden_layers * (kept if args.gradient_checkpointing else per_layer)
                              + (per_layer if args.gradient_checkpointing else 0))
    if counts["vision"][1]:
        act += args.micro_batch * vc.num_layers_used * 34 * vc.num_positions * vc.hidden_size * b / 2
    act += 2 * 4096 * lc.vocab_size * 4
    gib = 2 ** 30
    print(f"\nmemory per device, GiB (rough: +-30%, plus 1-2 GiB of CUDA context/fragmentation; "
          f"micro-batch {args.micro_batch}, {L} tokens, "
          f"checkpointing {'on' if args.gradient_checkpointing else 'off'})")
    print(f"{'devices':<9}{'ZeRO':>5}{'weights':>9}{'grads':>8}{'Adam':>8}{'activ.':>8}{'total':>8}")
    for n in (1, 2, 4, 8):
        for z in (0, 2, 3):
            w = P * b / (n if z == 3 else 1)
            g = T * b / (n if z >= 2 else 1)
            o = T * (8 + (4 if b == 2 else 0)) / (n if z >= 1 else 1)  # m, v (+ fp32 master copy)
            print(f"{n:<9}{z:>5}{w / gib:>9.1f}{g / gib:>8.1f}{o / gib:>8.1f}{act / gib:>8.1f}"
                  f"{(w + g + o + act) / gib:>8.1f}")


# ---- data ---------------------------------------------------------------------------------------

def make_dataset(args, m: model.DoctorSun, tokenizer) -> data.SupervisedDataset:
    stage = STAGES[args.stage]
    return data.SupervisedDataset(
        data.parse_data_spec(args.data), tokenizer, template=stage["template"],
        num_image_tokens=m.num_image_tokens, image_token_id=m.image_token_id, max_length=args.max_length,
        image_size=m.config.vision.image_size, pad_to_square=stage["pad_to_square"], on_bad=args.on_bad,
        seed=args.seed)


def micro_batches(ds, args, rank: int, world: int, start: int):
    """This rank's micro-batches from micro-batch `start` on, epoch after epoch. Data order is a
    function of (seed, epoch) only, so a resumed run reads exactly what the interrupted one would."""
    def sampler(epoch, start_index=0):
        return data.LengthGroupedSampler(ds.lengths, ds.is_image, args.micro_batch, seed=args.seed, epoch=epoch,
                                         num_replicas=world, rank=rank, start_index=start_index)
    per_epoch = len(sampler(0)) // args.micro_batch
    epoch, skip = divmod(start, per_epoch)
    pad_id = ds.tokenizer.pad_id
    while True:
        loader = torch.utils.data.DataLoader(
            ds, batch_size=args.micro_batch, sampler=sampler(epoch, skip * args.micro_batch),
            collate_fn=functools.partial(data.collate, pad_id=pad_id), num_workers=args.workers,
            generator=torch.Generator().manual_seed(args.seed + epoch))  # leaves the global RNG alone
        for batch in loader:
            yield epoch, batch
        epoch, skip = epoch + 1, 0


def resolve_tokenizer(args) -> str:
    if args.tokenizer:
        return args.tokenizer
    if args.init:  # recorded by the parent's run (checkpoint.py follows the chain of stages)
        found = checkpoint.tokenizer_folder(args.init)
        if found != Path(args.init):
            return str(found)
    if args.llm:
        return args.llm
    if args.demo or args.model_preset == "tiny":
        return str(demo_root() / "tokenizer")
    raise SystemExit("no tokenizer: pass --tokenizer DIR")


# ---- schedule -----------------------------------------------------------------------------------

def lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    """xtuner's schedule (reference §2): linear from 1e-5 x lr over the first warmup_ratio of the
    steps, then cosine to 0. `step` counts optimizer steps already taken."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return 1e-5 + (1 - 1e-5) * step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ---- checkpoints --------------------------------------------------------------------------------

def gather_weights(m: model.DoctorSun, names: set[str], zero3: bool) -> dict:
    """Full tensors of `names` on the CPU. Under ZeRO-3 a parameter outside the engine is an empty
    shard, so each is gathered first (collective: every rank calls this); an empty or misshapen
    tensor is an error, never a silent size-0 save."""
    import deepspeed

    sd = {}
    for name, p in m.named_parameters():
        if name not in names:
            continue
        shape = tuple(p.ds_shape) if zero3 and hasattr(p, "ds_shape") else tuple(p.shape)
        if zero3 and hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p]):
                t = p.detach().clone().cpu()
        else:
            t = p.detach().clone().cpu()
        if t.numel() == 0 or tuple(t.shape) != shape:
            raise RuntimeError(f"refusing to save {name}: got shape {tuple(t.shape)}, expected {shape} "
                               f"(a ZeRO-3 partition that was not gathered?)")
        sd[name] = t
    missing = names - sd.keys()
    if missing:
        raise RuntimeError(f"weights to save not found in the model: {sorted(missing)[:5]}")
    return sd


def weights_to_save(m: model.DoctorSun, base: dict, full: bool) -> set[str]:
    """Trained weights, plus whole parts that no base path can re-create (e.g. a random tiny ViT)."""
    sources = {"vision": base.get("vision"), "llm": base.get("llm"), "projector": None}
    return {name for name, p in m.named_parameters()
            if full or p.requires_grad or (not base.get("init") and not sources[name.split(".")[0]])}


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def rng_state() -> dict:
    """Every generator training draws from (LoRA dropout), as JSON: resume restores it exactly."""
    version, state, gauss = random.getstate()
    st = {"torch": _b64(torch.get_rng_state()), "python": [version, list(state), gauss],
          "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()]}
    if torch.cuda.is_available():
        st["cuda"] = _b64(torch.cuda.get_rng_state())
    return st


def set_rng_state(st: dict) -> None:
    unb64 = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(unb64(st["torch"]))
    version, state, gauss = st["python"]
    random.setstate((version, tuple(state), gauss))
    np.random.set_state(tuple(np.array(x, dtype=np.uint32) if isinstance(x, list) else x for x in st["numpy"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(unb64(st["cuda"]))


def is_complete(folder: Path) -> bool:
    """trainer_state.json is written last and lists every file with its size."""
    try:
        st = json.loads((folder / "trainer_state.json").read_text())
        return all((folder / f).is_file() and (folder / f).stat().st_size == n for f, n in st["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def latest_checkpoint(out: Path) -> Path | None:
    found = []
    for d in list(out.glob("step-*")) + [out / "final"]:
        if d.is_dir():
            if is_complete(d):
                found.append((json.loads((d / "trainer_state.json").read_text())["step"], d.name == "final", d))
            else:
                print(f"resume: ignoring incomplete checkpoint {d}")
    return max(found)[2] if found else None


def save(engine, m, args, ctx: dict, step: int, micro_done: int, tag: str, rank: int) -> Path:
    """Every rank calls this. Write into out/.tmp-<tag>, then rename to out/<tag>."""
    out = Path(args.out)
    tmp, final = out / f".tmp-{tag}", out / tag
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    sd = gather_weights(m, weights_to_save(m, ctx["base"], args.save_full), ctx["zero3"])
    # Frozen weights come back from the rebuilt model; saving them again would double the size.
    engine.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False, exclude_frozen_parameters=True)
    (tmp / "rng").mkdir(exist_ok=True)
    (tmp / "rng" / f"rank{rank}.json").write_text(json.dumps(rng_state()))
    torch.distributed.barrier()
    if rank == 0:
        model.save_pretrained(m, tmp, state_dict=sd, base=ctx["base"], lora_configs=ctx["lora"],
                              extra={"stage": args.stage, "tokenizer": ctx["tokenizer"], "train": vars(args)})
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        state = {"step": step, "micro_batches": micro_done, "world_size": ctx["world"], "seed": args.seed,
                 "stage": args.stage, "total_steps": ctx["total_steps"], "files": files}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        if final.exists():  # a rerun: swap the old one out, then delete it
            old = out / f".old-{tag}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        steps = sorted(out.glob("step-*"))
        for d in steps[:max(0, len(steps) - args.keep)]:
            shutil.rmtree(d)
    torch.distributed.barrier()
    return final


# ---- training -----------------------------------------------------------------------------------

def peak_flops(device, dtype, override) -> float | None:
    if override:
        return override * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                 "L40": 181e12, "4090": 165e12, "A10": 125e12, "V100": 125e12}  # dense bf16/fp16
        return next((v for k, v in table.items() if k in name), None)
    # CPU: measure a matmul for a fraction of a second (own generator: the global RNG drives dropout)
    x = torch.randn(1024, 1024, dtype=dtype, generator=torch.Generator().manual_seed(0))
    x @ x
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.2:
        x @ x
        n += 1
    return 2 * 1024 ** 3 * n / (time.perf_counter() - t0)


def train_step(engine, batches: list[dict], world: int, device) -> dict:
    """One optimizer step over this rank's micro-batches (see the module docstring for the loss)."""
    counts = [int((b["labels"][:, 1:] != data.IGNORE_INDEX).sum()) for b in batches]
    total = torch.tensor([float(sum(counts))], device=device)
    torch.distributed.all_reduce(total)
    scale = world / max(1.0, total.item())
    fallback = next((b for b in reversed(batches) if len(b["ids"])), None)
    loss_sum, tokens, images, gn = 0.0, 0, 0, None
    for b in batches:
        if not len(b["ids"]):  # every sample of this micro-batch was skipped
            if fallback is None:
                raise RuntimeError("a whole optimizer step of this rank's data was bad samples (see --on-bad)")
            # Run a real batch with no supervised token: a zero gradient, but every rank still takes
            # part in the same gradient reductions.
            b = {**fallback, "labels": torch.full_like(fallback["labels"], data.IGNORE_INDEX)}
        px = b["pixel_values"]
        ls, n = engine(b["input_ids"].to(device), None if px is None else px.to(device),
                       b["attention_mask"].to(device), b["labels"].to(device))
        engine.backward(ls * scale, scale_wrt_gas=False)
        boundary = engine.is_gradient_accumulation_boundary()
        if boundary and engine.zero_optimization_stage() == 0:
            # A trainable parameter unused in the whole step (the ViT LoRA during a text-only step)
            # gets a zero gradient, as in ZeRO-2/3's flat buffers: AdamW then moves it by its
            # momentum there too, instead of skipping it as it skips grad=None.
            trainable = [p for p in engine.module.parameters() if p.requires_grad]
            for p in trainable:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            # Plain data parallel keeps no norm of its own; the gradients are all-reduced by now.
            gn = float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in trainable])))
        lr = engine.get_lr()[0]
        engine.step()
        if boundary and engine.zero_optimization_partition_weights():
            # DeepSpeed 0.19.8 ZeRO-3 bug (stage3.py partition_grads): a gradient partition is
            # overwritten only if its parameter takes part in a step's first micro-batch; one first
            # used later (an image micro-batch after a text-only one) adds to the previous step's
            # gradient, one unused all step reuses it. Clear them; tests/test_train.py checks it.
            engine.optimizer.grad_partitions_flat_buffer.zero_()
        loss_sum += float(ls.detach())
        tokens += int(b["attention_mask"].sum())  # image positions included: they run through the LLM
        images += 0 if px is None else px.shape[0]
    stats = torch.tensor([loss_sum, float(tokens), float(images)], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(stats)
    if engine.zero_optimization_stage():
        gn = engine.get_global_grad_norm()
    return {"loss": stats[0].item() / max(1.0, total.item()), "lr": lr, "supervised_tokens": int(total.item()),
            "tokens": int(stats[1].item()), "images": int(stats[2].item()),
            "grad_norm": None if gn is None else float(gn)}


def run(args, rank: int, world: int, device) -> dict:
    """One stage, start to finish. Returns the summary."""
    import deepspeed
    from tqdm import tqdm

    stage = STAGES[args.stage]
    if args.build_parent:
        # The demo chain: aligning a projector to a random LLM teaches nothing.
        parent = Path(args.runs) / stage["parent"] / "final"
        if rank == 0:
            print(f"{parent} does not exist: the {args.stage} stage starts from the {stage['parent']} stage's "
                  f"checkpoint, so `python train.py --stage {stage['parent']}` runs first")
        run(resolve(parse_args(["--stage", stage["parent"], "--runs", args.runs, "--seed", str(args.seed),
                                "--deepspeed", args.deepspeed, "--workers", str(args.workers)])),
            rank, world, device)
        args.init, args.build_parent = str(parent), False
    if args.init:
        args.init = str(Path(args.init).resolve())
        if rank == 0:
            print(f"starting from {args.init}")

    dsc = ds_config(args, world)
    dtype = torch.bfloat16 if bf16(dsc) else torch.float32
    m = build_model(args, model_config(args), dtype)
    cfg = m.config
    lcfg = apply_stage(m, args)
    m.train()
    tok_dir = str(Path(resolve_tokenizer(args)).resolve())
    tokenizer = data.load_tokenizer(tok_dir)
    if tokenizer.vocab_size > cfg.llm.vocab_size:
        raise SystemExit(f"tokenizer {tok_dir} has {tokenizer.vocab_size} ids, the LLM only {cfg.llm.vocab_size}")
    ds = make_dataset(args, m, tokenizer)
    gas = dsc["gradient_accumulation_steps"]
    per_epoch = len(data.LengthGroupedSampler(ds.lengths, ds.is_image, args.micro_batch,
                                              num_replicas=world, rank=rank)) // args.micro_batch
    total_steps = args.max_steps if args.max_steps > 0 else max(1, math.ceil(args.epochs * per_epoch / gas))

    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    sched = lambda o: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
        o, lambda s: lr_factor(s, total_steps, args.warmup_ratio))
    engine, _, _, _ = deepspeed.initialize(model=m, optimizer=opt, lr_scheduler=sched, config=dsc)
    base = {"init": args.init, "vision": args.vision and str(Path(args.vision).resolve()),
            "llm": args.llm and str(Path(args.llm).resolve())}
    ctx = {"base": base, "lora": lcfg, "tokenizer": tok_dir, "world": world, "total_steps": total_steps,
           "zero3": zero_stage(dsc) == 3}

    out = Path(args.out)
    step = micro_done = 0
    if args.resume:
        ckpt = latest_checkpoint(out) if out.is_dir() else None
        if ckpt is None:
            if rank == 0:
                print(f"resume: no complete checkpoint in {out}; starting from the beginning")
        else:
            st = json.loads((ckpt / "trainer_state.json").read_text())
            if st["world_size"] != world or st["seed"] != args.seed or st["stage"] != args.stage:
                raise SystemExit(f"resume: {ckpt} was written by a run with world size {st['world_size']}, "
                                 f"seed {st['seed']}, stage {st['stage']}; this run differs")
            path, _ = engine.load_checkpoint(str(ckpt), tag="deepspeed", load_module_strict=False)
            if path is None:
                raise SystemExit(f"resume: DeepSpeed could not load {ckpt / 'deepspeed'}")
            set_rng_state(json.loads((ckpt / "rng" / f"rank{rank}.json").read_text()))
            step, micro_done = st["step"], st["micro_batches"]
            if rank == 0:
                print(f"resume: continuing from {ckpt} (step {step}, {micro_done} micro-batches per rank done)")

    counts = param_counts(m)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"stage {args.stage}: {len(ds):,} samples, {total_steps} steps of {args.global_batch} samples "
              f"({world} x {args.micro_batch} x {gas} accumulation), lr {args.lr:g}, "
              f"config {Path(args.deepspeed).name}")
        print("trainable: " + ", ".join(f"{k} {t:,}/{n:,}" for k, (n, t) in counts.items()))
    metrics_path = out / "metrics.jsonl"
    history = []
    if rank == 0 and metrics_path.exists() and step > 0:  # keep what the resumed-from run logged
        history = [r for r in map(json.loads, metrics_path.read_text().splitlines()) if r["step"] <= step]
    if rank == 0:
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
    f_tok, f_head, f_img = flops_model(m)
    peak = peak_flops(device, dtype, args.peak_tflops)
    skipped = collections.Counter()
    batches = micro_batches(ds, args, rank, world, micro_done)
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True, desc=args.stage)
    t_start, last = time.time(), None
    try:
        while step < total_steps:
            t0 = time.time()
            group = [next(batches) for _ in range(gas)]
            epoch = group[-1][0]
            mbs = [b for _, b in group]
            for b in mbs:
                skipped.update(b["skipped"])
            r = train_step(engine, mbs, world, device)
            step, micro_done = step + 1, micro_done + gas
            dt = time.time() - t0
            all_skipped = collections.Counter()
            if world > 1:
                gathered = [None] * world
                torch.distributed.all_gather_object(gathered, dict(skipped))
                for g in gathered:
                    all_skipped.update(g)
            else:
                all_skipped = skipped
            flops = r["tokens"] * f_tok + r["supervised_tokens"] * f_head + r["images"] * f_img
            last = {"step": step, "epoch": epoch, "loss": round(r["loss"], 6), "lr": r["lr"],
                    "grad_norm": r["grad_norm"],
                    "tokens_per_s": round(r["tokens"] / dt, 1), "supervised_tokens": r["supervised_tokens"],
                    "step_s": round(dt, 3), "mfu": None if not peak else round(flops / dt / (peak * world), 5),
                    "skipped": dict(all_skipped)}
            if rank == 0:
                history.append(last)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
                bar.set_postfix(loss=f"{r['loss']:.4f}", lr=f"{r['lr']:.2e}", tok_s=f"{last['tokens_per_s']:.0f}")
                bar.update(1)
            if args.save_every and step % args.save_every == 0 and step < total_steps:
                save(engine, m, args, ctx, step, micro_done, f"step-{step:06d}", rank)
    except KeyboardInterrupt:  # a summary at exit, and where to resume from
        bar.close()
        if rank == 0:
            ckpt = latest_checkpoint(out)
            print(f"interrupted at step {step}/{total_steps}; " + (f"--resume continues from {ckpt}" if ckpt else
                  "no checkpoint yet (--save-every N writes some)"))
            print("summary: " + json.dumps({"stage": args.stage, "steps": step, "interrupted": True,
                                           **report(history, out)}, ensure_ascii=False))
        raise
    bar.close()
    final = save(engine, m, args, ctx, step, micro_done, "final", rank)
    summary = {"stage": args.stage, "steps": step, "wall_s": round(time.time() - t_start, 1), "checkpoint": str(final),
               "skipped": dict(last["skipped"]) if last else {}}
    if rank == 0:
        summary.update(report(history, out))
        print("summary: " + json.dumps(summary, ensure_ascii=False))
        nxt = {"text": "pretrain", "pretrain": "finetune"}.get(args.stage)
        print(f"next: python train.py --stage {nxt}" if nxt else
              f"next: python eval.py --model {final}   |   python convert.py --to llava-hf {final} OUT")
    del engine, m, opt
    gc.collect()
    return summary


def report(history: list[dict], out: Path) -> dict:
    """Loss curve PNG and the numbers for the summary (rank 0)."""
    if not history:
        return {}
    k = max(1, len(history) // 10)
    first = sum(h["loss"] for h in history[:k]) / k
    end = sum(h["loss"] for h in history[-k:]) / k
    timed = history[1:] or history  # the first step pays for warm-up
    s_step = sum(h["step_s"] for h in timed) / len(timed)
    tok_s = sum(h["tokens_per_s"] for h in timed) / len(timed)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per supervised token)")
    ax.set_title(f"{out.name}: {first:.3f} -> {end:.3f}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
    return {f"loss_first_{k}_steps": round(first, 4), f"loss_last_{k}_steps": round(end, 4),
            "s_per_step": round(s_step, 3), "tokens_per_s": round(tok_s, 1), "loss_png": str(out / "loss.png")}


def main(argv=None) -> dict | None:
    args = resolve(parse_args(argv))
    if args.dry_run:
        dry_run(args)
        return None
    torch.manual_seed(args.seed)
    rank, world, device = init_distributed()
    return run(args, rank, world, device)


if __name__ == "__main__":
    main()
