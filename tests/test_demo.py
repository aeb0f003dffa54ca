"""Tests for demo.py: the embedded demo dataset is complete, deterministic, held out, balanced
(a model that ignores the image cannot score), written atomically, and its tokenizer loads in
`tokenizers` and transformers with the Llama-3 special tokens as single ids."""
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import demo
from conftest import cli_error

SMALL = dict(n_train_images=120, n_test_images=60)


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def load(root: Path):
    pre = json.loads((root / "pretrain.json").read_text(encoding="utf-8"))
    ft = json.loads((root / "finetune.json").read_text(encoding="utf-8"))
    test = json.loads((root / "test.json").read_text(encoding="utf-8"))
    text = [json.loads(line) for line in (root / "text.jsonl").read_text(encoding="utf-8").splitlines()]
    return pre, ft, test, text


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return demo.build(tmp_path_factory.mktemp("a") / "demo_data", **SMALL)


def strip_prefix(q: str) -> str:
    for p in demo.YES_NO_PREFIX.values():
        q = q.removeprefix(p)
    return q


# ---- files and formats -------------------------------------------------------------------------

def test_files_exist_and_parse(built):
    for name in ("pretrain.json", "finetune.json", "test.json", "text.jsonl", "README.md", demo.MARKER,
                 "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json"):
        assert (built / name).is_file(), name
    pre, ft, test, text = load(built)
    assert len(pre) == SMALL["n_train_images"] + len(list((built / "images").glob("*.dcm")))
    assert len(test) == 2 * SMALL["n_test_images"] and len(text) > SMALL["n_train_images"]
    assert all(set(t) == {"id", "text"} and t["text"] for t in text)
    for recs in (pre, ft, test):
        ids = [r["id"] for r in recs]
        assert len(set(map(repr, ids))) == len(ids), "duplicate ids"
        for r in recs:
            conv = r["conversations"]
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2) and conv, r["id"]
            assert all(t["value"].strip() for t in conv[1::2]), r["id"]  # no empty answer
            n_image = sum(t["value"].count("<image>") for t in conv)
            if "image" in r:
                assert n_image == 1 and conv[0]["value"].startswith("<image>\n"), r["id"]
                path = built / r["image"]
                assert path.is_file(), r["image"]
                if path.suffix == ".png":
                    with Image.open(path) as im:
                        assert im.mode in ("L", "RGB") and min(im.size) >= 64, r["image"]
            else:
                assert n_image == 0, r["id"]
    assert {type(r["id"]) for r in ft} == {int, str}  # text-only records have int ids
    assert any("image" not in r for r in ft) and all("image" in r for r in pre + test)
    assert max(len(r["conversations"]) for r in ft) >= 6  # multi-turn
    for r in test:
        assert r["conversations"][0]["value"] == "<image>\n" + r["question"]
        assert r["conversations"][1]["value"] == r["answer"]
        assert r["lang"] in ("en", "zh") and r["answer_type"] in ("CLOSED", "OPEN")
        closed = r["answer"] in ("yes", "no", "是", "否")
        assert closed == (r["answer_type"] == "CLOSED"), r["id"]
        if r["answer_type"] == "OPEN":
            assert 1 <= len(r["answer"].split()) <= 3
    # both languages in every file
    zh = lambda s: any("\u4e00" <= c <= "\u9fff" for c in s)
    for values in ([r["conversations"][1]["value"] for r in pre], [t["text"] for t in text], [r["question"] for r in test]):
        n_zh = sum(map(zh, values))
        assert 0.4 < n_zh / len(values) < 0.6


def test_deterministic_and_seeded(built, tmp_path):
    again = demo.build(tmp_path / "b", **SMALL)
    assert tree_hashes(again) == tree_hashes(built)  # every file byte-identical, images included
    other = tree_hashes(demo.build(tmp_path / "c", seed=1, n_train_images=8, n_test_images=4))
    ours = tree_hashes(built)
    assert other["test.json"] != ours["test.json"] and other["images/test_00000.png"] != ours["images/test_00000.png"]
    # the tokenizer depends on the vocabulary only: checkpoints keep their token ids across rebuilds
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert other[f"tokenizer/{name}"] == ours[f"tokenizer/{name}"]


def test_test_split_is_held_out(built):
    pre, ft, test, _ = load(built)
    train = {r["image"] for r in pre + ft if "image" in r}
    held = {r["image"] for r in test}
    assert held and not held & train
    digest = lambda p: hashlib.sha256((built / p).read_bytes()).hexdigest()
    assert not {digest(p) for p in held} & {digest(p) for p in train}  # no copy under another name


# ---- honesty: answers balanced, so ignoring the image gives ~50% ---------------------------------

def test_test_split_balanced(built):
    _, _, test, _ = load(built)
    closed = [r for r in test if r["answer_type"] == "CLOSED"]
    assert Counter(r["lang"] for r in test) == {"en": SMALL["n_test_images"], "zh": SMALL["n_test_images"]}
    for lang in ("en", "zh"):
        answers = Counter(r["answer"] for r in closed if r["lang"] == lang)
        yes, no = demo.YES_NO[lang]
        assert set(answers) == {yes, no} and abs(answers[yes] - answers[no]) <= 1, (lang, answers)
        for qtype in demo.CLOSED:  # and per question type
            a = Counter(r["answer"] for r in closed if r["lang"] == lang and r["question_type"] == qtype)
            assert abs(a[yes] - a[no]) <= 2, (lang, qtype, a)
    assert {r["question_type"] for r in test} == set(demo.QUESTIONS)


def test_finetune_balanced_per_wording(built):
    _, ft, _, _ = load(built)
    by_question = {}
    for r in ft:
        if "image" not in r:
            continue
        for q, a in zip(r["conversations"][0::2], r["conversations"][1::2]):
            q = strip_prefix(q["value"].removeprefix("<image>\n"))
            if a["value"] in ("yes", "no", "是", "否"):
                by_question.setdefault(q, Counter())[a["value"] in ("yes", "是")] += 1
    for lang in ("en", "zh"):
        for q in demo.QUESTIONS["presence"][lang]:  # fixed wordings: yes and no alternate exactly
            assert abs(by_question[q][True] - by_question[q][False]) <= 1, (q, by_question[q])
        total = sum((c for q, c in by_question.items() if q.isascii() == (lang == "en")), Counter())
        assert abs(total[True] / (total[True] + total[False]) - 0.5) < 0.06, (lang, total)


def test_text_checks_not_predictable_from_their_place(built):
    """text.jsonl lines are a caption then questions: the k-th yes/no check of a line must not give its
    answer away (a fresh Balancer per line once made every first check "yes")."""
    by_place = {}
    for line in (built / "text.jsonl").read_text(encoding="utf-8").splitlines():
        answers = [a for a in re.findall(r"(?:Answer: |答：)(.+)", json.loads(line)["text"]) if a in ("yes", "no", "是", "否")]
        for k, a in enumerate(answers):
            by_place.setdefault(k, Counter())[a in ("yes", "是")] += 1
    assert by_place, "no yes/no checks in text.jsonl"
    for k, c in by_place.items():
        if sum(c.values()) >= 50:
            assert abs(c[True] / sum(c.values()) - 0.5) < 0.1, (k, c)


def test_blind_baseline_scores_chance(built):
    """The best image-blind rule learnable from the training data (majority answer per question
    text) is near 50% on the test split: the questions carry no answer."""
    _, ft, test, _ = load(built)
    prior = {}
    for r in ft:
        for q, a in zip(r["conversations"][0::2], r["conversations"][1::2]):
            prior.setdefault(strip_prefix(q["value"].removeprefix("<image>\n")), Counter())[a["value"]] += 1
    closed = [r for r in test if r["answer_type"] == "CLOSED"]
    guess = lambda r: prior[r["question"]].most_common(1)[0][0] if r["question"] in prior else demo.YES_NO[r["lang"]][0]
    acc = np.mean([guess(r) == r["answer"] for r in closed])
    assert acc <= 0.62, acc


def test_lesion_stays_in_its_quadrant():
    rng = np.random.default_rng(0)
    for loc, (_, _, sx, sy) in demo.LOCATIONS.items():
        for _ in range(50):
            m = demo._lesion_mask(rng, loc, (96, 96)) > 0
            ys, xs = np.nonzero(m)
            assert 250 < m.sum() < 700  # radius 10-13.5 px
            assert (np.sign(xs + 0.5 - 48) == sx).all() and (np.sign(ys + 0.5 - 48) == sy).all(), loc


def test_render_modes_and_sizes():
    rng = np.random.default_rng(0)
    for mod in demo.MODALITIES:
        for lesion in (None, "upper_left"):
            im = demo.render(demo.Scan(mod, lesion, bright=False), rng)
            assert im.size == (96, 96) and im.mode == ("RGB" if mod == "us" else "L")
            assert 20 < np.asarray(im).std() < 120  # not blank, not saturated noise


# ---- build mechanics ------------------------------------------------------------------------------

def test_build_is_idempotent_and_rebuilds_on_change(tmp_path):
    root = demo.build(tmp_path / "d", n_train_images=4, n_test_images=4)
    marker = root / demo.MARKER
    stamp = marker.stat().st_mtime_ns
    assert demo.build(root, n_train_images=4, n_test_images=4) == root
    assert marker.stat().st_mtime_ns == stamp  # nothing rewritten
    demo.build(root, n_train_images=6, n_test_images=4)
    assert json.loads(marker.read_text())["n_train_images"] == 6
    assert len(list((root / "images").glob("train_*.png"))) == 6  # old files replaced, not mixed
    assert not list(tmp_path.glob(".d.*"))  # no temporary folders left
    with pytest.raises(ValueError, match="at least 2"):
        demo.build(tmp_path / "e", n_train_images=0)


def test_killed_build_leaves_nothing_half_written(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt  # a kill in the middle of writing
    monkeypatch.setattr(demo, "train_tokenizer", boom)
    with pytest.raises(KeyboardInterrupt):
        demo.build(tmp_path / "d", n_train_images=4, n_test_images=4)
    assert not (tmp_path / "d").exists() and not list(tmp_path.iterdir())
    monkeypatch.undo()
    root = demo.build(tmp_path / "d", n_train_images=4, n_test_images=4)
    before = tree_hashes(root)
    monkeypatch.setattr(demo, "train_tokenizer", boom)
    with pytest.raises(KeyboardInterrupt):
        demo.build(root, n_train_images=6, n_test_images=4)
    assert tree_hashes(root) == before  # the previous complete demo is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a demo dataset"):
        demo.build(tmp_path / "mine", n_train_images=4, n_test_images=4, force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_cli_refusals_are_one_line(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert "not a demo dataset" in cli_error("demo.py", "--root", tmp_path / "mine", "--force")
    line = cli_error("demo.py", "--root", tmp_path / "d", "--n-train", "1")
    assert line == "error: argument --n-train: must be >= 2, got 1"


def test_ensure(tmp_path, monkeypatch, capsys):
    real_build = demo.build
    monkeypatch.setattr(demo, "build", lambda root, **kw: real_build(root, **{**dict(n_train_images=4, n_test_images=4), **kw}))
    root = tmp_path / "demo_data"
    assert demo.ensure(root) == root and (root / "test.json").is_file()
    assert demo.ensure(root) == root
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "built" in out[0] and "using" in out[1] and str(root) in out[1]
    # written by another version of demo.py: rebuilt, with the sizes it had
    marker = json.loads((root / demo.MARKER).read_text())
    (root / demo.MARKER).write_text(json.dumps({**marker, "generator": "older", "n_train_images": 5}))
    demo.ensure(root)
    assert "built" in capsys.readouterr().out
    assert json.loads((root / demo.MARKER).read_text()) == {**marker, "n_train_images": 5}
    assert oct((root).stat().st_mode & 0o777) == "0o755"


# ---- tokenizer ------------------------------------------------------------------------------------

ROUND_TRIP = ["腹部CT，左上区域可见一处亮斑。", "病灶位于左上区域吗？是", "Is there a lesion in this image? no",
              "患者男，45岁，咳嗽三天（未见发热）；CT示：右下肺结节 ✓ 🙂", "naïve  spaces\n\n\ttabs <image>\n",
              "CT scan of the abdomen with a dark lesion in the lower right region."]


def test_tokenizer_vocab_specials_round_trip(built):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(built / "tokenizer" / "tokenizer.json"))
    assert tok.get_vocab_size() == demo.VOCAB_SIZE == 2048
    ids = [tok.token_to_id(t) for t in demo.SPECIAL_TOKENS]
    assert None not in ids and ids == list(range(ids[0], ids[0] + len(ids)))  # Llama-3 order, contiguous
    for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert tok.encode(t, add_special_tokens=False).ids == [tok.token_to_id(t)], t
    assert max(tok.get_vocab().values()) == 2047
    for s in ROUND_TRIP:
        assert tok.decode(tok.encode(s, add_special_tokens=False).ids, skip_special_tokens=False) == s
    assert tok.encode("hi").ids[0] == tok.token_to_id("<|begin_of_text|>")  # bos added, as Llama-3
    # demo words are compact: one token per Chinese character, whole English words
    assert len(tok.encode("左上", add_special_tokens=False).ids) == 2
    assert tok.encode(" lesion", add_special_tokens=False).tokens == ["Ġlesion"]
    template = "<|start_header_id|>user<|end_header_id|>\n\n"
    assert len(tok.encode(template, add_special_tokens=False).ids) == 4  # user and \n\n are single tokens


def test_tokenizer_loads_in_transformers(built):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = built / "tokenizer"
    for cls in (AutoTokenizer, PreTrainedTokenizerFast):
        tok = cls.from_pretrained(folder)
        assert len(tok) == 2048 and tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|eot_id|>"
        assert tok.convert_tokens_to_ids("<|eot_id|>") == tok.eos_token_id
        for s in ROUND_TRIP:
            assert tok.decode(tok.encode(s, add_special_tokens=False)) == s
    text = tok.apply_chat_template([{"role": "user", "content": "<image>\n图像中有病灶吗？"},
                                    {"role": "assistant", "content": "是"}], tokenize=False)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\n图像中有病灶吗？<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n是<|eot_id|>")  # Llama-3 chat layout, <image> first


def test_train_tokenizer_on_a_tiny_corpus(tmp_path):
    from tokenizers import Tokenizer

    demo.train_tokenizer(["CT 左上", "MRI 右下"], str(tmp_path / "tok"))  # str path accepted
    tok = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert tok.get_vocab_size() == 2048 and tok.token_to_id("<|reserved_special_token_3|>") is not None
    assert tok.decode(tok.encode(ROUND_TRIP[3], add_special_tokens=False).ids) == ROUND_TRIP[3]


# ---- DICOM ------------------------------------------------------------------------------------------

def test_dicom_files(built):
    pydicom = pytest.importorskip("pydicom")
    files = sorted((built / "images").glob("*.dcm"))
    assert len(files) == 2 * (1 + demo.N_DICOM_VARIANTS)
    pre, ft, test, _ = load(built)
    used = {r.get("image") for r in pre + ft}
    assert {f"images/{f.name}" for f in files} <= used and not any(r["image"].endswith(".dcm") for r in test)
    for modality, original in (("ct", "CT_small.dcm"), ("mri", "MR_small.dcm")):
        base = pydicom.dcmread(built / "images" / f"dicom_{modality}.dcm")
        assert base.Modality == {"ct": "CT", "mri": "MR"}[modality]
        assert (built / "images" / f"dicom_{modality}.dcm").read_bytes() == \
            Path(pydicom.data.get_testdata_file(original, download=False)).read_bytes()
        for k in range(demo.N_DICOM_VARIANTS):
            ds = pydicom.dcmread(built / "images" / f"dicom_{modality}_{k}.dcm")
            a = ds.pixel_array
            assert a.shape == base.pixel_array.shape and ds.SOPInstanceUID != base.SOPInstanceUID
            # pixels much brighter than the original (or its mirror image): the synthetic lesion, if any
            b = base.pixel_array.astype(int)
            changed = min(((a.astype(int) - o) > 200).sum() for o in (b, b[:, ::-1]))
            assert changed > 100 if k % 2 == 0 else changed == 0, (modality, k, changed)
