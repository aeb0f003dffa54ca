"""Tests for eval.py: scoring rules on hand-computed cases, every loader on a tiny fixture of its
format, batched == one-by-one generation, an end-to-end run, rescoring and the one-question mode.

Models are tiny and random (weights scaled up so greedy decoding is decisive); the tokenizer is the
embedded demo's, built into tmp_path with few images.
"""
import csv
import json
import math
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as E
import model
from conftest import TINY_LLM, TINY_VISION, cli_error, tiny_checkpoint

# ---------------------------------------------------------------------------------------------
# Scoring: the normaliser


@pytest.mark.parametrize("text, expected", [
    ("Yes.", "yes"),                                  # lower-case, final period dropped
    ("The lesion is 2.5 cm.", "lesion is 2.5 cm"),   # decimal point kept, article dropped
    ("A mass in the left lung", "mass in left lung"),  # articles a/an/the dropped
    ("an apple", "apple"),
    ("two nodules, none calcified", "2 nodules 0 calcified"),  # number words -> digits
    ("ten", "10"),
    ("x-ray", "x ray"),                              # punctuation inside a word -> space
    ("left - right", "left right"),                  # punctuation touching a space -> removed
    ("1,000 cells", "1000 cells"),                   # a "1,000" number: punctuation glued away
    ("dont know", "don't know"),                     # apostrophes restored
    ("couldnt've", "couldn't've"),
    ("Is it (CT)?", "is it ct"),
    ("", ""),
    ("是的，有病灶。", "是的 有病灶"),               # full-width punctuation dropped
])
def test_normalize(text, expected):
    assert E.normalize(text) == expected


def test_tokens_split_chinese_by_character():
    assert E.tokens("左上区域") == ["左", "上", "区", "域"]
    assert E.tokens("CT图像，2.5 cm") == ["ct", "图", "像", "2.5", "cm"]
    assert E.tokens("The left lung") == ["left", "lung"]


def test_bleu1_and_rouge_l_by_hand():
    assert E.bleu1(["x", "y"], ["x", "y"]) == 1.0
    assert E.bleu1(["x"], ["x", "y"]) == pytest.approx(math.exp(1 - 2 / 1))  # brevity penalty e^(1-r/c)
    assert E.bleu1(["x", "y", "z"], ["x", "y"]) == pytest.approx(2 / 3)  # longer than the ref: no penalty
    assert E.bleu1(["x", "x", "x"], ["x", "q", "r"]) == pytest.approx(1 / 3)  # clipped counts
    assert E.bleu1([], ["x"]) == 0.0 and E.bleu1(["q"], ["x"]) == 0.0
    assert E.rouge_l(["x", "y", "z", "w"], ["x", "z", "w", "v"]) == pytest.approx(0.75)  # LCS x z w
    assert E.rouge_l(["x"], ["q"]) == 0.0 and E.rouge_l([], ["q"]) == 0.0


# ---------------------------------------------------------------------------------------------
# Scoring: VQA (MultiMedEval and LLaVA-Med)


def vqa(gold, lang="en", answer_type=None):
    return E.vqa_example("q", "question?", gold, None, lang, answer_type)


@pytest.mark.parametrize("pred, gold, correct", [
    ("No.", "no", True),                       # G = {no, not}: recall 1/2 >= 0.4
    ("There is not a fracture", "no", True),   # "not" counts for a "no" gold
    ("yes", "no", False),
    ("yes and no", "no", True),                # the rule's known leniency: 1/2 >= 0.4
    ("Yes, there is.", "yes", True),
    ("no", "yes", False),
    ("", "yes", False),                        # empty prediction
    ("", "no", False),
    ("nope", "no", False),
])
def test_closed_multimedeval(pred, gold, correct):
    assert E.score(pred, vqa(gold))["closed_correct"] is correct


def test_open_multimedeval_by_hand():
    s = E.score("The left lung.", vqa("left lung"))
    assert (s["recall"], s["open_hit"], s["bleu1"]) == (1.0, True, 1.0)
    assert s["f1"] == pytest.approx(1.0, abs=1e-6)
    s = E.score("left", vqa("left lung"))  # recall 1/2 < 0.75; precision 1
    assert s["recall"] == 0.5 and s["open_hit"] is False
    assert s["f1"] == pytest.approx(2 / 3, abs=1e-6)
    assert s["bleu1"] == pytest.approx(math.exp(-1))
    s = E.score("three lesions", vqa("3"))  # number words
    assert s["recall"] == 1.0 and s["open_hit"]
    assert E.score("about 2.5 cm.", vqa("2.5 cm"))["recall"] == 1.0  # decimals survive
    assert E.score("25 cm", vqa("2.5 cm"))["recall"] == 0.5
    s = E.score("right upper lobe of lung", vqa("right upper lobe"))  # precision 3/5, recall 1
    assert s["recall"] == 1.0 and s["f1"] == pytest.approx(2 * 0.6 / 1.6, abs=1e-6)
    s = E.score("", vqa("left lung"))  # empty prediction
    assert (s["recall"], s["f1"], s["bleu1"], s["open_hit"], s["llava_med_open_recall"]) == (0, 0, 0, False, 0)
    assert E.score("upper", vqa("right upper lobe"))["open_hit"] is False  # 1/3
    assert E.score("right upper", vqa("right upper lobe"))["open_hit"] is False  # 2/3 < 0.75
    assert E.score("lobe, right upper", vqa("right upper lobe"))["open_hit"] is True


def test_llava_med_convention():
    # closed: normalised gold is a substring of the normalised prediction
    assert E.score("Yes, it is.", vqa("yes", answer_type="CLOSED"))["llava_med_closed_correct"]
    assert E.score("Not sure", vqa("no", answer_type="CLOSED"))["llava_med_closed_correct"]  # "no" in "not sure"
    assert not E.score("yes", vqa("no", answer_type="CLOSED"))["llava_med_closed_correct"]
    # a CLOSED label on a non-yes/no answer: LLaVA-Med scores it closed, MultiMedEval open
    s = E.score("on the left side", vqa("Left", answer_type="CLOSED"))
    assert s["llava_med_closed_correct"] and "closed_correct" not in s and s["open_hit"]
    # open: recall over token counts tp / (tp + fn)
    s = E.score("right lobe", vqa("right upper lobe", answer_type="OPEN"))
    assert s["llava_med_open_recall"] == pytest.approx(2 / 3)
    s = E.score("lung", vqa("lung lung", answer_type="OPEN"))  # counts, not sets: 1 of 2
    assert s["llava_med_open_recall"] == 0.5 and s["recall"] == 1.0
    # no dataset label: our closed/open split decides
    assert "llava_med_closed_correct" in E.score("yes", vqa("yes"))
    assert "llava_med_open_recall" in E.score("ct", vqa("CT"))


@pytest.mark.parametrize("text, polarity", [
    ("是", "yes"), ("是的", "yes"), ("有", "yes"), ("包含", "yes"), ("图像中有病灶", "yes"),
    ("否", "no"), ("不是", "no"), ("没有", "no"), ("不包含", "no"), ("图像中没有病灶。", "no"),
    ("yes", "yes"), ("No.", "no"), ("nodule", None), ("左上", None), ("", None),
])
def test_zh_yes_no(text, polarity):
    assert E.zh_yes_no(text) == polarity


def test_chinese_questions():
    assert E.is_closed("是的", "zh") and E.is_closed("不包含", "zh") and E.is_closed("否", "zh")
    assert not E.is_closed("左肺", "zh") and E.is_closed("Yes", "en") and not E.is_closed("left", "en")
    gold_yes, gold_no = vqa("是的", "zh", "CLOSED"), vqa("没有", "zh", "CLOSED")
    assert gold_yes.qtype == "closed" and gold_yes.prompt == "question?"  # the English hint is not added
    assert E.score("是", gold_yes)["closed_correct"]
    assert not E.score("不是", gold_yes)["closed_correct"]
    assert E.score("图像中没有病灶", gold_no)["closed_correct"]
    assert not E.score("有", gold_no)["closed_correct"]
    # LLaVA-Med's substring rule would accept "没有" for a "有" gold (有 is in 没有); polarity does not
    assert not E.score("没有", vqa("有", "zh", "CLOSED"))["llava_med_closed_correct"]
    s = E.score("左上区域", vqa("左上", "zh", "OPEN"))  # open: recall over characters
    assert s["recall"] == 1.0 and s["open_hit"] and s["llava_med_open_recall"] == 1.0
    assert E.score("左下", vqa("左上", "zh"))["recall"] == 0.5


def test_yes_no_hint_follows_multimedeval():
    assert vqa("Yes").prompt == data.YES_NO_HINT + "question?"
    assert vqa("left").prompt == "question?"
    assert E.vqa_example("q", "Is it?", "no", None, "en", hint=False).prompt == "Is it?"


# ---------------------------------------------------------------------------------------------
# Scoring: multiple choice, PubMedQA, reports


OPTS = {"A": "Aspirin", "B": "Heparin", "C": "Warfarin"}


@pytest.mark.parametrize("pred, picked", [
    ("B: Heparin", "B"),
    ("The answer is B.", "B"),       # "answer is b": only option B's key matches
    ("Warfarin", "C"),
    ("heparin and aspirin", "A"),    # tie at 1/3: the first option wins
    ("A", None),                     # quirk kept: a bare "A" normalises to nothing (an article)
    ("", None),
    ("I do not know", None),         # BLEU 0 everywhere: invalid
])
def test_pick_option_multimedeval(pred, picked):
    assert E.pick_option(pred, OPTS) == picked


@pytest.mark.parametrize("pred, letters", [
    ("B", "B"), ("(C)", "C"), ("A.", "A"), ("The answer is B", "B"), ("answer: (C)", "C"),
    ("答案是D", "D"), ("B. Heparin", "B"), ("C) Warfarin", "C"), ("AC", "AC"), ("A、C", "AC"),
    ("C, A", "AC"), ("Heparin", None), ("Based on the history", None), ("", None),
    ("A patient with fever", None), ("The answer is a drug", None), ("The answer is Bleeding", None),
])
def test_extract_letters(pred, letters):
    assert E.extract_letters(pred, "ABCDE") == letters


def test_score_choice():
    ex = E.choice_example("1", "Which drug?", OPTS, "A")
    assert ex.prompt == "Which drug?\nOptions:\nA: Aspirin.\nB: Heparin.\nC: Warfarin.\nWhat is the correct answer?"
    s = E.score("A", ex)  # MultiMedEval's rule cannot read a bare "A"; the letter rule can
    assert (s["correct"], s["invalid"], s["letter_correct"]) == (False, True, True)
    s = E.score("A: Aspirin", ex)
    assert s["correct"] and s["letter_correct"]
    multi = E.choice_example("2", "题目", {"A": "甲", "B": "乙", "C": "丙", "D": ""}, "CA", "zh")
    assert multi.gold == "AC" and list(multi.options) == ["A", "B", "C"]  # empty option dropped
    assert E.score("AC", multi)["correct"] and not E.score("A", multi)["correct"]
    zh = E.choice_example("3", "题目", {"A": "阿司匹林", "B": "肝素"}, "B", "zh")
    assert zh.prompt.endswith("正确答案是什么？") and E.score("肝素", zh)["correct"]  # BLEU on characters
    with pytest.raises(ValueError, match="not among the options"):
        E.choice_example("4", "q", OPTS, "E")


@pytest.mark.parametrize("pred, picked", [
    ("Yes.", "yes"), ("no no maybe", "no"), ("Yes, maybe.", "yes"),  # tie: yes before maybe
    ("maybe", "maybe"), ("", None), ("Perhaps", None),
])
def test_pubmedqa_counting(pred, picked):
    ex = E.Example(id="1", question="q", gold="no", qtype="yesnomaybe")
    s = E.score(pred, ex)
    assert s["pred_option"] == picked and s["correct"] == (picked == "no") and s["invalid"] == (picked is None)


def test_report_scores():
    ex = E.Example(id="1", question="", gold="x z w v", qtype="report")
    s = E.score("x y z w", ex)
    assert s["bleu1"] == pytest.approx(0.75) and s["rouge_l"] == pytest.approx(0.75) and s["recall"] == 0.75


def test_summarize_by_hand():
    exs = [vqa("yes"), vqa("no"), vqa("left lung"), vqa("是", "zh"), vqa("左上", "zh")]
    preds = ["yes", "yes", "left", "是", "左上"]
    s = E.summarize(exs, [E.score(p, e) for p, e in zip(preds, exs)])
    assert (s["n"], s["n_closed"], s["n_open"]) == (5, 3, 2)
    assert s["closed_accuracy"] == pytest.approx(2 / 3)
    assert s["open_recall"] == pytest.approx(0.75) and s["open_accuracy"] == 0.5
    assert s["by_lang"]["en"]["closed_accuracy"] == 0.5 and s["by_lang"]["zh"]["closed_accuracy"] == 1.0
    assert s["llava_med"]["closed_accuracy"] == pytest.approx(2 / 3)
    assert "tokens" in s["rules"]
    table = E.format_table("t", s)
    assert "closed_accuracy" in table and "66.7" in table and "zh" in table


# ---------------------------------------------------------------------------------------------
# Loaders, one tiny fixture per format


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False))
    return path


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_load_vqa_rad_json(tmp_path):
    base = {"image_organ": "HEAD", "question_type": "PRES", "question_rephrase": "NULL"}
    f = write_json(tmp_path / "VQA_RAD Dataset Public.json", [
        {**base, "qid": 1, "image_name": "synpic1.jpg", "question": "Is there a mass?", "answer": "Yes",
         "answer_type": "CLOSED", "phrase_type": "test_freeform"},
        {**base, "qid": 2, "image_name": "synpic1.jpg", "question": "Which side?", "answer": "Left",
         "answer_type": "CLOSED", "phrase_type": "test_para"},
        {**base, "qid": 3, "image_name": "synpic2.jpg", "question": "Train q", "answer": "no",
         "answer_type": "CLOSED", "phrase_type": "freeform"},
    ])
    (tmp_path / "VQA_RAD Image Folder").mkdir()
    exs = E.load_task("vqa-rad", f)
    assert [e.id for e in exs] == ["1", "2"]  # the train record is left out
    assert exs[0].qtype == "closed" and exs[0].prompt == data.YES_NO_HINT + "Is there a mass?"
    assert exs[1].qtype == "open" and exs[1].answer_type == "CLOSED"  # CLOSED label, not yes/no
    assert exs[0].image == str(tmp_path / "VQA_RAD Image Folder" / "synpic1.jpg")
    assert len(E.load_task("vqa-rad", f, split="all")) == 3
    assert E.load_task("vqa-rad", f, hint=False)[0].prompt == "Is there a mass?"


def test_parquet_needs_pyarrow(tmp_path):
    try:
        import pyarrow  # noqa: F401
        pytest.skip("pyarrow is installed")
    except ImportError:
        pass
    f = tmp_path / "test-00000-of-00001.parquet"
    f.write_bytes(b"PAR1")
    for task in ("vqa-rad", "pathvqa"):
        with pytest.raises(ImportError, match="pip install pyarrow"):
            E.load_task(task, f)


def test_load_slake_en_zh(tmp_path):
    f = write_json(tmp_path / "Slake1.0" / "test.json", [
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Is this a CT?", "answer": "Yes",
         "q_lang": "en", "answer_type": "CLOSED", "qid": 10},
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "图中包含肝脏吗？", "answer": "不包含",
         "q_lang": "zh", "answer_type": "CLOSED", "qid": 11},
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "病灶在哪里？", "answer": "左肺",
         "q_lang": "zh", "answer_type": "OPEN", "qid": 12},
    ])
    (tmp_path / "Slake1.0" / "imgs").mkdir()
    exs = E.load_task("slake", f)
    assert [(e.lang, e.qtype) for e in exs] == [("en", "closed"), ("zh", "closed"), ("zh", "open")]
    assert exs[1].prompt == "图中包含肝脏吗？"  # no English hint on Chinese questions
    assert exs[0].image.endswith("imgs/xmlab1/source.jpg")
    assert [e.id for e in E.load_task("slake", f, lang="zh")] == ["11", "12"]


def test_load_pathvqa_json_export(tmp_path):
    f = tmp_path / "pathvqa.jsonl"
    f.write_text('{"id": "a", "question": "is this tissue?", "answer": "yes", "image": "i.png"}\n'
                 '{"id": "b", "question": "what stain?", "answer": "h&e", "image": "j.png"}\n')
    exs = E.load_task("pathvqa", f)
    assert [e.qtype for e in exs] == ["closed", "open"] and exs[0].prompt.startswith(data.YES_NO_HINT)


def test_load_pmc_vqa_csv(tmp_path):
    f = write_csv(tmp_path / "test_2.csv", [
        {"Figure_path": "PMC1.jpg", "Question": "What is shown?", "Choice A": "A:CT ",
         "Choice B": "B:MRI", "Choice C": "C:X-ray", "Choice D": "D:PET", "Answer": "MRI", "Answer_label": "B"},
        {"Figure_path": "PMC2.jpg", "Question": "Which organ?", "Choice A": "A: liver",
         "Choice B": "B: lung", "Choice C": "C: heart", "Choice D": "D: kidney", "Answer": "heart",
         "Answer_label": ""},
    ])
    (tmp_path / "images").mkdir()
    exs = E.load_task("pmc-vqa", f)
    assert exs[0].options == {"A": "CT", "B": "MRI", "C": "X-ray", "D": "PET"} and exs[0].gold == "B"
    assert exs[1].gold == "C"  # from the answer text when the label is empty
    assert exs[0].image == str(tmp_path / "images" / "PMC1.jpg") and exs[0].qtype == "choice"


def test_load_medqa_en_zh(tmp_path):
    f = tmp_path / "test.jsonl"
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"question": "Best drug?", "options": {"A": "Aspirin", "B": "Heparin"}, "answer": "Heparin",
         "answer_idx": "B", "meta_info": "step1"},
        {"question": "Which?", "options": [{"key": "A", "value": "x"}, {"key": "B", "value": "y"}],
         "answer": "x"},  # bigbio's option list, answer given as text only
        {"question": "最佳药物是？", "options": {"A": "阿司匹林", "B": "肝素"}, "answer_idx": "A"},
    ]))
    exs = E.load_task("medqa", f)
    assert [(e.gold, e.lang) for e in exs] == [("B", "en"), ("A", "en"), ("A", "zh")]
    assert "Options:\nA: Aspirin.\nB: Heparin." in exs[0].prompt and "选项" in exs[2].prompt


def test_load_pubmedqa(tmp_path):
    entry = lambda q, d: {"QUESTION": q, "CONTEXTS": ["c1.", "c2."], "LABELS": [], "MESHES": [],
                          "YEAR": None, "final_decision": d, "LONG_ANSWER": ""}
    f = write_json(tmp_path / "ori_pqal.json", {"111": entry("Q1?", "yes"), "222": entry("Q2?", "no")})
    exs = E.load_task("pubmedqa", f)
    assert [(e.id, e.gold) for e in exs] == [("111", "yes"), ("222", "no")]
    assert exs[0].prompt == "Answer the question with yes, no or maybe. c1. c2. Q1?"
    write_json(tmp_path / "test_ground_truth.json", {"222": "maybe"})  # the test split and its labels
    exs = E.load_task("pubmedqa", f)
    assert [(e.id, e.gold, e.qtype) for e in exs] == [("222", "maybe", "yesnomaybe")]


def test_load_cmb_and_cmexam(tmp_path):
    items = [{"id": 1, "exam_type": "医师考试", "exam_class": "执业医师", "exam_subject": "内科",
              "question": "哪项正确？", "question_type": "单项选择题",
              "option": {"A": "甲", "B": "乙", "C": "丙", "D": "丁", "E": ""}},
             {"id": 2, "question": "哪些正确？", "question_type": "多项选择题",
              "option": {"A": "甲", "B": "乙", "C": "丙"}, "answer": "AC"}]
    f = write_json(tmp_path / "cmb.json", items)
    key = write_json(tmp_path / "answers.json", [{"id": 1, "answer": "D"}])
    exs = E.load_task("cmb", f, answers=key)
    assert [(e.gold, e.lang, len(e.options)) for e in exs] == [("D", "zh", 4), ("AC", "zh", 3)]
    assert exs[1].prompt.startswith("（多项选择题）哪些正确？")
    with pytest.raises(ValueError, match="no answer"):
        E.load_task("cmb", f)
    g = write_csv(tmp_path / "cmexam.csv", [
        {"Question": "发热首选？", "Options": "A 甲药\nB 乙药\nC 丙药", "Answer": "B", "Explanation": ""},
        {"Question": "多选？", "Options": "A 甲\nB 乙\nC 丙\nD 丁", "Answer": "BD", "Explanation": ""}])
    exs = E.load_task("cmexam", g)
    assert exs[0].options == {"A": "甲药", "B": "乙药", "C": "丙药"} and exs[1].gold == "BD"


def test_load_generic_vqa_and_caption(tmp_path):
    f = write_json(tmp_path / "test.json", [
        {"id": 7, "image": "images/a.png", "conversations": [
            {"from": "human", "value": "<image>\nIs there a lesion?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "x", "question": "病灶在哪里？", "answer": "左上", "answer_type": "OPEN", "lang": "zh",
         "image": "images/a.png"},
        {"id": 9, "conversations": [{"from": "human", "value": "What is CT?"},
                                    {"from": "gpt", "value": "computed tomography"}]},
    ])
    exs = E.load_task("vqa", f)
    assert [(e.id, e.qtype, e.lang) for e in exs] == [("7", "closed", "en"), ("x", "open", "zh"), ("9", "open", "en")]
    assert exs[0].prompt == "Is there a lesion?"  # no hint: the question as the model was trained on it
    assert exs[0].image == str(tmp_path / "images" / "a.png") and exs[2].image is None
    cap = write_json(tmp_path / "pretrain.json", [{"id": 1, "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "腹部CT。"}]}])
    ex = E.load_task("caption", cap)[0]
    assert (ex.qtype, ex.lang, ex.prompt) == ("report", "zh", "请描述这张图像。")


def test_loader_errors_name_file_and_record(tmp_path):
    f = write_json(tmp_path / "bad.json", [{"id": 1, "question": "q", "answer": "a"}, {"id": 1, "question": "q2", "answer": "b"}])
    with pytest.raises(ValueError, match="duplicate question ids"):
        E.load_task("vqa", f)
    g = write_json(tmp_path / "slake.json", [{"qid": 1, "question": "q"}])
    with pytest.raises(ValueError, match=r"slake\.json record 0: no field 'answer'"):
        E.load_task("slake", g)
    h = tmp_path / "broken.jsonl"
    h.write_text('{"question": "q", "options": {"A": "x"}, "answer_idx": "A"}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2"):
        E.load_task("medqa", h)
    with pytest.raises(KeyError, match="unknown task"):
        E.load_task("nope", f)
    with pytest.raises(FileNotFoundError):
        E.load_task("vqa", tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------
# Generation on a tiny random model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random checkpoint in our format, with the demo tokenizer recorded in its config."""
    root = tmp_path_factory.mktemp("eval")
    ckpt, _ = tiny_checkpoint(root)
    m = model.from_pretrained(ckpt)
    tok = data.load_tokenizer(data.tokenizer_folder(ckpt))
    return {"root": root, "ckpt": ckpt, "model": m, "tok": tok}


def make_vqa_set(folder, n_images=3):
    """PNGs of different shapes and a generic VQA JSON over them: closed and open, en and zh,
    questions of different lengths, one text-only question."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for k in range(n_images):
        arr = rng.integers(0, 256, (40 + 8 * k, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / "images" / f"{k}.png")
    qs = [("Is there a lesion?", "yes", "en"), ("What modality is this scan, and which organ?", "CT", "en"),
          ("图像中有病灶吗？", "否", "zh"), ("病灶在哪里？", "左上", "zh"), ("Is it normal?", "no", "en")]
    recs = []
    for k in range(n_images):
        for j, (q, a, lang) in enumerate(qs):
            recs.append({"id": f"{k}_{j}", "image": f"images/{k}.png", "question": q, "answer": a, "lang": lang,
                         "answer_type": "CLOSED" if a in ("yes", "no", "否") else "OPEN"})
    recs.append({"id": "text", "question": "What does CT stand for?", "answer": "computed tomography", "lang": "en"})
    return write_json(folder / "test.json", recs), recs


def test_batched_equals_one_by_one(tiny, tmp_path):
    f, _ = make_vqa_set(tmp_path, n_images=2)
    exs = E.load_task("vqa", f)
    kw = dict(template="llama3", max_new_tokens=6, num_workers=0, progress=False)
    t = time.perf_counter()
    one, skipped, _ = E.generate_answers(tiny["model"], tiny["tok"], exs, batch_size=1, **kw)
    t_one = time.perf_counter() - t
    t = time.perf_counter()
    batched, _, _ = E.generate_answers(tiny["model"], tiny["tok"], exs, batch_size=8, **kw)
    t_batched = time.perf_counter() - t
    assert not skipped and len(one) == len(exs)
    assert batched == one
    assert len(set(one.values())) > 1  # the answers differ between prompts: the comparison means something
    for ex in (exs[1], exs[-1]):  # and the DataLoader path equals a direct call (one with, one without image)
        assert E.ask(tiny["model"], tiny["tok"], ex.prompt, ex.image, max_new_tokens=6, stream=False) == one[ex.id]
    print(f"\n{len(exs)} questions: one by one {len(exs) / t_one:.1f} samples/s, "
          f"batched (8) {len(exs) / t_batched:.1f} samples/s")


def test_sampling_is_seeded(tiny, tmp_path):
    f, _ = make_vqa_set(tmp_path, n_images=1)
    exs = E.load_task("vqa", f)
    kw = dict(template="llama3", max_new_tokens=6, num_workers=0, progress=False, do_sample=True,
              temperature=1.5, batch_size=4)
    a, _, _ = E.generate_answers(tiny["model"], tiny["tok"], exs, seed=1, **kw)
    b, _, _ = E.generate_answers(tiny["model"], tiny["tok"], exs, seed=1, **kw)
    c, _, _ = E.generate_answers(tiny["model"], tiny["tok"], exs, seed=2, **kw)
    assert a == b and a != c


def test_end_to_end(tiny, tmp_path, capsys):
    f, recs = make_vqa_set(tmp_path / "data", n_images=3)
    out = tmp_path / "out"
    assert E.main(["--model", str(tiny["ckpt"]), "--task", "vqa", "--data", str(f), "--out", str(out),
                   "--batch-size", "4", "--max-new-tokens", "8"]) == 0  # default: 2 DataLoader workers
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [str(r["id"]) for r in recs]
    assert all(isinstance(p["prediction"], str) and p["scores"] for p in preds)
    s = json.loads((out / "summary.json").read_text())["vqa"]
    assert (s["n"], s["n_closed"], s["n_open"]) == (16, 9, 7)
    assert s["by_lang"]["en"]["n"] == 10 and s["by_lang"]["zh"]["n"] == 6
    assert s["by_answer_type"]["CLOSED"]["n"] == 9 and s["llava_med"]["n_closed"] == 9
    # The checkpoint's prompt policy (ours record none: no system prompt), whatever folder it is in.
    assert s["settings"]["system"] is None and s["settings"]["decoding"] == "greedy"
    assert "implied by stage 'finetune'" in s["settings"]["prompt_policy"]
    assert s["settings"]["pad_to_square"] is True and s["settings"]["samples_per_s"] > 0
    assert "closed_accuracy" in capsys.readouterr().out

    # --limit, a missing image (skipped and reported, not scored) and --blank-images
    recs[0]["image"] = "images/missing.png"
    write_json(f, recs)
    out2 = tmp_path / "out2"
    E.main(["--model", str(tiny["ckpt"]), "--task", "vqa", "--data", str(f), "--out", str(out2),
            "--limit", "10", "--blank-images", "--max-new-tokens", "4", "--workers", "0"])
    preds = [json.loads(line) for line in (out2 / "predictions.jsonl").read_text().splitlines()]
    s = json.loads((out2 / "summary.json").read_text())["vqa"]
    assert len(preds) == 10 and s["n"] == 9 and s["skipped"] == {"missing_image": 1}
    assert preds[0]["skipped"].startswith("missing_image") and preds[0]["prediction"] is None
    # blank images: the same question about different images gets the same answer
    by_id = {p["id"]: p["prediction"] for p in preds}
    assert by_id["1_2"] == by_id["0_2"] and by_id["1_3"] == by_id["0_3"]
    # rescoring our own predictions.jsonl reproduces the summary (the skipped question stays unscored)
    E.main(["--task", "vqa", "--data", str(f), "--limit", "10", "--predictions", str(out2 / "predictions.jsonl"),
            "--out", str(tmp_path / "rescored")])
    r = json.loads((tmp_path / "rescored" / "summary.json").read_text())["vqa"]
    assert {k: v for k, v in r.items() if k != "settings"} == {k: v for k, v in s.items() if k != "settings"}


def test_rescoring_without_a_model(tmp_path):
    f, recs = make_vqa_set(tmp_path, n_images=1)
    pred_file = tmp_path / "other_model.jsonl"
    answers = {"0_0": "Yes.", "0_1": "a CT scan", "0_2": "不是", "0_3": "左上区域", "0_4": "yes"}
    pred_file.write_text("\n".join(json.dumps({"id": k, "prediction": v}, ensure_ascii=False)
                                   for k, v in answers.items()))  # "text" has no prediction
    out = tmp_path / "out"
    assert E.main(["--task", "vqa", "--data", str(f), "--predictions", str(pred_file), "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())["vqa"]
    # closed: yes/yes ok, 否/不是 ok, no/yes wrong -> 2/3; open: CT 1, 左上 1, text-only 0 (missing)
    assert s["closed_accuracy"] == pytest.approx(2 / 3)
    assert s["open_recall"] == pytest.approx(2 / 3) and s["open_accuracy"] == pytest.approx(2 / 3)
    assert s["settings"]["missing_predictions"] == 1 and s["n"] == 6
    # LLaVA's answer-file fields are read too
    llava_file = tmp_path / "llava.jsonl"
    llava_file.write_text(json.dumps({"question_id": "0_0", "text": "yes"}))
    assert E.read_predictions(llava_file) == ({"0_0": "yes"}, {})


def test_rescoring_refuses_duplicate_prediction_ids(tmp_path):
    """Two answers to one question: which one counts would be a guess (the last line used to win)."""
    pred = tmp_path / "dup.jsonl"
    rows = [{"id": "0_0", "prediction": "yes"}, {"question_id": "0_1", "text": "CT"}, {"id": "0_0", "prediction": "no"},
            {"id": "0_1", "skipped": "missing_image: images/0.png"}, {"id": "0_2", "prediction": "否"}]
    pred.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"dup\.jsonl: duplicate ids: '0_0' \(lines 1, 3\), '0_1' \(lines 2, 4\)"):
        E.read_predictions(pred)


def test_empty_gold_answers_are_reported_and_not_scored(tmp_path, capsys):
    """An empty gold answer cannot be matched: it used to count as a wrong open answer, silently."""
    f, recs = make_vqa_set(tmp_path, n_images=1)
    recs[1]["answer"], recs[3]["answer"] = "", " "  # 0_1 (open, en), 0_3 (open, zh)
    write_json(f, recs)
    pred = tmp_path / "p.jsonl"
    pred.write_text("".join(json.dumps({"id": r["id"], "prediction": r["answer"] or "CT"}, ensure_ascii=False) + "\n"
                            for r in recs))
    out = tmp_path / "out"
    assert E.main(["--task", "vqa", "--data", str(f), "--predictions", str(pred), "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())["vqa"]
    assert s["n"] == len(recs) - 2 and s["n_open"] == 1 and s["skipped"] == {"empty_gold": 2}
    assert s["open_recall"] == 1.0 and s["settings"]["missing_predictions"] == 0
    got = capsys.readouterr()
    assert f"warning: 2 questions in {f} have an empty gold answer (['0_1', '0_3'])" in got.err
    assert "empty_gold" in got.out  # the printed summary says so too
    preds = {p["id"]: p for p in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    assert preds["0_1"]["scores"] is None and preds["0_1"]["skipped"].startswith("empty_gold")


def test_cli_user_errors_are_one_line(tiny, tmp_path):
    """Bad input to eval.py: exit status 2 and one `error:` line naming the file, id, flag or tensor."""
    import shutil
    from safetensors.torch import load_file, save_file

    f, recs = make_vqa_set(tmp_path, n_images=1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "0_0", "prediction": "yes"}\n{oops\n')
    assert f"{bad}:2: not valid JSON" in cli_error("eval.py", "--task", "vqa", "--data", f, "--predictions", bad)
    dup = write_json(tmp_path / "dup.json", recs + recs[:1])
    line = cli_error("eval.py", "--task", "vqa", "--data", dup, "--predictions", bad)
    assert f"{dup}: duplicate question ids ['0_0']" in line
    line = cli_error("eval.py", "--task", "vqa", "--data", f, "--predictions", bad, "--batch-size", "0")
    assert "argument --batch-size: must be >= 1, got 0" in line
    # A NaN weight used to load and answer '!!!!'.
    nan = tmp_path / "nan"
    shutil.copytree(tiny["ckpt"], nan)
    sd = load_file(nan / "model.safetensors")
    sd["llm.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(sd, nan / "model.safetensors")
    line = cli_error("eval.py", "--model", nan, "--question", "Is there a lesion?", "--max-new-tokens", "4")
    assert f"'llm.layers.1.mlp.down_proj.weight' in {nan / 'model.safetensors'} holds NaN or Inf" in line


@pytest.mark.parametrize("argv, mode", [
    (["--task", "vqa", "--data", "t.json", "--model", "m"], "evaluate"),
    (["--task", "vqa", "--data", "t.json", "--predictions", "p.jsonl"], "rescore"),
    (["--model", "m", "--question", "q?"], "ask"),
    (["--model", "m", "--image", "x.png", "--question", "q?"], "ask"),
])
def test_cli_modes(argv, mode):
    assert E.parse_args(argv).mode == mode


@pytest.mark.parametrize("argv, message", [
    (["--model", "m", "--question", "q?", "--task", "vqa", "--data", "t.json"], "drop --task, --data"),
    (["--model", "m", "--question", "q?", "--predictions", "p.jsonl"], "drop --predictions"),
    (["--question", "q?"], "--question needs --model"),
    (["--model", "m", "--image", "x.png"], "--image needs --question"),
    (["--model", "m", "--task", "vqa"], "give --task and --data"),
    (["--task", "vqa", "--data", "t.json", "--model", "m", "--predictions", "p.jsonl"], "drop --model"),
    (["--task", "vqa", "--data", "t.json"], "give --model to generate answers, or --predictions"),
])
def test_cli_refuses_contradictory_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        E.parse_args(argv)
    assert message in capsys.readouterr().err


def test_single_image_mode_streams(tiny, tmp_path, capsys):
    import pydicom.examples

    png = tmp_path / "scan.png"
    Image.fromarray(np.full((30, 50, 3), 90, np.uint8)).save(png)
    for image in (str(png), str(pydicom.examples.get_path("ct"))):
        capsys.readouterr()
        assert E.main(["--model", str(tiny["ckpt"]), "--image", image, "--question", "这张CT有什么异常？",
                       "--max-new-tokens", "12"]) == 0
        streamed = capsys.readouterr().out
        answer = E.ask(tiny["model"], tiny["tok"], "这张CT有什么异常？", image, max_new_tokens=12, stream=False,
                       system="")  # the checkpoint's policy: ours train with no system prompt
        assert streamed.strip() == answer and streamed.endswith("\n")


def test_image_paths_stay_inside_the_image_root(tiny, tmp_path):
    """Eval data names its images relative to an image folder: an absolute path, a ../ path or a link
    leading out of the folder is not read (the question is skipped and reported with its reason) unless
    --allow-outside-image-root."""
    import shutil

    f, recs = make_vqa_set(tmp_path / "data", n_images=1)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(tmp_path / "data/images/0.png", outside / "secret.png")
    (tmp_path / "data/images/link.png").symlink_to(outside / "secret.png")
    escapes = {"absolute": str(outside / "secret.png"), "up": "../outside/secret.png", "link": "images/link.png"}
    recs = recs[:2] + [{"id": k, "image": v, "question": "Is it normal?", "answer": "no"} for k, v in escapes.items()]
    write_json(f, recs)
    args = ["--model", str(tiny["ckpt"]), "--task", "vqa", "--data", str(f), "--max-new-tokens", "2", "--workers", "0"]
    assert E.main(args + ["--out", str(tmp_path / "strict")]) == 0
    preds = {p["id"]: p for p in map(json.loads, (tmp_path / "strict/predictions.jsonl").read_text().splitlines())}
    s = json.loads((tmp_path / "strict/summary.json").read_text())["vqa"]
    assert s["n"] == 2 and s["skipped"] == {"unsafe_path": 3}
    for k in escapes:
        assert preds[k]["prediction"] is None and preds[k]["skipped"].startswith("unsafe_path"), preds[k]
        assert f"resolves to {outside / 'secret.png'}, outside the image root {tmp_path / 'data'}" in preds[k]["skipped"]
    assert E.main(args + ["--out", str(tmp_path / "trusting"), "--allow-outside-image-root"]) == 0
    s = json.loads((tmp_path / "trusting/summary.json").read_text())["vqa"]
    assert s["n"] == 5 and "skipped" not in s


def test_oversized_image_refused_before_decoding(tiny, tmp_path):
    """A 100000 x 8 PNG of a few KB: padding it to a square would take 30 GB. --image and eval data
    go through data.load_image, which refuses it from its header."""
    Image.new("1", (100_000, 8)).save(tmp_path / "wide.png")
    t0 = time.perf_counter()
    with pytest.raises(data.SampleError, match="wide.png is 100000x8 pixels") as e:
        E.ask(tiny["model"], tiny["tok"], "Is it normal?", str(tmp_path / "wide.png"), max_new_tokens=2, stream=False)
    assert e.value.reason == "image_too_large" and time.perf_counter() - t0 < 1.0
    exs = [E.vqa_example("w", "Is it normal?", "no", str(tmp_path / "wide.png"))]
    answers, skipped, _ = E.generate_answers(tiny["model"], tiny["tok"], exs, max_new_tokens=2, num_workers=0,
                                             progress=False)
    assert not answers and skipped["w"][0] == "image_too_large"


def test_llava_hf_folder(tiny, tmp_path):
    """A transformers LLaVA folder: model.from_pretrained reads it, the tokenizer comes from the folder."""
    import shutil

    import transformers

    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**TINY_VISION),
        text_config=transformers.LlamaConfig(vocab_size=2050, **TINY_LLM),
        image_token_index=2048, vision_feature_layer=-2, image_seq_length=16)
    torch.manual_seed(0)
    transformers.LlavaForConditionalGeneration(cfg).save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny["root"] / "demo" / "tokenizer" / name, tmp_path / "hf" / name)
    f, recs = make_vqa_set(tmp_path / "data", n_images=1)
    out = tmp_path / "out"
    E.main(["--model", str(tmp_path / "hf"), "--task", "vqa", "--data", str(f), "--out", str(out),
            "--max-new-tokens", "4", "--workers", "0"])
    assert json.loads((out / "summary.json").read_text())["vqa"]["n"] == len(recs)
