"""Tests for train.py: data parallel == one process, ZeRO-3 == ZeRO-0, stage rules, exact
resume, the loss normalisation, the dry run, and the README's `python train.py --stage pretrain`.

Runs go through the real entry points: `python train.py` / `torchrun --nproc_per_node 2 train.py`
as subprocesses (fp32 CPU configs), on tiny HF CLIP/Llama folders saved by transformers (the
`--vision/--llm` path) and a small demo dataset. Tolerances (fp32): losses 1e-5 across launchers
and ZeRO stages (measured ~1e-6: reduction order differs), saved weights 1e-5 (measured <= 3e-7);
resume is bitwise on the same launcher; gradients 1e-6 in the normalisation test.
"""
import collections
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import data
import demo
import llama
import model
import run_folder
import train
from conftest import TINY_LLM, TINY_VISION, cli_error

REPO = Path(__file__).resolve().parent.parent

DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
            "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    # One thread per process: on a shared 2-core runner, two spinning OpenMP threads per process
    # made steps ~10x slower here; on an idle one the tiny models lose little.
    return {"OMP_NUM_THREADS": "1", **env, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(args, nproc=1, cwd=REPO, timeout=600) -> str:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                 "--master_port", str(_port())] if nproc > 1 else [sys.executable])
    p = subprocess.run(launcher + [str(REPO / "train.py")] + [str(a) for a in args], cwd=cwd, env=_env(),
                       capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-5000:]
    return out


def metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Tiny HF CLIP + Llama folders (vocab = the demo tokenizer's 2048) and a small demo dataset."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).save_pretrained(root / "clip")
    LlamaForCausalLM(LlamaConfig(vocab_size=2048, **TINY_LLM)).save_pretrained(root / "llama")
    d = demo.build(root / "demo", n_train_images=24, n_test_images=2)
    return {"clip": root / "clip", "llama": root / "llama", "demo": d, "tok": d / "tokenizer", "root": root}


def common(parts, stage, **kw):
    d = parts["demo"]
    spec = {"text": f"{d}/text.jsonl", "pretrain": f"{d}/pretrain.json@{d}", "finetune": f"{d}/finetune.json@{d}"}
    args = {"--stage": stage, "--tokenizer": parts["tok"], "--data": spec[stage], "--global-batch": 4,
            "--micro-batch": 2, "--max-steps": 3, "--lr": 1e-3, "--max-length": 128, **kw}
    return [str(x) for k, v in args.items() for x in ((k,) if v is True else (k, v))]


# ---- data parallel and ZeRO ---------------------------------------------------------------------

def test_two_processes_zero2_and_zero3_match_one_process(parts, tmp_path):
    """Same global batch (4 = 1 x 2 x 2 accumulation = 2 ranks x 1 x 2): same losses; ZeRO-3's
    gathered save equals ZeRO-0's. Finetune with ViT LoRA over image + text-only records, so a
    text-only step follows an image one and the ViT LoRA is unused for a whole step (DeepSpeed's
    ZeRO-3 bug train.py clears)."""
    base = common(parts, "finetune", **{"--vision": parts["clip"], "--llm": parts["llama"], "--vision-lora": 4,
                                        "--lora-dropout": 0.0, "--seed": 0})
    run_train(base + ["--deepspeed", REPO / "configs/zero0_cpu.json", "--out", tmp_path / "z0"])
    run_train(base + ["--micro-batch", 1, "--deepspeed", REPO / "configs/zero2_cpu.json", "--out", tmp_path / "z2"],
              nproc=2)
    run_train(base + ["--micro-batch", 1, "--deepspeed", REPO / "configs/zero3_cpu.json", "--out", tmp_path / "z3"],
              nproc=2)
    ref = metrics(tmp_path / "z0")
    assert len(ref) == 3 and ref[-1]["loss"] < 20
    for run in ("z2", "z3"):
        got = metrics(tmp_path / run)
        assert [r["supervised_tokens"] for r in got] == [r["supervised_tokens"] for r in ref]
        for a, b in zip(ref, got):
            assert abs(a["loss"] - b["loss"]) <= 1e-5, (run, a, b)
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], (run, a, b)
    w0 = load_file(tmp_path / "z0/final/model.safetensors")
    assert any(".lora_B" in k for k in w0) and any(k.startswith("projector.") for k in w0)
    for run in ("z2", "z3"):
        w = load_file(tmp_path / run / "final/model.safetensors")
        assert w.keys() == w0.keys()
        for k in w0:
            assert w[k].shape == w0[k].shape and w[k].numel() > 0, k
            torch.testing.assert_close(w[k], w0[k], atol=1e-5, rtol=0, msg=f"{run} {k}")
    # A global batch is one modality; an image step followed by a text-only one is what the ZeRO-3
    # fix is about (without it ZeRO-3 reuses the image step's ViT LoRA gradient).
    ds = data.SupervisedDataset(data.parse_data_spec(f"{parts['demo']}/finetune.json@{parts['demo']}"), None,
                                template="llama3", num_image_tokens=16)
    steps = [{ds.is_image[i] for i in b} for b in
             data.LengthGroupedSampler(ds.lengths, ds.is_image, 4, seed=0).global_batches()[:3]]
    assert any(a == {True} and b == {False} for a, b in zip(steps, steps[1:])), steps


# ---- more than one machine ----------------------------------------------------------------------

def run_nodes(args, tmp_path, launcher="torchrun", cwd=(REPO, REPO), ok=True, timeout=600) -> list[str]:
    """Two "machines" on this one: two launcher invocations, node ranks 0 and 1, one process each,
    meeting at 127.0.0.1 as two machines meet at node 0's address. Returns each node's output."""
    port = _port()
    if launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--master_addr", "127.0.0.1", "--master_port", str(port), "--node_rank"]
    else:  # DeepSpeed's launcher: without ssh/pdsh each node starts its own share of the hostfile
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
        head = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
                "--num_nodes", "2", "--num_gpus", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                "--node_rank"]
    logs = [tmp_path / f"node{r}-{port}.log" for r in (0, 1)]
    procs = []
    for r in (0, 1):  # output to files: a full pipe would stall one node and with it the other
        with open(logs[r], "w") as f:
            procs.append(subprocess.Popen(head + [str(r), str(REPO / "train.py")] + [str(a) for a in args],
                                          cwd=cwd[r], env=_env(), stdout=f, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=timeout) for p in procs]
    outs = [f.read_text() for f in logs]
    for code, out in zip(codes, outs):
        assert (code == 0) == ok, out[-5000:]
    return outs


def node_args(parts, config, **kw):
    """Finetune with ViT LoRA, global batch 4, a checkpoint at step 2; seed 0 orders the steps image,
    text-only, image (so the ViT LoRA sits out step 2: the ZeRO-3 case train.py works around)."""
    return common(parts, "finetune", **{"--vision": parts["clip"], "--llm": parts["llama"], "--vision-lora": 4,
                                        "--lora-dropout": 0.0, "--save-every": 2, "--seed": 0,
                                        "--deepspeed": REPO / "configs" / config, **kw})


def assert_same_run(ref, got, tol):
    """Same samples in every step (supervised-token counts), losses and final weights within tol."""
    a, b = metrics(ref), metrics(got)
    assert [r["step"] for r in b] == [r["step"] for r in a] == [1, 2, 3]
    assert [r["supervised_tokens"] for r in b] == [r["supervised_tokens"] for r in a]
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= tol and ra["lr"] == rb["lr"], (ra, rb)
    wa, wb = load_file(Path(ref) / "final/model.safetensors"), load_file(Path(got) / "final/model.safetensors")
    assert wa.keys() == wb.keys() and any(".lora_B" in k for k in wa)
    print(f"{Path(got).name} vs {Path(ref).name}: max |loss diff| per step "
          f"{[abs(ra['loss'] - rb['loss']) for ra, rb in zip(a, b)]}, max |weight diff| "
          f"{max((wa[k] - wb[k]).abs().max().item() for k in wa):.2e}")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=tol, rtol=0, msg=k)


@pytest.fixture(scope="module")
def one_process(parts, tmp_path_factory):
    """The reference: one process, ZeRO-0, global batch 4 = micro-batch 2 x 2 accumulation steps."""
    out = tmp_path_factory.mktemp("one") / "run"
    run_train(node_args(parts, "zero0_cpu.json") + ["--out", out])
    return out


@pytest.mark.parametrize("launcher,config,resume", [("torchrun", "zero3_cpu.json", True),
                                                     ("deepspeed", "zero2_cpu.json", False)])
def test_two_loopback_nodes_match_one_process_and_resume(parts, one_process, tmp_path, launcher, config, resume):
    """Two nodes x 1 process (micro-batch 2, no accumulation) against one process (micro-batch 2 x 2
    accumulation): the same global batch, so the same samples per step, losses and weights (fp32,
    sums in another order: 1e-5). Then the two-node run cut after its step-2 checkpoint resumes as
    two nodes and ends exactly where the uninterrupted two-node run did (ZeRO-3 only, to keep the
    test short: every rank's partition of weights and optimizer state must come back)."""
    nodes = tmp_path / "nodes"
    run_nodes(node_args(parts, config) + ["--out", nodes], tmp_path, launcher)
    assert_same_run(one_process, nodes, tol=1e-5)
    if not resume:
        return
    cut = tmp_path / "cut"
    shutil.copytree(nodes, cut)
    shutil.rmtree(cut / "final")
    outs = run_nodes(node_args(parts, config) + ["--out", cut, "--resume"], tmp_path, launcher)
    assert "continuing from" in outs[0] and "step-000002" in outs[0]
    assert_same_run(nodes, cut, tol=0)


@pytest.mark.parametrize("config,before,after", [("zero0_cpu.json", 1, 2), ("zero2_cpu.json", 1, 2),
                                                 ("zero3_cpu.json", 2, 1)])
def test_resume_on_another_number_of_processes(parts, one_process, tmp_path, config, before, after):
    """A run cut after its step-2 checkpoint continues on another number of processes with the
    same samples, losses and lr, and ends where the uninterrupted run did (fp32, sums in another
    order: 1e-5). ZeRO-0 keeps the whole optimizer state in one file; ZeRO-2/3 partition it (ZeRO-3
    the weights too) per rank and go through DeepSpeed's universal checkpoint."""
    def launch(out, n, extra=()):
        args = node_args(parts, config) + ["--out", out, *extra]
        return run_nodes(args, tmp_path) if n == 2 else [run_train(args)]

    full = one_process
    if config != "zero0_cpu.json":
        full = tmp_path / "full"
        launch(full, before)
        assert_same_run(one_process, full, tol=1e-5)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "final")
    outs = launch(cut, after, ["--resume"])
    assert f"written by {before} processes, now {after}" in outs[0], outs[0][-3000:]
    assert ("through a universal checkpoint" in outs[0]) == (config != "zero0_cpu.json")
    assert not list(cut.glob(".universal-*"))  # the converted copy is removed after loading
    assert_same_run(full, cut, tol=1e-5)


def test_two_nodes_need_a_shared_out_folder(parts, tmp_path):
    """The same relative --out on two nodes with different working folders: two machines whose
    --out is local. Every rank writes into it, so both stop before training, naming the rank."""
    cwd = (tmp_path / "node0", tmp_path / "node1")
    for d in cwd:
        d.mkdir()
    args = common(parts, "text", **{"--vision": parts["clip"], "--llm": parts["llama"], "--out": "run"})
    outs = run_nodes(args, tmp_path, cwd=cwd, ok=False)
    for out in outs:
        assert "--out run is not shared: rank 1 (host" in out and str(cwd[1] / "run") in out, out[-3000:]
    assert not (cwd[0] / "run" / "metrics.jsonl").exists()


# ---- stage rules --------------------------------------------------------------------------------

def _weights(path) -> dict:
    m = model.from_pretrained(path, merge_lora=False)
    return {k: v.clone() for k, v in m.state_dict().items()}


def _changed(before: dict, after: dict) -> set:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.fixture(scope="module")
def chain(parts, tmp_path_factory):
    """text (from the HF folders) -> pretrain -> finetune, 2 steps each, every weight saved."""
    runs = tmp_path_factory.mktemp("chain")
    kw = {"--max-steps": 2, "--save-full": True}
    run_train(common(parts, "text", **{"--vision": parts["clip"], "--llm": parts["llama"], **kw,
                                       "--out": runs / "text"}))
    # Pretrain on 6 captions plus 2 bad records: 2 steps of 4 read all 8; the bad ones are counted.
    d = parts["demo"]
    bad = [{"id": "bad-missing", "image": "images/nope.png",
            "conversations": [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "A scan."}]},
           {"id": "bad-empty", "image": "images/train_00000.png",
            "conversations": [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": ""}]}]
    (runs / "bad.json").write_text(json.dumps(bad))
    run_train(common(parts, "pretrain", **{"--init": runs / "text/final", **kw, "--out": runs / "pretrain",
                                           "--data": f"{d}/pretrain.json:0.15@{d},{runs / 'bad.json'}@{d}"}))
    run_train(common(parts, "finetune", **{"--init": runs / "pretrain/final", "--vision-lora": 4, **kw,
                                           "--out": runs / "finetune"}))
    return runs


def test_stage_rules_exactly_the_intended_parameters_change(parts, chain):
    # The text stage's starting point, rebuilt exactly as train.py builds it (same seed).
    args = train.resolve(train.parse_args(common(parts, "text", **{"--vision": parts["clip"],
                                                                   "--llm": parts["llama"]})))
    m0 = train.build_model(args, train.model_config(args), torch.float32)
    start = {k: v.clone() for k, v in m0.state_dict().items()}
    text, pre = _weights(chain / "text/final"), _weights(chain / "pretrain/final")
    assert _changed(start, text) == {k for k in start if k.startswith("llm.")}
    assert _changed(text, pre) == {k for k in text if k.startswith("projector.")}
    fine = _weights(chain / "finetune/final")
    lora_keys = {k for k in fine if ".lora_" in k}
    assert lora_keys and all(k.startswith("vision.") for k in lora_keys)
    assert fine.keys() - pre.keys() == lora_keys
    # Finetune: the whole LLM and projector and every ViT adapter change; ViT base weights do not.
    assert _changed(pre, fine) == {k for k in pre if k.startswith(("llm.", "projector."))}
    # B starts at zero and trains in the ViT layers that run; the layer after select_layer=-2 never
    # runs, so its adapters (upstream's "all linear layers" has them too) stay zero.
    for k in (k for k in lora_keys if k.endswith("lora_B")):
        assert bool(fine[k].abs().sum() > 0) == k.startswith("vision.encoder.layers.0."), k
    # Bad samples are skipped and counted by reason, in the metrics and the summary.
    assert metrics(chain / "pretrain")[-1]["skipped"] == {"missing_image": 1, "empty_answer": 1}
    cfg = json.loads((chain / "finetune/final/config.json").read_text())
    # A final checkpoint holds every weight and its tokenizer (base {}); the run records where it started.
    assert cfg["stage"] == "finetune" and cfg["base"] == {} and cfg["train"]["init"] == str(chain / "pretrain/final")
    assert cfg["lora"]["vision"]["r"] == 4 and cfg["train"]["lr"] == 1e-3 and cfg["tokenizer"] == "tokenizer"
    assert cfg["train"]["tokenizer"] == str(parts["tok"])


def test_pretrain_template_follows_the_seed_and_every_checkpoint_records_its_policy(parts, chain, tmp_path):
    """Real models pretrain with captions inside the Llama-3 chat template (the seed's xtuner
    ..._sharegpt4v_pretrain config: llama3_chat, SYSTEM "", no padding); the demo keeps LLaVA's plain
    caption template; --template chooses. Each checkpoint records the policy eval and convert use."""
    real = train.resolve(train.parse_args(common(parts, "pretrain", **{"--vision": parts["clip"],
                                                                        "--llm": parts["llama"]})))
    assert real.template == "llama3"
    plain = train.resolve(train.parse_args(common(parts, "pretrain", **{"--vision": parts["clip"], "--llm": parts["llama"],
                                                                         "--template": "caption"})))
    assert plain.template == "caption"
    demo_run = train.resolve(train.parse_args(["--stage", "pretrain", "--runs", str(tmp_path), "--dry-run"]))
    assert demo_run.template == "caption"
    # The chain's pretrain ran from --init of a checkpoint of HF folders: a real model, so llama3.
    expected = {"text": ("text", False), "pretrain": ("llama3", False), "finetune": ("llama3", True)}
    for stage, (template, pad) in expected.items():
        policy, where = data.prompt_policy(chain / stage / "final")
        assert policy == data.PromptPolicy(template, "", pad) and where.startswith("recorded"), (stage, policy)


def test_train_reads_a_meta_native_llm_and_eval_its_tokenizer(parts, tmp_path, capsys):
    """--llm META_DIR (consolidated.00.pth + params.json + tiktoken tokenizer.model, as Meta publishes
    Llama 3): train.py trains from it, the checkpoint records that folder as its tokenizer, and eval.py
    asks the model through it (data.Tokenizer reads the tiktoken file, ids as Meta's own Tokenizer)."""
    import eval as E
    import llama_models.llama3.tokenizer as meta_tokenizer
    from conftest import save_meta_llama

    meta = tmp_path / "Llama3.1-tiny"
    params = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                  ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
    save_meta_llama(meta, params, torch.zeros(1, 3, dtype=torch.long))
    shutil.copy(Path(meta_tokenizer.__file__).parent / "tokenizer.model", meta / "tokenizer.model")
    args = common(parts, "text", **{"--vision": parts["clip"], "--llm": meta, "--tokenizer": meta,
                                    "--max-steps": 1, "--out": tmp_path / "run"})
    run_train(args)
    final = tmp_path / "run" / "final"
    # The final checkpoint carries a copy of the tokenizer it was trained with (it loads on its own).
    assert data.tokenizer_folder(final) == final / "tokenizer"
    assert (final / "tokenizer/tokenizer.model").read_bytes() == (meta / "tokenizer.model").read_bytes()
    text = "患者胸痛3小时，ECG: ST elevation."
    ours = data.load_tokenizer(data.tokenizer_folder(final)).encode(text)
    assert ours == meta_tokenizer.Tokenizer(meta / "tokenizer.model").encode(text, bos=False, eos=False)
    assert E.main(["--model", str(final), "--question", "What is shown?", "--max-new-tokens", "3"]) == 0


def test_stage_table_trainable_sets_and_default_save_keys():
    """Without --save-full a checkpoint holds the trained weights plus parts no base path can
    re-create; frozen parameters have requires_grad=False (no autograd state)."""
    cfg = model.ModelConfig.from_name("tiny")
    for stage, extra, trains in [
        ("text", [], ("llm.",)),
        ("pretrain", [], ("projector.",)),
        ("finetune", [], ("llm.", "projector.", "vision.*lora")),
        ("finetune", ["--llm-lora", "4", "--vision-lora", "0"], ("llm.*lora", "projector.")),
    ]:
        m = model.build(cfg)
        args = train.parse_args(["--stage", stage, "--data", "x.json", *extra])
        args.vision_lora = 64 if args.vision_lora is None and stage == "finetune" else (args.vision_lora or 0)
        train.apply_stage(m, args)
        names = {n for n, p in m.named_parameters() if p.requires_grad}

        def match(n, pat):
            head, _, tail = pat.partition("*")
            return n.startswith(head) and tail in n

        assert names == {n for n, _ in m.named_parameters() if any(match(n, t) for t in trains)}, stage
        with_parent = train.weights_to_save(m, {"init": "parent", "vision": None, "llm": None}, full=False)
        assert with_parent == names
        # From scratch (no parent, no HF folders): everything, since nothing else can rebuild it.
        assert train.weights_to_save(m, {"init": None}, full=False) == {n for n, _ in m.named_parameters()}
        from_hf = train.weights_to_save(m, {"init": None, "vision": "clip", "llm": "llama"}, full=False)
        assert from_hf == names | {n for n, _ in m.named_parameters() if n.startswith("projector.")}


# ---- resume -------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", ["zero0_cpu.json", "zero3_cpu.json"])
def test_resume_matches_uninterrupted_and_skips_cut_checkpoints(parts, chain, tmp_path, config):
    """Finetune with LoRA dropout (so the RNG state matters) and accumulation 2 (so the data offset
    counts micro-batches). The run is cut after step 2: its later outputs are removed, a step-3
    checkpoint is truncated mid-file and a temp dir is left behind, as a kill would leave them.
    ZeRO-0 is the CPU default; ZeRO-3 restores partitioned fp32 weights and optimizer states."""
    args = common(parts, "finetune", **{"--init": chain / "pretrain/final", "--vision-lora": 4, "--max-steps": 4,
                                        "--save-every": 2, "--lora-dropout": 0.3,
                                        "--deepspeed": REPO / "configs" / config})
    full = tmp_path / "full"
    run_train(args + ["--out", full])
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "final")
    shutil.copytree(cut / "step-000002", cut / "step-000003")
    st = json.loads((cut / "step-000003/trainer_state.json").read_text())
    (cut / "step-000003/trainer_state.json").write_text(json.dumps({**st, "step": 3}))
    f = cut / "step-000003/model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # killed mid-write
    shutil.copytree(cut / "step-000002", cut / ".tmp-step-000004")
    assert run_folder.verify(cut / "step-000003") and run_folder.verify(cut / "step-000002") is None
    out = run_train(args + ["--out", cut, "--resume"])
    assert "skipping" in out and "step-000003" in out
    assert "continuing from" in out and "step-000002" in out
    a, b = metrics(full), metrics(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["lr"] == rb["lr"] and ra["supervised_tokens"] == rb["supervised_tokens"]
    wa, wb = load_file(full / "final/model.safetensors"), load_file(cut / "final/model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ---- a run owns its --out; checkpoints you can trust and move -------------------------------------

def run_fails(args, **kw) -> str:
    p = subprocess.run([sys.executable, str(REPO / "train.py")] + [str(a) for a in args], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=600, **kw)
    said = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(said) == 1 and "Traceback" not in p.stderr, (p.returncode, p.stderr[-3000:])
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def owned(parts, tmp_path_factory):
    """A finished 3-step text run (step-2 checkpoint kept) from private copies of the HF folders."""
    root = tmp_path_factory.mktemp("owned")
    for part in ("clip", "llama"):
        shutil.copytree(parts[part], root / part)
    args = common(parts, "text", **{"--vision": root / "clip", "--llm": root / "llama", "--save-every": 2})
    run_train(args + ["--out", root / "run"])
    return {"root": root, "args": args, "run": root / "run"}


def test_a_used_out_is_refused_unless_resume_or_overwrite(owned, tmp_path):
    """Before: a second run in a finished run's --out had its new checkpoints rotated away by the old
    names and a later --resume continued the old run's final. Now: refused, or moved aside."""
    out = tmp_path / "run"
    shutil.copytree(owned["run"], out)
    before = sorted(p.name for p in out.iterdir())
    msg = run_fails(owned["args"] + ["--out", out, "--lr", 1e-2])
    assert f"--out {out} already holds a run" in msg and "--resume" in msg and "--overwrite" in msg
    assert sorted(p.name for p in out.iterdir()) == before  # nothing touched
    run_train(owned["args"] + ["--out", out, "--lr", 1e-2, "--overwrite"])
    aside = list(tmp_path.glob("run.old-*"))
    assert len(aside) == 1 and (aside[0] / "final/model.safetensors").is_file()
    assert metrics(aside[0]) == metrics(owned["run"])  # the old run, whole
    new = json.loads((out / "final/config.json").read_text())["train"]
    assert new["lr"] == 1e-2 and [r["step"] for r in metrics(out)] == [1, 2, 3]


def test_two_runs_cannot_share_an_out(owned, tmp_path):
    """A run holds an flock on <out>/.lock while it runs; a second one is refused, naming the holder.
    The lock dies with its process (kill -9 included), so it never blocks a later --resume."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242 on testhost since 2026-12-02T05:00:00\n")
        held.flush()
        msg = run_fails(owned["args"] + ["--out", out])
    assert f"--out {out} is in use by a running training (pid 4242 on testhost" in msg
    run_train(owned["args"] + ["--out", out])  # released: it runs


def test_resume_refuses_changed_settings_naming_each(owned, tmp_path):
    """Before: --resume with another --lr/--max-length/--data was accepted, the new lr ignored but
    recorded. Now each difference is named; --max-steps (allowed) extends the run."""
    out = tmp_path / "run"
    shutil.copytree(owned["run"], out)
    msg = run_fails(owned["args"] + ["--out", out, "--resume", "--lr", 1e-2, "--max-length", 96])
    assert "was written with other settings" in msg
    assert "--lr: 0.001 -> 0.01" in msg and "--max-length: 128 -> 96" in msg
    run_train(owned["args"] + ["--out", out, "--resume", "--max-steps", 4])
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]


def _pickle_bomb(marker: Path) -> bytes:
    import pickle

    class Bomb:
        def __reduce__(self):
            return (Path.write_text, (marker, "unpickled"))
    return pickle.dumps(Bomb())


def test_resume_verifies_hashes_and_falls_back_never_unpickling_unverified(owned, tmp_path):
    """Before: a same-size damaged newest checkpoint failed deep in torch.load (or loaded), a pickle
    placed in a checkpoint was unpickled, and a cut last metrics line broke every later --resume.
    Now the newest checkpoint that verifies is used, each skipped one named with its reason."""
    out = tmp_path / "run"
    shutil.copytree(owned["run"], out)
    marker = tmp_path / "pwned"
    # final: one byte flipped in DeepSpeed's state, same size
    f = out / "final/deepspeed/mp_rank_00_model_states.pt"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))
    # step-2: a pickle payload added where DeepSpeed globs its partition files
    (out / "step-000002/deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(_pickle_bomb(marker))
    msg = run_fails(owned["args"] + ["--out", out, "--resume"])  # nothing verifies: ...
    assert f"skipping {out / 'final'}: deepspeed/mp_rank_00_model_states.pt is damaged or was changed" in msg
    assert f"skipping {out / 'step-000002'}: files not written by the run" in msg
    assert f"no checkpoint in {out} verifies" in msg and "--overwrite" in msg
    assert not marker.exists()
    # ... with the payload gone, step-2 verifies and the run continues from it, bitwise.
    (out / "step-000002/deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with open(out / "metrics.jsonl", "a") as m:
        m.write('{"step": 4, "loss": 1.2')  # a kill mid-line
    got = run_train(owned["args"] + ["--out", out, "--resume"])
    assert "continuing from" in got and "step-000002" in got and "cut short; dropped" in got
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(owned["run"])]
    assert not marker.exists()


def test_final_loads_on_its_own_and_a_step_checkpoint_refuses_a_changed_base(owned, tmp_path):
    """Before: every checkpoint re-read frozen weights from its parent by absolute path, unverified
    (re-training the parent changed what it loaded; moving runs/ broke it; a tensor missing from
    the child came from the parent). Now final holds every weight and its tokenizer; a step
    checkpoint records its base folders' sha256 and names a changed file or a missing tensor."""
    ref = model.from_pretrained(owned["run"] / "final")
    moved = tmp_path / "elsewhere"
    shutil.copytree(owned["run"] / "final", moved)
    hidden = {p: tmp_path / p.name for p in (owned["run"], owned["root"] / "clip", owned["root"] / "llama")}
    for a, b in hidden.items():  # as if deleted: the run, and the HF folders it started from
        os.replace(a, b)
    try:
        m = model.from_pretrained(moved)
        for k, v in ref.state_dict().items():
            assert torch.equal(m.state_dict()[k], v), k
        assert data.tokenizer_folder(moved) == moved / "tokenizer" and data.load_tokenizer(moved / "tokenizer")
        with pytest.raises(checkpoint.CheckpointError, match="which no longer exists"):
            model.from_pretrained(tmp_path / "run/step-000002")
    finally:
        for a, b in hidden.items():
            os.replace(b, a)
    # The base changes under a step checkpoint: one weight of the CLIP folder re-trained.
    step = owned["run"] / "step-000002"
    clip_dir = owned["root"] / "clip"
    saved = (clip_dir / "model.safetensors").read_bytes()
    try:
        w = load_file(clip_dir / "model.safetensors")
        k = next(iter(w))
        w[k] = w[k] + 1
        save_file(w, clip_dir / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(checkpoint.CheckpointError, match="model.safetensors there changed"):
            model.from_pretrained(step)
        r2 = tmp_path / "r2"
        shutil.copytree(owned["run"], r2)
        msg = run_fails(owned["args"] + ["--out", r2, "--resume"])  # the frozen ViT would differ
        assert "the frozen weights this run starts from" in msg and "changed since" in msg
    finally:
        (clip_dir / "model.safetensors").write_bytes(saved)
    model.from_pretrained(step)  # the same bytes again: loads
    # A trained tensor gone from the step checkpoint's file is an error naming it, not the base's copy.
    cut = tmp_path / "cut"
    shutil.copytree(step, cut)
    w = load_file(cut / "model.safetensors")
    gone = next(k for k in w if k.startswith("llm.layers.0."))
    del w[gone]
    save_file(w, cut / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(checkpoint.CheckpointError, match=f"lack: \\['{gone}'\\]"):
        model.from_pretrained(cut)


def test_a_diverged_run_stops_before_saving_non_finite_weights(owned, tmp_path):
    """Before: --lr 1e30 gave NaN at step 2, wrote `NaN` (not JSON) into metrics.jsonl and saved a
    final checkpoint of 149,664 NaN weights. Now it stops at step 2, naming the newest checkpoint."""
    out = tmp_path / "run"
    msg = cli_error("train.py", *owned["args"], "--out", out, "--lr", 1e30, "--warmup-ratio", 0)
    assert msg.startswith("error: step 2: loss nan") and "training diverged" in msg
    assert "no checkpoint was written yet" in msg  # --save-every 2: step 2's was not written
    assert not (out / "final").exists() and not list(out.glob("step-*"))
    assert [r["step"] for r in metrics(out)] == [1]


def test_disk_full_during_save_is_one_clear_error(owned, tmp_path):
    """Before: `basic_ios::clear: iostream error` from deep inside torch.save. Now: the folder, the
    rank and the free space; the half-written folder is removed and earlier checkpoints stay."""
    import resource
    import signal

    def small_disk():  # writes past 64 KiB fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    out = tmp_path / "run"
    msg = run_fails(owned["args"] + ["--out", out], preexec_fn=small_disk)
    assert f"writing checkpoint {out / '.tmp-step-000002'} failed on rank 0" in msg and "MiB free" in msg
    assert not (out / ".tmp-step-000002").exists()


# ---- loss normalisation -------------------------------------------------------------------------

@pytest.fixture
def dist_in_process():
    saved = {k: os.environ.get(k) for k in DIST_ENV + ("DS_ACCELERATOR",)}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_selective_recompute_under_zero3_that_releases_every_weight(dist_in_process, monkeypatch):
    """DeepSpeed's ZeRO-3 with every weight released after its module's forward (persistence threshold,
    live parameters and reuse distance 0) hands each module's output on as a detached alias and
    gathers a module's weights again only for its own backward. The norm outputs and silu(gate) * up
    are still rebuilt from recipes (counted), and three SGD steps give the same losses as with
    selective_recompute off."""
    import deepspeed

    train.init_distributed()
    rebuilt = []
    get = llama.Recipe.get
    monkeypatch.setattr(llama.Recipe, "get", lambda self: rebuilt.append(1) or get(self))
    conf = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 10 ** 9,
            "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                  "stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0,
                                  "stage3_prefetch_bucket_size": 0}}
    ids = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(1))
    losses = {}
    for selective in (True, False):
        torch.manual_seed(0)
        m = llama.Llama(llama.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
        m.selective_recompute = selective
        engine, *_ = deepspeed.initialize(model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), config=conf)
        rebuilt.clear()
        losses[selective] = []
        for _ in range(3):
            loss = engine(ids).float().logsumexp(-1).mean()
            engine.backward(loss)
            engine.step()
            losses[selective].append(loss.item())
        # per step and layer: q, k, v and gate, up read the norm outputs, down_proj silu(gate) * up
        assert len(rebuilt) == (3 * 2 * 6 if selective else 0)
    assert losses[True] == losses[False]


def test_loss_is_normalised_by_the_global_supervised_token_count(dist_in_process):
    """Two micro-batches with 2 and 30 supervised tokens (accumulation 2) give the gradient of one
    batch holding both: sum of token losses / 32. SGD(lr=1) turns the update into the gradient."""
    import deepspeed

    rank, world, device = train.init_distributed()
    cfg = model.ModelConfig(vision=model.clip.ClipConfig(image_size=32, patch_size=8, hidden_size=32,
                                                         num_hidden_layers=2, num_attention_heads=2,
                                                         intermediate_size=64),
                            llm=model.llama.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=4, num_key_value_heads=2,
                                                        intermediate_size=64))
    g = torch.Generator().manual_seed(0)
    ids_a, ids_b = torch.randint(1, 64, (20,), generator=g), torch.randint(1, 64, (40,), generator=g)
    lab_a, lab_b = torch.full((20,), -100), ids_b.clone()
    lab_a[-2:], lab_b[:10] = ids_a[-2:], -100
    a = {"id": "a", "input_ids": ids_a, "labels": lab_a, "pixel_values": None}
    b = {"id": "b", "input_ids": ids_b, "labels": lab_b, "pixel_values": None}
    assert int((lab_a[1:] != -100).sum()) == 2 and int((lab_b[1:] != -100).sum()) == 30

    def grads_via_train_step(batches, micro, gas):
        m = model.build(cfg, seed=0)
        m.requires_grad_(False)
        m.llm.requires_grad_(True)
        before = {n: p.detach().clone() for n, p in m.llm.named_parameters()}
        conf = {"train_batch_size": micro * gas, "train_micro_batch_size_per_gpu": micro,
                "gradient_accumulation_steps": gas, "gradient_clipping": 0.0, "zero_optimization": {"stage": 0},
                "steps_per_print": 10 ** 9}
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0)
        engine, *_ = deepspeed.initialize(model=m, optimizer=opt, config=conf)
        r = train.train_step(engine, [data.collate(x, pad_id=0) for x in batches], world, device)
        return {n: before[n] - p.detach() for n, p in m.llm.named_parameters()}, r

    def reference(mean_of_means=False):
        m = model.build(cfg, seed=0)
        if mean_of_means:  # the bug this test guards against: per-micro-batch means averaged
            la, na = m(*_args(data.collate([a], 0)))
            lb, nb = m(*_args(data.collate([b], 0)))
            ((la / na + lb / nb) / 2).backward()
        else:
            ls, n = m(*_args(data.collate([a, b], 0)))
            (ls / n).backward()
        return {n: p.grad for n, p in m.llm.named_parameters()}

    ref = reference()
    split, r2 = grads_via_train_step([[a], [b]], micro=1, gas=2)
    joint, r1 = grads_via_train_step([[a, b]], micro=2, gas=1)
    assert r1["supervised_tokens"] == r2["supervised_tokens"] == 32
    # fp32 sums in another order: a few ulps of a loss near 4.5 (measured 1.1e-6), not an absolute 1e-6
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-6, abs=0)
    wrong = reference(mean_of_means=True)
    for n in ref:
        torch.testing.assert_close(split[n], ref[n], atol=1e-6, rtol=1e-5, msg=n)
        torch.testing.assert_close(joint[n], ref[n], atol=1e-6, rtol=1e-5, msg=n)
    # The check can fail: the mean of per-micro-batch means is far from it.
    assert max((wrong[n] - ref[n]).abs().max().item() for n in ref) > 1e-2


def _args(batch):
    return batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["labels"]


# ---- schedule, dry run --------------------------------------------------------------------------

def test_lr_schedule_warmup_then_cosine():
    total = 100  # warmup = ceil(3% of 100) = 3 steps from 1e-5 x lr
    f = [train.lr_factor(s, total, 0.03) for s in range(total)]
    assert f[0] == pytest.approx(1e-5) and f[3] == pytest.approx(1.0)
    assert f[1] == pytest.approx(1e-5 + (1 - 1e-5) / 3)
    assert all(x >= y for x, y in zip(f[3:], f[4:])) and f[-1] < 1e-3
    assert f[3 + 97 // 2] == pytest.approx(0.5, abs=0.02)


def test_dry_run_real_preset_on_meta(parts, capsys, tmp_path):
    train.main(["--stage", "finetune", "--model-preset", "doctor-sun", "--runs", str(tmp_path),
                "--deepspeed", str(REPO / "configs/zero3.json"),
                "--data", f"{parts['demo']}/finetune.json@{parts['demo']}", "--gradient-checkpointing", "--dry-run"])
    out = capsys.readouterr().out
    # Llama-3.1-8B: 8,030,261,248 parameters; CLIP ViT-L/14-336 303,507,456 + LoRA r=64 on 6 linears
    # x 24 layers = 28,311,552; projector 1024*4096+4096 + 4096*4096+4096 = 20,979,712.
    assert "8,030,261,248" in out and "28,311,552" in out and "20,979,712" in out
    assert "331,819,008" in out  # 303,507,456 + 28,311,552
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit() and len(line.split()) == 7]
    assert len(rows) == 12  # devices x ZeRO 0/2/3
    total = {(int(r[0]), int(r[1])): float(r[6]) for r in rows}
    assert total[8, 3] < total[8, 2] < total[8, 0] and total[1, 0] > 100  # full 8B finetune on 1 GPU: no
    assert "tokens per step" in out


@pytest.mark.parametrize("runs", ["empty", "after a chain"])
def test_dry_run_needs_no_data(request, runs, capsys, tmp_path):
    """The README's `train.py --stage finetune --model-preset doctor-sun --dry-run`: sizes and memory
    without a dataset, also where a previous chain (the quickstart's) left runs/pretrain/final, which
    must not stand in for the preset. Activations per layer and token in fp32 (the default config on a
    CPU): 4 x 4096 + 2 x 1024 + 2 x 14336 values (llama.py's selective recomputation) x 4 bytes x 4096
    tokens x 32 layers = 23.0 GiB, plus the ViT's and one logits chunk's, about 1 GiB."""
    folder = request.getfixturevalue("chain") if runs != "empty" else tmp_path
    assert (runs == "empty") != (folder / "pretrain/final").is_dir()
    train.main(["--stage", "finetune", "--model-preset", "doctor-sun", "--runs", str(folder), "--dry-run"])
    out = capsys.readouterr().out
    assert "data: none given" in out and "8,030,261,248" in out  # Llama-3.1-8B's parameters
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit() and len(line.split()) == 7]
    assert len(rows) == 12
    activations = {float(r[5]) for r in rows}
    assert len(activations) == 1 and 23.0 < activations.pop() < 24.5, rows


def test_bad_configs_are_refused(parts, tmp_path):
    bad = tmp_path / "fp16.json"
    bad.write_text(json.dumps({"fp16": {"enabled": True}, "zero_optimization": {"stage": 0}}))
    args = train.resolve(train.parse_args(common(parts, "text", **{"--deepspeed": bad})))
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="fp16 does not work on CPU"):
            train.ds_config(args, 1)
    conflict = tmp_path / "conflict.json"
    conflict.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    args = train.resolve(train.parse_args(common(parts, "text", **{"--deepspeed": conflict})))
    with pytest.raises(SystemExit, match="train_micro_batch_size_per_gpu=8 conflicts"):
        train.ds_config(args, 1)
    with pytest.raises(SystemExit, match="does not exist: run `--stage pretrain` first"):
        train.resolve(train.parse_args(["--stage", "finetune", "--model-preset", "doctor-sun", "--runs", str(tmp_path),
                                        "--data", "x.json"]))
    with pytest.raises(SystemExit, match="not a multiple"):
        train.ds_config(train.resolve(train.parse_args(common(parts, "text", **{"--global-batch": 6}))), 4)


# ---- bad data -----------------------------------------------------------------------------------

def bad_pretrain_data(parts, folder: Path) -> str:
    """6 good captions; 3 corrupt images in a row, a missing one and a 100000 x 8 PNG of a few KB; and a
    text-only record whose human turn holds <image> (the only text-only record: before, a whole
    text-only step of bad samples, which stopped the run)."""
    d = parts["demo"]
    good = json.loads((d / "pretrain.json").read_text())[:6]
    (folder / "images").mkdir(parents=True)
    for rec in good:
        shutil.copy(d / rec["image"], folder / rec["image"])
    for k in range(3):
        (folder / f"images/corrupt{k}.png").write_bytes(bytes(range(200)))
    from PIL import Image
    Image.new("1", (100_000, 8)).save(folder / "images/wide.png")
    caption = good[0]["conversations"]
    bad = [{"id": n, "image": f"images/{n}.png", "conversations": caption}
           for n in ("corrupt0", "corrupt1", "corrupt2", "nope", "wide")]
    bad.append({"id": "no-image", "conversations": caption})
    (folder / "d.json").write_text(json.dumps(good + bad))
    return f"{folder / 'd.json'}@{folder}"


def test_bad_samples_are_replaced_logged_and_processes_agree(parts, tmp_path):
    """Every bad sample is replaced by a good one of its modality, chosen from (seed, index, attempt):
    each step trains on a full global batch, the same on 1 process (2 x 2 accumulation) as on 2
    (1 x 2 each), and each bad sample is listed in skipped.jsonl by id, file, record and reason. A run
    resumed from step 2 ends with the same list and counts."""
    spec = bad_pretrain_data(parts, tmp_path / "data")
    args = common(parts, "pretrain", **{"--vision": parts["clip"], "--llm": parts["llama"], "--data": spec,
                                        "--max-steps": 4, "--seed": 0, "--save-every": 2})
    out = run_train(args + ["--out", tmp_path / "one"])
    run_train(args + ["--micro-batch", 1, "--out", tmp_path / "two"], nproc=2)
    shutil.copytree(tmp_path / "one", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut/final")
    assert "continuing from" in run_train(args + ["--out", tmp_path / "cut", "--resume"])
    assert [r["skipped"] for r in metrics(tmp_path / "cut")] == [r["skipped"] for r in metrics(tmp_path / "one")]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(a) == 4 and [r["supervised_tokens"] for r in a] == [r["supervised_tokens"] for r in b]
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 and ra["skipped"] == rb["skipped"], (ra, rb)
    log = (tmp_path / "one/skipped.jsonl").read_text()
    assert log == (tmp_path / "two/skipped.jsonl").read_text() == (tmp_path / "cut/skipped.jsonl").read_text()
    rows = [json.loads(line) for line in log.splitlines()]
    file = str(tmp_path / "data/d.json")
    assert rows[0] == {"step": 0, "id": "no-image", "file": file, "record": 11, "reason": "token_without_image",
                       "detail": "<image> in the text but the record has no image"}
    reasons = {"corrupt0": "corrupt_image", "corrupt1": "corrupt_image", "corrupt2": "corrupt_image",
               "nope": "missing_image", "wide": "image_too_large"}
    read = rows[1:]
    assert {r["id"] for r in read} == set(reasons)  # 4 steps x 4 samples read every image record
    for r in read:
        assert r["step"] >= 1 and r["file"] == file and r["record"] == 6 + list(reasons).index(r["id"])
        assert r["reason"] == reasons[r["id"]] and r["replaced_by"].startswith("cap_train_"), r
    counts = collections.Counter(r["reason"] for r in rows)
    assert a[-1]["skipped"] == dict(counts)
    assert f'"skipped": {json.dumps(a[-1]["skipped"])}' in out and "bad sample id='no-image'" in out


def run_train_fails(args) -> str:
    p = subprocess.run([sys.executable, str(REPO / "train.py")] + [str(a) for a in args], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode != 0, (p.stdout + p.stderr)[-3000:]
    return p.stdout + p.stderr


def test_max_bad_fraction_stops_the_run_and_is_checked_at_parse_time(parts, tmp_path, capsys):
    """Beyond --max-bad-fraction the run stops with a message naming the counts and the log: of the
    records loaded (before the first step), or of the samples read (over at least BAD_MIN_SAMPLES)."""
    spec = bad_pretrain_data(parts, tmp_path / "data")
    args = common(parts, "pretrain", **{"--vision": parts["clip"], "--llm": parts["llama"], "--data": spec,
                                        "--max-steps": 4, "--seed": 0})
    out = run_train_fails(args + ["--max-bad-fraction", 0, "--out", tmp_path / "zero"])
    assert "1 of the 12 records of --data" in out and "more than --max-bad-fraction 0.0" in out
    assert not (tmp_path / "zero/metrics.jsonl").read_text()  # stopped before the first step
    out = run_train_fails(args + ["--max-bad-fraction", 0.002, "--out", tmp_path / "small"])
    stop = re.search(r"stopping at step (\d): (\d+) of the (\d+) samples read were bad", out)
    assert stop and int(stop[2]) > 2 and "more than --max-bad-fraction 0.002" in out, out[-3000:]
    assert len(metrics(tmp_path / "small")) == int(stop[1])  # the step that crossed it was logged, then the stop
    rows = (tmp_path / "small/skipped.jsonl").read_text().splitlines()
    assert len(rows) == 1 + int(stop[2])  # the record dropped at load, and each bad one read
    assert train.parse_args(common(parts, "text", **{"--max-bad-fraction": 0.5})).max_bad_fraction == 0.5
    for value in ("1.5", "-0.1", "nan", "ten"):
        with pytest.raises(SystemExit):
            train.parse_args(common(parts, "text", **{"--max-bad-fraction": value}))
        assert "--max-bad-fraction" in capsys.readouterr().err
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.parse_args(common(parts, "text", **{"--max-bad-fraction": "1.5"}))
    assert "--max-bad-fraction: must be in [0, 1], got 1.5" in capsys.readouterr().err

def test_unreadable_deepspeed_json_is_named(parts, tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": ')
    args = train.resolve(train.parse_args(common(parts, "text", **{"--deepspeed": bad})))
    with pytest.raises(SystemExit) as e:
        train.ds_config(args, 1)
    assert str(e.value).startswith(f"--deepspeed {bad}: not valid JSON")


SPEC_FORM = "(file[:ratio][@image_root])"


@pytest.mark.parametrize("flag, value, message", [
    ("--micro-batch", "0", "must be >= 1, got 0"),  # was a ZeroDivisionError after startup
    ("--global-batch", "-4", "must be >= 1, got -4"),
    ("--max-length", "0", "must be >= 1, got 0"),
    ("--keep", "0", "must be >= 1, got 0"),  # deleted every checkpoint right after writing it
    ("--save-every", "-1", "must be >= 0, got -1"),
    ("--lr", "0", "must be > 0, got 0"),
    ("--lr", "nan", "'nan' is not a finite number"),
    ("--warmup-ratio", "1.5", "must be in [0, 1], got 1.5"),
    ("--data", "a.json:0", "data spec 'a.json:0': ratio must be > 0 and finite " + SPEC_FORM),
    ("--eval-data", "a.json,b.json:0", "data spec 'b.json:0': ratio must be > 0 and finite " + SPEC_FORM),
])
def test_flags_are_checked_when_parsed(flag, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--stage", "text", flag, value])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: argument {flag}: {message}\n"


def test_cli_user_errors_are_one_line(parts, tmp_path):
    """Through the real entry point: a flag refused when parsed, a contradiction refused when the run is
    resolved (SystemExit with a message), and a data file with no record (was a ZeroDivisionError)."""
    assert "argument --micro-batch: must be >= 1, got 0" in cli_error("train.py", *common(parts, "text", **{
        "--micro-batch": 0}))
    line = cli_error("train.py", *common(parts, "text", **{"--init": tmp_path, "--vision": parts["clip"]}))
    assert line == "error: --init already holds the whole model: do not combine it with --vision/--llm"
    (tmp_path / "empty.jsonl").write_text("")
    line = cli_error("train.py", *common(parts, "text", **{"--vision": parts["clip"], "--llm": parts["llama"],
                                                           "--data": tmp_path / "empty.jsonl",
                                                           "--out": tmp_path / "out"}), timeout=300)
    assert line == f"error: --data {tmp_path / 'empty.jsonl'}: no records to train on"


# ---- evaluation during training, TensorBoard ----------------------------------------------------

def _eval_spec(parts) -> str:
    """Held-out test records (images) plus 11 finetune records, one of them text-only: both modalities."""
    d = parts["demo"]
    return f"{d}/test.json@{d},{d}/finetune.json:0.15@{d}"


@pytest.fixture(scope="module")
def eval_runs(parts, tmp_path_factory):
    """Finetune from the HF folders for 3 steps with ViT LoRA dropout: with --eval-data/--eval-questions
    every 2 steps and --report-to tensorboard, and without (the same run otherwise)."""
    runs = tmp_path_factory.mktemp("evalruns")
    d = parts["demo"]
    base = common(parts, "finetune", **{"--vision": parts["clip"], "--llm": parts["llama"], "--vision-lora": 4})
    hook = ["--eval-data", _eval_spec(parts), "--eval-questions", f"{d}/test.json@{d}", "--eval-every", 2,
            "--eval-max-new-tokens", 12]
    out = run_train(base + hook + ["--report-to", "tensorboard", "--out", runs / "eval"])
    run_train(base + ["--out", runs / "plain"])
    return runs, base, hook, out


def _start_model(parts, base) -> model.DoctorSun:
    """The model train.py starts the run from, rebuilt as it builds it (seeded); LoRA's B starts at zero."""
    run = train.resolve(train.parse_args(base))
    return train.build_model(run, train.model_config(run), torch.float32).eval()


def _loss_per_sample(m, spec, tok) -> tuple[float, int]:
    """The eval loss recomputed one sample at a time with model.forward (no padding, no batching)."""
    ds = data.SupervisedDataset(data.parse_data_spec(spec), tok, template="llama3", num_image_tokens=m.num_image_tokens,
                                image_token_id=m.image_token_id, max_length=128,
                                image_size=m.config.vision.image_size, pad_to_square=True,
                                seed=1024)  # the run's --seed picks the ratio's subset
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            ls, n = m(*_args(data.collate([ds[i]], pad_id=tok.pad_id)))
            total, count = total + float(ls), count + n
    return total / count, count


def _eval_py_answers(m, parts, tok, max_new_tokens) -> dict:
    """eval.py's greedy answers to the test records' questions (its prompts, batching and cut)."""
    import eval as E

    d = parts["demo"]
    exs = [E.Example(id=r["id"], question=r["question"], gold=r["answer"], image=str(d / r["image"]),
                     prompt=r["question"]) for r in json.loads((d / "test.json").read_text())]
    answers, skipped, _ = E.generate_answers(m, tok, exs, template="llama3", system="", pad_to_square=True,
                                             max_new_tokens=max_new_tokens, num_workers=0, progress=False)
    assert not skipped
    return answers


def test_eval_hook_loss_answers_and_plot(parts, eval_runs):
    """--eval-data/--eval-every: rows at steps 0, 2 and 3 (before, every 2, after the last). Each
    figure is recomputed here: the eval loss with model.forward one sample at a time from the model
    the run started from (step 0) and from the saved checkpoint (step 3), fp32, relative 1e-5; the
    supervised token counts exactly; the answers equal eval.py's for the same model. Training is
    bitwise the same as without the hook (evaluation draws from no RNG; LoRA dropout does)."""
    runs, base, hook, out = eval_runs
    rows = metrics(runs / "eval")
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    tok = data.load_tokenizer(parts["tok"])
    n_questions = len(json.loads((parts["demo"] / "test.json").read_text()))
    final = model.from_pretrained(runs / "eval/final").eval()
    for row, m in ((evals[0], _start_model(parts, base)), (evals[-1], final)):
        loss, count = _loss_per_sample(m, _eval_spec(parts), tok)
        print(f"step {row['step']}: eval loss {row['eval_loss']:.6f} in training, {loss:.6f} recomputed "
              f"({count} supervised tokens)")
        assert row["eval_supervised_tokens"] == count and row["eval_skipped"] == {}
        assert row["eval_loss"] == pytest.approx(loss, rel=1e-5, abs=0)
        got = {a["id"]: a["answer"] for a in row["eval_answers"]}
        assert len(got) == n_questions and all(a["question"] and a["reference"] for a in row["eval_answers"])
        assert got == _eval_py_answers(m, parts, tok, max_new_tokens=12)
    assert any(a["answer"] for a in evals[0]["eval_answers"])  # a random model still says something
    assert evals[0]["eval_loss"] > evals[-1]["eval_loss"]
    assert "eval at step 2: loss" in out
    assert "test_00000_presence [images/test_00000.png]: 'Is there a lesion in this image?' ->" in out
    summary = json.loads(next(line for line in out.splitlines() if line.startswith("summary: "))[len("summary: "):])
    assert summary["eval_loss_first"] == evals[0]["eval_loss"] and summary["eval_loss_last"] == evals[-1]["eval_loss"]
    assert (runs / "eval/loss.png").stat().st_size > 0
    # The hook leaves training alone.
    plain = metrics(runs / "plain")
    assert [(r["loss"], r["grad_norm"]) for r in plain] == [(r["loss"], r["grad_norm"]) for r in rows if "loss" in r]
    wa, wb = load_file(runs / "eval/final/model.safetensors"), load_file(runs / "plain/final/model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_report_to_tensorboard_reads_back_as_metrics_jsonl(eval_runs):
    """TensorBoard's own reader (EventAccumulator) finds every figure of metrics.jsonl under its tag,
    at its step (float32 in the event file: relative 1e-6), and the answers as a text summary."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = eval_runs[0]
    rows = metrics(runs / "eval")
    acc = EventAccumulator(str(runs / "eval/tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    want = {tag: [(r["step"], r[k]) for r in rows if r.get(k) is not None] for k, tag in train.TB_SCALARS.items()}
    want = {tag: v for tag, v in want.items() if v}
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss"} <= want.keys()
    assert set(acc.Tags()["scalars"]) == want.keys()
    for tag, expected in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in expected], tag
        for (_, a), (_, b) in zip(got, expected):
            assert a == pytest.approx(b, rel=1e-6), tag
    text = acc.Tensors("eval/answers/text_summary")
    assert [e.step for e in text] == [0, 2, 3]
    last = text[-1].tensor_proto.string_val[0].decode()
    for a in rows[-1]["eval_answers"]:
        assert f"| {a['id']} | {a['question']} |" in last


def test_eval_hook_two_processes_zero3_match_one_process(parts, eval_runs, tmp_path):
    """2 ranks x micro-batch 1 under ZeRO-3: the eval set is split over the ranks (a text-only
    record alone in its global batch leaves one rank a stand-in), the loss summed over both; the
    answers decoded by both ranks with partitioned weights. Before the first step both runs hold
    the same model, so the step-0 rows agree (fp32, relative 1e-5: another summation order)."""
    runs, base, hook, _ = eval_runs
    run_train(base + hook + ["--micro-batch", 1, "--deepspeed", REPO / "configs/zero3_cpu.json",
                             "--out", tmp_path / "z3"], nproc=2)
    one, two = (next(r for r in metrics(f) if "eval_loss" in r) for f in (runs / "eval", tmp_path / "z3"))
    print(f"step 0 eval loss: 1 process {one['eval_loss']}, 2 processes ZeRO-3 {two['eval_loss']}")
    assert two["eval_supervised_tokens"] == one["eval_supervised_tokens"]
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5, abs=0)
    assert two["eval_answers"] == one["eval_answers"]
    assert [r["step"] for r in metrics(tmp_path / "z3") if "eval_loss" in r] == [0, 2, 3]


# ---- the README command -------------------------------------------------------------------------

@pytest.mark.slow  # ~3 minutes: trains the demo's text and pretrain stages
def test_default_pretrain_command_builds_the_chain_and_learns(tmp_path):
    """`python train.py --stage pretrain`, exactly as a user types it, in an empty folder: the demo
    LLM does not exist yet, so the text stage runs first; both losses fall."""
    out = run_train(["--stage", "pretrain"], cwd=tmp_path, timeout=900)
    assert "runs/text/final does not exist" in out
    for stage in ("text", "pretrain"):
        hist = [h for h in metrics(tmp_path / "runs" / stage) if "loss" in h]  # step rows, not the demo's eval rows
        k = max(1, len(hist) // 10)
        first = sum(h["loss"] for h in hist[:k]) / k
        last = sum(h["loss"] for h in hist[-k:]) / k
        print(f"{stage}: {len(hist)} steps, loss {first:.3f} -> {last:.3f}, "
              f"{sum(h['step_s'] for h in hist[1:]) / max(1, len(hist) - 1):.3f} s/step")
        # Relative: a caption's loss can fall only by what the image tells about it (~25% on the
        # demo captions); a broken projector update leaves it flat.
        assert last < 0.85 * first, (stage, first, last)
        assert (tmp_path / "runs" / stage / "loss.png").stat().st_size > 0
    summaries = [json.loads(line[len("summary: "):]) for line in out.splitlines() if line.startswith("summary: ")]
    assert [s["stage"] for s in summaries] == ["text", "pretrain"]
    cfg = json.loads((tmp_path / "runs/pretrain/final/config.json").read_text())
    assert cfg["train"]["init"] == str(tmp_path / "runs/text/final") and cfg["base"] == {}
    saved = load_file(tmp_path / "runs/pretrain/final/model.safetensors")
    m = model.from_pretrained(tmp_path / "runs/pretrain/final")  # a final holds every weight
    assert set(saved) == set(m.state_dict()) and any(k.startswith("projector.") for k in saved)
    assert torch.equal(m.projector[0].weight, saved["projector.0.weight"])
