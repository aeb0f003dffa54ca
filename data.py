"""Data pipeline: LLaVA-format records -> (input_ids, labels, pixel_values) batches.

What users have: LLaVA JSON/JSONL conversations, images in a folder
or in the released .zip archives, DICOM files from hospitals, a Llama-3 `tokenizer.json` or a
Llama-2 `tokenizer.model`. This file turns them into right-padded training batches (or left-padded
generation batches) and knows nothing about the model except how many positions an image takes
(`num_image_tokens`) and the placeholder id that marks them (`IMAGE_TOKEN_ID`).

    python data.py check --data finetune.json --images image_finetune.zip --tokenizer MODEL_DIR
"""
from __future__ import annotations

import base64
import codecs
import collections
import collections.abc
import functools
import io
import json
import math
import os
import posixpath
import random
import re
import shutil
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import errors
from checkpoint import load_hf_config
from special_ids import IGNORE_INDEX, IMAGE_TOKEN_ID  # noqa: F401  (re-exported: data.IGNORE_INDEX)

IMAGE_TOKEN = "<image>"  # placeholder in record text; never in the vocabulary
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's preprocessing statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_FILL = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104): the mean colour, ~0 after normalising

# Decoding limits, checked against an image's header before any pixel is decoded. A file's size says
# nothing about its pixels: an 855-byte PNG can declare 100000 x 8 pixels (pad-to-square then makes a
# 100000² canvas: 30 GB), and an 8 MB zip can hold an 8 GB member. Real inputs are far smaller: CT/MR
# slices are 512², radiographs and mammograms up to ~5000 px a side (~28 MP), phone photos ~48 MP.
MAX_IMAGE_SIDE = 12_000  # px; pad-to-square allocates side² x 3 bytes: at most 432 MB
MAX_IMAGE_PIXELS = 64_000_000  # width x height: 192 MB as RGB (PIL's own bomb warning starts at 89 MP)
MAX_IMAGE_BYTES = 512 * 2 ** 20  # a file or zip member read whole (DICOM, zip members), or a decoded DICOM volume


class SampleError(errors.UserError):
    """A bad sample. `.reason` is a short stable key (skip counts are keyed by it); the message
    says which sample and why. Reasons: missing_image, corrupt_image, image_too_large, unsafe_path,
    empty_answer, multiple_images, image_without_token, token_without_image, too_long_no_labels,
    template_mismatch, malformed_record."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------------------------
# Images


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB as HF's convert_to_rgb makes it, so preprocessing matches CLIPImageProcessor:
    transparency is composited on white (LLaVA's plain .convert("RGB") would keep whatever colour
    the transparent pixels store, often black). 16-bit/float greyscale (medical PNG/TIFF) is
    stretched over its own range first: PIL's convert would clip everything above 255 to white."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")
    if "A" in img.getbands() or "transparency" in img.info:
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def _as_rgb(img: Image.Image) -> Image.Image:
    """img itself when it is plain RGB already (no copy: preprocessing only reads it), else _to_rgb."""
    return img if img.mode == "RGB" and "transparency" not in img.info else _to_rgb(img)


def _first(v) -> float:
    """DICOM multi-valued window tags (one value per preset): use the first."""
    if isinstance(v, collections.abc.Sequence) and not isinstance(v, str):
        v = v[0]
    return float(v)


def _load_dicom(f, name: str) -> Image.Image:
    """DICOM -> RGB. Stored values are not intensities: the modality LUT (slope/intercept) gives
    physical units (Hounsfield units for CT), then a window maps a range of them to grey levels.
    Window: the file's own WindowCenter/Width, else CT soft tissue (40/400 HU), else the full range.
    A multi-frame volume gives its middle frame. Non-linear VOI LUT sequences are not applied."""
    import pydicom  # only DICOM needs it

    ds = pydicom.dcmread(f)
    _check_dicom_size(ds, name)
    x = ds.pixel_array  # raises if the transfer syntax needs a decoder that is not installed
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        x = x[x.shape[0] // 2]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if int(ds.get("SamplesPerPixel", 1)) == 3:  # colour (ultrasound, photos); pydicom converts YBR to RGB
        if x.dtype != np.uint8:
            x = np.round(x.astype(np.float32) * (255.0 / (2 ** int(ds.BitsStored) - 1)))
        return Image.fromarray(x.astype(np.uint8), "RGB")
    if not photometric.startswith("MONOCHROME"):
        raise SampleError("corrupt_image", f"unsupported DICOM PhotometricInterpretation {photometric}")
    x = x.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    elif ds.get("Modality") == "CT":
        center, width = 40.0, 400.0
    else:
        center, width = (float(x.max()) + float(x.min())) / 2, float(x.max()) - float(x.min()) + 1
    # Linear window exactly as DICOM PS3.3 C.11.2.1.2.1 defines it (the -0.5 / -1 are in the standard).
    y = np.clip((x - (center - 0.5)) / max(width - 1, 1) + 0.5, 0.0, 1.0)
    if photometric == "MONOCHROME1":  # 0 means white
        y = 1.0 - y
    return Image.fromarray(np.round(y * 255).astype(np.uint8), "L").convert("RGB")


def _check_dicom_size(ds, name: str) -> None:
    """The DICOM header's frame size, and the whole volume's, since pixel_array decodes every frame
    (only the middle one is used)."""
    tag = lambda key, default: int(ds.get(key, default) or default)  # noqa: E731
    rows, cols, frames = tag("Rows", 0), tag("Columns", 0), tag("NumberOfFrames", 1)
    check_image_size(cols, rows, name)
    volume = frames * rows * cols * tag("SamplesPerPixel", 1) * -(-tag("BitsAllocated", 8) // 8)
    if volume > MAX_IMAGE_BYTES:
        raise SampleError("image_too_large", f"{name}: {frames} frames of {cols}x{rows} decode to {volume:,} bytes "
                                             f"(limit data.MAX_IMAGE_BYTES = {MAX_IMAGE_BYTES:,})")


def _is_dicom(src, name: str) -> bool:
    if name.lower().endswith((".dcm", ".dicom")):
        return True
    if isinstance(src, (str, os.PathLike)):
        with open(src, "rb") as fh:
            head = fh.read(132)
    else:
        pos = src.tell()
        head = src.read(132)
        src.seek(pos)
    return head[128:132] == b"DICM"  # DICOM part 10: 128-byte preamble then the magic


def check_image_size(width: int, height: int, name: str) -> None:
    """Refuse an image whose decoded pixels would not fit the limits above (SampleError
    "image_too_large"), from its header: before decoding, and before padding to a square."""
    if max(width, height) > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        raise SampleError("image_too_large", f"{name} is {width}x{height} pixels (limits: data.MAX_IMAGE_SIDE = "
                                             f"{MAX_IMAGE_SIDE} a side, data.MAX_IMAGE_PIXELS = "
                                             f"{MAX_IMAGE_PIXELS:,} in all)")


def _check_file_size(src, name: str) -> None:
    if isinstance(src, (str, os.PathLike)):
        size = os.path.getsize(src)  # FileNotFoundError: reported as missing_image
    elif isinstance(src, io.BytesIO):
        size = src.getbuffer().nbytes
    else:
        return
    if size > MAX_IMAGE_BYTES:
        raise SampleError("image_too_large", f"{name} is {size:,} bytes "
                                             f"(limit data.MAX_IMAGE_BYTES = {MAX_IMAGE_BYTES:,})")


def load_image(src, name: str | None = None) -> Image.Image:
    """An RGB PIL image from a path, bytes, or a binary file object (zip members; `name` is used
    for messages and the .dcm check). PNG/JPG/GIF/BMP/TIFF go through PIL, which picks the decoder
    from the content, not the extension: a GIF saved as .jpg loads (its first frame) like any GIF.
    DICOM is recognised by extension or by its DICM magic. The size the header declares is checked
    against MAX_IMAGE_SIDE/MAX_IMAGE_PIXELS (and a file against MAX_IMAGE_BYTES) before decoding.
    Failures raise SampleError ("missing_image" / "corrupt_image" / "image_too_large") naming the file."""
    name = name or (os.fspath(src) if isinstance(src, (str, os.PathLike)) else "<bytes>")
    if isinstance(src, (bytes, bytearray)):
        src = io.BytesIO(src)
    try:
        _check_file_size(src, name)
        if _is_dicom(src, name):
            return _load_dicom(src, name)
        with warnings.catch_warnings():  # PIL only warns between 89 and 179 MP: make that an error too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as img:  # reads the header only
                check_image_size(*img.size, name)
                img.load()  # decode now: a truncated file fails here, not later inside a worker
                return _to_rgb(img)
    except SampleError:
        raise
    except FileNotFoundError:
        raise SampleError("missing_image", f"{name} does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SampleError("image_too_large", f"{name}: {e}") from None
    except Exception as e:  # PIL and pydicom raise OSError, ValueError, SyntaxError, EOFError, ...
        raise SampleError("corrupt_image", f"{name}: {type(e).__name__}: {e}") from None


def expand2square(img: Image.Image, background=CLIP_FILL) -> Image.Image:
    """LLaVA's "pad" aspect mode: centre the image on a square canvas of the CLIP mean colour,
    so the centre crop that follows keeps the whole image."""
    check_image_size(*img.size, "the image to pad")  # so the max(w, h)² canvas is at most MAX_IMAGE_SIDE²
    img = _as_rgb(img)
    w, h = img.size
    if w == h:
        return img
    out = Image.new("RGB", (max(w, h), max(w, h)), background)
    out.paste(img, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return out


def preprocess_image(img: Image.Image, size: int = 336, pad_to_square: bool = True,
                     mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """HF CLIPImageProcessor with PIL + numpy: shortest side -> `size` (PIL bicubic, long side
    floored like HF), centre crop, x/255, (x - mean) / std. Returns float32 (3, size, size)."""
    check_image_size(*img.size, "the image")  # load_image checked it; an image made elsewhere may be larger
    img = expand2square(img) if pad_to_square else _as_rgb(img)
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    img = img.resize((new_w, new_h), Image.BICUBIC)  # 80% of the time at 512 px: the same call as HF's
    if (new_w, new_h) != (size, size):
        top, left = (new_h - size) // 2, (new_w - size) // 2
        img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.array(img))  # (S, S, 3) uint8, a writable copy
    # (x/255 - mean)/std as one multiply and one add per value, on planes: the (3, S, S) float tensor
    # is written once by the uint8 -> float copy, then scaled in place
    std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    out = torch.empty(3, size, size).copy_(x.permute(2, 0, 1))
    out.mul_(torch.from_numpy(1.0 / (255.0 * std)))
    return out.add_(torch.from_numpy(-(np.asarray(mean, dtype=np.float32).reshape(3, 1, 1) / std)))


def check_inside(path, root) -> None:
    """Refuse (SampleError "unsafe_path") a file outside `root` once every symbolic link on its way
    is followed: a link inside an image folder, or a path in a record, must not make training or
    evaluation read files elsewhere on the machine. The file need not exist."""
    real = Path(path).resolve()
    if not real.is_relative_to(Path(root).resolve()):
        raise SampleError("unsafe_path", f"{path} resolves to {real}, outside the image root {root} "
                                         "(allowed by --allow-outside-image-root)")


class ImageSource:
    """An image root: a folder, or a .zip archive read in place (the released archives hold
    hundreds of thousands of files; extracting them is not needed). A ZipFile handle keeps one
    file position, so a handle inherited through fork() and used by several DataLoader workers at
    once reads garbage: each process opens its own, lazily, checked by pid. An archive whose
    entries all sit in one top-level folder (`zip -r x.zip x/`) also finds paths relative to it.
    Record paths that are absolute or climb out of the root (`../`), and files that symbolic links
    lead out of a folder root, are refused unless `allow_outside` (the user trusts the records).
    A zip member is read whole, so its declared size is checked first (MAX_IMAGE_BYTES)."""

    def __init__(self, root, allow_outside: bool = False):
        self.root = os.fspath(root)
        if not os.path.exists(self.root):
            raise FileNotFoundError(f"image root {self.root} does not exist")
        self.is_zip = os.path.isfile(self.root)
        if self.is_zip and not zipfile.is_zipfile(self.root):
            raise ValueError(f"image root {self.root} is a file but not a zip archive")
        self.allow_outside = allow_outside
        self._zip, self._pid, self._prefix = None, None, ""

    def __getstate__(self):  # a worker started by spawn opens its own handle
        return {**self.__dict__, "_zip": None, "_pid": None}

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            self._zip, self._pid = zipfile.ZipFile(self.root), os.getpid()
            names = self._zip.namelist()
            top = names[0].split("/", 1)[0] + "/" if names else ""
            self._prefix = top if all(n.startswith(top) for n in names) else ""
        return self._zip

    def _safe(self, relpath) -> str:
        p = str(relpath).replace("\\", "/")
        norm = posixpath.normpath(p)
        leaves = p.startswith("/") or re.match(r"[A-Za-z]:", p) or norm == ".." or norm.startswith("../")
        if not p or (leaves and not self.allow_outside):
            raise SampleError("unsafe_path", f"image path {relpath!r} is absolute or leaves the image root {self.root}"
                                             " (allowed by --allow-outside-image-root)")
        return norm

    def _file(self, relpath) -> str:
        """A folder root's file for a record path: inside the root after following links."""
        path = os.path.join(self.root, self._safe(relpath))
        if not self.allow_outside:
            check_inside(path, self.root)
        return path

    def _member(self, path: str) -> str | None:
        zf = self._archive()
        for name in (path, self._prefix + path):
            try:
                zf.getinfo(name)
                return name
            except KeyError:
                pass
        return None

    def exists(self, relpath) -> bool:
        return self._member(self._safe(relpath)) is not None if self.is_zip else os.path.isfile(self._file(relpath))

    def open(self, relpath) -> Image.Image:
        if not self.is_zip:
            return load_image(self._file(relpath))
        path = self._safe(relpath)
        name = self._member(path)
        if name is None:
            raise SampleError("missing_image", f"{path} is not in {self.root}")
        size = self._archive().getinfo(name).file_size  # what the archive's directory declares
        if size > MAX_IMAGE_BYTES:
            raise SampleError("image_too_large", f"{self.root}:{name} is {size:,} bytes uncompressed "
                                                 f"(limit data.MAX_IMAGE_BYTES = {MAX_IMAGE_BYTES:,})")
        try:
            with self._archive().open(name) as f:
                raw = f.read(size)  # read(n) inflates at most n bytes, even if the declared size lies
        except (zipfile.BadZipFile, OSError, EOFError) as e:  # CRC error, truncated archive
            raise SampleError("corrupt_image", f"{self.root}:{name}: {e}") from None
        return load_image(raw, name=f"{self.root}:{name}")


# ----------------------------------------------------------------------------------------------
# Tokenizers


def _content(v):
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} dicts."""
    return v.get("content") if isinstance(v, dict) else v


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---- Meta's tiktoken tokenizer.model (Llama 3) -> a `tokenizers` byte-level BPE ----------------
# Meta ships Llama 3's tokenizer as lines "base64(token bytes) rank" (tiktoken's format), not as a
# sentencepiece model. It is the same BPE as HF's tokenizer.json once the merges are recovered from
# the ranks; tiktoken itself is not needed.

# pat_str of llama_models/llama3/tokenizer.py (GPT-4 style), split before the bytes are merged.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Meta's 256 special tokens, in id order right after the ranks (llama_models/llama3/tokenizer.py):
# <|begin_of_text|> = 128000, <|start_header_id|> = 128006, <|eot_id|> = 128009 in Llama 3.
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                  "<|image|>"]
LLAMA3_SPECIAL += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIAL))]
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+")


def is_tiktoken_file(path) -> bool:
    """tiktoken's text format, told apart from a sentencepiece protobuf (whose first byte is 0x0a,
    an empty first line) by its first line."""
    with open(path, "rb") as f:
        first = f.read(1024).split(b"\n", 1)[0].rstrip(b"\r")
    return _TIKTOKEN_LINE.fullmatch(first) is not None


@functools.lru_cache(maxsize=2)  # keyed by (path, mtime, size): rebuilt only when the file changes
def _tiktoken_bpe(path: str, _mtime_ns: int, _size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) in byte-level BPE's alphabet. tiktoken merges, at each step, the adjacent pair
    whose concatenation has the lowest rank; so every split (a, b) of a token t with a, b in the
    vocabulary is a merge of priority rank(t). ~1 s for Llama 3's 128,000 ranks."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f.read().splitlines(), 1):
            if not line.strip():
                continue
            if _TIKTOKEN_LINE.fullmatch(line) is None:
                raise errors.UserError(f"{path}:{n}: not a tiktoken line 'base64-token rank': {line[:60]!r}")
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise errors.UserError(f"{path}: ranks are not 0..{len(ranks) - 1} (duplicates or gaps)")
    char = _byte_chars()
    text = {t: "".join(char[b] for b in t) for t in ranks}
    merges = []
    for t, r in ranks.items():
        splits = [(ranks[t[:i]], ranks[t[i:]], i) for i in range(1, len(t)) if t[:i] in ranks and t[i:] in ranks]
        merges += [(r, a, b, text[t[:i]], text[t[i:]]) for a, b, i in sorted(splits)]
    merges.sort()
    return {text[t]: r for t, r in ranks.items()}, [(a, b) for *_, a, b in merges]


@functools.lru_cache(maxsize=1)
def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies are written in)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def tiktoken_tokenizer(path):
    """A Meta tiktoken tokenizer.model as a `tokenizers.Tokenizer`, laid out as Meta's own
    tokenizer.json for Llama 3: the split regex, byte-level BPE that keeps a pre-token found whole
    in the vocabulary (tiktoken does), the 256 special tokens, and <|begin_of_text|> prepended by
    encode(add_special_tokens=True)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    import tokenizers

    st = os.stat(path)
    vocab, merges = _tiktoken_bpe(os.fspath(path), st.st_mtime_ns, st.st_size)
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL])
    bos = len(vocab)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    return tok


class Tokenizer:
    """One interface over HF `tokenizers` (tokenizer.json: Llama-3 byte-level BPE; or Meta's tiktoken
    tokenizer.model, converted) and `sentencepiece` (tokenizer.model: Llama-2). `encode` never adds
    BOS/EOS and tokenises the text as it would tokenise inside a longer string, so template pieces
    concatenate to the tokens of the whole prompt: special-token strings in text stay text, and sentencepiece's dummy-prefix
    space is off (HF's LlamaTokenizer legacy=False does the same; templates write that space)."""

    def __init__(self, folder):
        self.folder = os.fspath(folder)
        cfg = {**_read_json(os.path.join(self.folder, "special_tokens_map.json")),
               **_read_json(os.path.join(self.folder, "tokenizer_config.json"))}
        gen = _read_json(os.path.join(self.folder, "generation_config.json"))
        self._tok = self._sp = self._sp_enc = None
        if os.path.exists(os.path.join(self.folder, "tokenizer.json")):
            import tokenizers

            self._tok = tokenizers.Tokenizer.from_file(os.path.join(self.folder, "tokenizer.json"))
            # Special tokens come only from templates. If "<|eot_id|>" typed in a record became the
            # real id, a user could end a turn or forge a system block (prompt injection), and
            # data that quotes chat markup would silently change the conversation structure.
            self._tok.encode_special_tokens = True
        elif os.path.exists(os.path.join(self.folder, "tokenizer.model")) and is_tiktoken_file(
                os.path.join(self.folder, "tokenizer.model")):  # Meta's Llama 3 release
            self._tok = tiktoken_tokenizer(os.path.join(self.folder, "tokenizer.model"))
            self._tok.encode_special_tokens = True  # as above
        elif os.path.exists(os.path.join(self.folder, "tokenizer.model")):
            import sentencepiece as spm
            try:
                from sentencepiece import sentencepiece_model_pb2
            except ImportError as e:
                raise ImportError(f"reading {self.folder}/tokenizer.model needs protobuf: pip install protobuf") from e

            path = os.path.join(self.folder, "tokenizer.model")
            self._sp = spm.SentencePieceProcessor(model_file=path)  # decoding, piece lookup
            proto = sentencepiece_model_pb2.ModelProto()
            with open(path, "rb") as f:
                proto.ParseFromString(f.read())
            proto.normalizer_spec.add_dummy_prefix = False  # pieces must concatenate (see class doc)
            self._sp_enc = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
            # Control symbols (<s>, </s>) are never produced from text, so injection is not an issue.
        else:
            raise FileNotFoundError(f"{self.folder}: no tokenizer.json or tokenizer.model")

        def first_id(*names):
            ids = [self.token_to_id(n) for n in names if n]
            return next((i for i in ids if i is not None), None)

        self.bos_id = first_id(_content(cfg.get("bos_token")), "<|begin_of_text|>", "<s>")
        self.eos_id = first_id(_content(cfg.get("eos_token")), "<|end_of_text|>", "</s>", "<|endoftext|>")
        # Pad positions are masked (attention_mask 0, label IGNORE_INDEX); any id works, EOS is safe.
        self.pad_id = first_id(_content(cfg.get("pad_token")))
        if self.pad_id is None:
            self.pad_id = self.eos_id if self.eos_id is not None else 0
        gen_eos = gen.get("eos_token_id", [])
        stops = (gen_eos if isinstance(gen_eos, list) else [gen_eos]) + [
            self.eos_id, self.token_to_id("<|eot_id|>"), self.token_to_id("<|end_of_text|>")]
        self.stop_ids = list(dict.fromkeys(i for i in stops if i is not None))

    def __getstate__(self):  # rebuilt from the folder in spawned workers
        return {"folder": self.folder}

    def __setstate__(self, state):
        self.__init__(state["folder"])

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True) if self._tok else self._sp.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        if self._tok is not None:
            return self._tok.token_to_id(token)
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None  # piece_to_id answers unk for unknowns

    def encode(self, text: str) -> list[int]:
        if self._tok is not None:
            return self._tok.encode(text, add_special_tokens=False).ids
        return self._sp_enc.encode(text)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids if int(i) >= 0]  # image placeholders / IGNORE_INDEX are not tokens
        if self._tok is not None:
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        out, run = [], []  # sentencepiece always drops control symbols: render them by hand if asked
        for i in ids:
            if self._sp.is_control(i):
                out.append(self._sp.decode(run))
                run = []
                if not skip_special_tokens:
                    out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        return "".join(out) + self._sp.decode(run)


# What Tokenizer reads from a folder: a checkpoint that must load on its own carries a copy of these.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def copy_tokenizer(src, dst) -> None:
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, dst / name)


def load_tokenizer(folder) -> Tokenizer:
    """A model folder with tokenizer.json (+ tokenizer_config.json / special_tokens_map.json /
    generation_config.json, all optional) or tokenizer.model."""
    return Tokenizer(folder)


def stop_ids(tokenizer: Tokenizer, eos_token_id) -> list[int]:
    """Ids that end an answer: the tokenizer's chat stop ids, then the model config's eos id(s)
    (an int, a list, or None), each once."""
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return list(dict.fromkeys(tokenizer.stop_ids + eos))


def decode_answer(row: list[int], tokenizer: Tokenizer, stops) -> str:
    """Generated tokens up to the first stop token, as text: what an answer is (eval, chat, train's eval hook)."""
    cut = next((k for k, t in enumerate(row) if t in stops), len(row))
    return tokenizer.decode(row[:cut], skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------------------------
# Templates and label masking


@dataclass(frozen=True)
class Template:
    """A prompt format as strings. `<|...|>`, `{bos}`, `{eos}` become single special ids (written
    here, never parsed out of record text); `{system}`, `{input}`, `{output}` are filled with record
    text, tokenised as plain text. `user` covers a human turn and the header that opens the answer
    (labels ignored); `assistant` is the answer and its end token (supervised)."""
    prefix: str
    system: str  # "" = the format has no system prompt
    user: str
    assistant: str
    system_in_user: bool = False  # Llama-2 puts <<SYS>> inside the first [INST]
    image_only_input: bool = False  # LLaVA "plain": the human turn contributes only its image


TEMPLATES: dict[str, Template] = {
    # Llama-3 Instruct (the chat_template of Meta-Llama-3-8B-Instruct). Stop word <|eot_id|>.
    "llama3": Template(
        prefix="<|begin_of_text|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant="{output}<|eot_id|>"),
    # Llama-2 chat as Meta's chat_completion builds it: per turn BOS "[INST] {user} [/INST] {answer} " EOS.
    # [INST] is plain text in Llama-2's vocabulary. Meta tokenises each turn in one call whose
    # sentencepiece dummy prefix puts a space before "[INST]"; our encode has no dummy prefix, so
    # the space is written here.
    "llama2": Template(
        prefix="", system="<<SYS>>\n{system}\n<</SYS>>\n\n",
        user="{bos} [INST] {input} [/INST]", assistant=" {output} {eos}", system_in_user=True),
    # LLaVA-1.5 (Vicuna v1, llava/conversation.py's SeparatorStyle.TWO): "{system} USER: {q} ASSISTANT: {a}</s>USER: ..."
    # The space before each answer is written here, as for llama2 (no sentencepiece dummy prefix).
    "vicuna_v1": Template(prefix="{bos}", system="{system} ", user="USER: {input} ASSISTANT:",
                          assistant=" {output}{eos}"),
    # Alignment on captions (LLaVA "plain"): BOS, the image, then caption + EOS supervised.
    "caption": Template(prefix="{bos}", system="", user="{input}", assistant="{output}{eos}", image_only_input=True),
    # Text stage: BOS + raw text + EOS, all supervised ({"id", "text"} records; prompts continue the text).
    "text": Template(prefix="{bos}", system="", user="{input}", assistant="{output}{eos}"),
}

# Prompt texts of the evaluation, defined once: eval.py sends them, demo.py's tokenizer learns them.
EVAL_SYSTEM = "Answer the questions."  # Doctor Sun's evaluation system prompt
YES_NO_HINT = "Answer the following question with yes or no. "  # MultiMedEval's prefix to yes/no VQA questions
YES_NO_MAYBE_HINT = "Answer the question with yes, no or maybe."  # opens the PubMedQA prompt

_FIELD = re.compile(r"(<\|[a-z0-9_]+\|>|\{bos\}|\{eos\}|\{system\}|\{input\}|\{output\})")


def _template(template) -> Template:
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[template]


def _normalize(turns, has_image: bool):
    """LLaVA's turn rules (llava/train/train.py): a leading gpt turn is dropped, <image> moves to
    the front of its human input as "<image>\n"; consecutive human turns are merged ("\n"), each
    gpt turn closes an (input, output) pair, values are stripped like Llama-3's chat template
    (`| trim`). Returns (pairs, system or None)."""
    if not isinstance(turns, list) or not turns:
        raise SampleError("malformed_record", "'conversations' must be a non-empty list")
    pairs, pending, system, n_images = [], [], None, 0
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise SampleError("malformed_record", f"turn {k} is not an object with a string 'value'")
        role, value = turn.get("from", turn.get("role")), turn["value"]
        if role == "system":
            system = value.strip()
        elif role in ("human", "user"):
            pending.append(value.strip())
        elif role in ("gpt", "assistant"):
            if IMAGE_TOKEN in value:
                raise SampleError("malformed_record", f"turn {k}: {IMAGE_TOKEN} in an answer")
            if not pending and not pairs:
                continue  # a leading answer has no question
            if not value.strip():
                raise SampleError("empty_answer", f"turn {k} is empty")
            inp = "\n".join(pending)
            n_images += inp.count(IMAGE_TOKEN)  # a trailing unanswered human turn is not part of the sample
            if IMAGE_TOKEN in inp:
                inp = IMAGE_TOKEN + "\n" + inp.replace(IMAGE_TOKEN, "").strip()
            pairs.append((inp, value.strip()))
            pending = []
        else:
            raise SampleError("malformed_record", f"turn {k} has unknown role {role!r}")
    if not pairs:
        raise SampleError("empty_answer", "no gpt turn answers a human turn")
    if n_images > 1:
        raise SampleError("multiple_images", f"{n_images} {IMAGE_TOKEN} tokens (at most one image per sample)")
    if has_image and not n_images:
        raise SampleError("image_without_token", f"record has an image but no {IMAGE_TOKEN} in its human turns")
    if n_images and not has_image:
        raise SampleError("token_without_image", f"{IMAGE_TOKEN} in the text but the record has no image")
    return pairs, system


def _render(fmt: str, tok: Tokenizer, **fields) -> list:
    """Template string -> items ("id", int) / ("text", str) / ("image", None)."""
    items = []
    for part in _FIELD.split(fmt):
        if part in ("{system}", "{input}", "{output}"):
            text = fields[part[1:-1]]
            for j, piece in enumerate(text.split(IMAGE_TOKEN) if part == "{input}" else [text]):
                if j:
                    items.append(("image", None))
                items.append(("text", piece))
        elif part in ("{bos}", "{eos}") or part.startswith("<|"):
            i = tok.bos_id if part == "{bos}" else tok.eos_id if part == "{eos}" else tok.token_to_id(part)
            if i is None:
                raise errors.UserError(f"tokenizer in {tok.folder} has no {part} token, which this template needs")
            items.append(("id", i))
        elif part:
            items.append(("text", part))
    return items


def _spans(t: Template, tok: Tokenizer, pairs, system):
    """[(items, supervised)] for (input, output) pairs; output None ends at the answer header."""
    if system and not t.system:
        raise SampleError("template_mismatch", "a system prompt was given but the template has none")
    spans = [(_render(t.prefix, tok), False)]
    if system and not t.system_in_user:
        spans.append((_render(t.system, tok, system=system), False))
    for k, (inp, out) in enumerate(pairs):
        if t.image_only_input:
            inp = IMAGE_TOKEN if IMAGE_TOKEN in inp else ""
        if k == 0 and system and t.system_in_user:
            inp = t.system.replace("{system}", system) + inp
        spans.append((_render(t.user, tok, input=inp), False))
        if out is not None:
            spans.append((_render(t.assistant, tok, output=out), True))
    return spans


def _tokenize(spans, tok: Tokenizer, num_image_tokens: int, image_token_id: int):
    """spans: [(items, supervised)]. Each same-label run of text is tokenised on its own, so a
    label boundary is always a token boundary; then the pieces must equal the tokenisation of the
    text they came from, else the sample is rejected (upstream LLaVA warns "tokenization mismatch"
    and trains on misaligned labels)."""
    ids, labels, text = [], [], []

    def flush():
        runs = []
        for s, sup in text:
            if runs and runs[-1][1] == sup:
                runs[-1][0] += s
            else:
                runs.append([s, sup])
        toks = [tok.encode(s) for s, _ in runs]
        if len(runs) > 1 and sum(toks, []) != tok.encode("".join(s for s, _ in runs)):
            whole = "".join(s for s, _ in runs)
            raise SampleError("template_mismatch", f"tokens of {whole[-80:]!r} merge across the prompt/answer boundary")
        for t, (_, sup) in zip(toks, runs):
            ids.extend(t)
            labels.extend(t if sup else [IGNORE_INDEX] * len(t))
        text.clear()

    for items, sup in spans:
        for kind, v in items:
            if kind == "text":
                if v:
                    text.append((v, sup))
                continue
            flush()
            if kind == "id":
                ids.append(v)
                labels.append(v if sup else IGNORE_INDEX)
            else:
                ids.extend([image_token_id] * num_image_tokens)
                labels.extend([IGNORE_INDEX] * num_image_tokens)
    flush()
    return ids, labels


def encode_conversation(conversations, tokenizer: Tokenizer, template="llama3", *, system=None,
                        num_image_tokens: int = 0, image_token_id: int = IMAGE_TOKEN_ID,
                        max_length: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one record. `conversations` is a LLaVA turn list, or a string (raw
    text for the "text" template). num_image_tokens > 0 means the record has an image: its
    `<image>` becomes that many `image_token_id`s. max_length counts expanded tokens (the model's
    context; xtuner's LLaVA configs keep 4096 - 576 = 3520 for text). A cut that would fall inside the image
    block moves before it: the model needs all of an image's features or none."""
    t = _template(template)
    if isinstance(conversations, str):
        if not conversations.strip():
            raise SampleError("empty_answer", "empty text")
        pairs, rec_system = [("", conversations.strip())], None
    else:
        pairs, rec_system = _normalize(conversations, has_image=num_image_tokens > 0)
    spans = _spans(t, tokenizer, pairs, rec_system or system)
    ids, labels = _tokenize(spans, tokenizer, num_image_tokens, image_token_id)
    if max_length is not None and len(ids) > max_length:
        cut = max_length
        if image_token_id in ids:
            start = ids.index(image_token_id)
            if start < cut < start + num_image_tokens:
                cut = start
        n, ids, labels = len(ids), ids[:cut], labels[:cut]
        if all(label == IGNORE_INDEX for label in labels):
            raise SampleError("too_long_no_labels", f"{n} tokens, max_length {max_length}: no answer token left")
    return ids, labels


def encode_prompt(question: str, tokenizer: Tokenizer, template="llama3", *, system=None, has_image=False,
                  num_image_tokens: int = 0, image_token_id: int = IMAGE_TOKEN_ID) -> list[int]:
    """Generation prompt: prefix, optional system, one human turn, ending where the answer starts
    (Llama-3: the assistant header; Llama-2: "[/INST]"). With has_image the question starts with
    "<image>\n" (an <image> already in it is moved there), as in training."""
    t = _template(template)
    if has_image and num_image_tokens < 1:
        raise ValueError("has_image=True needs num_image_tokens >= 1")
    n = question.count(IMAGE_TOKEN)
    if n > 1 or (n and not has_image):
        raise ValueError(f"question holds {n} {IMAGE_TOKEN} tokens but has_image={has_image}")
    question = question.replace(IMAGE_TOKEN, "").strip()
    inp = IMAGE_TOKEN + "\n" + question if has_image else question
    spans = _spans(t, tokenizer, [(inp, None)], system)
    return _tokenize(spans, tokenizer, num_image_tokens if has_image else 0, image_token_id)[0]


def encode_later_turn(question: str, tokenizer: Tokenizer, template="llama3", *,
                      image_token_id: int = IMAGE_TOKEN_ID) -> list[int]:
    """A human turn after the first, with the header that opens its answer, as training renders it
    inside a multi-turn record (never the prefix or the system prompt again): what a chat appends."""
    t = _template(template)
    text = "" if t.image_only_input else question.strip()  # a caption template reads no question
    return _tokenize([(_render(t.user, tokenizer, input=text), False)], tokenizer, 0, image_token_id)[0]


def answer_end_ids(tokenizer: Tokenizer, template="llama3") -> list[int]:
    """What closes an answer in training (Llama-3: <|eot_id|>; Vicuna: </s>): a chat's history gets
    these whether the model stopped on them, on another stop id, or ran out of new tokens."""
    end = _template(template).assistant.split("{output}", 1)[1]
    return _tokenize([(_render(end, tokenizer), True)], tokenizer, 0, IMAGE_TOKEN_ID)[0]


# ----------------------------------------------------------------------------------------------
# How a checkpoint's inputs were prepared (train.py records its run in config.json)


def tokenizer_folder(model_dir, override=None) -> Path:
    """--tokenizer, else the checkpoint's "tokenizer" entry (train.py records it; followed up the
    "base.init" chain of stage checkpoints), else the model folder (llava-hf / LLaVA ship theirs)."""
    if override:
        return Path(override)
    folder = Path(model_dir)
    while True:
        cfg = load_hf_config(folder)
        for ref in (cfg.get("tokenizer"), (cfg.get("train") or {}).get("tokenizer")):
            if ref:
                p = Path(ref)  # a relative one: inside the checkpoint (the copy a final carries)
                return p if p.is_absolute() or (p.exists() and not (folder / p).exists()) else folder / p
        parent = (cfg.get("base") or {}).get("init")
        if not parent:
            return Path(model_dir)
        folder = Path(parent) if Path(parent).exists() else folder / parent


@dataclass(frozen=True)
class PromptPolicy:
    """How a model's inputs are built, as it was trained: the chat template, the system prompt
    ("" = none), and the image preprocessing. train.py records it in every checkpoint, convert.py
    carries it into every export in the place the consumer reads, and eval.py uses it by default,
    so one model is asked the same way whatever folder it sits in."""
    template: str = "llama3"  # a TEMPLATES key
    system: str = ""
    pad_to_square: bool = True
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD

    def to_dict(self) -> dict:
        return {"template": self.template, "system": self.system, "pad_to_square": self.pad_to_square,
                "image_mean": list(self.image_mean), "image_std": list(self.image_std)}

    @classmethod
    def from_dict(cls, d: dict) -> "PromptPolicy":
        return cls(template=d["template"], system=d.get("system", ""), pad_to_square=bool(d["pad_to_square"]),
                   image_mean=tuple(d.get("image_mean", CLIP_MEAN)), image_std=tuple(d.get("image_std", CLIP_STD)))


POLICY_KEY = "prompt_policy"  # the config.json key of ours and of our exports
# LLaVA-1.5's conv_vicuna_v1 (llava/conversation.py), the prompt its evaluation scripts use.
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def prompt_policy(model_dir) -> tuple[PromptPolicy, str]:
    """The policy a checkpoint folder records, else what its layout implies; and where it came from.

    Recorded: our checkpoints and our exports (config.json "prompt_policy"). Otherwise: our older
    checkpoints by their stage, with no system prompt; any other folder by its image_aspect_ratio
    (original LLaVA) or its processor's do_pad (llava-hf), and by its tokenizer: Llama-3 chat with no
    system prompt (as xtuner's LLaVA-Llama-3 configs and Doctor Sun train), else LLaVA-1.5's Vicuna
    conversation, whose system prompt is part of its format. The seed's evaluation prompt
    (EVAL_SYSTEM) is an evaluation choice: eval.py --system.
    """
    cfg = load_hf_config(model_dir)
    if POLICY_KEY in cfg:
        return PromptPolicy.from_dict(cfg[POLICY_KEY]), f"recorded in {Path(model_dir) / 'config.json'}"
    train = cfg.get("train") or {}
    stage = cfg.get("stage") or train.get("stage")
    proc = _read_json(os.path.join(os.fspath(model_dir), "preprocessor_config.json"))
    if "image_aspect_ratio" in cfg:  # original LLaVA's setting
        pad = cfg["image_aspect_ratio"] == "pad"
    elif train.get("pad_to_square") is not None:
        pad = bool(train["pad_to_square"])
    elif stage:  # LLaVA-1.5's recipe: pretrain does not pad, finetune does
        pad = stage != "pretrain"
    else:  # llava-hf: LlavaImageProcessor pads when do_pad; CLIPImageProcessor never does
        pad = bool(proc.get("do_pad", False)) if proc else True
    norm = tuple(proc.get("image_mean", CLIP_MEAN)), tuple(proc.get("image_std", CLIP_STD))
    if train or cfg.get("format") == "doctor-sun":  # ours, before policies were recorded: train.py uses no system prompt
        template = {"text": "text", "pretrain": "caption"}.get(stage, "llama3")
        return PromptPolicy(template, "", pad, *norm), f"implied by stage {stage!r} of {model_dir}"
    llama3 = _has_llama3_chat(tokenizer_folder(model_dir))
    template, system = ("llama3", "") if llama3 else ("vicuna_v1", VICUNA_V1_SYSTEM)
    return PromptPolicy(template, system, pad, *norm), f"implied by the layout of {model_dir} (none recorded)"


def _has_llama3_chat(folder: Path) -> bool:
    try:
        return load_tokenizer(folder).token_to_id("<|eot_id|>") is not None
    except (FileNotFoundError, OSError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------
# Records and the dataset


@dataclass
class DataSource:
    path: str  # LLaVA JSON list or JSONL
    ratio: float = 1.0  # <1: seeded subset, >1: repeats (Doctor Sun found medical 1 : general 0.5 best)
    images: str | None = None  # image folder or .zip


def parse_data_spec(spec: str) -> list[DataSource]:
    """Comma-separated `file[:ratio][@image_root]`, e.g.
    "medical.json:1.0@image_finetune.zip,general.jsonl:0.5@coco/" (ratio defaults to 1, the
    image root to none: text-only data). Paths are taken as given (relative to the working dir)."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        path, _, images = item.partition("@")
        ratio = 1.0
        head, sep, tail = path.rpartition(":")
        if sep:
            try:
                ratio, path = float(tail), head
            except ValueError:
                raise errors.UserError(f"data spec {item!r}: ratio {tail!r} is not a number "
                                       "(file[:ratio][@image_root])") from None
        if not path:
            raise errors.UserError(f"data spec {item!r}: no file (file[:ratio][@image_root])")
        if not 0 < ratio < math.inf:  # a ratio of 0 picks no record: an empty source, or an empty run
            raise errors.UserError(f"data spec {item!r}: ratio must be > 0 and finite (file[:ratio][@image_root])")
        out.append(DataSource(path, ratio, images or None))
    if not out:
        raise errors.UserError(f"empty data spec {spec!r}")
    return out


class _BadLine(str):
    """A JSONL line that does not parse: kept in place, so it is reported like a malformed record."""


def read_records(path, *, bad_lines: str = "keep", allow_object: bool = False) -> list | dict:
    """The records of a JSON document or of a JSON Lines file (.jsonl, one record per line).

    Training data keeps a JSONL line that does not parse (or is not UTF-8) as a `_BadLine`
    (bad_lines="keep"): it is then skipped and counted like any malformed record. Benchmarks must
    not lose questions quietly (bad_lines="raise": ValueError naming file:line). A JSON document must
    be UTF-8 (else a ValueError naming file:line) and a list (LLaVA's format) unless allow_object
    (PubMedQA's {PMID: record}). A leading byte-order mark is ignored."""
    if bad_lines not in ("keep", "raise"):
        raise ValueError(f"bad_lines must be 'keep' or 'raise', got {bad_lines!r}")
    path = os.fspath(path)
    with open(path, "rb") as f:  # bytes: a stray non-UTF-8 byte is reported with its line, not as a traceback
        if path.endswith(".jsonl"):
            lines = (line.removeprefix(codecs.BOM_UTF8) if n == 1 else line for n, line in enumerate(f, 1))
            return [_parse_line(line, n, path, bad_lines) for n, line in enumerate(lines, 1) if line.strip()]
        raw = f.read().removeprefix(codecs.BOM_UTF8)
    try:
        records = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise errors.UserError(f"{path}:{line}: not UTF-8 text ({e.reason}: byte {raw[e.start]:#04x} at offset "
                         f"{e.start})") from None
    except json.JSONDecodeError as e:
        hint = " (one record per line? name it .jsonl)" if e.msg == "Extra data" else ""
        raise errors.UserError(f"{path}: not valid JSON: {e}{hint}") from None
    if not isinstance(records, list) and not (allow_object and isinstance(records, dict)):
        raise errors.UserError(f"{path}: expected a JSON list of records (LLaVA format), got {type(records).__name__}")
    return records


def _parse_line(line: bytes, n: int, path: str, bad_lines: str):
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        problem = f"not UTF-8 text ({e.reason}: byte {line[e.start]:#04x} at column {e.start + 1})"
        if bad_lines == "raise":
            raise ValueError(f"{path}:{n}: {problem}") from None
        return _BadLine(f"line {n}: {problem}")
    except json.JSONDecodeError as e:
        if bad_lines == "raise":
            raise errors.UserError(f"{path}:{n}: not valid JSON ({e})") from None
        return _BadLine(f"line {n}: invalid JSON: {e}")


def _check_record(rec, template: str):
    """Structure only (types and fields); the conversation is checked by _normalize."""
    if isinstance(rec, _BadLine):
        raise SampleError("malformed_record", str(rec))
    if not isinstance(rec, dict):
        raise SampleError("malformed_record", f"record is a {type(rec).__name__}, not an object")
    if template == "text":
        if not isinstance(rec.get("text"), str):
            raise SampleError("malformed_record", "the text template needs a string 'text' field")
        return
    if not isinstance(rec.get("conversations"), list):
        raise SampleError("malformed_record", "no 'conversations' list")
    image = rec.get("image")
    if isinstance(image, list):
        raise SampleError("multiple_images" if len(image) > 1 else "malformed_record", f"'image' is a list: {image!r}")
    if image is not None and not isinstance(image, str):
        raise SampleError("malformed_record", f"'image' must be a string path, got {image!r}")


def _record_text(rec, template) -> tuple[bool, object]:
    """(has_image, conversations-or-text) of a checked record."""
    if template == "text":
        return False, rec["text"]
    return bool(rec.get("image")), rec["conversations"]


def _check_text(rec, template) -> None:
    """What a record's text alone shows is wrong (its structure, the conversation rules), with no
    tokenizer and no image."""
    _check_record(rec, template)
    has_image, conv = _record_text(rec, template)
    if not isinstance(conv, str):
        _normalize(conv, has_image)
    elif not conv.strip():
        raise SampleError("empty_answer", "empty text")


# Draws for one sample before training gives up (on_bad="replace"): the sample and 31 replacements. If
# half of a modality's samples were bad, 31 bad replacements in a row would happen to one bad sample in
# 2 billion; giving up means the data is mostly bad (a wrong image root, a --max-length no answer fits).
MAX_DRAWS = 32


class BadDataError(RuntimeError):
    """Training cannot go on: a bad sample's replacements were all bad too."""


class SupervisedDataset(torch.utils.data.Dataset):
    """Records from one or more sources (mixed by ratio) -> tokenised samples with labels.

    Loading only parses JSON; tokenising and image decoding happen per sample in __getitem__,
    in DataLoader workers. A bad sample raises (on_bad="error"), comes back as {"id", "skip": reason}
    (on_bad="skip"; collate drops and counts those), or is replaced by another sample (on_bad="replace",
    training: a step never comes out empty or short). Replacement leaves every bad sample it met in the
    good sample's "skips" ({id, file, record, reason, detail, replaced_by}); collate gathers them.
    Counts travel with the batches, so they stay right across worker processes (a counter inside a
    worker would die with it)."""

    def __init__(self, sources, tokenizer: Tokenizer | None, *, template="llama3", system=None, num_image_tokens: int,
                 image_token_id: int = IMAGE_TOKEN_ID, max_length: int = 2048, image_size: int = 336,
                 pad_to_square: bool = True, on_bad: str = "skip", seed: int = 0,
                 allow_outside_image_root: bool = False):
        if on_bad not in ("skip", "replace", "error"):
            raise ValueError(f"on_bad must be 'skip', 'replace' or 'error', got {on_bad!r}")
        if system and not _template(template).system:
            raise ValueError(f"template {template!r} has no system prompt")
        if tokenizer is not None:  # None: only lengths / is_image are wanted (a dry run)
            encode_conversation("x", tokenizer, template, system=system)  # fail now if a template token is missing
        if isinstance(sources, str):
            sources = parse_data_spec(sources)
        self.tokenizer, self.template, self.system = tokenizer, template, system
        self.num_image_tokens, self.image_token_id, self.max_length = num_image_tokens, image_token_id, max_length
        self.image_size, self.pad_to_square, self.on_bad, self.seed = image_size, pad_to_square, on_bad, seed
        self.files, self.index = [], []  # files: (source, records, ImageSource|None); index: (file, record)
        rng = random.Random(seed)
        for f, src in enumerate(sources):
            records = read_records(src.path)
            images = ImageSource(src.images, allow_outside_image_root) if src.images else None
            self.files.append((src, records, images))
            n = len(records)
            k = round(n * src.ratio)
            picks = (list(range(n)) * (k // n) + sorted(rng.sample(range(n), k % n))) if n else []
            self.index += [(f, r) for r in picks]
            if on_bad == "error":  # fail before training starts, not hours into it
                for r, rec in enumerate(records):
                    try:
                        _check_record(rec, template)
                    except SampleError as e:
                        raise self._named(e, rec, src, r) from None
        self.dropped = self._drop_bad() if on_bad == "replace" else []  # skip rows of records dropped at load

    def __len__(self):
        return len(self.index)

    @staticmethod
    def _sample_id(rec, src, r):
        return rec["id"] if isinstance(rec, dict) and "id" in rec else f"{src.path}#{r}"

    def _named(self, e: SampleError, rec, src, r) -> SampleError:
        return SampleError(e.reason, f"sample id={self._sample_id(rec, src, r)!r} ({src.path}, record {r}): {e.detail}")

    def _skip_row(self, f: int, r: int, e: SampleError) -> dict:
        src, records, _ = self.files[f]
        return {"id": self._sample_id(records[r], src, r), "file": src.path, "record": r, "reason": e.reason,
                "detail": e.detail}

    def _drop_bad(self) -> list[dict]:
        """on_bad="replace": records whose text alone is bad leave the index at load, so the samples of
        each modality, which replacements are drawn from, hold none of them (one text-only record
        among image records would otherwise be a whole text-only step of bad samples)."""
        keep, dropped = [], []
        for f, r in self.index:
            try:
                _check_text(self.files[f][1][r], self.template)
                keep.append((f, r))
            except SampleError as e:
                dropped.append(self._skip_row(f, r, e))
        self.index = keep
        return dropped

    def __getitem__(self, i):
        if self.on_bad == "replace":
            return self._replaced(i)
        f, r = self.index[i]
        src, records, images = self.files[f]
        rec = records[r]
        try:
            return self._build(rec, src, images, r)
        except SampleError as e:
            if self.on_bad == "error":
                raise self._named(e, rec, src, r) from None
            return {"id": self._sample_id(rec, src, r), "skip": e.reason}

    def _replaced(self, i):
        """Sample i, or if it is bad the first good one of replacements drawn from i's modality (a
        global batch is all image or all text-only samples) by (seed, i, attempt) alone: the same on
        any rank, so any number of processes still trains on the same samples."""
        j, skips, seen = i, [], set()
        pool = self._by_modality[self.is_image[i]]
        for attempt in range(MAX_DRAWS):
            f, r = self.index[j]
            src, records, images = self.files[f]
            try:
                sample = self._build(records[r], src, images, r)
            except SampleError as e:
                if (f, r) not in seen:  # a record drawn twice is one bad sample
                    seen.add((f, r))
                    skips.append(self._skip_row(f, r, e))
                j = pool[random.Random(f"{self.seed}:{i}:{attempt}").randrange(len(pool))]
                continue
            return {**sample, "skips": [{**s, "replaced_by": sample["id"]} for s in skips]}
        kind, first = "image" if self.is_image[i] else "text-only", skips[0]
        raise BadDataError(
            f"sample id={first['id']!r} ({first['file']}, record {first['record']}) and the {MAX_DRAWS - 1} "
            f"replacements drawn for it from the {len(pool)} {kind} samples were all bad: {len(skips)} records, "
            f"{dict(collections.Counter(s['reason'] for s in skips))}; the first: {first['reason']}: "
            f"{first['detail']}. `python data.py check` names every bad sample")

    @functools.cached_property
    def _by_modality(self) -> dict[bool, list[int]]:
        return {m: [j for j, x in enumerate(self.is_image) if x == m] for m in (True, False)}

    def _build(self, rec, src, images, r):
        _check_record(rec, self.template)
        has_image, conv = _record_text(rec, self.template)
        ids, labels = encode_conversation(
            conv, self.tokenizer, self.template, system=self.system, max_length=self.max_length,
            num_image_tokens=self.num_image_tokens if has_image else 0, image_token_id=self.image_token_id)
        pixel_values = None
        if has_image and self.image_token_id in ids:  # truncation may have removed the image block
            if images is None:
                raise SampleError("missing_image", f"record has image {rec['image']!r} but {src.path} has no "
                                                   "image root (file@DIR_OR_ZIP)")
            pixel_values = preprocess_image(images.open(rec["image"]), self.image_size, self.pad_to_square)
        return {"id": self._sample_id(rec, src, r), "input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "pixel_values": pixel_values}

    @functools.cached_property
    def _estimates(self) -> tuple[list[int], list[bool]]:
        """Token counts estimated without tokenising: Latin words + non-ASCII characters (a CJK
        character is 3 UTF-8 bytes and about one Llama-3 token) + the image block."""
        per_record, lengths, is_image = {}, [], []
        for f, r in self.index:
            if (f, r) not in per_record:
                rec = self.files[f][1][r]
                try:
                    _check_record(rec, self.template)
                    has_image, conv = _record_text(rec, self.template)
                    texts = [conv] if isinstance(conv, str) else [t.get("value") for t in conv if isinstance(t, dict)]
                    n = sum(len(s.split()) + (len(s.encode()) - len(s)) // 2 for s in texts if isinstance(s, str))
                    per_record[f, r] = (max(1, n + self.num_image_tokens * has_image), has_image)
                except SampleError:
                    per_record[f, r] = (1, False)
            lengths.append(per_record[f, r][0])
            is_image.append(per_record[f, r][1])
        return lengths, is_image

    @property
    def lengths(self) -> list[int]:
        return self._estimates[0]

    @property
    def is_image(self) -> list[bool]:
        return self._estimates[1]


# ----------------------------------------------------------------------------------------------
# Batching


def collate(batch, pad_id: int, padding_side: str = "right") -> dict:
    """Pad to the longest sample. Right padding for training; left padding for batched
    generation (every prompt then ends at the last position, where the next token is read).
    Skipped samples are dropped and counted in `skipped`; a batch may come out empty (B = 0). The
    bad samples that replaced ones met are counted there too, and listed in `skips`."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    skips = [s for b in batch for s in b.get("skips", ())]
    skipped = collections.Counter([b["skip"] for b in batch if "skip" in b] + [s["reason"] for s in skips])
    batch = [b for b in batch if "skip" not in b]
    T = max((len(b["input_ids"]) for b in batch), default=0)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), T), dtype=torch.long)
    for k, b in enumerate(batch):
        n = len(b["input_ids"])
        pos = slice(0, n) if padding_side == "right" else slice(T - n, T)
        input_ids[k, pos] = torch.as_tensor(b["input_ids"])
        attention_mask[k, pos] = 1
        if b.get("labels") is not None:
            labels[k, pos] = torch.as_tensor(b["labels"])
    images = [b["pixel_values"] for b in batch if b.get("pixel_values") is not None]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "pixel_values": torch.stack(images) if images else None,  # (n_images, 3, S, S), batch order
            "ids": [b.get("id") for b in batch], "skipped": skipped, "skips": skips}


def expand_image_tokens(input_ids: torch.Tensor, num_image_tokens: int, attention_mask=None, labels=None,
                        image_token_id: int = IMAGE_TOKEN_ID):
    """LLaVA's one-placeholder-per-image convention -> ours: each lone placeholder becomes
    `num_image_tokens` of them (label IGNORE_INDEX). For batches written by the original LLaVA or
    xtuner code; our own encoders already write every position. Runs that are already expanded are
    left alone; rows are re-padded on the side they were padded on. Returns (ids, mask, labels)."""
    n, img = num_image_tokens, image_token_id
    is_img = input_ids == img
    prev = torch.nn.functional.pad(is_img[:, :-1], (1, 0), value=False)
    nxt = torch.nn.functional.pad(is_img[:, 1:], (0, 1), value=False)
    lone = is_img & ~prev & ~nxt
    if n == 1 or not lone.any():
        return input_ids, attention_mask, labels
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    left = bool((attention_mask[:, 0] == 0).any()) and not bool((attention_mask[:, -1] == 0).any())
    rows = []
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool()
        reps = torch.where(lone[b], n, 1)[keep]
        row_lab = None
        if labels is not None:
            row_lab = labels[b][keep].masked_fill(lone[b][keep], IGNORE_INDEX).repeat_interleave(reps)
        rows.append((input_ids[b][keep].repeat_interleave(reps), row_lab))
    T = max(r[0].numel() for r in rows)
    ids = input_ids.new_zeros(len(rows), T)
    mask = attention_mask.new_zeros(len(rows), T)
    labs = None if labels is None else labels.new_full((len(rows), T), IGNORE_INDEX)
    for b, (row_ids, row_lab) in enumerate(rows):
        sl = slice(T - row_ids.numel(), T) if left else slice(0, row_ids.numel())
        ids[b, sl], mask[b, sl] = row_ids, 1
        if labs is not None:
            labs[b, sl] = row_lab
    return ids, mask, labs


def _split_even(batch, lengths, n):
    """LLaVA's split_to_even_chunks: n equal-size chunks with similar total length (longest
    first, each to the lightest chunk), so no rank waits long for another."""
    size = len(batch) // n
    chunks, totals = [[] for _ in range(n)], [0] * n
    for i in batch:
        k = min((k for k in range(n) if len(chunks[k]) < size), key=lambda k: totals[k])
        chunks[k].append(i)
        totals[k] += lengths[i]
    return chunks


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Modality- and length-grouped order (LLaVA's group_by_modality_length: image and text-only
    samples in separate batches, similar lengths together to cut padding), as this rank's stream
    of indices for a DataLoader with batch_size=batch_size.

    Per epoch (seeded by seed + epoch): each modality is shuffled and padded with repeats of its
    own samples to a multiple of global_batch (as DistributedSampler pads), so every global batch
    is full and one modality; mega-batches of `megabatch_mult` global batches are sorted by length
    and cut into global batches (HF's LengthGroupedSampler; LLaVA's mega-batch of one global batch
    sorts nothing on one rank, and its final mixed batch breaks modality grouping); the global
    batches are shuffled. All of this depends on (seed, epoch, global_batch) only, so any number of
    ranks sees the same samples in each optimizer step. Only then is each global batch cut into
    micro-steps of batch_size * num_replicas neighbours in length (one micro-batch on every rank;
    global_batch / (batch_size * num_replicas) of them: the gradient accumulation), and each
    micro-step is split over ranks with similar total lengths. global_batch defaults to
    batch_size * num_replicas (no accumulation). `start_index` skips this rank's first samples:
    resume with start_index = steps_done * global_batch // num_replicas and the rest of the epoch
    is identical to an uninterrupted run, on any number of ranks."""

    def __init__(self, lengths, is_image, batch_size: int, *, global_batch: int | None = None, seed: int = 0,
                 epoch: int = 0, num_replicas: int = 1, rank: int = 0, start_index: int = 0,
                 megabatch_mult: int = 50):
        if len(lengths) != len(is_image):
            raise ValueError(f"{len(lengths)} lengths but {len(is_image)} is_image flags")
        if not 0 <= rank < num_replicas or batch_size < 1:
            raise ValueError(f"need batch_size >= 1, 0 <= rank < num_replicas: {batch_size=} {rank=} {num_replicas=}")
        global_batch = global_batch or batch_size * num_replicas
        if global_batch % (batch_size * num_replicas):
            raise ValueError(f"global_batch {global_batch} is not a multiple of batch_size {batch_size} x "
                             f"{num_replicas} replicas")
        self.lengths, self.is_image = list(lengths), [bool(m) for m in is_image]
        self.batch_size, self.global_batch, self.seed, self.epoch = batch_size, global_batch, seed, epoch
        self.num_replicas, self.rank, self.start_index = num_replicas, rank, start_index
        self.megabatch_mult = megabatch_mult

    def set_epoch(self, epoch: int, start_index: int = 0):
        self.epoch, self.start_index = epoch, start_index

    def global_batches(self) -> list[list[int]]:
        """This epoch's optimizer steps, all ranks together: lists of global_batch indices, each
        sorted longest first. Independent of batch_size, num_replicas and rank."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        step = self.global_batch
        batches = []
        for modality in (True, False):
            idx = [i for i, m in enumerate(self.is_image) if m == modality]
            if not idx:
                continue
            idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            pad = -len(idx) % step
            idx += (idx * (pad // len(idx) + 1))[:pad]
            for s in range(0, len(idx), step * self.megabatch_mult):
                mega = sorted(idx[s:s + step * self.megabatch_mult], key=lambda i: -self.lengths[i])
                batches += [mega[t:t + step] for t in range(0, len(mega), step)]
        return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]

    def __iter__(self):
        micro_step = self.batch_size * self.num_replicas  # one micro-batch on each rank
        mine = [i for b in self.global_batches() for s in range(0, len(b), micro_step)
                for i in _split_even(b[s:s + micro_step], self.lengths, self.num_replicas)[self.rank]]
        return iter(mine[self.start_index:])

    def __len__(self):
        n_image, G = sum(self.is_image), self.global_batch
        n_batches = math.ceil(n_image / G) + math.ceil((len(self.is_image) - n_image) / G)
        return max(0, n_batches * G // self.num_replicas - self.start_index)


# ----------------------------------------------------------------------------------------------
# Validator


def check(data, images=None, tokenizer=None, *, template="llama3", system=None, max_length=None,
          num_image_tokens: int = 576, decode_images: bool = True, allow_outside_image_root: bool = False,
          out=sys.stdout) -> dict:
    """Validate one data file the way training would read it, without a model. Prints counts,
    every bad sample by id with its reason, reason counts, and (with a tokenizer) token-length
    percentiles and how many samples max_length would truncate. Returns the same as a dict."""
    records = read_records(data)
    source = ImageSource(images, allow_outside_image_root) if images else None
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    bad, lengths, n_image, truncated = [], [], 0, 0
    for r, rec in enumerate(records):
        sid = rec["id"] if isinstance(rec, dict) and "id" in rec else f"{data}#{r}"
        try:
            _check_record(rec, template)
            has_image, conv = _record_text(rec, template)
            n_image += has_image
            if tok is not None:
                kw = dict(system=system, num_image_tokens=num_image_tokens if has_image else 0)
                ids, _ = encode_conversation(conv, tok, template, **kw)
                lengths.append(len(ids))
                if max_length is not None and len(ids) > max_length:
                    truncated += 1
                    encode_conversation(conv, tok, template, max_length=max_length, **kw)
            elif not isinstance(conv, str):
                _normalize(conv, has_image)
            if has_image:
                if source is None:
                    raise SampleError("missing_image", f"record has image {rec['image']!r} but no image root was given")
                if decode_images:
                    source.open(rec["image"])
                elif not source.exists(rec["image"]):
                    raise SampleError("missing_image", f"{rec['image']} is not in {source.root}")
        except SampleError as e:
            bad.append((sid, e.reason, e.detail))
    reasons = collections.Counter(reason for _, reason, _ in bad)
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"data: {data}   images: {images}")
    n_malformed = reasons["malformed_record"]
    p(f"records: {len(records)}   with image: {n_image}   text-only: {len(records) - n_image - n_malformed}"
      f"   malformed: {n_malformed}")
    p(f"bad samples: {len(bad)}")
    for sid, reason, detail in bad:
        p(f"  id={sid}  {reason}: {detail}")
    if reasons:
        p("by reason: " + ", ".join(f"{k} {v}" for k, v in reasons.most_common()))
    if lengths:
        q = np.percentile(lengths, [50, 90, 99])
        p(f"tokens ({template}, {num_image_tokens} per image): "
          f"p50 {q[0]:.0f}  p90 {q[1]:.0f}  p99 {q[2]:.0f}  max {max(lengths)}")
        if max_length is not None:
            p(f"max_length {max_length} truncates {truncated} of {len(lengths)} samples")
    return {"records": len(records), "with_image": n_image, "bad": bad, "reasons": reasons,
            "lengths": lengths, "truncated": truncated}


def main(argv=None) -> int:
    ap = errors.ArgumentParser(description="Doctor Sun data tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="validate a LLaVA-format data file and its images; exit 1 if any sample is bad")
    c.add_argument("--data", required=True, help="LLaVA JSON list or JSONL")
    c.add_argument("--images", help="image folder or .zip")
    c.add_argument("--tokenizer", help="model folder with tokenizer.json or tokenizer.model")
    c.add_argument("--template", default="llama3", choices=sorted(TEMPLATES))
    c.add_argument("--system", default=None)
    c.add_argument("--max-length", type=errors.at_least(1), default=None)
    c.add_argument("--num-image-tokens", type=errors.at_least(1), default=576)
    c.add_argument("--no-decode", action="store_true", help="only check that images exist (fast)")
    c.add_argument("--allow-outside-image-root", action="store_true",
                   help="accept absolute and ../ image paths, and links leading out of the image folder")
    a = ap.parse_args(argv)
    report = check(a.data, a.images, a.tokenizer, template=a.template, system=a.system, max_length=a.max_length,
                   num_image_tokens=a.num_image_tokens, decode_images=not a.no_decode,
                   allow_outside_image_root=a.allow_outside_image_root)
    return 1 if report["bad"] else 0


if __name__ == "__main__":
    errors.run(main)
