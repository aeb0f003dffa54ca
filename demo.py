"""The embedded bilingual demo dataset: what `python train.py` trains on when given no data.

Without GPUs or downloadable weights, the honest proof that the pipeline works is a tiny model,
trained from nothing, that learns a visual medical task in English and Chinese. This file writes
that task, deterministically and offline:

- synthetic 96x96 "scans" of four modalities (abdominal CT, brain MRI, chest X-ray, liver
  ultrasound), each with or without one bright or dark lesion in one of four image quadrants,
  with geometric/intensity jitter and noise so that no image is memorisable; plus pydicom's real
  CT and MR test files (and variants of them with a synthetic lesion) when pydicom is installed;
- `pretrain.json` (captions), `finetune.json` (multi-turn VQA + text-only QA) and `text.jsonl`
  (raw text) in the LLaVA format that `data.py` reads, and a held-out `test.json` in the VQA
  evaluation format (question / answer / answer_type / lang, like SLAKE);
- `tokenizer/`: a 2048-token byte-level BPE with the Llama-3 special tokens, loadable by
  `tokenizers` and by transformers.

Why a model cannot score without looking: every yes/no question pattern (and each wording of it)
has exactly alternating yes/no answers, so language priors give 50%; the answers depend only on
pixels (modality texture, lesion presence, lesion brightness, lesion quadrant).

Locations are in image coordinates ("upper left" = top-left of the picture), not the radiological
patient-left convention, so that anyone can check an answer by looking at the PNG.

    python demo.py [--root DIR] [--force]      # or, from code: demo.ensure() -> Path
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import data
import errors

VERSION = 1  # the demo format; the marker also records a hash of this file, so any edit rebuilds
DEFAULT_ROOT = Path(__file__).resolve().parent / "demo_data"  # gitignored
MARKER = "demo_config.json"  # written last: its presence means the folder is complete
IMAGE_SIZE = 96  # larger than the tiny ViT's 64 px so preprocessing resizes like real data
N_DICOM_VARIANTS = 8  # per real DICOM file (train split only: the two base images can't be held out)

# ---------------------------------------------------------------------------------------------
# Vocabulary: every word the demo uses, in both languages.
# ---------------------------------------------------------------------------------------------
MODALITIES = {
    "ct": dict(en="CT", en_a="a CT", en_scan="CT scan", part_en="abdomen", zh="CT", part_zh="腹部"),
    "mri": dict(en="MRI", en_a="an MRI", en_scan="MRI scan", part_en="brain", zh="磁共振", part_zh="脑部"),
    "xray": dict(en="X-ray", en_a="an X-ray", en_scan="X-ray", part_en="chest", zh="X光", part_zh="胸部"),
    "us": dict(en="ultrasound", en_a="an ultrasound", en_scan="ultrasound", part_en="liver", zh="超声",
               part_zh="肝脏"),
}
# quadrant -> (en, zh, x sign, y sign)
LOCATIONS = {
    "upper_left": ("upper left", "左上", -1, -1),
    "upper_right": ("upper right", "右上", 1, -1),
    "lower_left": ("lower left", "左下", -1, 1),
    "lower_right": ("lower right", "右下", 1, 1),
}
BRIGHTNESS = {True: ("bright", "亮斑"), False: ("dark", "暗斑")}
YES_NO = {"en": ("yes", "no"), "zh": ("是", "否")}
NO_LESION = {"en": "no lesion", "zh": "未见病灶"}

# A small closed set of wordings per pattern, so a 4-layer model learns them in minutes.
QUESTIONS = {
    # closed (yes/no)
    "presence": {"en": ["Is there a lesion in this image?", "Is this image abnormal?"],
                 "zh": ["图像中有病灶吗？", "这张图像有异常吗？"]},
    "modality_check": {"en": ["Is this {a_mod} image?", "Was this image taken with {mod}?"],
                       "zh": ["这是{mod}图像吗？", "这张图像是{mod}检查吗？"]},
    "brightness_check": {"en": ["Is the lesion {b}?"], "zh": ["病灶是{b}吗？"]},
    # open (1-3 word answers)
    "modality": {"en": ["What modality is this?", "What type of scan is this?"],
                 "zh": ["这是什么检查？", "这是哪种影像检查？"]},
    "location": {"en": ["Where is the lesion?"], "zh": ["病灶在哪里？"]},
    "brightness": {"en": ["Is the lesion bright or dark?"], "zh": ["病灶是亮斑还是暗斑？"]},
    "body_part": {"en": ["Which part of the body is shown?"], "zh": ["这是身体的哪个部位？"]},
}
CLOSED = ("presence", "modality_check", "brightness_check")
CHECKS = ("modality_check", "brightness_check")  # yes/no about a value the question names
# Evaluation prefixes closed questions with this (MultiMedEval's hint); some training turns carry it too.
YES_NO_PREFIX = {"en": data.YES_NO_HINT, "zh": "请用是或否回答以下问题。"}
TEXT_QA = {"en": ("Question: ", "Answer: "), "zh": ("问：", "答：")}  # text.jsonl: caption, then QA lines

# Text-only medical QA (finetune.json records without an image, and raw sentences for text.jsonl).
FACTS = {
    "en": [("What does CT stand for?", "computed tomography", "CT stands for computed tomography."),
           ("What does MRI stand for?", "magnetic resonance imaging", "MRI stands for magnetic resonance imaging."),
           ("Which imaging method uses sound waves?", "ultrasound", "Ultrasound makes images with sound waves."),
           ("Which imaging method uses a strong magnetic field?", "MRI", "MRI makes images with a strong magnetic field."),
           ("Which imaging test is usually done first for the chest?", "X-ray",
            "An X-ray is usually the first imaging test for the chest."),
           ("How does bone appear on CT?", "white", "Bone appears white on CT."),
           ("How does air in the lungs appear on an X-ray?", "black", "Air in the lungs appears black on an X-ray."),
           ("How does a simple cyst appear on ultrasound?", "dark", "A simple cyst appears dark on ultrasound."),
           ("What is a lesion?", "abnormal tissue", "A lesion is an area of abnormal tissue."),
           ("What shape does an ultrasound image have?", "a fan", "An ultrasound image has the shape of a fan."),
           ("Does a CT scan use X-rays?", "yes", "A CT scan uses X-rays."),
           ("Is a CT image a cross-sectional image?", "yes", "A CT image is a cross-sectional image."),
           ("Can MRI show the brain?", "yes", "MRI can show the brain in detail."),
           ("Does MRI use ionizing radiation?", "no", "MRI does not use ionizing radiation."),
           ("Does ultrasound use ionizing radiation?", "no", "Ultrasound does not use ionizing radiation."),
           ("Is a chest X-ray a cross-sectional image?", "no",
            "A chest X-ray is a projection image, not a cross-sectional image.")],
    "zh": [("CT的全称是什么？", "计算机断层扫描", "CT的全称是计算机断层扫描。"),
           ("MRI的中文名称是什么？", "磁共振成像", "MRI的中文名称是磁共振成像。"),
           ("哪种检查利用声波成像？", "超声", "超声检查利用声波成像。"),
           ("哪种检查利用强磁场成像？", "磁共振", "磁共振检查利用强磁场成像。"),
           ("检查胸部通常先做哪种影像检查？", "X光", "检查胸部通常先做X光检查。"),
           ("骨骼在CT上呈什么颜色？", "白色", "骨骼在CT上呈白色。"),
           ("肺内的空气在X光片上呈什么颜色？", "黑色", "肺内的空气在X光片上呈黑色。"),
           ("单纯囊肿在超声上表现为什么？", "无回声暗区", "单纯囊肿在超声上表现为无回声暗区。"),
           ("什么是病灶？", "病变组织", "病灶是机体发生病变的部位。"),
           ("超声图像是什么形状？", "扇形", "超声图像呈扇形。"),
           ("CT检查使用X射线吗？", "是", "CT检查使用X射线。"),
           ("CT图像是断层图像吗？", "是", "CT图像是断层图像。"),
           ("磁共振可以显示脑部吗？", "是", "磁共振可以清楚地显示脑部。"),
           ("磁共振检查有电离辐射吗？", "否", "磁共振检查没有电离辐射。"),
           ("超声检查有电离辐射吗？", "否", "超声检查没有电离辐射。"),
           ("胸部X光片是断层图像吗？", "否", "胸部X光片是投影图像，不是断层图像。")],
}
DESCRIPTIONS = {  # what the synthetic images look like, for the text stage
    "en": ["An abdominal CT scan shows a round body with grey organs and a bright spine at the bottom.",
           "A brain MRI scan shows an oval head with a bright scalp, a dark skull and a textured brain.",
           "A chest X-ray shows two dark lungs in a bright frame, with ribs across the lungs.",
           "A liver ultrasound has the shape of a fan and a grainy speckle texture.",
           "A bright lesion is whiter than the tissue around it; a dark lesion is blacker.",
           "The image is divided into four regions: upper left, upper right, lower left and lower right."],
    "zh": ["腹部CT显示圆形的身体、灰色的器官和下方明亮的脊柱。",
           "脑部磁共振显示椭圆形的头部、明亮的头皮、暗色的颅骨和有纹理的脑组织。",
           "胸部X光显示明亮背景中的两个暗色肺野，肋骨横跨肺野。",
           "肝脏超声图像呈扇形，带有颗粒状的斑点纹理。",
           "亮斑比周围组织更亮，暗斑比周围组织更暗。",
           "图像分为四个区域：左上、右上、左下和右下。"],
}


@dataclass(frozen=True)
class Scan:
    """What an image shows; every answer and caption is derived from this, never from pixels."""
    modality: str  # key of MODALITIES
    lesion: str | None  # key of LOCATIONS, or None
    bright: bool = True
    kind: str = "synthetic"  # "synthetic" | "dicom" (real file + synthetic lesion) | "dicom_original"


def _pick(rng, seq):
    """A uniform choice that returns the element itself (numpy's choice returns numpy strings)."""
    seq = list(seq)
    return seq[int(rng.integers(len(seq)))]


def random_scan(rng, has_lesion) -> Scan:
    """Uniform modality, quadrant and brightness: none of them is predictable from the others."""
    return Scan(_pick(rng, MODALITIES), _pick(rng, LOCATIONS) if has_lesion else None, bool(rng.random() < 0.5))


class Balancer:
    """Alternates yes/no per key (pattern, language, wording): answer priors are exactly 50%."""

    def __init__(self):
        self.count: dict[tuple, int] = {}

    def _count(self, key) -> int:
        # every other new key of a language (key[1]) starts on "no": odd counts cancel, not add up
        return self.count.get(key, sum(k[1] == key[1] for k in self.count) % 2)

    def peek(self, key) -> bool:
        return self._count(key) % 2 == 0

    def next(self, key) -> bool:
        yes = self.peek(key)
        self.count[key] = self._count(key) + 1
        return yes


# ---------------------------------------------------------------------------------------------
# Synthetic images
# ---------------------------------------------------------------------------------------------
# Each modality is told apart by its global look (outline, frame, fan, texture); the anatomy
# inside the quadrants is kept low-contrast so that the lesion is the strongest local signal
# (the tiny model has minutes, not hours, to find it; measurements in NOTES.md).
@functools.cache
def _grid(shape):
    """Pixel-centre coordinates (yy, xx), each of `shape`."""
    return np.mgrid[0:shape[0], 0:shape[1]] + 0.5


def _ellipse(shape, cx, cy, ax, ay):
    """Anti-aliased filled ellipse mask: 1 inside, 0 outside, a ~1 px ramp at the border."""
    yy, xx = _grid(shape)
    d = np.hypot((xx - cx) / ax, (yy - cy) / ay)
    return np.clip((1.0 - d) * min(ax, ay) + 0.5, 0.0, 1.0)


def _paint(img, mask, value):
    return img + mask * (value - img)


def _texture(rng, cells):
    """Low-frequency zero-mean texture: a random cells x cells grid upsampled bicubically."""
    small = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32))
    return np.asarray(small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), dtype=np.float64)


def _lesion_mask(rng, loc, shape):
    """A round-ish blob inside one quadrant: centre 14-18 px (of 96) off both midlines, radius at
    most 13.5 px, so it never crosses a midline and the quadrant is unambiguous. At the ViT's 64 px
    it sits on the quadrant's inner 16 px patch (13-18 px across): one patch token changes a lot,
    which a random-init ViT passes on far better than a small blob spread over four patches."""
    _, _, sx, sy = LOCATIONS[loc]
    k = shape[0] / IMAGE_SIZE
    cx = shape[1] / 2 + sx * rng.uniform(14, 18) * k
    cy = shape[0] / 2 + sy * rng.uniform(14, 18) * k
    ax, ay = np.minimum(rng.uniform(10, 13) * k * rng.uniform(0.9, 1.1, 2), 13.5 * k)
    return _ellipse(shape, cx, cy, ax, ay)


def _ct(rng, g, lesion):
    dx, dy, s = g
    sh, cx, cy = (IMAGE_SIZE, IMAGE_SIZE), 48 + dx, 50 + dy
    img = np.full(sh, 8.0)  # air
    img = _paint(img, _ellipse(sh, cx, cy, 41 * s, 33 * s), 75)  # subcutaneous fat
    img = _paint(img, _ellipse(sh, cx, cy, 36 * s, 28 * s), 112)  # soft tissue
    img = _paint(img, _ellipse(sh, cx - 14 * s, cy - 8 * s, 15 * s, 12 * s), 124)  # liver
    img = _paint(img, _ellipse(sh, cx + 17 * s, cy - 9 * s, 8 * s, 6 * s), 120)  # spleen
    for side in (-1, 1):
        img = _paint(img, _ellipse(sh, cx + side * 13 * s, cy + 9 * s, 5 * s, 7 * s), 126)  # kidneys
    img = _paint(img, _ellipse(sh, cx, cy + 24 * s, 6 * s, 5 * s), 235)  # vertebral body: bright cortex,
    img = _paint(img, _ellipse(sh, cx, cy + 24 * s, 3.5 * s, 2.5 * s), 175)  # greyer marrow, and a
    img = _paint(img, _ellipse(sh, cx, cy + 31 * s, 1.5 * s, 2.5 * s), 220)  # spinous process: not a blob
    img += 6 * _texture(rng, 12) * (img > 30)
    if lesion is not None:
        img = _paint(img, *lesion)
    return img


def _mri(rng, g, lesion):
    dx, dy, s = g
    sh, cx, cy = (IMAGE_SIZE, IMAGE_SIZE), 48 + dx, 48 + dy
    img = np.full(sh, 4.0)
    img = _paint(img, _ellipse(sh, cx, cy, 35 * s, 43 * s), 175)  # scalp fat (bright on T1)
    img = _paint(img, _ellipse(sh, cx, cy, 32 * s, 40 * s), 30)  # skull (dark)
    brain = _ellipse(sh, cx, cy, 29 * s, 37 * s)
    img = _paint(img, brain, 115 + 8 * _texture(rng, 20))  # grey/white matter folds, finer than a lesion
    for side in (-1, 1):
        img = _paint(img, _ellipse(sh, cx + side * 4 * s, cy - 2 * s, 2 * s, 6 * s), 75)  # ventricles
    if lesion is not None:
        img = _paint(img, *lesion)
    return img


def _xray(rng, g, lesion):
    dx, dy, s = g
    sh, cx, cy = (IMAGE_SIZE, IMAGE_SIZE), 48 + dx, 47 + dy
    yy, xx = _grid((IMAGE_SIZE, IMAGE_SIZE))
    img = 165 + 10 * _texture(rng, 4)  # soft tissue frame
    img = _paint(img, np.clip(1.5 - np.abs(xx - cx) / 3.5, 0, 1), 205)  # spine / mediastinum
    lungs = np.maximum(_ellipse(sh, cx - 19 * s, cy, 14 * s, 30 * s), _ellipse(sh, cx + 19 * s, cy, 14 * s, 30 * s))
    ribs = (np.cos(2 * np.pi * (yy - 0.012 * (xx - cx) ** 2 - dy) / (9 * s)) > 0.6).astype(float)
    img = _paint(img, lungs, 88 + 14 * ribs)
    if lesion is not None:
        img = _paint(img, *lesion)
    return img


def _ultrasound(rng, g, lesion):
    dx, dy, s = g
    yy, xx = _grid((IMAGE_SIZE, IMAGE_SIZE))
    r, theta = np.hypot(xx - 48 - dx, yy + 8 - dy), np.arctan2(xx - 48 - dx, yy + 8 - dy)
    fan = np.clip((0.95 - np.abs(theta)) * r, 0, 1) * np.clip(r - 20, 0, 1) * np.clip(100 - r, 0, 1)
    echo = 110 * np.exp(-(r - 20) / 180)  # depth attenuation
    echo += 35 * np.exp(-(((r - 30 * s) / 1.5) ** 2)) + 50 * np.exp(-(((r - 90 * s) / 2.0) ** 2))  # capsule, diaphragm
    if lesion is not None:  # echogenicity: lesions are speckled like tissue
        echo = _paint(echo, *lesion)
    # speckle: Rayleigh amplitude, log-compressed-like (square root), mean 1, 2 px grains
    grain = np.sqrt(rng.rayleigh(1.0, (IMAGE_SIZE // 2, IMAGE_SIZE // 2))) / 1.0779
    return fan * echo * np.kron(grain, np.ones((2, 2)))


RENDERERS = {"ct": _ct, "mri": _mri, "xray": _xray, "us": _ultrasound}


def render(scan: Scan, rng) -> Image.Image:
    """One synthetic scan with random pose, contrast and noise."""
    g = (*rng.uniform(-3, 3, 2), rng.uniform(0.92, 1.08))
    lesion = None
    if scan.lesion is not None:
        value = rng.uniform(215, 240) if scan.bright else rng.uniform(5, 25)
        lesion = (_lesion_mask(rng, scan.lesion, (IMAGE_SIZE, IMAGE_SIZE)), value)
    img = RENDERERS[scan.modality](rng, g, lesion)
    img = img * rng.uniform(0.9, 1.1) + rng.uniform(-8, 8) + rng.normal(0, rng.uniform(2, 6), img.shape)
    img = np.clip(img, 0, 255).round().astype(np.uint8)
    # ultrasound exported as RGB screenshots, the rest as greyscale: the loader must handle both
    return Image.fromarray(img).convert("RGB" if scan.modality == "us" else "L")


def _dicom_images(img_dir: Path, seed: int) -> list[tuple[str, Scan]]:
    """pydicom's bundled CT and MR test files, copied, plus variants with a synthetic bright lesion
    written into PixelData (so the DICOM path of the loader is exercised by training)."""
    try:
        import pydicom
        from pydicom.data import get_testdata_file
        from pydicom.uid import generate_uid
    except ImportError:
        return []
    out = []
    # file, modality, bright lesion value in stored units (CT: 1000 HU; MR: above its window)
    for mi, (fname, modality, hu) in enumerate((("CT_small.dcm", "ct", 1000), ("MR_small.dcm", "mri", 1800))):
        src = get_testdata_file(fname, download=False)  # never get_testdata_files("*"): it downloads
        if src is None:
            continue
        name = f"dicom_{modality}.dcm"
        shutil.copyfile(src, img_dir / name)
        out.append((name, Scan(modality, None, kind="dicom_original")))
        ds = pydicom.dcmread(src)
        base = ds.pixel_array
        value = (hu - float(ds.get("RescaleIntercept", 0))) / float(ds.get("RescaleSlope", 1))
        for k in range(N_DICOM_VARIANTS):
            rng = np.random.default_rng([seed, 6, mi, k])
            loc = list(LOCATIONS)[(k // 2) % 4] if k % 2 == 0 else None
            a = base[:, ::-1] if rng.random() < 0.5 else base  # mirrored variants
            a = a.astype(np.float64) + rng.normal(0, 4, a.shape)
            if loc is not None:
                a = _paint(a, _lesion_mask(rng, loc, a.shape), value)
            info = np.iinfo(base.dtype)
            ds.PixelData = np.clip(a.round(), info.min, info.max).astype(base.dtype).tobytes()
            uid = generate_uid(entropy_srcs=["doctor-sun-demo", str(seed), fname, str(k)])
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.ImageComments = "demo.py variant" + (f": synthetic bright lesion, {LOCATIONS[loc][0]}" if loc else "")
            name = f"dicom_{modality}_{k}.dcm"
            ds.save_as(img_dir / name)
            out.append((name, Scan(modality, loc, kind="dicom")))
    return out


# ---------------------------------------------------------------------------------------------
# Text: captions, questions, answers
# ---------------------------------------------------------------------------------------------
def caption(scan: Scan, lang: str, t: int) -> str:
    """Caption template `t` (0 or 1) for a scan. Short, report-impression style: most tokens carry
    what the image shows, so the projector's alignment loss is mostly about the image."""
    m = MODALITIES[scan.modality]
    if lang == "en":
        what = (f"{m['en_scan']} of the {m['part_en']}" if scan.kind == "synthetic"
                else f"{m['en']} image from a DICOM file")
        What = what[0].upper() + what[1:]
        if scan.kind == "dicom_original":
            return f"{What}."
        if scan.lesion is None:
            return [f"{What}: no lesion.", f"No lesion; {what}."][t]
        b, loc = BRIGHTNESS[scan.bright][0], LOCATIONS[scan.lesion][0]
        return [f"{What}: {b} lesion in the {loc} region.", f"{b.capitalize()} lesion, {loc}; {what}."][t]
    what = m["part_zh"] + m["zh"] if scan.kind == "synthetic" else f"DICOM格式的{m['zh']}"
    if scan.kind == "dicom_original":
        return f"{what}图像。"
    if scan.lesion is None:
        return [f"{what}：未见病灶。", f"未见病灶，{what}。"][t]
    b, loc = BRIGHTNESS[scan.bright][1], LOCATIONS[scan.lesion][1]
    return [f"{what}：{loc}区域见{b}。", f"{loc}见{b}，{what}。"][t]


def ask(pattern: str, scan: Scan, lang: str, wording: int, want_yes: bool, rng) -> tuple[str, str]:
    """(question, answer) for one pattern; closed patterns answer `want_yes` (the image is built
    to match for presence, the question is built to match for the others)."""
    m, yes, no = MODALITIES[scan.modality], *YES_NO[lang]
    q = QUESTIONS[pattern][lang][wording]
    if pattern == "presence":
        return q, yes if scan.lesion else no
    if pattern == "modality_check":
        named = scan.modality if want_yes else _pick(rng, [k for k in MODALITIES if k != scan.modality])
        n = MODALITIES[named]
        return q.format(a_mod=n["en_a"], mod=n[lang]), yes if want_yes else no
    if pattern == "brightness_check":
        named = scan.bright == want_yes  # the lesion's own brightness, or the other one
        return q.format(b=BRIGHTNESS[named][lang == "zh"]), yes if want_yes else no
    if pattern == "modality":
        return q, m[lang]
    if pattern == "location":
        return q, LOCATIONS[scan.lesion][lang == "zh"] if scan.lesion else NO_LESION[lang]
    if pattern == "brightness":
        return q, BRIGHTNESS[scan.bright][lang == "zh"]
    if pattern == "body_part":
        return q, m["part_" + lang]
    raise ValueError(f"unknown question pattern {pattern!r}")


def applicable(pattern: str, scan: Scan) -> bool:
    if scan.kind == "dicom_original":  # real images: we only know their modality
        return pattern in ("modality_check", "modality")
    if pattern in ("brightness", "brightness_check"):  # DICOM variants only carry bright lesions: don't teach that prior
        return scan.lesion is not None and scan.kind == "synthetic"
    if pattern == "body_part":
        return scan.kind == "synthetic"
    return True


def _turn(pattern, scan, lang, rng, bal, wording=None):
    """One (pattern, question, answer) with exact yes/no alternation per (pattern, lang, wording)."""
    if wording is None:
        wording = int(rng.integers(len(QUESTIONS[pattern][lang])))
    want_yes = bal.next((pattern, lang, wording)) if pattern in CHECKS else None
    q, a = ask(pattern, scan, lang, wording, want_yes, rng)
    return pattern, q, a


# "Is this a CT?" and "Is the lesion bright?" compare a word of the question with the image; the
# model learns them after it reads the attribute itself, so they are picked 3x as often as the open
# question of their group. The lesion's location is asked open only: yes/no checks of it stayed
# near chance within the demo's budget (NOTES.md has the figures for both).
GROUP_P = 0.9  # chance that a conversation asks about each attribute group
PATTERN_WEIGHT = {p: 3.0 for p in CHECKS}


def _conversation(scan, lang, rng, bal, presence_wording):
    """Multi-turn VQA for one training image: one question per attribute at most (modality, lesion
    presence, location, brightness), so no answer can be read off an earlier one except that a
    located lesion exists; presence, when asked, comes first as in a clinical read."""
    groups = [g for g in (("modality_check", "modality", "body_part"), ("location",), ("brightness_check", "brightness"))
              if any(applicable(p, scan) for p in g) and rng.random() < GROUP_P]
    turns = [_turn("presence", scan, lang, rng, bal, presence_wording)] if presence_wording is not None else []
    for i in rng.permutation(len(groups)):
        ps = [p for p in groups[i] if applicable(p, scan)]
        w = np.array([PATTERN_WEIGHT.get(p, 1.0) for p in ps])
        turns.append(_turn(ps[int(rng.choice(len(ps), p=w / w.sum()))], scan, lang, rng, bal))
    if not turns:
        turns.append(_turn("modality", scan, lang, rng, bal))
    return turns


def _llava(id_, image, qas, rng=None, prefix_p=0.0):
    """LLaVA record; some closed questions carry the yes/no instruction eval harnesses add."""
    conv = []
    for i, (pattern, q, a) in enumerate(qas):
        if rng is not None and pattern in CLOSED and rng.random() < prefix_p:
            q = YES_NO_PREFIX["zh" if rng.random() < 0.5 and not q.isascii() else "en"] + q
        conv += [{"from": "human", "value": (data.IMAGE_TOKEN + "\n" if i == 0 and image else "") + q}, {"from": "gpt", "value": a}]
    rec = {"id": id_}
    if image:
        rec["image"] = image
    rec["conversations"] = conv
    return rec


# ---------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE with the Llama-3 special tokens
# ---------------------------------------------------------------------------------------------
def tokenizer_corpus() -> list[str]:
    """Every sentence the demo can write, each once: the tokenizer depends on the vocabulary tables
    only, not on the seed or the sizes, so a rebuild with other sizes keeps every token id (and
    checkpoints that point at an older demo's tokenizer stay valid)."""
    scans = [Scan(m, loc, b, kind) for kind in ("synthetic", "dicom", "dicom_original") for m in MODALITIES
             for loc in (None, *LOCATIONS) for b in (True, False)]
    out = [caption(sc, lang, t) for sc in scans for lang in ("en", "zh") for t in (0, 1)]
    for lang in ("en", "zh"):
        ask_, answer = TEXT_QA[lang]
        for q in (q for wordings in QUESTIONS.values() for q in wordings[lang]):
            qs = sorted({q.format(a_mod=m["en_a"], mod=m[lang], b=b[lang == "zh"])
                         for m in MODALITIES.values() for b in BRIGHTNESS.values()})
            out += qs + [YES_NO_PREFIX[lang] + q for q in qs] + [f"{ask_}{q}\n{answer}" for q in qs]
        answers = [*YES_NO[lang], NO_LESION[lang], *(m[k] for m in MODALITIES.values() for k in (lang, "part_" + lang)),
                   *(loc[lang == "zh"] for loc in LOCATIONS.values()), *(b[lang == "zh"] for b in BRIGHTNESS.values())]
        out += answers + [answer + a for a in answers] + DESCRIPTIONS[lang] + [x for fact in FACTS[lang] for x in fact]
    # prompt pieces of the chat template and of eval harnesses, so "user", "\n\n" etc. are single tokens
    out += ["user\n\n", "assistant\n\n", "system\n\n", data.IMAGE_TOKEN + "\n", data.EVAL_SYSTEM, data.YES_NO_MAYBE_HINT]
    return out * 2  # BPE's min_frequency=2 then keeps every merge the demo needs

VOCAB_SIZE = 2048
# Llama-3.1's first special tokens in their order (ids 128000-128010 there); the rest of the
# 2048 ids after the BPE vocabulary are <|reserved_special_token_k|>, as in Llama-3.
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
N_SPECIAL_MIN = 16  # the BPE trainer gets VOCAB_SIZE - 16 ids at most
# Split of Meta-Llama-3-8B's tokenizer.json pre_tokenizer (GPT-4 style), applied before byte-level.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# chat_template of Meta-Llama-3-8B-Instruct (no default system prompt, as Doctor Sun trains).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def train_tokenizer(texts: list[str], out_dir) -> int:
    """Byte-level BPE on `texts` plus the Llama-3 special tokens, exactly VOCAB_SIZE ids, written
    as tokenizer.json + the two files transformers needs (tokenizer_config, special_tokens_map).
    Returns the number of BPE tokens (256 bytes + merges); the special tokens follow them."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))  # Llama-3: a pre-token found in the vocab is not re-merged
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # Not in Llama-3: Han characters are isolated first. On this tiny repetitive corpus BPE would
        # otherwise merge whole Chinese clauses ("病灶位于左上区域吗") into one token each; this way
        # Chinese stays at about Llama-3's granularity (one character per token) and compositional.
        pre_tokenizers.Split(Regex(r"\p{Han}"), behavior="isolated", invert=False),
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - N_SPECIAL_MIN, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer)
    n_reserved = VOCAB_SIZE - tok.get_vocab_size() - len(SPECIAL_TOKENS)  # small corpora stop merging early
    specials = SPECIAL_TOKENS + [f"<|reserved_special_token_{k}|>" for k in range(3, 3 + n_reserved)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    n_bpe = VOCAB_SIZE - len(specials)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([  # as Llama-3: encode(text) prepends <|begin_of_text|>
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    # transformers reads these two files (AutoTokenizer, and convert.py's llava-hf processor).
    config = {
        "added_tokens_decoder": {str(tok.token_to_id(t)): dict(content=t, lstrip=False, normalized=False, rstrip=False,
                                                               single_word=False, special=True) for t in specials},
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_CHAT_TEMPLATE,
        # False (Llama-3 says True): the clean-up rewrites " ." and " 's" and breaks exact round trips
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast"}
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    return n_bpe


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------
def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def _closed_balance(records):
    """{lang: (yes, no)} over every closed answer in LLaVA records (test records carry `lang`)."""
    out = {"en": (0, 0), "zh": (0, 0)}
    for r in records:
        for turn in r["conversations"][1::2]:
            a = turn["value"]
            for lang, (yes, no) in YES_NO.items():
                if a in (yes, no):
                    y, n = out.get(lang, (0, 0))
                    out[lang] = (y + (a == yes), n + (a == no))
    return out


def _write_demo(root: Path, seed: int, n_train: int, n_test: int) -> dict:
    (root / "images").mkdir(parents=True)
    pretrain, finetune, train_scans = _train_records(root, seed, n_train)
    test = _test_records(root, seed, n_test)
    text = _text_lines(seed, n_train)

    _write_json(root / "pretrain.json", pretrain)
    _write_json(root / "finetune.json", finetune)
    _write_json(root / "test.json", test)
    with open(root / "text.jsonl", "w", encoding="utf-8") as f:
        for k, t in enumerate(text):
            f.write(json.dumps({"id": f"text_{k:05d}", "text": t}, ensure_ascii=False) + "\n")

    n_bpe = train_tokenizer(tokenizer_corpus(), root / "tokenizer")

    stats = {"train_images": len(train_scans), "dicom_images": sum(s.kind != "synthetic" for _, s in train_scans),
             "test_images": n_test, "pretrain": len(pretrain), "finetune": len(finetune),
             "finetune_text_only": sum("image" not in r for r in finetune), "text": len(text), "test": len(test),
             "finetune_closed_yes_no": _closed_balance([r for r in finetune if "image" in r]),
             "test_closed_yes_no": _closed_balance(test), "bpe_tokens": n_bpe,
             "test_by_type": {f"{t}/{l}": sum(r["answer_type"] == t and r["lang"] == l for r in test)
                              for t in ("CLOSED", "OPEN") for l in ("en", "zh")}}
    _write_readme(root, stats)
    return stats


def _train_records(root: Path, seed: int, n_train: int):
    """(pretrain, finetune, train_scans): training images are drawn to fit their questions, each
    image gets VQA conversations and a caption; text-only QA is mixed into finetune."""
    rng, bal = np.random.default_rng([seed, 1]), Balancer()
    pretrain, finetune, train_scans = [], [], []
    for i in range(n_train):
        lang = ("en", "zh")[i % 2]
        presence_wording = int(rng.integers(2)) if rng.random() < 0.7 else None
        if presence_wording is not None:
            scan = random_scan(rng, bal.next(("presence", lang, presence_wording)))
        else:
            scan = random_scan(rng, rng.random() < 0.5)
        name = f"images/train_{i:05d}.png"
        render(scan, np.random.default_rng([seed, 2, i])).save(root / name, compress_level=1)  # noise compresses badly
        train_scans.append((name, scan))
        finetune.append(_llava(f"train_{i:05d}", name, _conversation(scan, lang, rng, bal, presence_wording), rng, 0.2))
        # and a second conversation in the other language: a yes/no check then names other values for
        # the same image ("Is this a CT?" once, "Is this an MRI?" another time), so it cannot be
        # memorised per image (finetune sees each record ~7 times) and must be compared
        other = ("zh", "en")[i % 2]
        finetune.append(_llava(f"train_{i:05d}_{other}", name, _conversation(scan, other, rng, bal, None), rng, 0.2))
    for name, scan in _dicom_images(root / "images", seed):
        name = f"images/{name}"
        lang = ("en", "zh")[len(train_scans) % 2]
        train_scans.append((name, scan))
        pw = None  # the lesion is fixed by the variant: ask presence only in a wording whose turn it is
        if applicable("presence", scan):
            pw = next((int(w) for w in rng.permutation(2)
                       if bal.peek(("presence", lang, int(w))) == (scan.lesion is not None)), None)
            if pw is not None:
                bal.next(("presence", lang, pw))
        finetune.append(_llava(Path(name).stem, name, _conversation(scan, lang, rng, bal, pw), rng, 0.2))
    for i, (name, scan) in enumerate(train_scans):  # captions in the other language than the VQA
        pretrain.append({"id": f"cap_{Path(name).stem}", "image": name, "conversations": [
            {"from": "human", "value": data.IMAGE_TOKEN + "\n"},
            {"from": "gpt", "value": caption(scan, ("zh", "en")[i % 2], int(rng.integers(2)))}]})

    # text-only QA (int ids, mixed into finetune like general data in real mixtures)
    for k in range(max(8, n_train // 8)):
        lang = ("en", "zh")[k % 2]
        facts = [FACTS[lang][j] for j in rng.choice(len(FACTS[lang]), size=int(rng.integers(1, 3)), replace=False)]
        finetune.append(_llava(k, None, [("fact", q, a) for q, a, _ in facts]))
    order = rng.permutation(len(finetune))
    return pretrain, [finetune[j] for j in order], train_scans


def _test_records(root: Path, seed: int, n_test: int) -> list[dict]:
    """Held-out test: fresh images, one closed and one open question each, balanced by construction."""
    rng, tbal, test = np.random.default_rng([seed, 3]), Balancer(), []
    n_asked = {}  # per (pattern or "open", lang): cycles the closed wordings and the open patterns
    for j in range(n_test):
        lang, closed = ("en", "zh")[j % 2], CLOSED[(j // 2) % 3]
        k = n_asked[closed, lang] = n_asked.get((closed, lang), -1) + 1
        wording = k % len(QUESTIONS[closed][lang])
        want_yes = tbal.next((closed, lang, wording))
        has_lesion = want_yes if closed == "presence" else closed == "brightness_check" or rng.random() < 0.5
        scan = random_scan(rng, has_lesion)
        name = f"images/test_{j:05d}.png"
        render(scan, np.random.default_rng([seed, 4, j])).save(root / name, compress_level=1)
        k = n_asked["open", lang] = n_asked.get(("open", lang), -1) + 1
        opens = [p for p in ("modality", "location", "brightness", "body_part") if applicable(p, scan)]
        opened = opens[k % len(opens)]
        for pattern, w in ((closed, wording), (opened, k // len(opens) % len(QUESTIONS[opened][lang]))):
            q, a = ask(pattern, scan, lang, w, want_yes, rng)
            rec = _llava(f"test_{j:05d}_{pattern}", name, [(pattern, q, a)])
            rec.update(question=q, answer=a, answer_type="CLOSED" if pattern in CLOSED else "OPEN", lang=lang,
                       question_type=pattern, modality=MODALITIES[scan.modality]["en"])
            test.append(rec)
    return test


def _text_lines(seed: int, n_train: int) -> list[str]:
    """Raw text for the text stage: descriptions, facts, and captions followed by questions about them."""
    rng, tbal, text = np.random.default_rng([seed, 5]), Balancer(), []
    for lang in ("en", "zh"):
        text += DESCRIPTIONS[lang] + [s for _, _, s in FACTS[lang]] + [f"{q} {a}" for q, a, _ in FACTS[lang]]
    for k in range(n_train):
        lang = ("en", "zh")[k % 2]
        scan = random_scan(rng, rng.random() < 0.5)
        # one Balancer for the whole corpus: a fresh one per line made every line's first check "yes"
        qa = _conversation(scan, lang, rng, tbal, int(rng.integers(2)) if rng.random() < 0.5 else None)
        ask_, answer = TEXT_QA[lang]
        text.append("\n".join([caption(scan, lang, int(rng.integers(2)))] + [f"{ask_}{q}\n{answer}{a}" for _, q, a in qa]))
    return [text[j] for j in rng.permutation(len(text))]


def _write_readme(root: Path, st: dict) -> None:
    by_type = ", ".join(f"{k}: {v}" for k, v in st["test_by_type"].items())
    bal = lambda d: ", ".join(f"{l}: {y} yes / {n} no ({100 * y / max(1, y + n):.1f}% yes)" for l, (y, n) in d.items())
    (root / "README.md").write_text(f"""# Doctor Sun demo dataset (generated by demo.py, version {VERSION})

A small bilingual (English / Chinese) medical VQA task that a tiny model can learn on a laptop CPU.
Regenerate with `python demo.py --force`; nothing here is downloaded.

- `images/`: {st['train_images'] - st['dicom_images']} synthetic training scans, {st['test_images']} held-out test scans
  (96x96 PNG; abdominal CT, brain MRI, chest X-ray, liver ultrasound; half with one bright or dark lesion
  in one quadrant; random pose, contrast and noise) and {st['dicom_images']} DICOM files (pydicom's CT/MR test
  files and variants with a synthetic bright lesion; training only). Locations are image quadrants
  ("upper left" = top-left of the picture).
- `pretrain.json`: {st['pretrain']} image-caption pairs (LLaVA format), English and Chinese.
- `finetune.json`: {st['finetune']} instruction records: multi-turn VQA on every training image (two
  conversations per synthetic image, one per language) plus {st['finetune_text_only']} text-only QA
  records (integer ids).
- `text.jsonl`: {st['text']} raw-text lines for the text stage.
- `test.json`: {st['test']} single-turn questions on the held-out images ({by_type}), with
  `question`, `answer`, `answer_type` (CLOSED = yes/no, 是/否) and `lang`.
- `tokenizer/`: byte-level BPE, {VOCAB_SIZE} ids: {st['bpe_tokens']} learned from the demo's sentences (256 bytes + merges;
  Han characters are kept one per token), then the Llama-3 special tokens and
  {VOCAB_SIZE - st['bpe_tokens'] - len(SPECIAL_TOKENS)} `<|reserved_special_token_k|>` (the demo's vocabulary is small).

Answer balance (closed questions; yes/no alternate exactly per question pattern, language and wording,
so a model that ignores the image scores 50%):
- finetune: {bal(st['finetune_closed_yes_no'])}
- test: {bal(st['test_closed_yes_no'])}
""", encoding="utf-8")


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _generator() -> str:
    """Hash of this file and of the prompt texts it takes from data.py: a demo written by other code
    is rebuilt, with no version to forget to bump (the output is deterministic, so an edit that
    changes nothing rewrites the same bytes)."""
    prompts = "\n".join([data.YES_NO_HINT, data.EVAL_SYSTEM, data.YES_NO_MAYBE_HINT]).encode()
    return hashlib.sha256(Path(__file__).read_bytes() + prompts).hexdigest()[:16]


def _has_pydicom() -> bool:
    try:
        import pydicom  # noqa: F401
        return True
    except ImportError:
        return False


def build(root=DEFAULT_ROOT, *, seed=0, n_train_images=1200, n_test_images=160, force=False) -> Path:
    """Write the demo under `root` unless an identical one (same version and config) is there.
    Built in a temporary sibling folder and renamed into place, so a killed build leaves nothing half-written."""
    root = Path(root)
    config = {"version": VERSION, "generator": _generator(), "seed": seed, "n_train_images": n_train_images,
              "n_test_images": n_test_images, "dicom": _has_pydicom()}
    if n_train_images < 2 or n_test_images < 2:
        raise errors.UserError(f"demo: need at least 2 train and 2 test images, got {n_train_images} and "
                               f"{n_test_images}")
    if not force and _read_marker(root) == config:
        return root
    if root.exists() and _read_marker(root) is None and any(root.iterdir()):
        raise FileExistsError(f"demo: {root} exists and is not a demo dataset (no {MARKER}); "
                              "remove it or pass another root")
    root.parent.mkdir(parents=True, exist_ok=True)
    for stale in root.parent.glob(f".{root.name}.*-*"):  # left by a killed build (builds take seconds)
        if stale.is_dir() and time.time() - stale.stat().st_mtime > 600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the demo is ordinary data
    old = None
    try:
        _write_demo(tmp, seed, n_train_images, n_test_images)
        _write_json(tmp / MARKER, config)
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / root.name)
        try:
            os.replace(tmp, root)
        except OSError:
            if _read_marker(root) != config:  # else a concurrent build finished first: use it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left there after a successful rename
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return root


def ensure(root=DEFAULT_ROOT) -> Path:
    """The demo folder: kept if complete and written by this version of demo.py (whatever its sizes),
    else built (with the sizes it had, or the defaults)."""
    root = Path(root)
    marker = _read_marker(root)
    if marker is not None and marker.get("version") == VERSION and marker.get("generator") == _generator():
        print(f"demo: using the demo dataset in {root}")
        return root
    sizes = {k: marker[k] for k in ("seed", "n_train_images", "n_test_images") if k in marker} if marker else {}
    t0 = time.time()
    build(root, **sizes)
    print(f"demo: built the demo dataset in {root} ({time.time() - t0:.1f}s)")
    return root


def main(argv=None):
    p = errors.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=errors.at_least(2), default=1200, help="synthetic training images")
    p.add_argument("--n-test", type=errors.at_least(2), default=160, help="held-out test images (2 questions each)")
    p.add_argument("--force", action="store_true", help="rebuild even if an identical demo exists")
    a = p.parse_args(argv)
    t0 = time.time()
    build(a.root, seed=a.seed, n_train_images=a.n_train, n_test_images=a.n_test, force=a.force)
    print(f"demo: {a.root} ready ({time.time() - t0:.1f}s)")
    print((a.root / "README.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    errors.run(main)
