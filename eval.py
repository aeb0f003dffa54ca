"""Evaluate a checkpoint on medical QA / VQA benchmarks, honestly and fast.

Doctor Sun's own `eva.py` cannot be reproduced (it overwrites every question, feeds an all-zero
image and samples at temperature 0.1). Here every question is asked with its own image, decoding
is greedy unless asked otherwise, and answers are scored with the rules the field reports:

    task files --loader--> [Example] --prompt + image--> batched greedy generate --> predictions
    predictions + gold --score_*()--> per-question scores --summarize()--> summary.json + table

The file reads in four parts:
  1. task loaders: each public dataset's own on-disk format -> a list of `Example`s;
  2. scoring: pure functions, MultiMedEval's rules and LLaVA-Med's convention side by side;
  3. generation: prompts sorted by length, left-padded batches, KV cache, images in a DataLoader;
  4. the CLI, in one of three modes that its flags name (`resolve_mode`):

    evaluate  python eval.py --model runs/finetune/final --task vqa --data demo_data/test.json --out out/eval
    rescore   python eval.py --task vqa-rad --data "VQA_RAD Dataset Public.json" --predictions preds.jsonl
    ask       python eval.py --model runs/finetune/final --image scan.dcm --question "这张CT有什么异常？"
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import re
import sys
import time
from collections import Counter
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

import data
import errors

# ==============================================================================================
# 1. Task loaders
# ==============================================================================================


@dataclass
class Example:
    id: str
    question: str  # the dataset's question, as written to predictions.jsonl
    gold: str  # the gold answer; for multiple choice the option letter(s), e.g. "B" or "ACD"
    image: str | bytes | None = None  # a resolved file path, raw bytes (parquet rows), or None
    lang: str = "en"  # "en" | "zh"
    qtype: str = "open"  # "closed" | "open" | "choice" | "yesnomaybe" | "report"
    options: dict[str, str] | None = None  # {"A": "...", ...} for multiple choice
    prompt: str = ""  # the user turn sent to the model (the image placeholder is added by the template)
    answer_type: str | None = None  # the dataset's own CLOSED/OPEN label, where it has one
    image_root: str | None = None  # the folder `image` was named relative to: it must resolve inside it


# Chinese closed answers (SLAKE: 是的/不是/有/没有/包含/不包含; the demo: 是/否). Checked longest first.
ZH_YES = ("是的", "是", "对", "有", "存在", "包含", "可见")
ZH_NO = ("不是", "不对", "没有", "不存在", "不包含", "未见", "不可见", "否", "无", "不", "没")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def detect_lang(text: str) -> str:
    return "zh" if _CJK.search(text or "") else "en"


def is_closed(gold: str, lang: str) -> bool:
    """MultiMedEval's split: closed = the normalised gold answer is exactly yes/no (whatever a dataset's
    own CLOSED/OPEN label says); for Chinese, one of the yes/no words above."""
    if lang == "zh":
        g = re.sub(r"\s+", "", _ZH_PUNCT.sub(" ", gold)).lower()
        return g in ZH_YES + ZH_NO + ("yes", "no")
    return normalize(gold) in ("yes", "no")


def vqa_example(id, question, gold, image, lang=None, answer_type=None, hint=True) -> Example:
    """One VQA question. `hint`: prefix MultiMedEval's yes/no instruction when the gold is yes/no.
    (That peeks at the gold answer's type, as MultiMedEval does; English only, as MultiMedEval is.)"""
    question, gold = str(question).strip(), str(gold).strip()
    lang = lang or detect_lang(question)
    closed = is_closed(gold, lang)
    prompt = (data.YES_NO_HINT if hint and closed and lang == "en" else "") + question
    return Example(id=str(id), question=question, gold=gold, image=image, lang=lang,
                   qtype="closed" if closed else "open", prompt=prompt,
                   answer_type=answer_type.upper() if answer_type else None)


def choice_prompt(question: str, options: dict[str, str], lang: str) -> str:
    """MultiMedEval's MedQA prompt (`{key}: {value}.` per line); a Chinese rendering for Chinese exams."""
    if lang == "zh":
        lines = "\n".join(f"{k}: {v}" for k, v in options.items())
        return f"{question}\n选项：\n{lines}\n正确答案是什么？"
    lines = "\n".join(f"{k}: {v}." for k, v in options.items())
    return f"{question}\nOptions:\n{lines}\nWhat is the correct answer?"


def choice_example(id, question, options, gold, lang=None, image=None, kind="") -> Example:
    options = {str(k).strip().upper(): str(v).strip() for k, v in options.items() if str(v).strip()}
    gold = "".join(sorted(re.sub(r"[^A-Za-z]", "", str(gold)).upper()))
    question = str(question).strip()
    if not gold or any(g not in options for g in gold):
        raise errors.UserError(f"question {id}: answer {gold!r} is not among the options {sorted(options)}")
    lang = lang or detect_lang(question)
    prompt = choice_prompt(f"{kind}{question}", options, lang)
    return Example(id=str(id), question=question, gold=gold, image=image, lang=lang, qtype="choice",
                   options=options, prompt=prompt)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def read_parquet(path: Path) -> list[dict]:
    """Rows of a parquet file, or of every *.parquet under a folder (HF dataset layout)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading parquet needs pyarrow, which is not installed "
                          f"(pip install pyarrow), or pass a JSON export of the same rows") from None
    files = [path] if path.is_file() else (sorted(path.rglob("test-*.parquet")) or sorted(path.rglob("*.parquet")))
    if not files:
        raise FileNotFoundError(f"no .parquet files under {path}")
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def _field(rec: dict, *names, where: str):
    for n in names:
        if n in rec and rec[n] is not None:
            return rec[n]
    raise errors.UserError(f"{where}: no field {' / '.join(map(repr, names))} (has {sorted(rec)})")


def _image_root(path: Path, images: str | None, *candidates: str) -> Path:
    if images:
        return Path(images)
    base = path if path.is_dir() else path.parent
    for c in candidates:
        if (base / c).is_dir():
            return base / c
    return base


def _rooted(examples: list[Example], root: Path) -> list[Example]:
    """Record the folder the examples' image paths were joined to: PromptSet reads an image only if it
    resolves inside it (no absolute or ../ path in the file, no link out of the folder), unless
    --allow-outside-image-root: a benchmark file must not make the evaluator read other files."""
    for ex in examples:
        if isinstance(ex.image, str):
            ex.image_root = str(root)
    return examples


def _parquet_image(img):
    """HF `Image` feature: {"bytes": ..., "path": ...}."""
    if isinstance(img, dict):
        return img.get("bytes") or img.get("path")
    return img


def load_vqa_rad(path: Path, images=None, split="test", hint=True) -> list[Example]:
    """Official `VQA_RAD Dataset Public.json` (test = phrase_type test_freeform/test_para, 451
    questions) or the parquet release (`flaviagiammarino/vqa-rad`, test rows only)."""
    if path.suffix == ".parquet" or path.is_dir():
        return [vqa_example(i, r["question"], r["answer"], _parquet_image(r["image"]), "en", hint=hint)
                for i, r in enumerate(read_parquet(path))]
    root = _image_root(path, images, "VQA_RAD Image Folder")
    out = []
    for n, r in enumerate(data.read_records(path, bad_lines="raise")):
        where = f"{path} record {n}"
        if split == "test" and not str(_field(r, "phrase_type", where=where)).startswith("test"):
            continue
        out.append(vqa_example(_field(r, "qid", where=where), _field(r, "question", where=where),
                               _field(r, "answer", where=where),
                               str(root / _field(r, "image_name", where=where)), "en",
                               r.get("answer_type"), hint=hint))
    return _rooted(out, root)


def load_slake(path: Path, images=None, hint=True) -> list[Example]:
    """SLAKE `test.json` (English and Chinese questions, `q_lang`), images under `imgs/`."""
    root = _image_root(path, images, "imgs", "../imgs")
    out = []
    for n, r in enumerate(data.read_records(path, bad_lines="raise")):
        where = f"{path} record {n}"
        out.append(vqa_example(_field(r, "qid", "id", where=where), _field(r, "question", where=where),
                               _field(r, "answer", where=where),
                               str(root / _field(r, "img_name", where=where)),
                               r.get("q_lang"), r.get("answer_type"), hint=hint))
    return _rooted(out, root)


def load_pathvqa(path: Path, images=None, hint=True) -> list[Example]:
    """PathVQA parquet (`flaviagiammarino/path-vqa`) or a JSON(L) export with question/answer/image.
    (The original release is pickles: never unpickle untrusted files.)"""
    if path.suffix == ".parquet" or path.is_dir():
        rows = read_parquet(path)
        return [vqa_example(i, r["question"], r["answer"], _parquet_image(r["image"]), "en", hint=hint)
                for i, r in enumerate(rows)]
    return load_vqa(path, images, hint=hint)


def load_vqa(path: Path, images=None, hint=False) -> list[Example]:
    """Generic LLaVA-format VQA (the demo's test split): JSON list or JSONL records with `question` /
    `answer` (+ optional `answer_type`, `lang`) or `conversations` (first human / first gpt turn),
    and an optional `image` relative to --images (default: the file's folder)."""
    root = _image_root(path, images)
    out = []
    for n, r in enumerate(data.read_records(path, bad_lines="raise")):
        where = f"{path} record {n}"
        q, a = r.get("question"), r.get("answer")
        if q is None or a is None:
            conv = _field(r, "conversations", "conversatons", where=where)  # sic: a LLaVA-Med typo
            q = next((t["value"] for t in conv if t.get("from") == "human"), None)
            a = next((t["value"] for t in conv if t.get("from") == "gpt"), None)
            if q is None or a is None:
                raise errors.UserError(f"{where}: conversations need a human and a gpt turn")
        q = str(q).replace(data.IMAGE_TOKEN, "").strip()
        img = r.get("image")
        out.append(vqa_example(r.get("id", r.get("question_id", n)), q, a,
                               str(root / img) if img else None, r.get("lang"), r.get("answer_type"),
                               hint=hint))
    return _rooted(out, root)


def load_pmc_vqa(path: Path, images=None) -> list[Example]:
    """PMC-VQA CSV (`test_2.csv` / `test_clean.csv`): Figure_path, Question, Choice A..D (values carry
    an "A:" prefix), Answer_label (or the answer text in `Answer` / early `Anwser`)."""
    root = _image_root(path, images, "images", "figures")
    out = []
    for n, r in enumerate(read_csv(path)):
        where = f"{path} row {n + 2}"
        options = {}
        for k in "ABCDE":
            v = r.get(f"Choice {k}")
            if v:
                options[k] = re.sub(rf"^\s*{k}\s*[:：.]\s*", "", v).strip()
        label = (r.get("Answer_label") or "").strip()
        if not label:
            text = re.sub(r"^\s*[A-E]\s*[:：.]\s*", "", _field(r, "Answer", "Anwser", where=where)).strip()
            label = next((k for k, v in options.items() if v == text), "")
        out.append(choice_example(r.get("index", n), _field(r, "Question", where=where), options, label,
                                  "en", str(root / _field(r, "Figure_path", where=where))))
    return _rooted(out, root)


def load_medqa(path: Path, images=None) -> list[Example]:
    """MedQA JSONL (US or Mainland): question, options (dict A-E, or bigbio's [{key, value}]),
    answer_idx (or the answer text)."""
    out = []
    for n, r in enumerate(data.read_records(path, bad_lines="raise")):
        where = f"{path} record {n}"
        opts = _field(r, "options", where=where)
        if isinstance(opts, list):
            opts = {o["key"]: o["value"] for o in opts}
        gold = r.get("answer_idx") or next((k for k, v in opts.items() if v == r.get("answer")), None)
        if gold is None:
            raise errors.UserError(f"{where}: no answer_idx and the answer matches no option")
        out.append(choice_example(r.get("id", n), _field(r, "question", where=where), opts, gold))
    return out


def load_pubmedqa(path: Path, images=None) -> list[Example]:
    """PubMedQA PQA-L `ori_pqal.json` ({PMID: {QUESTION, CONTEXTS, final_decision}}); a
    `test_ground_truth.json` beside it restricts to the 500 test PMIDs and gives their labels."""
    records = data.read_records(path, bad_lines="raise", allow_object=True)
    truth_file = path.parent / "test_ground_truth.json"
    truth = (data.read_records(truth_file, bad_lines="raise", allow_object=True)
             if truth_file.is_file() and truth_file != path else None)
    out = []
    for pmid in (truth if truth is not None else records):
        where = f"{path} entry {pmid}"
        if pmid not in records:
            raise errors.UserError(f"{truth_file} names PMID {pmid}, which {path} lacks")
        r = records[pmid]
        gold = truth[pmid] if truth is not None else _field(r, "final_decision", where=where)
        context = " ".join(_field(r, "CONTEXTS", where=where))
        q = _field(r, "QUESTION", where=where)
        out.append(Example(id=str(pmid), question=q, gold=str(gold).lower(), lang="en",
                           qtype="yesnomaybe",
                           prompt=f"{data.YES_NO_MAYBE_HINT} {context} {q}"))
    return out


def load_cmb(path: Path, images=None, answers=None) -> list[Example]:
    """CMB-Exam items (id, question_type, question, option {A..E}, answer inline or in --answers, a
    list of {id, answer}); empty options are dropped."""
    key = {}
    if answers:
        key = {str(a["id"]): a["answer"] for a in data.read_records(answers, bad_lines="raise")}
    out = []
    for n, r in enumerate(data.read_records(path, bad_lines="raise")):
        where = f"{path} record {n}"
        id_ = str(r.get("id", n))
        gold = r.get("answer") or key.get(id_)
        if not gold:
            raise errors.UserError(f"{where}: no answer (inline or in --answers) for id {id_}")
        kind = f"（{r['question_type']}）" if r.get("question_type") else ""
        out.append(choice_example(id_, _field(r, "question", where=where),
                                  _field(r, "option", "options", where=where), gold, "zh", kind=kind))
    return out


def load_cmexam(path: Path, images=None) -> list[Example]:
    """CMExam CSV: Question, Options (one string, a line per option like "A 内容"), Answer (1-5 letters)."""
    out = []
    for n, r in enumerate(read_csv(path)):
        where = f"{path} row {n + 2}"
        options = dict(re.findall(r"^\s*([A-E])[\s.:：、]+(.*?)\s*$", _field(r, "Options", where=where),
                                  flags=re.M))
        out.append(choice_example(n, _field(r, "Question", where=where), options,
                                  _field(r, "Answer", where=where), "zh"))
    return out


def load_caption(path: Path, images=None) -> list[Example]:
    """Caption / report generation from LLaVA-format records (like the demo's pretrain.json): image,
    first human turn (may be just "<image>") and the reference text as the first gpt turn."""
    out = []
    for ex in load_vqa(path, images, hint=False):
        ex.qtype, ex.lang = "report", detect_lang(ex.gold)
        ex.prompt = ex.question or ("请描述这张图像。" if ex.lang == "zh" else "Describe the image.")
        out.append(ex)
    return out


TASKS = {  # task name -> loader(path, images, **options)
    "vqa-rad": load_vqa_rad, "slake": load_slake, "pathvqa": load_pathvqa, "pmc-vqa": load_pmc_vqa,
    "medqa": load_medqa, "pubmedqa": load_pubmedqa, "cmb": load_cmb, "cmexam": load_cmexam,
    "vqa": load_vqa, "caption": load_caption,
}


def load_task(task: str, path, images=None, *, lang=None, limit=None, hint=None, answers=None,
              split="test") -> list[Example]:
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist")
    kw = {}
    if hint is not None and task in ("vqa-rad", "slake", "pathvqa", "vqa"):
        kw["hint"] = hint
    if task == "vqa-rad":
        kw["split"] = split
    if answers is not None:
        if task != "cmb":
            raise errors.UserError("--answers is only used by the cmb task")
        kw["answers"] = answers
    examples = TASKS[task](path, images, **kw)
    seen = Counter(e.id for e in examples)
    dup = [i for i, c in seen.items() if c > 1]
    if dup:
        raise errors.UserError(f"{path}: duplicate question ids {dup[:5]} (ids key predictions.jsonl)")
    if lang:
        examples = [e for e in examples if e.lang == lang]
    return examples[:limit] if limit else examples


# ==============================================================================================
# 2. Scoring (pure functions)
# ==============================================================================================
#
# The text normaliser of VQA-v2's evaluation, as MultiMedEval (`clean_str`) and LLaVA-Med
# (`normalize_word`) copy it: lower-case; drop the punctuation below (replaced by nothing when it
# touches a space or the text has a "1,000"-style number, else by a space); drop periods that do
# not start a decimal; number words -> digits; drop articles; restore contraction apostrophes.
# Chinese has no spaces, so after normalising, every CJK character is one token ("by characters").

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # upstream's lookbehind typo: any "." not before a digit
_COMMA = re.compile(r"(\d)(,)(\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# VQA-v2's table restores apostrophes: a contraction typed without one of its apostrophes maps to
# the contraction ("dont" -> "don't", "couldnt've" -> "couldn't've"). Derived from the contractions
# below, this equals the table's lower-case entries (less its one reversed entry, "somebody'd").
_CONTRACTIONS = {c[:i] + c[i + 1:]: c for c in """ain't aren't can't could've couldn't couldn't've
    didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've he's how'd how'll how's isn't
    it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock
    oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll
    somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll
    that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't
    we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd
    who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all
    y'all'll y'all'd've you'd you'd've you'll you're you've""".split() for i, ch in enumerate(c) if ch == "'"}
# Full-width punctuation never occurs in English text, so removing it keeps English results identical.
_ZH_PUNCT = re.compile(r"[，。？！：；、“”‘’（）《》【】…—·～「」]")


def normalize(text: str) -> str:
    """MultiMedEval's `clean_str` (= LLaVA-Med's `normalize_word` after lower())."""
    text = _ZH_PUNCT.sub(" ", str(text).lower())
    out, glued = text, _COMMA.search(text) is not None
    for p in _PUNCT:
        out = out.replace(p, "" if glued or p + " " in text or " " + p in text else " ")
    out = _PERIOD.sub("", out)  # upstream passes re.UNICODE as `count` (32 periods at most); we strip all
    words = [_NUMBERS.get(w, w) for w in out.split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words).replace(",", "")


def tokens(text: str) -> list[str]:
    """Normalised whitespace words, with each CJK character a token of its own."""
    return _CJK.sub(lambda m: f" {m.group(0)} ", normalize(text)).split()


def bleu1(pred: list[str], ref: list[str]) -> float:
    """Sentence BLEU-1 with brevity penalty (torchmetrics' BLEUScore(n_gram=1), as MultiMedEval uses)."""
    if not pred or not ref:
        return 0.0
    ref_counts = Counter(ref)
    hits = sum(min(c, ref_counts[w]) for w, c in Counter(pred).items())
    if hits == 0:
        return 0.0
    bp = 1.0 if len(pred) > len(ref) else math.exp(1 - len(ref) / len(pred))
    return bp * hits / len(pred)


def rouge_l(pred: list[str], ref: list[str]) -> float:
    """ROUGE-L F1 (longest common subsequence, beta = 1) on our tokens."""
    if not pred or not ref:
        return 0.0
    prev = [0] * (len(ref) + 1)
    for p in pred:
        cur = [0]
        for j, r in enumerate(ref):
            cur.append(prev[j] + 1 if p == r else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(pred), lcs / len(ref)
    return 2 * prec * rec / (prec + rec)


_POLARITY = re.compile("|".join([r"\b(?P<yes_en>yes)\b", r"\b(?P<no_en>no|not)\b",
                                   "(?P<no>" + "|".join(ZH_NO) + ")", "(?P<yes>" + "|".join(ZH_YES) + ")"]))


def zh_yes_no(text: str) -> str | None:
    """Polarity of a Chinese (or English) yes/no answer: its first yes/no word. Negative words are
    tried first at each position, so that 没有 is not read as 有 and 不是 not as 是."""
    m = _POLARITY.search(_ZH_PUNCT.sub(" ", str(text).lower()))
    if m is None:
        return None
    return "yes" if m.lastgroup in ("yes", "yes_en") else "no"


def score_vqa(pred: str, ex: Example) -> dict:
    """One VQA answer under both conventions.

    MultiMedEval: token *sets* P, G of the normalised texts; recall |P∩G|/|G|, precision, F1, BLEU-1.
    Closed (gold yes/no): if gold is "no", "not" joins G; correct when recall >= 0.4. Open: correct
    ("open_hit") when recall >= 0.75. Chinese closed questions compare yes/no polarity instead.
    LLaVA-Med: the dataset's CLOSED/OPEN label (else ours); closed = normalised gold is a substring of
    the normalised prediction (Chinese: polarity, as 有 is a substring of 没有); open = recall over
    token *counts*, tp / (tp + fn). (LLaVA-Med's script leaves a wrong closed answer that contains
    "yes" or "no" out of the denominator, which inflates its accuracy; every question counts here.)
    """
    P, G = set(tokens(pred)), set(tokens(ex.gold))
    hit = len(P & G)
    recall = hit / len(G) if G else 0.0
    precision = hit / len(P) if P else 0.0
    s = {"recall": recall, "f1": 2 * precision * recall / (precision + recall + 1e-8),
         "bleu1": bleu1(tokens(pred), tokens(ex.gold))}
    if ex.qtype == "closed":
        if ex.lang == "zh":
            s["closed_correct"] = zh_yes_no(pred) == zh_yes_no(ex.gold)
        else:
            G2 = G | {"not"} if G == {"no"} else G
            s["closed_correct"] = len(P & G2) / len(G2) >= 0.4
    else:
        s["open_hit"] = recall >= 0.75
    llava_closed = ex.answer_type == "CLOSED" if ex.answer_type else ex.qtype == "closed"
    if llava_closed:
        if ex.lang == "zh" and ex.qtype == "closed":
            s["llava_med_closed_correct"] = zh_yes_no(pred) == zh_yes_no(ex.gold)
        else:
            s["llava_med_closed_correct"] = normalize(ex.gold) in normalize(pred)
    else:
        pc, gc = Counter(tokens(pred)), Counter(tokens(ex.gold))
        tp = sum(min(c, pc[w]) for w, c in gc.items())
        s["llava_med_open_recall"] = tp / sum(gc.values()) if gc and pc else 0.0
    return s


def pick_option(pred: str, options: dict[str, str]) -> str | None:
    """MultiMedEval's MedQA rule: the option whose normalised "{key} {value}" has the highest BLEU-1
    against the normalised answer (first on ties); None (invalid) for an empty answer or BLEU 0.
    Quirk kept: a bare "A" normalises to nothing (an article), so it is invalid."""
    p = tokens(pred)
    if not p:
        return None
    scores = [bleu1(p, tokens(f"{k} {v}")) for k, v in options.items()]
    best = max(scores)
    return list(options)[scores.index(best)] if best > 0 else None


def extract_letters(pred: str, keys) -> str | None:
    """The option letter(s) an answer states explicitly: "B", "(B)", "AC", "A、C", "B. text",
    "The answer is B", "答案是B". None when it names none. Capitals only: a lower-case "a" is
    usually the article ("A patient ..." is not option A either: a letter must stand alone or be
    followed by punctuation)."""
    keys = "".join(keys)
    t = str(pred).strip()
    letters = rf"[{keys}](?:[\s,，、和&/]*[{keys}])*"
    m = (re.fullmatch(rf"[\s(（\[]*({letters})[\s)）\].。:：]*", t)
         or re.search(rf"(?:(?i:answer is|answer:)|答案是|答案为|答案[:：]|选)\s*[(（]?\s*({letters})\b", t)
         or re.match(rf"\s*[(（]?({letters})[)）.:：、]", t))
    if m is None:
        return None
    found = "".join(sorted(set(re.sub(rf"[^{keys}]", "", m.group(1).upper()))))
    return found or None


def score_choice(pred: str, ex: Example) -> dict:
    """`correct`: MultiMedEval's BLEU-1 option match (single-answer); answers with several letters
    (CMB/CMExam) need the exact letter set. `letter_correct`: the explicitly stated letter(s) equal
    the gold set (the usual rule of Chinese exam benchmarks and PMC-VQA)."""
    letters = extract_letters(pred, ex.options)
    if len(ex.gold) == 1:
        picked = pick_option(pred, ex.options)
    else:
        picked = letters
    return {"pred_option": picked, "correct": picked == ex.gold, "invalid": picked is None,
            "letter_correct": letters == ex.gold}


def score_yesnomaybe(pred: str, ex: Example) -> dict:
    """MultiMedEval's PubMedQA rule: count yes/no/maybe tokens, argmax wins (ties: yes, no, maybe)."""
    p = normalize(pred).split()
    counts = [p.count(w) for w in ("yes", "no", "maybe")]
    picked = ("yes", "no", "maybe")[counts.index(max(counts))] if max(counts) > 0 else None
    return {"pred_option": picked, "correct": picked == ex.gold, "invalid": picked is None}


def score_report(pred: str, ex: Example) -> dict:
    p, g = tokens(pred), tokens(ex.gold)
    return {"bleu1": bleu1(p, g), "rouge_l": rouge_l(p, g),
            "recall": len(set(p) & set(g)) / len(set(g)) if g else 0.0}


def score(pred: str, ex: Example) -> dict:
    pred = pred or ""
    if ex.qtype in ("closed", "open"):
        return score_vqa(pred, ex)
    return {"choice": score_choice, "yesnomaybe": score_yesnomaybe, "report": score_report}[ex.qtype](pred, ex)


def _mean(xs) -> float | None:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else None


def _macro_f1(golds, preds, labels) -> float:
    f1s = []
    for c in labels:
        tp = sum(g == c and p == c for g, p in zip(golds, preds))
        fp = sum(g != c and p == c for g, p in zip(golds, preds))
        fn = sum(g == c and p != c for g, p in zip(golds, preds))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / len(f1s)


def _metrics(rows: list[dict]) -> dict:
    """Aggregate per-question rows ({"example", "scores"}) of one subset into named metrics."""
    m: dict = {"n": len(rows)}
    vqa = [r for r in rows if r["example"].qtype in ("closed", "open")]
    if vqa:
        closed = [r["scores"] for r in vqa if r["example"].qtype == "closed"]
        open_ = [r["scores"] for r in vqa if r["example"].qtype == "open"]
        m.update(n_closed=len(closed), n_open=len(open_),
                 closed_accuracy=_mean(s["closed_correct"] for s in closed),
                 open_recall=_mean(s["recall"] for s in open_),
                 open_accuracy=_mean(s["open_hit"] for s in open_),
                 recall=_mean(r["scores"]["recall"] for r in vqa),
                 f1=_mean(r["scores"]["f1"] for r in vqa),
                 bleu1=_mean(r["scores"]["bleu1"] for r in vqa))
        lc = [r["scores"]["llava_med_closed_correct"] for r in vqa if "llava_med_closed_correct" in r["scores"]]
        lo = [r["scores"]["llava_med_open_recall"] for r in vqa if "llava_med_open_recall" in r["scores"]]
        m["llava_med"] = {"n_closed": len(lc), "n_open": len(lo), "closed_accuracy": _mean(lc),
                          "open_recall": _mean(lo)}
    choice = [r for r in rows if r["example"].qtype in ("choice", "yesnomaybe")]
    if choice:
        m.update(accuracy=_mean(r["scores"]["correct"] for r in choice),
                 invalid=_mean(r["scores"]["invalid"] for r in choice))
        if any("letter_correct" in r["scores"] for r in choice):
            m["letter_accuracy"] = _mean(r["scores"]["letter_correct"] for r in choice
                                         if "letter_correct" in r["scores"])
        if all(r["example"].qtype == "yesnomaybe" for r in choice):
            m["macro_f1"] = _macro_f1([r["example"].gold for r in choice],
                                      [r["scores"]["pred_option"] for r in choice], ("yes", "no", "maybe"))
    report = [r["scores"] for r in rows if r["example"].qtype == "report"]
    if report:
        m.update(bleu1=_mean(s["bleu1"] for s in report), rouge_l=_mean(s["rouge_l"] for s in report),
                 recall=_mean(s["recall"] for s in report))
    return m


RULES = {
    "closed_accuracy": "MultiMedEval: gold yes/no; token-set recall >= 0.4 with 'not' added to a 'no' "
                       "gold; Chinese: yes/no polarity of the answer equals the gold's",
    "open_recall": "MultiMedEval: mean token-set recall |P∩G|/|G| over open questions",
    "open_accuracy": "MultiMedEval: share of open questions with recall >= 0.75",
    "llava_med": "LLaVA-Med: dataset CLOSED/OPEN label; closed = normalised gold is a substring of "
                 "the normalised answer (Chinese yes/no: polarity); open = unigram-count recall",
    "accuracy": "MultiMedEval: option with the highest BLEU-1 (single answer) / exact letter set "
                "(several answers); PubMedQA: most frequent of yes/no/maybe",
    "letter_accuracy": "the explicitly stated option letter(s) equal the gold set",
    "tokens": "VQA-v2 normaliser, whitespace words; each Chinese character is one token",
}


def summarize(examples: list[Example], scores: list[dict], skipped: dict | None = None) -> dict:
    """Named metrics for the whole task, per language, and (where the dataset has one) per its own
    CLOSED/OPEN label."""
    rows = [{"example": e, "scores": s} for e, s in zip(examples, scores)]
    out = _metrics(rows)
    langs = sorted({e.lang for e in examples})
    if len(langs) > 1:
        out["by_lang"] = {lang: _metrics([r for r in rows if r["example"].lang == lang]) for lang in langs}
    types = sorted({e.answer_type for e in examples if e.answer_type})
    if types:
        out["by_answer_type"] = {t: _metrics([r for r in rows if r["example"].answer_type == t])
                                 for t in types}
    if skipped:
        out["skipped"] = dict(skipped)
    out["rules"] = {k: v for k, v in RULES.items() if k in out or k == "tokens"}
    return out


_TABLE_KEYS = ("n", "n_closed", "n_open", "closed_accuracy", "open_recall", "open_accuracy", "recall", "f1",
               "bleu1", "rouge_l", "accuracy", "letter_accuracy", "invalid", "macro_f1")


def format_table(task: str, summary: dict) -> str:
    """The summary as a plain-text table: one row per metric, one column per subset."""
    cols = {"all": summary, **summary.get("by_lang", {}), **summary.get("by_answer_type", {})}
    rows = [(k, [c.get(k) for c in cols.values()]) for k in _TABLE_KEYS if k in summary]
    if "llava_med" in summary:
        for k in ("closed_accuracy", "open_recall"):
            rows.append((f"llava_med.{k}", [c.get("llava_med", {}).get(k) for c in cols.values()]))
    fmt = lambda v: "-" if v is None else (str(v) if isinstance(v, int) else f"{100 * v:.1f}")
    w = max(len(r[0]) for r in rows) + 2
    lines = [f"{task:<{w}}" + "".join(f"{c:>10}" for c in cols)]
    lines += [f"{k:<{w}}" + "".join(f"{fmt(v):>10}" for v in vals) for k, vals in rows]
    return "\n".join(lines)


# ==============================================================================================
# 3. Generation
# ==============================================================================================



def encode(ex: Example, tok, m, template, system) -> list[int]:
    """The generation prompt of one example; image placeholders expanded to the model's count."""
    return data.encode_prompt(ex.prompt, tok, template, system=system or None,
                              has_image=ex.image is not None, num_image_tokens=m.num_image_tokens,
                              image_token_id=m.image_token_id)


class PromptSet(torch.utils.data.Dataset):
    """Tokenised prompts (their lengths are needed up front, to sort) plus images, which are loaded
    and preprocessed here, inside DataLoader workers, while the model generates."""

    def __init__(self, examples, prompts, image_size, pad_to_square, blank_images=False,
                 norm=(data.CLIP_MEAN, data.CLIP_STD), allow_outside_image_root=False):
        self.examples, self.prompts = examples, prompts
        self.image_size, self.pad_to_square, self.blank, self.norm = image_size, pad_to_square, blank_images, norm
        self.allow_outside = allow_outside_image_root

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        ex = self.examples[i]
        item = {"id": ex.id, "input_ids": self.prompts[i]}
        if ex.image is not None:
            try:  # skip and report a missing/corrupt/oversized/outside image instead of crashing mid-run
                if ex.image_root is not None and not self.allow_outside:
                    data.check_inside(ex.image, ex.image_root)
                img = data.load_image(ex.image)  # also when blanking: both runs skip the same questions
            except data.SampleError as e:
                return {"id": ex.id, "skip": e.reason, "detail": str(e)}
            if self.blank:
                img = Image.new("RGB", (self.image_size,) * 2, data.CLIP_FILL)
            item["pixel_values"] = data.preprocess_image(img, self.image_size, self.pad_to_square,
                                                         mean=self.norm[0], std=self.norm[1])
        return item


def _collate(batch, pad_id):
    out = data.collate(batch, pad_id, padding_side="left")
    out["skipped_ids"] = {b["id"]: (b["skip"], b["detail"]) for b in batch if "skip" in b}
    return out


@torch.no_grad()
def generate_answers(m, tok, examples: list[Example], *, template="llama3", system="",
                     batch_size=16, max_new_tokens=64, pad_to_square=True, norm=(data.CLIP_MEAN, data.CLIP_STD),
                     blank_images=False,
                     do_sample=False, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=0,
                     num_workers=2, progress=True, allow_outside_image_root=False) -> tuple[dict, dict, float]:
    """Answers for every example: ({id: text}, {id: (skip reason, detail)}, seconds).

    Prompts are sorted by length, longest first (a too-large batch fails at once, and rows of a
    batch need little padding), left-padded so every row's next token is read at the last column,
    and decoded with the KV cache. Sampling draws from one seeded generator, so a run is repeatable
    for a given batch size (not across batch sizes: rows draw in a different order).
    """
    device = m.llm.embed_tokens.weight.device
    prompts = [encode(ex, tok, m, template, system) for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: -len(prompts[i]))
    loader = torch.utils.data.DataLoader(
        PromptSet(examples, prompts, m.config.vision.image_size, pad_to_square, blank_images, norm,
                  allow_outside_image_root),
        batch_sampler=[order[i:i + batch_size] for i in range(0, len(order), batch_size)],
        collate_fn=functools.partial(_collate, pad_id=tok.pad_id), num_workers=num_workers)
    gen = torch.Generator(device).manual_seed(seed) if do_sample else None
    stops = data.stop_ids(tok, m.config.llm.eos_token_id)
    answers, skipped = {}, {}
    bar = tqdm(total=len(examples), unit="sample", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    for batch in loader:
        skipped.update(batch["skipped_ids"])
        if batch["ids"]:
            pix = batch["pixel_values"]
            out = m.generate(batch["input_ids"].to(device),
                             None if pix is None else pix.to(device, m.llm.embed_tokens.weight.dtype),
                             batch["attention_mask"].to(device), max_new_tokens, do_sample=do_sample,
                             temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty, stop_token_ids=stops,
                             pad_token_id=tok.pad_id, generator=gen)
            for qid, row in zip(batch["ids"], out.tolist()):
                answers[qid] = data.decode_answer(row, tok, stops)
        bar.update(len(batch["ids"]) + len(batch["skipped_ids"]))  # tqdm shows samples/s
    bar.close()
    return answers, skipped, time.perf_counter() - t0


class TokenPrinter:
    """A generate() streamer for one row: prints text as it grows. Decoding the whole answer each
    step (not token by token) keeps multi-byte characters whole: a Chinese character is often
    split over two byte-level tokens, and half of it decodes to U+FFFD."""

    def __init__(self, tok, stops, out=None):
        self.tok, self.stops, self.out = tok, set(stops), out or sys.stdout
        self.ids, self.shown, self.done = [], "", False

    def __call__(self, step_tokens: torch.Tensor):
        t = int(step_tokens[0])
        self.done = self.done or t in self.stops
        if self.done:
            return
        self.ids.append(t)
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd") and text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text


def ask(m, tok, question: str, image=None, *, template="llama3", system="", pad_to_square=True,
        norm=(data.CLIP_MEAN, data.CLIP_STD), max_new_tokens=256, stream=True, **sampling) -> str:
    """One question, with an optional image (path: DICOM, PNG, JPG ...), answer streamed to stdout."""
    device, dtype = m.llm.embed_tokens.weight.device, m.llm.embed_tokens.weight.dtype
    ex = Example(id="0", question=question, gold="", image=image, prompt=question)
    ids = torch.tensor([encode(ex, tok, m, template, system)], device=device)
    pix = None
    if image is not None:
        img = data.load_image(image)
        pix = data.preprocess_image(img, m.config.vision.image_size, pad_to_square, mean=norm[0],
                                    std=norm[1])[None].to(device, dtype)
    stops = data.stop_ids(tok, m.config.llm.eos_token_id)
    printer = TokenPrinter(tok, stops) if stream else None
    out = m.generate(ids, pix, None, max_new_tokens, stop_token_ids=stops, pad_token_id=tok.pad_id,
                     streamer=printer, **sampling)
    answer = data.decode_answer(out[0].tolist(), tok, stops)
    if stream:  # whatever the stream held back (an incomplete character at the end), then a newline
        full = tok.decode(printer.ids)
        sys.stdout.write((full[len(printer.shown):] if full.startswith(printer.shown) else "") + "\n")
    return answer


# ==============================================================================================
# 4. CLI: evaluate, rescore, ask
# ==============================================================================================


def read_predictions(path) -> tuple[dict[str, str], dict]:
    """({id: prediction}, {id: (reason, detail)}) from JSONL: ours (`id`, `prediction`, and
    `skipped` for questions whose image failed: they stay unscored, as in the original run) or
    LLaVA's answer files (`question_id`, `text`). An id on two lines is an error: which answer
    counts would be a guess."""
    answers, skipped, lines = {}, {}, {}
    for n, rec in enumerate(data.read_records(path, bad_lines="raise"), 1):
        qid = rec.get("id", rec.get("question_id")) if isinstance(rec, dict) else None
        if qid is None:
            raise errors.UserError(f"{path}:{n}: no `id` (or `question_id`) field")
        lines.setdefault(str(qid), []).append(n)
        if rec.get("skipped"):
            skipped[str(qid)] = (rec["skipped"].split(":")[0], rec["skipped"])
        else:
            answers[str(qid)] = rec.get("prediction", rec.get("text")) or ""
    dup = [f"{i!r} (lines {', '.join(map(str, ns))})" for i, ns in lines.items() if len(ns) > 1]
    if dup:
        raise errors.UserError(f"{path}: duplicate ids: {', '.join(dup[:5])}" + (f" and {len(dup) - 5} more"
                                                                                if len(dup) > 5 else ""))
    return answers, skipped


def empty_golds(examples: list[Example]) -> dict:
    """{id: ("empty_gold", detail)} for questions whose gold answer is empty. Nothing can match it, so
    every answer would score as wrong: they are reported and left unscored, like skipped questions."""
    return {e.id: ("empty_gold", "empty_gold: the gold answer is empty") for e in examples if not e.gold.strip()}


def write_outputs(out_dir, task, examples, answers, skipped, settings) -> dict:
    """Score, write predictions.jsonl + summary.json, return the task's summary."""
    kept = [e for e in examples if e.id not in skipped]
    scores = [score(answers.get(e.id, ""), e) for e in kept]
    summary = summarize(kept, scores, Counter(r for r, _ in skipped.values()))
    summary["settings"] = settings
    if out_dir:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        by_id = {e.id: s for e, s in zip(kept, scores)}
        with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
            for e in examples:
                rec = {"id": e.id, "question": e.question, "gold": e.gold,
                       "prediction": answers.get(e.id), "scores": by_id.get(e.id), "lang": e.lang,
                       "qtype": e.qtype, "answer_type": e.answer_type}
                if e.id in skipped:
                    rec["skipped"] = skipped[e.id][1]
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        (out_dir / "summary.json").write_text(json.dumps({task: summary}, indent=2, ensure_ascii=False))
    return summary


def parse_args(argv=None):
    p = errors.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--task", choices=sorted(TASKS), help="benchmark format of --data")
    g.add_argument("--data", help="the task's file (or parquet folder)")
    g.add_argument("--images", help="image folder (default: per format, beside --data)")
    g.add_argument("--allow-outside-image-root", action="store_true",
                   help="read images that --data names by absolute or ../ paths, or that links lead out of the "
                        "image folder to (refused and reported as skipped otherwise)")
    g.add_argument("--answers", help="cmb: answer-key file (list of {id, answer})")
    g.add_argument("--split", default="test", choices=["test", "all"], help="vqa-rad JSON: test questions only")
    g.add_argument("--lang", choices=["en", "zh"], help="keep only questions in this language")
    g.add_argument("--limit", type=errors.at_least(1), help="first N questions only, for a quick look")
    g.add_argument("--predictions", help="rescore this JSONL ({id, prediction} per line); loads no model")
    g.add_argument("--out", help="write predictions.jsonl and summary.json here")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="our checkpoint (any stage), a llava-hf folder or an original LLaVA folder")
    g.add_argument("--vision", help="CLIP folder for an original LLaVA checkpoint without its vision tower")
    g.add_argument("--tokenizer", help="default: the checkpoint's recorded tokenizer, else the model folder")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU, fp32 on CPU")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g = p.add_argument_group("prompt and decoding")
    g.add_argument("--template", choices=sorted(data.TEMPLATES),
                   help="default: the checkpoint's prompt policy (data.prompt_policy)")
    g.add_argument("--system", help=f"system prompt (default: the checkpoint's prompt policy, as it was trained: none "
                                     f"for Llama-3 models, LLaVA-1.5's for Vicuna ones; the seed evaluated with "
                                     f"{data.EVAL_SYSTEM!r})")
    g.add_argument("--yes-no-hint", choices=["auto", "on", "off"], default="auto",
                   help=f"prefix {data.YES_NO_HINT.strip()!r} to yes/no questions (auto: on for vqa-rad, slake, pathvqa)")
    g.add_argument("--pad-to-square", action=argparse.BooleanOptionalAction, default=None,
                   help="default: as the checkpoint was trained")
    g.add_argument("--blank-images", action="store_true",
                   help="replace every image by a blank (CLIP-mean colour) one: how much do answers use the image?")
    g.add_argument("--batch-size", type=errors.at_least(1), default=16)
    g.add_argument("--max-new-tokens", type=errors.at_least(1), help="default 64 (256 for caption)")
    add_sampling_flags(g)
    g.add_argument("--workers", type=errors.at_least(0), default=2, help="DataLoader workers preprocessing images")
    g = p.add_argument_group("one question")
    g.add_argument("--image", help="an image (DICOM, PNG, JPG ...) to ask --question about")
    g.add_argument("--question", help="ask this and stream the answer")
    args = p.parse_args(argv)
    args.mode = resolve_mode(args, p.error)
    return args


def resolve_mode(args, error) -> str:
    """The one thing this run does, named: "evaluate" (--task --data --model: generate and score),
    "rescore" (--task --data --predictions: score saved answers, no model) or "ask" (--model
    --question [--image]: one streamed answer). `error` (argparse's) refuses flags that contradict."""
    if args.question is not None:
        clash = [flag for flag, v in (("--task", args.task), ("--data", args.data),
                                      ("--predictions", args.predictions)) if v]
        if clash:
            error(f"--question asks one question and scores nothing: drop {', '.join(clash)}")
        if not args.model:
            error("--question needs --model")
        return "ask"
    if args.image is not None:
        error("--image needs --question")
    if not (args.task and args.data):
        error("give --task and --data (with --model or --predictions), or --question")
    if args.model and args.predictions:
        error("--predictions rescores saved answers and loads no model: drop --model (or --predictions)")
    if not (args.model or args.predictions):
        error("give --model to generate answers, or --predictions to rescore")
    return "rescore" if args.predictions else "evaluate"


def load_model(args):
    """(model, tokenizer, prompt policy) from the CLI arguments. The policy is what the checkpoint
    records (or its layout implies), whatever container it is in; --template, --system and
    --pad-to-square override its parts. Which one was used is printed and kept in the summary."""
    import model

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    m = model.from_pretrained(args.model, dtype=dtype, device=device, vision=args.vision)
    tok_dir = data.tokenizer_folder(args.model, args.tokenizer)
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"tokenizer folder {tok_dir} (found via {args.model}) does not exist; "
                                f"pass --tokenizer DIR")
    tok = data.load_tokenizer(tok_dir)
    policy, where = data.prompt_policy(args.model)
    flags = {"template": args.template, "system": args.system, "pad_to_square": args.pad_to_square}
    policy = dataclasses.replace(policy, **{k: v for k, v in flags.items() if v is not None})
    overridden = [k for k, v in flags.items() if v is not None]
    print(f"prompt policy: template {policy.template}, system {policy.system!r}, pad_to_square "
          f"{policy.pad_to_square} ({where}" + (f"; overridden: {', '.join(overridden)})" if overridden else ")"),
          file=sys.stderr)
    return m, tok, policy, where


def add_sampling_flags(g) -> None:
    """Decoding flags, as the seed's evaluation has them; chat.py takes the same ones."""
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=errors.at_least(0.0, float), default=1.0)
    g.add_argument("--top-p", type=errors.between(0, 1), default=1.0)
    g.add_argument("--top-k", type=errors.at_least(0), default=0, help="0: no top-k cut")
    g.add_argument("--repetition-penalty", type=errors.above(0), default=1.0,
                   help="> 1 discourages tokens already in the prompt or answer (transformers' rule)")
    g.add_argument("--seed", type=int, default=0)


def _sampling(args) -> dict:
    return dict(do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                repetition_penalty=args.repetition_penalty)


def run_ask(args) -> int:
    """--question [--image]: stream one answer."""
    m, tok, policy, _ = load_model(args)
    gen = torch.Generator(m.llm.embed_tokens.weight.device).manual_seed(args.seed) if args.do_sample else None
    ask(m, tok, args.question, args.image, template=policy.template, system=policy.system,
        pad_to_square=policy.pad_to_square, norm=(policy.image_mean, policy.image_std),
        max_new_tokens=args.max_new_tokens or 256, generator=gen, **_sampling(args))
    return 0


def _task_examples(args) -> list[Example]:
    hint = {"auto": None, "on": True, "off": False}[args.yes_no_hint]
    return load_task(args.task, args.data, args.images, lang=args.lang, limit=args.limit, hint=hint,
                     answers=args.answers, split=args.split)


def run_rescore(args) -> int:
    """--predictions: score saved answers (ours or LLaVA's answer files) without a model."""
    examples = _task_examples(args)
    answers, skipped = read_predictions(args.predictions)
    empty = empty_golds(examples)
    missing = [e.id for e in examples if e.id not in answers and e.id not in skipped and e.id not in empty]
    if missing:  # scored as empty answers (wrong), never silently left out
        print(f"warning: {len(missing)} questions have no prediction in {args.predictions} "
              f"(e.g. {missing[:3]}); they count as empty answers", file=sys.stderr)
    settings = {"task": args.task, "data": str(args.data), "n_questions": len(examples),
                "predictions": str(args.predictions), "missing_predictions": len(missing)}
    return _report(args, examples, answers, skipped, settings)


def run_evaluate(args) -> int:
    """--model: generate an answer to every question, then score."""
    examples = _task_examples(args)
    m, tok, policy, where = load_model(args)
    max_new = args.max_new_tokens or (256 if args.task == "caption" else 64)
    answers, skipped, seconds = generate_answers(
        m, tok, examples, template=policy.template, system=policy.system, batch_size=args.batch_size,
        max_new_tokens=max_new, pad_to_square=policy.pad_to_square, norm=(policy.image_mean, policy.image_std),
        blank_images=args.blank_images, seed=args.seed, num_workers=args.workers,
        allow_outside_image_root=args.allow_outside_image_root, **_sampling(args))
    for qid, (reason, detail) in list(skipped.items())[:10]:
        print(f"skipped {qid}: {detail}", file=sys.stderr)
    settings = {"task": args.task, "data": str(args.data), "n_questions": len(examples),
                "model": str(args.model), "template": policy.template, "system": policy.system or None,
                "pad_to_square": policy.pad_to_square, "prompt_policy": where, "blank_images": args.blank_images, "max_new_tokens": max_new,
                "batch_size": args.batch_size, "dtype": str(m.llm.embed_tokens.weight.dtype),
                "decoding": "sample" if args.do_sample else "greedy", "seconds": round(seconds, 2),
                "samples_per_s": round(len(examples) / max(seconds, 1e-9), 3)}
    if args.do_sample:
        settings.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if args.repetition_penalty != 1.0:
        settings["repetition_penalty"] = args.repetition_penalty
    return _report(args, examples, answers, skipped, settings)


def _report(args, examples, answers, skipped, settings) -> int:
    empty = empty_golds(examples)
    if empty:
        print(f"warning: {len(empty)} questions in {args.data} have an empty gold answer ({list(empty)[:5]}"
              f"{' ...' if len(empty) > 5 else ''}); they are not scored", file=sys.stderr)
    summary = write_outputs(args.out, args.task, examples, answers, {**skipped, **empty}, settings)
    print(format_table(args.task, summary))
    if "skipped" in summary:
        print(f"skipped (not scored): {summary['skipped']}")
    if args.out:
        print(f"wrote {Path(args.out) / 'predictions.jsonl'} and {Path(args.out) / 'summary.json'}")
    return 0


MODES = {"evaluate": run_evaluate, "rescore": run_rescore, "ask": run_ask}


def main(argv=None) -> int:
    args = parse_args(argv)
    return MODES[args.mode](args)


if __name__ == "__main__":
    errors.run(main)
