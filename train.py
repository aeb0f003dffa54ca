"""Train every Doctor Sun stage under DeepSpeed: text -> pretrain -> finetune.

    python train.py --stage text        # continued pretraining of the LLM on (medical) text
    python train.py --stage pretrain    # feature alignment: only the projector trains
    python train.py --stage finetune    # instruction tuning: LLM + projector + LoRA on the ViT

With no other argument each stage runs the tiny preset on the embedded demo dataset (demo.py).
A stage continues from the previous one's checkpoint where that stage writes it (runs/text/final,
runs/pretrain/final; --init overrides); for the demo a missing one is trained first, because
aligning a projector to a random LLM teaches nothing. Real weights (Doctor Sun's settings, HPARAMS):

    python train.py --stage pretrain --vision CLIP_DIR --llm LLAMA_DIR --data pretrain.json@image_pretrain.zip
    python train.py --stage finetune --data finetune.json@image_finetune.zip    # from runs/pretrain/final

(An optional text stage, `--stage text --vision CLIP_DIR --llm LLAMA_DIR --data text.jsonl`, records
the CLIP folder too, so that `--stage pretrain` can then start from it with no --vision/--llm.)

Launchers: `python train.py` (one process: this script sets up the rendezvous itself, gloo on CPU),
`torchrun --nproc_per_node N train.py`, `deepspeed train.py`. `--deepspeed configs/zero{2,3}.json`
are the upstream settings for GPUs (bf16, overlap_comm); configs/zero{0,2,3}_cpu.json run on CPU
in fp32 (fp16 does not work there). The optimizer is always a client `torch.optim.AdamW` (fused), so
DeepSpeed compiles no optimizer op; batch sizes and clipping come from the command line.
Several machines: the same command on each (`torchrun --nnodes N --node_rank R --master_addr ...`,
or `deepspeed --hostfile`), with --out on a filesystem they share (checked before training).
Each step's --global-batch samples are chosen before they are split over processes, so any
number of processes trains the same model, and a run resumes on another number (ZeRO-1/2/3
through DeepSpeed's universal checkpoint).

The loss (torchtitan's rule): the summed cross-entropy over supervised tokens divided by the
number of supervised tokens of the whole global batch (every micro-batch of the step on every
rank), counted before the first forward of the step. Each micro-batch backpropagates
loss_sum / global_count * world_size with `scale_wrt_gas=False`: DeepSpeed sums gradients over
micro-batches when not told to scale and averages them over ranks (checked in tests/test_train.py).

Checkpoints (`out/step-000050`, `out/final`) are written to `out/.tmp-*` and renamed; each holds
our model format (model.save_pretrained with the resolved run config: `final` every weight and the
tokenizer, a step checkpoint the trained weights and the sha256 of the base folders it re-reads),
DeepSpeed's engine state and trainer_state.json, written last, with every file's size and sha256.
`--resume` takes the newest checkpoint that verifies, so a kill at any moment costs at most the steps
since it. The run owns --out (run_folder.py): locked while it runs, and a folder holding another
run is refused unless --resume continues it (same settings) or --overwrite moves it aside.

Logging and evaluation: metrics.jsonl holds a row per step (loss, lr, grad norm, tokens/s, MFU) and,
with --eval-data/--eval-questions, a row per evaluation (before the first step, every --eval-every
steps, after the last): the held-out loss per supervised token and greedy answers to fixed questions,
also printed and drawn in loss.png. Off by default; on for the demo (DEMO_EVAL). `--report-to
tensorboard` writes the same figures as TensorBoard events in <out>/tensorboard.

Reading order: main() runs the stage chain; each stage is setup() -> resume() -> fit() -> save().
The resolved run (CLI + stage table + hyper-parameter table) is one frozen RunConfig, recorded in
every checkpoint's config.json under "train".
"""
from __future__ import annotations

import argparse
import base64
import collections
import functools
import contextlib
import gc
import io
import json
import math
import os
import random
import shutil
import socket
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

import checkpoint
import data
import errors
import lora
import model
import run_folder
from cross_entropy import chunk_rows

ROOT = Path(__file__).resolve().parent

# ---- stages -------------------------------------------------------------------------------------
# What trains in each stage (Doctor Sun's recipe: continued pretraining of the LLM on text, then
# LLaVA-1.5's feature alignment and instruction tuning). Everything not listed is frozen
# (requires_grad=False); `vision_lora` is the default LoRA rank on every ViT linear layer (0: none);
# `parent` is the stage whose checkpoint this one starts from. Pretrain wraps each caption in the
# Llama-3 chat template, as the seed's xtuner config (..._sharegpt4v_pretrain: llama3_chat) does; the
# demo keeps LLaVA's plain caption template (`demo_template`), whose shorter samples it was tuned on.
STAGES = {
    "text": dict(train=("llm",), template="text", pad_to_square=False, vision_lora=0, parent=None,
                 demo_data="text.jsonl"),
    "pretrain": dict(train=("projector",), template="llama3", pad_to_square=False, vision_lora=0,
                     parent="text", demo_data="pretrain.json", demo_template="caption"),
    "finetune": dict(train=("llm", "projector"), template="llama3", pad_to_square=True, vision_lora=64,
                     parent="pretrain", demo_data="finetune.json"),
}
# Hyper-parameters for real models: Doctor Sun's xtuner configs (1 epoch, global batch 16, max
# 4096 tokens = 3520 text + 576 image positions). The text stage ran outside xtuner; it gets the
# finetune settings of a full-LLM run. LLM LoRA uses LLaVA-1.5's lr 2e-4 (scripts/v1_5/finetune_lora.sh).
HPARAMS = {
    "text": dict(lr=2e-5, global_batch=16, micro_batch=1, max_length=4096, epochs=1.0, max_steps=0),
    "pretrain": dict(lr=1e-3, global_batch=16, micro_batch=1, max_length=4096, epochs=1.0, max_steps=0),
    "finetune": dict(lr=5e-6, global_batch=16, micro_batch=1, max_length=4096, epochs=1.0, max_steps=0),
}
LLM_LORA_LR = 2e-4
# The embedded demo (tiny preset, one sample per ~70 tokens): sized so the chain text -> pretrain ->
# finetune runs in ~8 minutes on a 2-core CPU; how these numbers were chosen is in NOTES.md.
DEMO_HPARAMS = {
    "text": dict(lr=3e-3, global_batch=16, micro_batch=16, max_length=256, epochs=0.0, max_steps=240),
    "pretrain": dict(lr=1e-3, global_batch=16, micro_batch=16, max_length=256, epochs=0.0, max_steps=960),
    "finetune": dict(lr=1e-3, global_batch=16, micro_batch=16, max_length=256, epochs=0.0, max_steps=1200),
}
# Evaluation during training, on for the demo only (real runs: --eval-data/--eval-questions). The demo's
# held-out split is test.json (VQA on 160 unseen images): finetune scores a fixed 20% of it (64 records)
# and asks 8 of its questions; pretrain captions 4 of its images (the caption template asks with the
# image alone; a held-out loss would score VQA answers as captions, so there is none); the text stage
# has no held-out text. Specs are file[:ratio][@images] in the demo folder (--seed fixes the subset).
DEMO_EVAL = {
    "text": dict(eval_data=None, eval_questions=None, eval_every=0),
    "pretrain": dict(eval_data=None, eval_questions="test.json:0.0125", eval_every=160),
    "finetune": dict(eval_data="test.json:0.2", eval_questions="test.json:0.025", eval_every=100),
}


def parse_args(argv=None) -> argparse.Namespace:
    """Values that make no sense (a batch of 0, a data ratio of 0, --keep 0) are refused here, naming
    the flag (errors.py), not minutes later as a ZeroDivisionError or a deleted checkpoint."""
    at_least, spec, espec = errors.at_least, errors.checked_by(data.parse_data_spec), errors.checked_by(eval_spec)
    p = errors.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stage", required=True, choices=list(STAGES))
    g = p.add_argument_group("model")
    g.add_argument("--model-preset", default="tiny", choices=sorted(model.presets))
    g.add_argument("--vision", help="HF CLIP folder (CLIPVisionModel or CLIPModel)")
    g.add_argument("--llm", help="HF Llama folder (LlamaForCausalLM)")
    g.add_argument("--init", help="start from this checkpoint (a previous stage's out/final); "
                                  "default for the demo: runs/<previous stage>/final")
    g.add_argument("--tokenizer", help="default: --init's tokenizer, else --llm, else the demo's")
    g.add_argument("--llm-lora", type=at_least(0), default=0, help="LoRA rank on the LLM (0: train it fully)")
    g.add_argument("--vision-lora", type=at_least(0), default=None,
                   help="LoRA rank on every ViT linear (default: 64 in finetune, else 0)")
    g.add_argument("--lora-alpha", type=errors.above(0), default=16.0)
    g.add_argument("--lora-dropout", type=errors.between(0, 1), default=0.05)
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute LLM/ViT layers in backward")
    g = p.add_argument_group("data")
    g.add_argument("--data", type=spec,
                   help="file[:ratio][@image_root],... (data.parse_data_spec); default: the demo")
    g.add_argument("--max-length", type=at_least(1), help="tokens per sample, image positions included")
    g.add_argument("--template", choices=sorted(data.TEMPLATES),
                   help="chat template (default: the stage's; pretrain: llama3, or caption for the demo)")
    g.add_argument("--on-bad", default="skip", choices=["skip", "error"],
                   help="a bad sample: log it and train on another of its kind instead, or stop the run")
    g.add_argument("--max-bad-fraction", type=errors.between(0, 1), default=0.1,
                   help="with --on-bad skip, stop when more than this fraction of the records loaded, or of the "
                        f"samples read so far (counted over at least {BAD_MIN_SAMPLES}), were bad; each is "
                        "listed in OUT/skipped.jsonl")
    g.add_argument("--allow-outside-image-root", action="store_true",
                   help="read absolute and ../ image paths, and links leading out of the image folder (trusted data)")
    g.add_argument("--workers", type=at_least(0), default=0, help="DataLoader worker processes")
    g = p.add_argument_group("optimisation (defaults per stage: HPARAMS, DEMO_HPARAMS for the tiny preset)")
    g.add_argument("--lr", type=errors.above(0))
    g.add_argument("--global-batch", type=at_least(1), help="samples per optimizer step, all ranks together")
    g.add_argument("--micro-batch", type=at_least(1), help="samples per forward on one rank")
    g.add_argument("--epochs", type=at_least(0, float))
    g.add_argument("--max-steps", type=at_least(0), help="optimizer steps (overrides --epochs when > 0)")
    g.add_argument("--warmup-ratio", type=errors.between(0, 1), default=0.03)
    g.add_argument("--weight-decay", type=at_least(0, float), default=0.0)
    g.add_argument("--grad-clip", type=at_least(0, float), default=1.0, help="0: no clipping")
    g.add_argument("--seed", type=int, default=1024)
    g.add_argument("--deepspeed", help="DeepSpeed JSON (default: configs/zero2.json on GPU, "
                                       "configs/zero0_cpu.json on CPU)")
    g = p.add_argument_group("evaluation during training (off unless given; on for the demo: DEMO_EVAL)")
    g.add_argument("--eval-data", type=espec, help="held-out records, file[:ratio][@image_root],... as --data, in "
                                                   "the stage's format and template: loss per supervised token "
                                                   "('none': off)")
    g.add_argument("--eval-questions", type=espec, help="records (same spec) whose first question, and image, the "
                                                        "model answers greedily at each evaluation ('none': off)")
    g.add_argument("--eval-every", type=at_least(0),
                   help="evaluate before the first step, every N steps and after the last (0: first and last only)")
    g.add_argument("--eval-max-new-tokens", type=at_least(1), default=64)
    g = p.add_argument_group("output")
    g.add_argument("--runs", default="runs", help="root of the default output folders")
    g.add_argument("--out", help="default: <runs>/<stage>")
    g.add_argument("--save-every", type=at_least(0), default=0, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--keep", type=at_least(1), default=2, help="step checkpoints kept (final is always kept)")
    g.add_argument("--save-full", action="store_true", help="save every weight, not only the trained ones")
    g.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    g.add_argument("--overwrite", action="store_true",
                   help="--out holds another run: move it aside to <out>.old-<time> and start again")
    g.add_argument("--report-to", default="none", choices=["none", "tensorboard"],
                   help="also log to TensorBoard (event files in <out>/tensorboard, beside metrics.jsonl)")
    g.add_argument("--peak-tflops", type=errors.above(0),
                   help="device peak for the MFU estimate (default: table/measured)")
    g.add_argument("--dry-run", action="store_true", help="print sizes and memory estimates, then exit")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def eval_spec(s: str) -> list[data.DataSource]:
    """--eval-data/--eval-questions: a data spec, or 'none' (off)."""
    return [] if s in ("", "none") else data.parse_data_spec(s)


@dataclass(frozen=True)
class RunConfig:
    """One stage's run: the CLI flags with every default filled in from the tables, resolved once
    and never changed afterwards. Every checkpoint records it (config.json "train")."""
    stage: str
    model_preset: str
    vision: str | None                  # HF CLIP folder, as given
    llm: str | None                     # HF Llama folder, as given
    init: str | None                    # parent checkpoint, absolute
    tokenizer: str | None               # tokenizer folder, absolute (None in a dry run)
    llm_lora: int
    vision_lora: int
    lora_alpha: float
    lora_dropout: float
    gradient_checkpointing: bool
    data: str | None  # None only in a dry run without --data
    template: str
    max_length: int
    on_bad: str
    max_bad_fraction: float             # of the samples read (at least BAD_MIN_SAMPLES), or of the records loaded
    allow_outside_image_root: bool
    workers: int
    lr: float
    global_batch: int
    micro_batch: int
    epochs: float
    max_steps: int
    warmup_ratio: float
    weight_decay: float
    grad_clip: float
    seed: int
    deepspeed: str
    runs: str
    out: str
    save_every: int
    keep: int
    eval_data: str | None               # held-out records spec (None: no eval loss)
    eval_questions: str | None          # records whose first question is asked (None: none)
    eval_every: int
    eval_max_new_tokens: int
    report_to: str                      # "none" or "tensorboard"
    save_full: bool
    resume: bool
    overwrite: bool
    peak_tflops: float | None
    dry_run: bool
    demo: bool                          # the embedded demo: DEMO_HPARAMS instead of HPARAMS


def resolve(args: argparse.Namespace, parent: RunConfig | None = None) -> RunConfig:
    """Fill every default from the stage and hyper-parameter tables, so the checkpoint records
    exactly what ran. `parent`: the stage this process trains just before this one."""
    stage = STAGES[args.stage]
    if args.init and (args.vision or args.llm):
        raise SystemExit("--init already holds the whole model: do not combine it with --vision/--llm")
    init = str(Path(parent.out) / "final") if parent else (args.init or find_parent(args))
    init = init and str(Path(init).resolve())
    demo = parent.demo if parent else is_demo(args, init)
    hp = (DEMO_HPARAMS if demo else HPARAMS)[args.stage]
    settings = {k: v for k, v in vars(args).items() if k != "local_rank"}  # the launcher's, not the run's
    settings.update({k: v for k, v in hp.items() if settings[k] is None})
    if args.lr is None:
        settings["lr"] = LLM_LORA_LR if args.llm_lora and not demo else hp["lr"]
    if args.vision_lora is None:
        settings["vision_lora"] = stage["vision_lora"]
    if args.template is None:
        settings["template"] = stage.get("demo_template", stage["template"]) if demo else stage["template"]
    if args.data is None and demo:
        root = demo_root()
        f = root / stage["demo_data"]
        settings["data"] = str(f) if args.stage == "text" else f"{f}@{root}"
    elif args.data is None and not args.dry_run:  # a dry run describes the model and its memory without data
        raise SystemExit("--data is required with real models (file[:ratio][@image_root],...)")
    settings.update(resolve_eval(args, demo and args.data is None))
    tokenizer = None if args.dry_run else find_tokenizer(args, init, demo, parent)
    return RunConfig(**{**settings, "init": init, "tokenizer": tokenizer, "demo": demo,
                        "deepspeed": args.deepspeed or default_deepspeed(),
                        "out": args.out or str(Path(args.runs) / args.stage)})


def resolve_eval(args, demo_data: bool) -> dict:
    """--eval-data/--eval-questions/--eval-every: as given ('none': off), else DEMO_EVAL when the
    stage trains on the demo's data (its held-out split), else off."""
    table = DEMO_EVAL[args.stage] if demo_data else dict(eval_data=None, eval_questions=None, eval_every=0)
    out = {}
    for k in ("eval_data", "eval_questions"):
        given = getattr(args, k)
        if given is None and table[k]:
            root = demo_root()
            given = f"{root / table[k]}@{root}"
        out[k] = None if given in (None, "", "none") else given
    out["eval_every"] = table["eval_every"] if args.eval_every is None else args.eval_every
    return out


def find_parent(args) -> str | None:
    """The previous stage's output, where that stage writes it; an error if it is missing."""
    found = parent_checkpoint(args)
    if found is not None and args.dry_run and args.model_preset != "tiny":
        return None  # a dry run of a named preset describes that preset, not a checkpoint the demo left
    if found is None or run_folder.verify(found, hashes=False) is None:
        return found and str(found)
    if not args.dry_run:  # a dry run describes the preset instead
        raise SystemExit(f"{found} does not exist: run `--stage {STAGES[args.stage]['parent']}` first, or pass "
                         f"--init CHECKPOINT (or --vision/--llm to start from HF folders)")
    return None


def parent_checkpoint(args) -> Path | None:
    """Where the previous stage's checkpoint should be, when the model comes from it."""
    parent = STAGES[args.stage]["parent"]
    if not parent or args.init or args.vision or args.llm:
        return None
    return Path(args.runs) / parent / "final"


def stage_chain(args: argparse.Namespace) -> list[RunConfig]:
    """The requested stage, preceded by each demo stage whose checkpoint is missing: aligning a
    projector to a random LLM teaches nothing, so the demo trains the parent first."""
    chain = [args]
    while needs_parent_run(chain[0]):
        a = chain[0]
        chain.insert(0, parse_args(["--stage", STAGES[a.stage]["parent"], "--runs", a.runs, "--seed", str(a.seed),
                                    "--deepspeed", a.deepspeed or default_deepspeed(), "--workers", str(a.workers),
                                    "--report-to", a.report_to]))
    runs = []
    for a in chain:
        runs.append(resolve(a, parent=runs[-1] if runs else None))
    return runs


def needs_parent_run(args) -> bool:
    found = parent_checkpoint(args)
    return found is not None and args.model_preset == "tiny" and not args.dry_run and run_folder.verify(found, hashes=False) is not None


def is_demo(args, init: str | None) -> bool:
    """The embedded demo: the tiny preset built here, or a checkpoint of it."""
    if init:
        return checkpoint_model_config(init).to_dict() == model.ModelConfig.from_name("tiny").to_dict()
    return args.model_preset == "tiny" and not (args.vision or args.llm)


def find_tokenizer(args, init: str | None, demo: bool, parent: RunConfig | None) -> str:
    """--tokenizer, else the one the parent checkpoint recorded, else --llm's, else the demo's."""
    if args.tokenizer:
        found = args.tokenizer
    elif parent:
        found = parent.tokenizer
    elif init and (recorded := data.tokenizer_folder(init)) != Path(init):  # up the chain of stages
        found = recorded
    elif args.llm:
        found = args.llm
    elif demo or args.model_preset == "tiny":
        found = demo_root() / "tokenizer"
    else:
        raise SystemExit("no tokenizer: pass --tokenizer DIR")
    return str(Path(found).resolve())


def default_deepspeed() -> str:
    return str(ROOT / "configs" / ("zero2.json" if torch.cuda.is_available() else "zero0_cpu.json"))


def demo_root() -> Path:
    import demo  # only the demo needs it

    return Path(demo.ensure())


# ---- distributed --------------------------------------------------------------------------------

def init_distributed():
    """Rank, world size and device. A plain `python train.py` gets a one-process rendezvous here:
    without RANK/MASTER_ADDR, DeepSpeed 0.19.8 falls back to MPI discovery, which needs mpi4py."""
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


def check_shared_out(out: Path, rank: int, world: int) -> None:
    """Every rank writes into --out (its DeepSpeed optimizer partition, rng/rank<r>.json) and rank 0
    lists and renames the checkpoint assembled there, so on several machines --out must be one
    folder on a shared filesystem. Rank 0 leaves a token there; if a rank cannot read it, every rank
    stops before training (collective) rather than writing checkpoints that cannot be resumed."""
    if world == 1:
        return
    marker = out / ".shared-check"
    token = [f"{socket.gethostname()} {os.getpid()} {time.time_ns()}" if rank == 0 else None]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        marker.write_text(token[0])
    torch.distributed.broadcast_object_list(token, src=0)  # after the write: rank 0 got here
    try:
        seen = marker.read_text() == token[0]
    except OSError:
        seen = False
    views = [None] * world
    torch.distributed.all_gather_object(views, (seen, socket.gethostname(), str(out.resolve())))
    if rank == 0:
        marker.unlink()
    blind = [f"rank {r} (host {host}, {folder})" for r, (ok, host, folder) in enumerate(views) if not ok]
    if blind:
        raise SystemExit(f"--out {out} is not shared: {', '.join(blind)} cannot read the file rank 0 (host "
                         f"{views[0][1]}, {views[0][2]}) wrote there. Every rank writes its part of each checkpoint "
                         f"into --out and rank 0 assembles it, so with several machines --out must be a folder on a "
                         f"shared filesystem (NFS, Lustre, ...), at the same path on every node.")


def ds_config(run, world: int) -> dict:
    """The DeepSpeed JSON with the batch sizes and clipping from the command line (a conflict is an error)."""
    try:
        cfg = json.loads(Path(run.deepspeed).read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"--deepspeed {run.deepspeed}: not valid JSON ({e})") from None
    if run.global_batch % (run.micro_batch * world):
        raise SystemExit(f"--global-batch {run.global_batch} is not a multiple of micro-batch "
                         f"{run.micro_batch} x {world} processes")
    want = {"train_batch_size": run.global_batch, "train_micro_batch_size_per_gpu": run.micro_batch,
            "gradient_accumulation_steps": run.global_batch // (run.micro_batch * world),
            "gradient_clipping": run.grad_clip}
    for k, v in want.items():
        if cfg.get(k, "auto") not in ("auto", v):
            raise SystemExit(f"{run.deepspeed}: {k}={cfg[k]} conflicts with the command line ({v}); "
                             f"leave it out of the JSON")
    if (cfg.get("fp16") or {}).get("enabled") is True and not torch.cuda.is_available():
        raise SystemExit(f"{run.deepspeed}: fp16 does not work on CPU; use a *_cpu.json config (fp32 or bf16)")
    return {**cfg, **want}


def zero_stage(cfg: dict) -> int:
    return int((cfg.get("zero_optimization") or {}).get("stage", 0))


def bf16(cfg: dict) -> bool:
    return (cfg.get("bf16") or {}).get("enabled") is True


# ---- model --------------------------------------------------------------------------------------

def checkpoint_model_config(init: str) -> model.ModelConfig:
    cfg = checkpoint.load_hf_config(init)
    if cfg.get("format") != model.FORMAT:
        raise SystemExit(f"--init {init}: not a checkpoint of this project (train.py output)")
    return model.ModelConfig.from_dict(cfg["model"])


def model_config(run) -> model.ModelConfig:
    """The parent checkpoint's model, else the preset with the HF folders' shapes."""
    if run.init:
        return checkpoint_model_config(run.init)
    preset = model.ModelConfig.from_name(run.model_preset)
    vision = preset.vision
    if run.vision:
        vision = model.vision_config(run.vision, select_layer=vision.select_layer,
                                     select_feature=vision.select_feature)
    llm = model.llm_config(run.llm) if run.llm else preset.llm
    return model.ModelConfig(vision=vision, llm=llm, projector_type=preset.projector_type,
                             image_token_id=preset.image_token_id)


def build_model(run, cfg: model.ModelConfig, dtype) -> model.DoctorSun:
    """Parts with a source are loaded from it; the rest are randomly initialised (seeded)."""
    if run.init:
        return model.from_pretrained(run.init, dtype=dtype, merge_lora=True)
    if not (run.vision or run.llm):
        return model.build(cfg, seed=run.seed, dtype=dtype)
    torch.manual_seed(run.seed)
    vision = (model.load_vision(run.vision, dtype, select_layer=cfg.vision.select_layer,
                                select_feature=cfg.vision.select_feature) if run.vision else None)
    llm = model.load_llm(run.llm, dtype) if run.llm else None
    return model.DoctorSun(cfg, vision=vision, llm=llm).to(dtype)


def apply_stage(m: model.DoctorSun, run) -> dict:
    """The stage table made real: freeze everything, then unfreeze/inject what this stage trains.
    Returns the LoRA configs (recorded in the checkpoint)."""
    stage = STAGES[run.stage]
    m.requires_grad_(False)
    lcfg = {"vision": None, "llm": None}
    if "projector" in stage["train"]:
        m.projector.requires_grad_(True)
    if "llm" in stage["train"]:
        if run.llm_lora:
            lcfg["llm"] = lora.LoRAConfig(run.llm_lora, run.lora_alpha, run.lora_dropout, lora.LLM_TARGETS)
            lora.inject(m.llm, lcfg["llm"])
            lora.mark_only_lora_trainable(m.llm)
        else:
            m.llm.requires_grad_(True)
    elif run.llm_lora:
        raise SystemExit(f"--llm-lora: the LLM does not train in the {run.stage} stage")
    if run.vision_lora:
        lcfg["vision"] = lora.LoRAConfig(run.vision_lora, run.lora_alpha, run.lora_dropout, lora.VIT_TARGETS)
        lora.inject(m.vision, lcfg["vision"])
        lora.mark_only_lora_trainable(m.vision)
    m.llm.gradient_checkpointing = m.vision.gradient_checkpointing = run.gradient_checkpointing
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

def dry_run(run) -> None:
    """Sizes and a memory estimate per device, without allocating the model (built on meta)."""
    cfg = model_config(run)
    with torch.device("meta"):
        m = model.DoctorSun(cfg)
    apply_stage(m, run)
    dsc = json.loads(Path(run.deepspeed).read_text())
    b = 2 if bf16(dsc) else 4
    counts = param_counts(m)
    print(f"stage {run.stage}   preset {run.model_preset}   dtype {'bf16' if b == 2 else 'fp32'}   "
          f"config {run.deepspeed}")
    print(f"{'module':<10}{'params':>16}{'trainable':>16}")
    for part, (n, t) in counts.items():
        print(f"{part:<10}{n:>16,}{t:>16,}")
    print(f"{'total':<10}{sum(n for n, _ in counts.values()):>16,}{sum(t for _, t in counts.values()):>16,}")
    L = run.max_length
    print(f"tokens per step: <= {run.global_batch} samples x {L} = {run.global_batch * L:,} "
          f"(a sample holds {m.num_image_tokens} image positions when it has an image)")
    if run.data is None:
        print("data: none given (--data adds an estimate of the tokens per step and the steps per epoch)")
    else:
        try:
            ds = data.SupervisedDataset(data.parse_data_spec(run.data), None, template=run.template,
                                        num_image_tokens=m.num_image_tokens)
            mean = sum(ds.lengths) / max(1, len(ds))
            print(f"data: {len(ds):,} samples, ~{mean:.0f} tokens each (estimate) -> "
                  f"~{run.global_batch * mean:,.0f} tokens per step, {len(ds) / run.global_batch:,.0f} steps per epoch")
        except (OSError, ValueError) as e:
            print(f"data: not read ({e})")
    print_memory_table(run, cfg, counts, b)


def print_memory_table(run, cfg: model.ModelConfig, counts: dict, b: int) -> None:
    """Weights, gradients, Adam states and activations per device, for 1-8 devices x ZeRO 0/2/3
    (`b`: bytes per weight)."""
    P, T, L = sum(n for n, _ in counts.values()), sum(t for _, t in counts.values()), run.max_length
    # Activations. An LLM layer keeps, per token, x before each norm, q and the attention output
    # (4 x hidden), k and v, gate and up (llama.py; the norm outputs and silu(gate) * up are recomputed);
    # a checkpointed layer keeps its input, plus one layer's worth (recomputed without the selective
    # part: 6 x hidden + 2 x kv + 3 x intermediate) during its backward. The ViT: Korthikanti et al.
    # 2022, 34·s·h bytes per layer in 16-bit without the s² term, which SDPA does not store. The loss
    # holds one chunk of logits (cross_entropy.py).
    lc, vc = cfg.llm, cfg.vision
    kv = lc.num_key_value_heads * lc.head_dim
    per_layer = L * (4 * lc.hidden_size + 2 * kv + 2 * lc.intermediate_size) * b
    whole_layer = L * (6 * lc.hidden_size + 2 * kv + 3 * lc.intermediate_size) * b
    kept = L * lc.hidden_size * b
    act = run.micro_batch * (lc.num_hidden_layers * (kept if run.gradient_checkpointing else per_layer)
                              + (whole_layer if run.gradient_checkpointing else 0))
    if counts["vision"][1]:
        act += run.micro_batch * vc.num_layers_used * 34 * vc.num_positions * vc.hidden_size * b / 2
    act += chunk_rows(lc.vocab_size) * lc.vocab_size * b
    gib = 2 ** 30
    print(f"\nmemory per device, GiB (rough: +-30%, plus 1-2 GiB of CUDA context/fragmentation; "
          f"micro-batch {run.micro_batch}, {L} tokens, "
          f"checkpointing {'on' if run.gradient_checkpointing else 'off'})")
    print(f"{'devices':<9}{'ZeRO':>5}{'weights':>9}{'grads':>8}{'Adam':>8}{'activ.':>8}{'total':>8}")
    for n in (1, 2, 4, 8):
        for z in (0, 2, 3):
            w = P * b / (n if z == 3 else 1)
            g = T * b / (n if z >= 2 else 1)
            o = T * (8 + (4 if b == 2 else 0)) / (n if z >= 1 else 1)  # m, v (+ fp32 master copy)
            print(f"{n:<9}{z:>5}{w / gib:>9.1f}{g / gib:>8.1f}{o / gib:>8.1f}{act / gib:>8.1f}"
                  f"{(w + g + o + act) / gib:>8.1f}")


# ---- data ---------------------------------------------------------------------------------------

def make_dataset(run, m: model.DoctorSun, tokenizer, training: bool = True) -> data.SupervisedDataset:
    """Training data replaces a bad sample by another of its modality (--on-bad skip), so no step is
    short of samples; held-out data skips it, so the eval set stays the eval set."""
    stage = STAGES[run.stage]
    return data.SupervisedDataset(
        data.parse_data_spec(run.data), tokenizer, template=run.template,
        num_image_tokens=m.num_image_tokens, image_token_id=m.image_token_id, max_length=run.max_length,
        image_size=m.config.vision.image_size, pad_to_square=stage["pad_to_square"],
        on_bad="replace" if training and run.on_bad == "skip" else run.on_bad, seed=run.seed,
        allow_outside_image_root=run.allow_outside_image_root)


def micro_batches(ds, run, rank: int, world: int, start: int):
    """This rank's micro-batches from micro-batch `start` on, epoch after epoch. Each optimizer
    step's global batch is a function of (seed, epoch, --global-batch) only, split over ranks
    afterwards: any number of processes trains on the same samples, and a resumed run reads
    exactly what the interrupted one would (start = steps done x accumulation steps)."""
    def sampler(epoch, start_index=0):
        return data.LengthGroupedSampler(ds.lengths, ds.is_image, run.micro_batch, global_batch=run.global_batch,
                                         seed=run.seed, epoch=epoch, num_replicas=world, rank=rank,
                                         start_index=start_index)
    per_epoch = len(sampler(0)) // run.micro_batch
    epoch, skip = divmod(start, per_epoch)
    pad_id = ds.tokenizer.pad_id
    while True:
        loader = torch.utils.data.DataLoader(
            ds, batch_size=run.micro_batch, sampler=sampler(epoch, skip * run.micro_batch),
            collate_fn=functools.partial(data.collate, pad_id=pad_id), num_workers=run.workers,
            generator=torch.Generator().manual_seed(run.seed + epoch))  # leaves the global RNG alone
        for batch in loader:
            yield epoch, batch
        epoch, skip = epoch + 1, 0


# ---- schedule -----------------------------------------------------------------------------------

def lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    """xtuner's LLaVA schedule (LinearLR from start_factor 1e-5 over the first warmup_ratio of the
    steps, then CosineAnnealingLR to 0). `step` counts optimizer steps already taken."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return 1e-5 + (1 - 1e-5) * step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ---- one stage's state --------------------------------------------------------------------------

@dataclass
class Trainer:
    """What setup() builds for one stage; fit() and save() read it."""
    run: RunConfig
    engine: object                      # deepspeed.DeepSpeedEngine
    model: model.DoctorSun              # the engine's module
    dataset: data.SupervisedDataset
    rank: int
    world: int
    device: torch.device
    gas: int                            # micro-batches per optimizer step, on each rank
    total_steps: int
    zero3: bool                         # parameters partitioned: gather before saving
    base: dict                          # where the unsaved weights come from (config.json "base")
    lora: dict                          # LoRA configs (config.json "lora")
    flops: tuple[float, float, float]   # per token, supervised token and image (flops_model)
    peak: float | None                  # device FLOP/s, for the MFU
    evals: EvalSet | None = None        # --eval-data / --eval-questions (make_eval_set)


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


def save(t: Trainer, step: int, micro_done: int, tag: str) -> Path:
    """Write out/<tag> (every rank calls this): into out/.tmp-<tag> first, then renamed, so a
    folder with that name is always whole. `final` holds every weight, so it loads on its own
    wherever it is copied; a step checkpoint holds the trained weights and re-reads the frozen ones
    from its base folders, whose sha256 it records (model.from_pretrained and --resume refuse a
    changed base)."""
    run, rank = t.run, t.rank
    out = Path(run.out)
    tmp, final = out / f".tmp-{tag}", out / tag
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    full = tag == "final" or run.save_full
    sd = gather_weights(t.model, weights_to_save(t.model, t.base, full), t.zero3)
    try:
        write_checkpoint(t, tmp, sd, full)
        hashes = hash_files(tmp, rank, t.world)
    except (OSError, RuntimeError) as e:  # disk full: torch.save says only "iostream error"
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(out).free / 2**20
        raise SystemExit(f"writing checkpoint {tmp} failed on rank {rank} ({str(e).splitlines()[0][:200]}); "
                         f"{free:,.0f} MiB free on that filesystem. The previous checkpoints are untouched.")
    if rank == 0:
        state = {"step": step, "micro_batches": micro_done, "world_size": t.world, "seed": run.seed,
                 "stage": run.stage, "global_batch": run.global_batch,
                 "zero_stage": t.engine.zero_optimization_stage(), "total_steps": t.total_steps,
                 "base_sha256": t.base["sha256"]}
        run_folder.record(tmp, hashes, state)
        run_folder.replace_folder(tmp, final)
        run_folder.rotate(out, run.keep)
    torch.distributed.barrier()
    return final


def write_checkpoint(t: Trainer, tmp: Path, sd: dict, full: bool) -> None:
    """Our model format (rank 0), DeepSpeed's engine state and every rank's RNG into `tmp`."""
    run = t.run
    # Frozen weights come back from the rebuilt model; saving them again would double the size.
    # The version mark is what DeepSpeed's converter requires to re-partition a checkpoint (to_universal).
    from deepspeed.checkpoint import constants as dsc
    universal = {dsc.UNIVERSAL_CHECKPOINT_INFO: {dsc.UNIVERSAL_CHECKPOINT_VERSION_KEY: dsc.UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    t.engine.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False, exclude_frozen_parameters=True,
                             client_state=universal)
    (tmp / "rng").mkdir(exist_ok=True)
    (tmp / "rng" / f"rank{t.rank}.json").write_text(json.dumps(rng_state()))
    torch.distributed.barrier()
    if t.rank == 0:
        policy = data.PromptPolicy(run.template, "", STAGES[run.stage]["pad_to_square"])  # no system prompt
        tokenizer = run.tokenizer
        if full:  # self-contained: its tokenizer too
            data.copy_tokenizer(run.tokenizer, tmp / "tokenizer")
            tokenizer = "tokenizer"
        model.save_pretrained(t.model, tmp, state_dict=sd, base={} if full else t.base, lora_configs=t.lora,
                              extra={"stage": run.stage, "tokenizer": tokenizer, "train": asdict(run),
                                     data.POLICY_KEY: policy.to_dict()})


def hash_files(folder: Path, rank: int, world: int) -> dict[str, str]:
    """sha256 of every file in `folder`, the work shared between ranks (file i on rank i % world):
    an 8B checkpoint with its optimizer state is ~100 GB, minutes for one process to hash."""
    torch.distributed.barrier()  # every rank's files are written
    names = [run_folder.files_of(folder)]  # rank 0's listing, so all ranks split the same list
    torch.distributed.broadcast_object_list(names, src=0)
    names = names[0]
    mine = {n: checkpoint.sha256(folder / n) for i, n in enumerate(names) if i % world == rank}
    parts = [None] * world
    torch.distributed.all_gather_object(parts, mine)
    return {k: v for p in parts for k, v in p.items()}


def find_resume(run: RunConfig, rank: int, world: int) -> tuple[Path, dict] | None:
    """The newest checkpoint in --out whose files all match their recorded sha256, and its
    trainer_state.json, or None. Rank 0 verifies (DeepSpeed's files are pickles: nothing is loaded
    before this) and tells the others."""
    found = [None]
    if rank == 0:
        found[0] = run_folder.newest_verified(Path(run.out))
        if found[0] is None and [*Path(run.out).glob("step-*"), *Path(run.out).glob("final")]:
            found[0] = (f"resume: no checkpoint in {run.out} verifies (reasons above), so nothing was loaded; "
                        f"--overwrite moves the run aside and starts again")
        elif found[0] is None:
            print(f"resume: no complete checkpoint in {run.out}; starting from the beginning")
    if world > 1:
        torch.distributed.broadcast_object_list(found, src=0)
    if isinstance(found[0], str):
        raise SystemExit(found[0])
    return found[0]


def needs_universal(found: tuple[Path, dict] | None, world: int, zero: int) -> bool:
    """ZeRO-1/2/3 save one optimizer partition per rank (ZeRO-3 the weights too), and DeepSpeed
    loads partitions only on the number of processes that wrote them. On another number the
    checkpoint goes through DeepSpeed's universal format (one file per parameter and state)."""
    return found is not None and found[1]["world_size"] != world and zero > 0


def resume(t: Trainer, found: tuple[Path, dict]) -> tuple[int, int]:
    """(step, micro-batches done per rank: step x accumulation) of checkpoint `found`, with the
    engine and every RNG restored, so the run continues exactly."""
    ckpt, st = found
    check_resumable(st, ckpt, t)
    load_dir = ckpt
    if t.engine.load_universal_checkpoint():
        load_dir = to_universal(ckpt, t.rank)
    # Not strict: the checkpoint holds only the trained parameters (exclude_frozen_parameters).
    path, _ = t.engine.load_checkpoint(str(load_dir), tag="deepspeed", load_module_strict=False)
    if path is None:
        raise SystemExit(f"resume: DeepSpeed could not load {load_dir / 'deepspeed'}")
    torch.distributed.barrier()
    if load_dir != ckpt and t.rank == 0:
        shutil.rmtree(load_dir)
    # On another number of processes rank r takes up rank r % old's generators: the data continues
    # exactly, random draws (LoRA dropout) cannot match a run of another size anyway.
    set_rng_state(json.loads((ckpt / "rng" / f"rank{t.rank % st['world_size']}.json").read_text()))
    if t.rank == 0:
        print(f"resume: continuing from {ckpt} (step {st['step']}, {st['step'] * t.run.global_batch} samples done, "
              f"written by {st['world_size']} processes, now {t.world}"
              + (", through a universal checkpoint)" if load_dir != ckpt else ")"))
    return st["step"], st["step"] * t.gas


def to_universal(ckpt: Path, rank: int) -> Path:
    """DeepSpeed's own converter (deepspeed/checkpoint/ds_to_universal.py) merges the per-rank
    partitions of ckpt/deepspeed into out/.universal-<name>/deepspeed; every rank then loads its
    new partition from there. Rank 0 converts (on the shared --out), the others wait."""
    from deepspeed.checkpoint import ds_to_universal

    dst = ckpt.parent / f".universal-{ckpt.name}"
    if rank == 0:
        shutil.rmtree(dst, ignore_errors=True)
        args = argparse.Namespace(input_folder=str(ckpt / "deepspeed"), output_folder=str(dst / "deepspeed"),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                  strict=True, inject_missing_state=False)
        with contextlib.redirect_stdout(io.StringIO()):  # its progress bars, not ours
            ds_to_universal.main(args)
    torch.distributed.barrier()
    return dst


def check_resumable(st: dict, ckpt: Path, t: Trainer) -> None:
    """Refuse a checkpoint that would not continue this run. The sample order depends on (seed,
    stage, --global-batch) only, so the number of processes may change (needs_universal)."""
    run, zero = t.run, t.engine.zero_optimization_stage()
    # Checkpoints written before these fields were recorded: assume this run's.
    saved = {"seed": st["seed"], "stage": st["stage"], "global batch": st.get("global_batch", run.global_batch),
             "ZeRO stage": st.get("zero_stage", zero)}
    now = {"seed": run.seed, "stage": run.stage, "global batch": run.global_batch, "ZeRO stage": zero}
    if saved != now:
        raise SystemExit(f"resume: {ckpt} was written by a run with " + ", ".join(f"{k} {v}" for k, v in saved.items())
                         + "; this run has " + ", ".join(f"{k} {v}" for k, v in now.items()))
    cfg = checkpoint.load_hf_config(ckpt)
    changed = run_folder.changed_settings(cfg.get("train") or asdict(run), asdict(run), MAY_CHANGE_ON_RESUME)
    if changed:
        raise SystemExit(f"resume: {ckpt} was written with other settings ({'; '.join(changed)}); resume with "
                         f"the same ones, or start a new run in another --out")
    if st.get("base_sha256", t.base["sha256"]) != t.base["sha256"]:  # the frozen weights are not in the checkpoint
        raise SystemExit(f"resume: the frozen weights this run starts from ({t.base['init'] or t.base['vision']}, "
                         f"{t.base['llm']}) changed since {ckpt} was written (sha256 differs)")


# Settings a resumed run may change: they decide how long it runs, how it saves and logs, and how a
# step's global batch is cut into micro-batches (memory, not samples or math); and where things are
# (a moved run; the frozen weights are compared by sha256 instead). Anything else is another run.
MAY_CHANGE_ON_RESUME = {"max_steps", "save_every", "keep", "resume", "overwrite", "report_to", "workers",
                        "peak_tflops", "eval_every", "eval_max_new_tokens", "micro_batch", "runs", "out",
                        "init", "vision", "llm", "dry_run", "max_bad_fraction"}


# ---- training -----------------------------------------------------------------------------------

def setup(run: RunConfig, rank: int, world: int, device, found: tuple[Path, dict] | None = None) -> Trainer:
    """Model, data, optimizer and DeepSpeed engine for one stage, built alike on every rank;
    `found` is the checkpoint it will resume from (DeepSpeed must know if that is a universal one)."""
    import deepspeed

    if run.init and rank == 0:
        print(f"starting from {run.init}")
    dsc = ds_config(run, world)
    if needs_universal(found, world, zero_stage(dsc)):
        dsc["checkpoint"] = {**dsc.get("checkpoint", {}), "load_universal": True}
    dtype = torch.bfloat16 if bf16(dsc) else torch.float32
    m = build_model(run, model_config(run), dtype)
    lora_configs = apply_stage(m, run)
    m.train()
    tokenizer = data.load_tokenizer(run.tokenizer)
    if tokenizer.vocab_size > m.config.llm.vocab_size:
        raise SystemExit(f"tokenizer {run.tokenizer} has {tokenizer.vocab_size} ids, "
                         f"the LLM only {m.config.llm.vocab_size}")
    ds = make_dataset(run, m, tokenizer)
    if not len(ds):  # nothing to draw a batch from (the sampler would divide by zero)
        raise SystemExit(f"--data {run.data}: no records to train on")
    evals = make_eval_set(run, m, tokenizer)
    gas = dsc["gradient_accumulation_steps"]
    per_epoch = len(data.LengthGroupedSampler(ds.lengths, ds.is_image, run.global_batch)) // run.global_batch
    total_steps = run.max_steps if run.max_steps > 0 else max(1, math.ceil(run.epochs * per_epoch))
    # fused: one kernel per tensor instead of about ten element-wise passes (AdamW was a third of a
    # bf16 step at a 128k vocabulary; 5-8x faster on CPU); the update agrees within rounding.
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=run.lr, betas=(0.9, 0.999),
                            weight_decay=run.weight_decay, fused=True)
    sched = lambda o: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
        o, lambda s: lr_factor(s, total_steps, run.warmup_ratio))
    engine, _, _, _ = deepspeed.initialize(model=m, optimizer=opt, lr_scheduler=sched, config=dsc)
    base = {"init": run.init, "vision": run.vision and str(Path(run.vision).resolve()),
            "llm": run.llm and str(Path(run.llm).resolve())}
    base["sha256"] = base_fingerprint(base, rank, world)
    return Trainer(run, engine, m, ds, rank, world, device, gas, total_steps, zero_stage(dsc) == 3, base,
                   lora_configs, flops_model(m), peak_flops(device, dtype, run.peak_tflops), evals)


def base_fingerprint(base: dict, rank: int, world: int) -> dict:
    """sha256 of the folders the frozen weights come from (rank 0 hashes, the others are told):
    a step checkpoint records it, and loading or resuming refuses a folder that changed since."""
    fp = [{part: checkpoint.fingerprint(path) for part, path in base.items() if path} if rank == 0 else None]
    if world > 1:
        torch.distributed.broadcast_object_list(fp, src=0)
    return fp[0]


def train_stage(run: RunConfig, rank: int, world: int, device) -> dict:
    """One stage, start to finish: setup, resume, the step loop, the final checkpoint, the summary."""
    lock = claim_out(run, rank, world)
    check_shared_out(Path(run.out), rank, world)
    found = find_resume(run, rank, world) if run.resume else None
    t = setup(run, rank, world, device, found)
    step, micro_done = resume(t, found) if found else (0, 0)
    out = Path(run.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"stage {run.stage}: {len(t.dataset):,} samples, {t.total_steps} steps of {run.global_batch} samples "
              f"({world} x {run.micro_batch} x {t.gas} accumulation), lr {run.lr:g}, "
              f"config {Path(run.deepspeed).name}")
        print("trainable: " + ", ".join(f"{k} {n_t:,}/{n:,}" for k, (n, n_t) in param_counts(t.model).items()))
    log = MetricsLog(run, step, rank)
    t_start = time.time()
    step, micro_done, last = fit(t, step, micro_done, log)
    log.close()
    final = save(t, step, micro_done, "final")
    summary = {"stage": run.stage, "steps": step, "wall_s": round(time.time() - t_start, 1),
               "checkpoint": str(final), "skipped": last["skipped"] if last else {}}
    if rank == 0:
        summary.update(report(log.rows, out))
        print("summary: " + json.dumps(summary, ensure_ascii=False))
        nxt = next((s for s, v in STAGES.items() if v["parent"] == run.stage), None)
        print(f"next: python train.py --stage {nxt}" if nxt else
              f"next: python eval.py --model {final}   |   python convert.py --to llava-hf {final} OUT")
    del t  # the engine, model and optimizer: free them before the next stage builds its own
    gc.collect()
    if lock is not None:
        lock.close()  # releases the flock: the next stage, or another run, may use --out
    return summary


def claim_out(run: RunConfig, rank: int, world: int):
    """Rank 0 locks --out for this run (run_folder.claim); every rank stops if it may not use it."""
    lock, err = None, [None]
    if rank == 0:
        try:
            lock = run_folder.claim(Path(run.out), resume=run.resume, overwrite=run.overwrite)
        except SystemExit as e:
            err[0] = str(e)
    if world > 1:
        torch.distributed.broadcast_object_list(err, src=0)
    if err[0]:
        raise SystemExit(err[0])
    return lock


def start_metrics(path: Path, step: int, rank: int) -> list[dict]:
    """metrics.jsonl restarted with the rows a resumed-from run logged up to `step` (rank 0)."""
    history = run_folder.read_metrics(path, step) if rank == 0 and step > 0 else []
    if rank == 0:
        path.write_text("".join(json.dumps(r) + "\n" for r in history))
    return history


def fit(t: Trainer, step: int, micro_done: int, log: MetricsLog) -> tuple[int, int, dict | None]:
    """The step loop up to total_steps: log each step, evaluate before the first step, every
    --eval-every steps and after the last, checkpoint every --save-every steps.
    Returns (step, micro-batches done, the last metrics row)."""
    from tqdm import tqdm

    run, rank, world = t.run, t.rank, t.world
    (f_tok, f_head, f_img), peak = t.flops, t.peak
    bad = BadSamples(run, t.dataset, step, rank, world, log.rows)
    batches = micro_batches(t.dataset, run, rank, world, micro_done)
    bar = tqdm(total=t.total_steps, initial=step, disable=rank != 0, dynamic_ncols=True, desc=run.stage)
    last = None
    if t.evals and step == 0:
        log.write_eval(evaluate(t, step))
    try:
        while step < t.total_steps:
            t0 = time.time()
            group = [next(batches) for _ in range(t.gas)]  # (epoch, micro-batch) pairs
            for _, b in group:
                bad.add(b)
            r = train_step(t.engine, [b for _, b in group], world, t.device)
            check_finite(r, step + 1, run)
            step, micro_done = step + 1, micro_done + t.gas
            dt = time.time() - t0
            flops = r["tokens"] * f_tok + r["supervised_tokens"] * f_head + r["images"] * f_img
            last = {"step": step, "epoch": group[-1][0], "loss": round(r["loss"], 6), "lr": r["lr"],
                    "grad_norm": r["grad_norm"], "tokens_per_s": round(r["tokens"] / dt, 1),
                    "supervised_tokens": r["supervised_tokens"], "step_s": round(dt, 3),
                    "mfu": None if not peak else round(flops / dt / (peak * world), 5),
                    "skipped": bad.end_step(step)}
            log.write(last)
            bad.check(step)
            if rank == 0:
                bar.set_postfix(loss=f"{r['loss']:.4f}", lr=f"{r['lr']:.2e}", tok_s=f"{last['tokens_per_s']:.0f}")
                bar.update(1)
            if t.evals and (step == t.total_steps or run.eval_every and step % run.eval_every == 0):
                log.write_eval(evaluate(t, step))
            if run.save_every and step % run.save_every == 0 and step < t.total_steps:
                save(t, step, micro_done, f"step-{step:06d}")
    except KeyboardInterrupt:  # a summary at exit, and where to resume from
        bar.close()
        if rank == 0:
            report_interrupt(run, step, t.total_steps, log.rows)
        raise
    except data.BadDataError as e:
        raise SystemExit(f"stopping at step {step}: {e}") from None
    finally:
        bar.close()  # ends the bar's line: an error message then starts a line of its own
    return step, micro_done, last


def check_finite(r: dict, step: int, run: RunConfig) -> None:
    """A NaN/Inf loss or gradient norm (same on every rank: both are reduced) means the weights this
    step updated are no longer finite: stop before they are saved or logged (NaN is not JSON)."""
    if math.isfinite(r["loss"]) and (r["grad_norm"] is None or math.isfinite(r["grad_norm"])):
        return
    last = run_folder.newest_verified(Path(run.out), hashes=False)
    raise SystemExit(f"step {step}: loss {r['loss']}, gradient norm {r['grad_norm']} (lr {r['lr']:g}): training "
                     f"diverged, nothing of this step was saved; "
                     + (f"the newest checkpoint is {last[0]}" if last else "no checkpoint was written yet")
                     + " (a lower --lr, more --warmup-ratio or --grad-clip are the usual cures)")


def gather_counts(counts: collections.Counter, world: int) -> dict:
    """Skipped-sample counts summed over ranks (collective)."""
    if world == 1:
        return dict(counts)
    gathered, total = [None] * world, collections.Counter()
    torch.distributed.all_gather_object(gathered, dict(counts))
    for g in gathered:
        total.update(g)
    return dict(total)


# ---- bad samples --------------------------------------------------------------------------------
# A bad sample (a missing, corrupt or oversized image, an answer --max-length cuts off, a record that
# breaks the conversation rules) does not end a run: the dataset trains on another sample of the same
# modality instead, and it is logged here. Only bad data in bulk stops a run: more than
# --max-bad-fraction (default 0.1) of what was read. A few percent of a large scraped set is ordinary
# rot (LLaVA-style releases lose images); beyond a tenth something systematic is wrong (a wrong image
# root, a truncated archive, a --max-length shorter than the answers), and the replacements would
# skew the data mixture noticeably. The fraction is taken over at least BAD_MIN_SAMPLES samples: one
# bad sample among the first 4 read is not "25% bad".
BAD_MIN_SAMPLES = 1000


def too_many_bad(n_bad: int, n: int, max_fraction: float) -> bool:
    return n_bad > max_fraction * max(n, BAD_MIN_SAMPLES)


class BadSamples:
    """A stage's bad training samples, known alike to every rank. Each step's are gathered from all
    ranks; rank 0 appends them to <out>/skipped.jsonl, one row each ({step, id, file, record, reason,
    detail, replaced_by}; step 0 also lists the records dropped at load) and prints the first PRINTED.
    The counts by reason (records dropped at load included) go into every metrics row and the
    summary. The run stops when the records dropped at load, or the bad samples among those read,
    exceed --max-bad-fraction (too_many_bad)."""
    PRINTED = 20

    def __init__(self, run: RunConfig, ds: data.SupervisedDataset, step: int, rank: int, world: int,
                 history: list[dict]):
        self.run, self.rank, self.world, self.path = run, rank, world, Path(run.out) / "skipped.jsonl"
        self.dropped, self.rows, self.printed = len(ds.dropped), [], 0
        counts = next((r["skipped"] for r in reversed(history) if "skipped" in r), None)  # rank 0's, on resume
        if world > 1:
            box = [counts]
            torch.distributed.broadcast_object_list(box, src=0)
            counts = box[0]
        self.counts = collections.Counter(counts if counts is not None else [r["reason"] for r in ds.dropped])
        # samples read: each step's global batch plus the bad samples read in their place
        self.read = step * run.global_batch + sum(self.counts.values()) - self.dropped
        if rank == 0:
            old = run_folder.read_metrics(self.path, step) if step else []  # a cut last line is dropped
            self.path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in old))
        if step == 0:
            self.log(ds.dropped, 0)
        if too_many_bad(self.dropped, len(ds) + self.dropped, run.max_bad_fraction):
            raise SystemExit(f"{self.dropped:,} of the {len(ds) + self.dropped:,} records of --data {run.data} are bad "
                             f"({dict(self.counts)}), more than --max-bad-fraction {run.max_bad_fraction}; "
                             f"each is listed in {self.path}")

    def add(self, batch: dict) -> None:
        self.rows += batch["skips"]

    def end_step(self, step: int) -> dict:
        """Gather and log the step's bad samples; the counts so far."""
        rows = self.rows
        if self.world > 1:
            gathered = [None] * self.world
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for g in gathered for r in g]
        rows.sort(key=lambda r: json.dumps(r, sort_keys=True, default=str))  # the same file on any number of ranks
        self.rows = []
        self.counts.update(r["reason"] for r in rows)
        self.read += self.run.global_batch + len(rows)
        self.log(rows, step)
        return dict(self.counts)

    def check(self, step: int) -> None:
        """Stop, on every rank alike, once the bad samples read exceed --max-bad-fraction."""
        n_bad = sum(self.counts.values()) - self.dropped
        if too_many_bad(n_bad, self.read, self.run.max_bad_fraction):
            raise SystemExit(f"stopping at step {step}: {n_bad:,} of the {self.read:,} samples read were bad "
                             f"({dict(self.counts)}), more than --max-bad-fraction {self.run.max_bad_fraction} "
                             f"(counted over at least {BAD_MIN_SAMPLES} samples); each is listed in {self.path}")

    def log(self, rows: list[dict], step: int) -> None:
        if self.rank != 0 or not rows:
            return
        from tqdm import tqdm

        with open(self.path, "a") as f:
            f.writelines(json.dumps({"step": step, **r}, ensure_ascii=False, default=str) + "\n" for r in rows)
        for r in rows[:max(0, self.PRINTED - self.printed)]:
            instead = f"; trained on id={r['replaced_by']!r} instead" if "replaced_by" in r else "; dropped at load"
            tqdm.write(f"bad sample id={r['id']!r} ({r['file']}, record {r['record']}): {r['reason']}: "
                       f"{r['detail']}{instead}")
        if self.printed < self.PRINTED <= self.printed + len(rows):
            tqdm.write(f"(further bad samples are only listed in {self.path})")
        self.printed += len(rows)


def report_interrupt(run: RunConfig, step: int, total_steps: int, history: list[dict]) -> None:
    """On Ctrl-C: the summary so far, and where --resume would continue from."""
    out = Path(run.out)
    last = run_folder.newest_verified(out, hashes=False)  # a message on Ctrl-C: no time to hash
    ckpt = last and last[0]
    print(f"interrupted at step {step}/{total_steps}; " + (f"--resume continues from {ckpt}" if ckpt else
          "no checkpoint yet (--save-every N writes some)"))
    print("summary: " + json.dumps({"stage": run.stage, "steps": step, "interrupted": True,
                                   **report(history, out)}, ensure_ascii=False))


def peak_flops(device, dtype, override) -> float | None:
    """Device FLOP/s for the MFU: --peak-tflops, a table of GPUs, or a CPU matmul measured here."""
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
    """One optimizer step over this rank's micro-batches (the loss rule: the module docstring)."""
    counts = [int((b["labels"][:, 1:] != data.IGNORE_INDEX).sum()) for b in batches]
    total = torch.tensor([float(sum(counts))], device=device)
    torch.distributed.all_reduce(total)
    scale = world / max(1.0, total.item())
    stand_in = next((b for b in reversed(batches) if len(b["ids"])), None)
    loss_sum, tokens, images, gn = 0.0, 0, 0, None
    for b in batches:
        if not len(b["ids"]):  # every sample of this micro-batch was skipped
            b = unsupervised(stand_in)
        px = b["pixel_values"]
        ls, n = engine(b["input_ids"].to(device), None if px is None else px.to(device),
                       b["attention_mask"].to(device), b["labels"].to(device))
        engine.backward(ls * scale, scale_wrt_gas=False)
        boundary = engine.is_gradient_accumulation_boundary()
        if boundary and engine.zero_optimization_stage() == 0:
            trainable = [p for p in engine.module.parameters() if p.requires_grad]
            zero_unused_grads(trainable)
            gn = grad_norm(trainable)
        lr = engine.get_lr()[0]
        engine.step()
        if boundary and engine.zero_optimization_partition_weights():
            clear_zero3_grad_partitions(engine)
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


def unsupervised(batch: dict | None) -> dict:
    """A stand-in for a micro-batch whose samples were all skipped: a real batch with no supervised
    token gives a zero gradient, yet this rank still takes part in every gradient reduction."""
    if batch is None:
        raise RuntimeError("a whole optimizer step of this rank's data was bad samples (see --on-bad)")
    return {**batch, "labels": torch.full_like(batch["labels"], data.IGNORE_INDEX)}


def zero_unused_grads(params: list[torch.nn.Parameter]) -> None:
    """ZeRO-0 only (DeepSpeed 0.19.8): a trainable parameter unused in the whole step (the ViT LoRA
    during a text-only step) gets a zero gradient, as it does in ZeRO-2/3's flat gradient buffers,
    so AdamW moves it by its momentum under every ZeRO stage alike instead of skipping grad=None."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def grad_norm(params: list[torch.nn.Parameter]) -> float:
    """ZeRO-0 only: DeepSpeed 0.19.8's plain data parallel keeps no gradient norm
    (engine.get_global_grad_norm() stays None), so compute it; the gradients are all-reduced by now."""
    return float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params])))


def clear_zero3_grad_partitions(engine) -> None:
    """DeepSpeed 0.19.8 ZeRO-3 bug (stage3.py partition_grads): a gradient partition is overwritten
    only if its parameter takes part in a step's first micro-batch; one first used later (an image
    micro-batch after a text-only one) adds to the previous step's gradient, and one unused all
    step reuses it. Called after each optimizer step; tests/test_train.py checks ZeRO-3 == ZeRO-0."""
    engine.optimizer.grad_partitions_flat_buffer.zero_()


# ---- evaluation during training -----------------------------------------------------------------
# xtuner's EvaluateChatHook, plus a held-out loss: the same pieces as training and eval.py (data.py's
# dataset, collate and prompts, model.generate), not eval.py itself, whose benchmarks and scoring
# training does not need.

@dataclass
class EvalSet:
    """What evaluate() reads: the held-out samples (None: no loss) and the fixed questions."""
    dataset: data.SupervisedDataset | None
    questions: list[dict]               # question_prompt() rows (prompt ids, pixels and what to log)


def make_eval_set(run, m: model.DoctorSun, tokenizer) -> EvalSet | None:
    """--eval-data read exactly as the training data (template, max length, padding, bad samples);
    --eval-questions as generation prompts."""
    if not (run.eval_data or run.eval_questions):
        return None
    ds = make_dataset(replace(run, data=run.eval_data), m, tokenizer, training=False) if run.eval_data else None
    questions = []
    if run.eval_questions:
        qs = make_dataset(replace(run, data=run.eval_questions), m, tokenizer, training=False)
        for f, r in qs.index:  # the records the spec's ratios pick (fixed by --seed)
            src, records, images = qs.files[f]
            questions.append(question_prompt(records[r], f"{src.path}, record {r}", images, run, m, tokenizer))
    return EvalSet(ds, questions)


def question_prompt(rec, where: str, images, run, m: model.DoctorSun, tokenizer) -> dict:
    """A record's first human turn (a text record: its text, to continue) with its image, as the
    prompt eval.py builds for a checkpoint of this run: the stage's template, no system prompt."""
    if not isinstance(rec, dict):
        raise SystemExit(f"--eval-questions {where}: not a record object")
    turns = rec.get("conversations") or []
    role = lambda turn: isinstance(turn, dict) and turn.get("from", turn.get("role"))  # noqa: E731
    question = rec.get("text") or next((u.get("value") for u in turns if role(u) in ("human", "user")), None)
    reference = next((u.get("value") for u in turns if role(u) in ("gpt", "assistant")), "")
    has_image = bool(rec.get("image")) and run.template != "text"
    if not isinstance(question, str) or not (has_image or question.replace(data.IMAGE_TOKEN, "").strip()):
        raise SystemExit(f"--eval-questions {where}: no 'text', human turn or image to ask about")
    pixel_values = None
    if has_image:
        if images is None:
            raise SystemExit(f"--eval-questions {where}: the record has an image; give the file as FILE@IMAGE_ROOT")
        try:
            img = images.open(rec["image"])
        except data.SampleError as e:
            raise SystemExit(f"--eval-questions {where}: {e}") from None
        pixel_values = data.preprocess_image(img, m.config.vision.image_size, STAGES[run.stage]["pad_to_square"])
    question = question.replace(data.IMAGE_TOKEN, "").strip()  # encode_prompt puts the image first
    ids = data.encode_prompt(question, tokenizer, run.template, has_image=has_image,
                             num_image_tokens=m.num_image_tokens, image_token_id=m.image_token_id)
    if data.TEMPLATES[run.template].image_only_input:  # LLaVA's plain template asks with the image alone,
        question, reference = "", ""  # so the record's answer is not what the model is asked for
    return {"id": rec.get("id", where), "question": question,
            "image": rec.get("image") if has_image else None, "reference": reference,
            "input_ids": ids, "pixel_values": pixel_values}


def evaluate(t: Trainer, step: int) -> dict:
    """One evaluation, by every rank: the model in eval mode (no dropout) with no gradients, then
    back in training mode. It draws from no RNG, so training goes on exactly as without it."""
    t0 = time.time()
    t.model.eval()
    try:
        row = {"step": step}
        if t.evals.dataset is not None:
            row.update(eval_loss(t))
        if t.evals.questions:
            row["eval_answers"] = eval_answers(t)
    finally:
        t.model.train()
    row["eval_s"] = round(time.time() - t0, 3)
    return row


def eval_batches(ds: data.SupervisedDataset, micro: int, rank: int, world: int) -> list[tuple[list[int], int]]:
    """This rank's (indices, stand-in index) micro-batches for one pass over `ds`: each modality cut
    into global batches of micro x world samples, the k-th micro-batch of each for rank k. Every rank
    gets as many micro-batches as the others, each of one modality, so under ZeRO-3 all ranks gather
    the same layers in the same order (the ViT only for images); a rank with no samples left in a
    modality's last global batch runs the stand-in with no supervised token."""
    out = []
    for modality in (True, False):
        idx = [i for i, x in enumerate(ds.is_image) if x == modality]
        for s in range(0, len(idx), micro * world):
            g = idx[s:s + micro * world]
            out.append((g[rank * micro:(rank + 1) * micro], g[0]))
    return out


@torch.no_grad()
def eval_loss(t: Trainer) -> dict:
    """The training loss rule over one pass of --eval-data: the summed cross-entropy of every
    supervised token, all ranks together, divided by their count."""
    ds, m, dev = t.evals.dataset, t.model, t.device
    dtype = m.llm.embed_tokens.weight.dtype
    sums, skipped = torch.zeros(2, dtype=torch.float64, device=dev), collections.Counter()
    for mine, stand_in in eval_batches(ds, t.run.micro_batch, t.rank, t.world):
        b = data.collate([ds[i] for i in mine or [stand_in]], pad_id=ds.tokenizer.pad_id)
        if mine:
            skipped.update(b["skipped"])
        else:
            b = unsupervised(b)
        if not len(b["ids"]):  # only bad samples
            continue
        px = b["pixel_values"]
        ls, n = m(b["input_ids"].to(dev), None if px is None else px.to(dev, dtype), b["attention_mask"].to(dev),
                  b["labels"].to(dev))
        sums += torch.tensor([float(ls), float(n)], dtype=torch.float64, device=dev)
    torch.distributed.all_reduce(sums)
    return {"eval_loss": round(sums[0].item() / max(1.0, sums[1].item()), 6),
            "eval_supervised_tokens": int(sums[1].item()), "eval_skipped": gather_counts(skipped, t.world)}


@torch.no_grad()
def eval_answers(t: Trainer) -> list[dict]:
    """Greedy answers to the fixed questions, micro-batch by micro-batch (left-padded), cut at the
    first stop token (data.decode_answer). Every rank answers them all: under ZeRO-3 each decoding
    step gathers weights from every rank, so there all decode the full length (no early stop)."""
    m, dev, tok = t.model, t.device, t.dataset.tokenizer
    dtype = m.llm.embed_tokens.weight.dtype
    stops = data.stop_ids(tok, m.config.llm.eos_token_id)
    qs, out = t.evals.questions, []
    for i in range(0, len(qs), t.run.micro_batch):
        b = data.collate(qs[i:i + t.run.micro_batch], pad_id=tok.pad_id, padding_side="left")
        px = b["pixel_values"]
        new = m.generate(b["input_ids"].to(dev), None if px is None else px.to(dev, dtype),
                         b["attention_mask"].to(dev), t.run.eval_max_new_tokens,
                         stop_token_ids=[] if t.zero3 else stops, pad_token_id=tok.pad_id)
        for q, row in zip(qs[i:i + t.run.micro_batch], new.tolist()):
            out.append({"id": q["id"], "question": q["question"], "image": q["image"], "reference": q["reference"],
                        "answer": data.decode_answer(row, tok, stops)})
    return out


# ---- logging ------------------------------------------------------------------------------------

# metrics.jsonl figure -> TensorBoard tag (--report-to tensorboard)
TB_SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
              "tokens_per_s": "train/tokens_per_s", "mfu": "train/mfu", "eval_loss": "eval/loss"}


class MetricsLog:
    """A stage's record, kept by rank 0 (the other ranks' calls do nothing): metrics.jsonl, one row
    per step and one per evaluation (keyed by step), the rows report() plots, and with
    --report-to tensorboard the same figures as TensorBoard events in <out>/tensorboard."""

    def __init__(self, run: RunConfig, step: int, rank: int):
        self.rank, self.path = rank, Path(run.out) / "metrics.jsonl"
        self.rows = start_metrics(self.path, step, rank)
        self.tb = tensorboard_writer(Path(run.out), step) if rank == 0 and run.report_to == "tensorboard" else None

    def write(self, row: dict) -> None:
        if self.rank != 0:
            return
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, tag in TB_SCALARS.items():
                if row.get(k) is not None:
                    self.tb.add_scalar(tag, row[k], row["step"])
            if row.get("eval_answers"):
                self.tb.add_text("eval/answers", answers_markdown(row["eval_answers"]), row["step"])
            self.tb.flush()  # a killed run keeps what it logged

    def write_eval(self, row: dict) -> None:
        """An evaluation's row, also printed: the loss, then each question and answer."""
        self.write(row)
        if self.rank != 0:
            return
        from tqdm import tqdm

        loss = (f" loss {row['eval_loss']:.4f} over {row['eval_supervised_tokens']:,} supervised tokens"
                if "eval_loss" in row else "")
        lines = [f"eval at step {row['step']}:{loss} ({row['eval_s']:.1f}s)"]
        for a in row.get("eval_answers", []):
            image = f" [{a['image']}]" if a["image"] else ""
            asked = repr(a["question"]) if a["question"] else "(the image alone)"
            ref = f"  (reference {a['reference']!r})" if a["reference"] else ""
            lines.append(f"  {a['id']}{image}: {asked} -> {a['answer']!r}{ref}")
        tqdm.write("\n".join(lines))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def tensorboard_writer(out: Path, step: int):
    """torch's SummaryWriter (it needs the tensorboard package, imported only for this flag)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise SystemExit(f"--report-to tensorboard needs the tensorboard package (pip install tensorboard): {e}")
    # purge_step: TensorBoard drops the events a cut run logged after the checkpoint this run resumes from.
    return SummaryWriter(str(out / "tensorboard"), purge_step=step + 1 if step else None)


def answers_markdown(answers: list[dict]) -> str:
    cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return "\n".join(["| id | question | answer | reference |", "|---|---|---|---|"] +
                     [f"| {cell(a['id'])} | {cell(a['question'])} | {cell(a['answer'])} | {cell(a['reference'])} |"
                      for a in answers])


def report(rows: list[dict], out: Path) -> dict:
    """Loss curve PNG (train, and eval where evaluated) and the numbers for the summary (rank 0)."""
    history = [r for r in rows if "loss" in r]  # the step rows; evaluations have rows of their own
    evals = [r for r in rows if "eval_loss" in r]
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
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1, label="train")
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", ms=3, lw=1, label="eval (held out)")
        ax.legend()
    if min([h["loss"] for h in history] + [e["eval_loss"] for e in evals]) > 0:
        ax.set_yscale("log")  # losses span orders of magnitude; a train/eval gap shows late in a run
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per supervised token)")
    ax.set_title(f"{out.name}: {first:.3f} -> {end:.3f}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
    summary = {f"loss_first_{k}_steps": round(first, 4), f"loss_last_{k}_steps": round(end, 4),
               "s_per_step": round(s_step, 3), "tokens_per_s": round(tok_s, 1), "loss_png": str(out / "loss.png")}
    if evals:
        summary.update(eval_loss_first=evals[0]["eval_loss"], eval_loss_last=evals[-1]["eval_loss"])
    return summary


def main(argv=None) -> dict | None:
    """Resolve the stage chain, then train each stage in turn; returns the last stage's summary."""
    args = parse_args(argv)
    chain = stage_chain(args)
    if args.dry_run:
        dry_run(chain[-1])
        return None
    torch.manual_seed(args.seed)  # once: a stage trained first leaves the RNG as the next one finds it
    rank, world, device = init_distributed()
    for parent, run in zip(chain, chain[1:]):
        if rank == 0:
            print(f"{Path(parent.out) / 'final'} does not exist: the {run.stage} stage starts from the "
                  f"{parent.stage} stage's checkpoint, so `python train.py --stage {parent.stage}` runs first")
    for run in chain:
        summary = train_stage(run, rank, world, device)
    return summary


if __name__ == "__main__":
    errors.run(main)
