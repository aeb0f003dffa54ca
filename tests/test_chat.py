"""Tests for chat.py: a conversation driven through stdin against eval.py and a from-scratch generate.

- The first answer equals eval.ask's and `eval.py --question`'s output (same prompt policy, same decoding).
- A later turn equals model.generate over the whole multi-turn prompt, which the test builds from the
  training renderer (data.encode_conversation), so the cache reuse is exact and the layout is training's.
- Cache reuse is visible: a forward pre-hook on the first decoder layer records how many tokens each
  LLM call processes, and a hook on the vision tower counts image encodings.
- /save writes a record data.py reads and encodes; the image it names opens from its image_root.

The model is tiny and random (weights scaled so greedy choices are decisive) with the demo tokenizer.
"""
import contextlib
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import chat
import data
import eval as E
import model
from conftest import cli_error, tiny_checkpoint

N_NEW = 10  # answer length: long enough to differ between prompts, short enough for CPU
EN, ZH = "Is there a lesion in this image?", "病灶在哪里？"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random checkpoint in our format with the demo tokenizer; two PNGs, one also in a zip."""
    root = tmp_path_factory.mktemp("chat")
    ckpt, demo_dir = tiny_checkpoint(root)
    rng = np.random.default_rng(0)
    pngs = []
    for k, shape in enumerate([(40, 48, 3), (64, 32, 3)]):
        pngs.append(root / f"scan{k}.png")
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(pngs[-1])
    with zipfile.ZipFile(root / "scans.zip", "w") as z:
        z.write(pngs[1], "ct/scan1.png")
    m = model.from_pretrained(ckpt)
    tok = data.load_tokenizer(data.tokenizer_folder(ckpt))
    policy, _ = data.prompt_policy(ckpt)
    return {"root": root, "ckpt": ckpt, "model": m, "tok": tok, "policy": policy, "pngs": pngs,
            "zip_member": f"{root / 'scans.zip'}:ct/scan1.png", "demo": demo_dir}


@contextlib.contextmanager
def counting(m):
    """{"llm": [tokens per LLM call], "vision": number of image batches encoded}."""
    seen = {"llm": [], "vision": 0}

    def on_llm(mod, args):
        seen["llm"].append(args[0].shape[1])  # x (B, T, D) entering the first decoder layer

    def on_vision(mod, args):
        seen["vision"] += 1

    hooks = [m.llm.layers[0].register_forward_pre_hook(on_llm), m.vision.register_forward_pre_hook(on_vision)]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def new_chat(tiny, **kw):
    return chat.Chat(tiny["model"], tiny["tok"], tiny["policy"], max_new_tokens=N_NEW, **kw)


def training_layout(tok, question: str) -> tuple[list[int], list[int]]:
    """(end of an answer, a later human turn + answer header) as training tokenises a two-turn record:
    the unsupervised run between the two supervised answers of data.encode_conversation."""
    conv = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
            {"from": "human", "value": question}, {"from": "gpt", "value": "a"}]
    ids, labels = data.encode_conversation(conv, tok, "llama3")
    sup = [k for k, label in enumerate(labels) if label != -100]
    end1 = next(k for k in range(sup[0], len(ids)) if labels[k] == -100)  # the first answer's run ends
    start2 = next(k for k in range(end1, len(ids)) if labels[k] != -100)
    return ids[sup[0] + len(tok.encode("a")):end1], ids[end1:start2]


def test_second_turn_reuses_the_cache_exactly(tiny):
    m, tok = tiny["model"], tiny["tok"]
    c = new_chat(tiny)
    c.set_image(str(tiny["pngs"][0]))
    with counting(m) as turn1:
        a1 = c.ask(EN)
    held = list(c.session.ids)  # the caches after turn 1
    with counting(m) as turn2:
        a2 = c.ask(ZH)
    # Turn 1 is eval.py's question.
    assert a1 == E.ask(m, tok, EN, str(tiny["pngs"][0]), max_new_tokens=N_NEW, stream=False, system="")
    # Turn 2 equals a from-scratch generate over the two-turn prompt laid out as training lays it out.
    p1 = data.encode_prompt(EN, tok, "llama3", has_image=True, num_image_tokens=m.num_image_tokens,
                            image_token_id=m.image_token_id)
    stops = data.stop_ids(tok, m.config.llm.eos_token_id)
    pix = c.pixel_values
    out1 = m.generate(torch.tensor([p1]), pix, max_new_tokens=N_NEW, stop_token_ids=stops)[0].tolist()
    end, user2 = training_layout(tok, ZH)
    body1 = out1[:-1] if out1[-1] in stops else out1
    full2 = p1 + body1 + end + user2
    out2 = m.generate(torch.tensor([full2]), pix, max_new_tokens=N_NEW, stop_token_ids=stops)[0].tolist()
    assert a2 == data.decode_answer(out2, tok, stops)
    assert c.session.ids[:len(full2)] == full2  # the cache holds exactly that prompt
    assert len(set(out2) - set(out1)) > 0 and a1 != a2  # the answers differ: the comparison means something
    # Reuse: turn 1 encodes the image and prefills its prompt; turn 2 prefills only its new tokens.
    assert turn1["vision"] == 1 and turn1["llm"][0] == len(p1) and set(turn1["llm"][1:]) == {1}
    assert turn2["vision"] == 0
    assert turn2["llm"][0] == len(full2) - len(held) == len(full2) - len(p1) - (len(out1) - 1)
    unfed = 0 if out1[-1] in stops else 1  # an answer cut by max_new_tokens: its last token was never fed
    assert turn2["llm"][0] == unfed + len(end) + len(user2) and set(turn2["llm"][1:]) == {1}
    print(f"\nturn 1 prefilled {turn1['llm'][0]} tokens (image {m.num_image_tokens}); turn 2 prefilled "
          f"{turn2['llm'][0]} of its {len(full2)}")


def test_without_reuse_same_answers_more_work(tiny):
    a, b = new_chat(tiny), new_chat(tiny, reuse_cache=False)
    for c in (a, b):
        c.set_image(str(tiny["pngs"][0]))
    with counting(tiny["model"]) as reuse:
        answers_a = [a.ask(q) for q in (EN, ZH, "What modality is this?")]
    with counting(tiny["model"]) as again:
        answers_b = [b.ask(q) for q in (EN, ZH, "What modality is this?")]
    assert answers_a == answers_b
    assert (reuse["vision"], again["vision"]) == (1, 3)
    assert sum(again["llm"]) > sum(reuse["llm"]) + 2 * tiny["model"].num_image_tokens


def test_stdin_conversation_image_change_and_save(tiny, tmp_path):
    """Through converse() with text streams: Chinese and English, an image change to a zip member,
    /save, a bad image and a misplaced <image> (messages; the chat goes on)."""
    m, tok = tiny["model"], tiny["tok"]
    saved = tmp_path / "chats.jsonl"
    lines = [EN, ZH, f"/image {tiny['zip_member']}", ZH, EN, "/image missing.png", "<image> again?",
             f"/save {saved}", "/unknown"]
    out, err = io.StringIO(), io.StringIO()
    c = new_chat(tiny)
    c.set_image(str(tiny["pngs"][0]))
    with counting(m) as seen:
        chat.converse(c, io.StringIO("\n".join(lines) + "\n"), out, err)
    assert seen["vision"] == 2  # one encoding per image for four questions
    assert [q for q, _ in c.turns] == [ZH, EN]  # /image started a new conversation; the bad line asked nothing
    assert c.image == tiny["zip_member"]  # the missing image left the zip member attached
    first_of_b = E.ask(m, tok, ZH, str(tiny["pngs"][1]), max_new_tokens=N_NEW, stream=False, system="")
    assert c.turns[0][1] == first_of_b  # the zip member is the same picture as scan1.png
    assert out.getvalue().count("\n") >= 4
    messages = err.getvalue()
    assert "missing.png does not exist" in messages and "the image goes first" in messages
    assert "unknown command /unknown" in messages and f"to {saved}" in messages
    # The record is training data: data.py reads and encodes it, its image opens from its root.
    [rec] = data.read_records(saved)
    assert rec["image"] == "ct/scan1.png" and rec["conversations"][0]["value"] == "<image>\n" + ZH
    assert [t["value"] for t in rec["conversations"][1::2]] == [a for _, a in c.turns]
    ids, labels = data.encode_conversation(rec["conversations"], tok, "llama3",
                                           num_image_tokens=m.num_image_tokens, image_token_id=m.image_token_id)
    assert ids.count(m.image_token_id) == m.num_image_tokens and any(label != -100 for label in labels)
    img = data.ImageSource(rec["image_root"]).open(rec["image"])
    assert np.array_equal(np.asarray(img), np.asarray(data.load_image(tiny["pngs"][1])))


def test_cli_through_a_pipe_first_answer_is_eval_py(tiny, tmp_path, capsys):
    """chat.py as a process with stdin a pipe (not a terminal); its first answer is eval.py's output."""
    flags = ["--model", str(tiny["ckpt"]), "--image", str(tiny["pngs"][0]), "--max-new-tokens", str(N_NEW)]
    saved = tmp_path / "s.jsonl"
    stdin = f"{EN}\n{ZH}\n/image {tiny['zip_member']}\n{EN}\n/save {saved}\n"
    r = subprocess.run([sys.executable, "chat.py", *flags, "--stats"], input=stdin, capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert E.main([*flags, "--question", EN]) == 0
    assert r.stdout.startswith(capsys.readouterr().out)
    assert r.stderr.count("[prefilled") == 3 and "[image" in r.stderr
    assert len(data.read_records(saved)[0]["conversations"]) == 2
    # The seed's sampling flags mean the same in both CLIs: here a repetition penalty, greedy.
    flags += ["--repetition-penalty", "1.8"]
    r = subprocess.run([sys.executable, "chat.py", *flags], input=f"{EN}\n", capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert E.main([*flags, "--question", EN]) == 0
    assert r.returncode == 0 and r.stdout == capsys.readouterr().out


def test_cli_user_errors_are_one_line(tiny, tmp_path):
    """A wrong --model path or flag value: exit 2 and one `error:` line naming it, not a traceback."""
    line = cli_error("chat.py", "--model", tmp_path / "nowhere")
    assert f"no config.json in {tmp_path / 'nowhere'}" in line
    line = cli_error("chat.py", "--model", tiny["ckpt"], "--max-new-tokens", "0")
    assert "argument --max-new-tokens: must be >= 1, got 0" in line
    assert "argument --top-p: must be in [0, 1], got 1.5" in cli_error("chat.py", "--model", tiny["ckpt"],
                                                                        "--top-p", "1.5")


def test_sampling_and_repetition_penalty_first_answer_is_eval_ask(tiny):
    kw = dict(do_sample=True, temperature=1.3, top_k=50, top_p=0.9, repetition_penalty=1.5)
    c = new_chat(tiny, seed=3, **kw)
    c.set_image(str(tiny["pngs"][0]))
    got = c.ask(EN)
    gen = torch.Generator().manual_seed(3)
    assert got == E.ask(tiny["model"], tiny["tok"], EN, str(tiny["pngs"][0]), max_new_tokens=N_NEW,
                        stream=False, system="", generator=gen, **kw)
    greedy = new_chat(tiny, repetition_penalty=1.5)
    greedy.set_image(str(tiny["pngs"][0]))
    assert greedy.ask(EN) == E.ask(tiny["model"], tiny["tok"], EN, str(tiny["pngs"][0]), max_new_tokens=N_NEW,
                                   stream=False, system="", repetition_penalty=1.5)


def test_full_context_is_a_message(tiny, monkeypatch):
    c = new_chat(tiny)
    monkeypatch.setattr(tiny["model"].config.llm, "max_position_embeddings", 40)
    err = io.StringIO()
    chat.converse(c, [EN, EN, EN], io.StringIO(), err)
    assert "the model's context is 40: start a new conversation" in err.getvalue()
    assert len(c.turns) == 1


def test_latency_per_turn_with_and_without_reuse(tiny):
    """The demo-sized model (model.build("tiny")) with the demo tokenizer: 5 turns of 32 new tokens,
    with and without cache reuse. Prints the best of 2 runs per turn (the CPU is shared); asserts only
    that both give the same answers and that reuse prefills less."""
    m = model.build("tiny")
    tok = data.load_tokenizer(tiny["demo"] / "tokenizer")
    qs = [EN, ZH, "What modality is this?", "这是什么检查？", "Where is the lesion?"]
    answers, prefilled = {}, {}
    for reuse in (True, False):
        best = {"first_token_seconds": [float("inf")] * len(qs), "seconds": [float("inf")] * len(qs)}
        for _ in range(2):
            c = chat.Chat(m, tok, data.PromptPolicy(), max_new_tokens=32, reuse_cache=reuse)
            c.stops = []  # always 32 tokens: the turns compare like for like
            c.set_image(str(tiny["pngs"][0]))
            prefilled[reuse] = []
            for k, q in enumerate(qs):
                c.ask(q)
                prefilled[reuse].append(c.last_stats["prefilled"])
                for key in best:
                    best[key][k] = min(best[key][k], c.last_stats[key])
            answers[reuse] = [a for _, a in c.turns]
        print(f"\nreuse={reuse}: prefilled {prefilled[reuse]} tokens; first token after "
              + " ".join(f"{s * 1000:.1f}" for s in best["first_token_seconds"]) + " ms; whole turn "
              + " ".join(f"{s * 1000:.0f}" for s in best["seconds"]) + " ms")
    assert answers[True] == answers[False]
    assert sum(prefilled[True]) < sum(prefilled[False])


@pytest.mark.parametrize("layout", ["llava-hf", "llava"])
def test_exported_folders_chat_like_our_checkpoint(tiny, tmp_path, layout):
    """chat.py takes a transformers LLaVA or an original LLaVA folder too: the export carries the
    prompt policy, so the same model gives the same two turns in either container."""
    import convert

    out = tmp_path / layout
    convert.main(["--to", layout, str(tiny["ckpt"]), str(out), "--dtype", "float32"])
    answers = []
    for folder in (tiny["ckpt"], out):
        stdout = io.StringIO()
        assert chat.main(["--model", str(folder), "--image", str(tiny["pngs"][0]), "--max-new-tokens", str(N_NEW)],
                         stdin=io.StringIO(f"{EN}\n{ZH}\n"), stdout=stdout, stderr=io.StringIO()) == 0
        answers.append(stdout.getvalue())
    assert answers[0] == answers[1] and answers[0].count("\n") >= 2, answers
