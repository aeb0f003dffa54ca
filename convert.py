"""Checkpoint conversion: this project's format <-> the LLaVA layouts the ecosystem loads.

    python convert.py --to llava-hf CHECKPOINT OUT [--tokenizer DIR] [--dtype bfloat16] [--pad-vocab-to 64]
    python convert.py --to llava    CHECKPOINT OUT [--tokenizer DIR] [--dtype float16] [--vision-tower NAME]
    python convert.py --to clip     CHECKPOINT OUT [--dtype float32]
    python convert.py --from llava-hf SRC OUT
    python convert.py --from llava    SRC OUT [--vision CLIP_DIR]
    python convert.py --from xtuner   SRC OUT --vision CLIP_DIR [--llm BASE_LLM_DIR]

CHECKPOINT is any folder `model.from_pretrained` reads (LoRA adapters are merged on load).

- llava-hf: `transformers`' LlavaForConditionalGeneration + LlavaProcessor (vLLM and SGLang read
  it too). The vocabulary grows by `<image>` and `<pad>`; the processor expands one `<image>` into
  exactly as many ids as the vision tower yields features.
- llava: the original LLaVA layout (LlavaLlamaForCausalLM) in which Doctor Sun was released: no
  `<image>` in the vocabulary (the placeholder is -200 at run time), config = the LLM config plus
  the `mm_*` fields, the vision tower merged into the weights.
- clip: the vision tower alone, LoRA merged, as a Hugging Face CLIPVisionModel folder with its
  CLIPImageProcessor (what xtuner's `convert merge ... --is-clip` writes): the tuned tower for
  another LLaVA training run, or for any CLIP consumer.
- xtuner: what xtuner's `pth_to_hf` writes for a LLaVA model (`llm/` or `llm_adapter/`,
  `projector/`, `visual_encoder_adapter/`) plus the base CLIP; peft LoRA adapters are merged.

The key tables and config translations live in formats.py, which reads and writes each layout
through the same table; this file adds what a consumer needs besides weights (tokenizer, chat
template, processor and generation configs) and writes atomically.
Every output is written into a temporary folder next to OUT and renamed at the end: an error
leaves nothing behind. transformers is not needed here (only the tests load the outputs with it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import torch

import checkpoint
import clip
import data
import formats
import lora
import model

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")

# Llama-3's chat template, extended for the processor's message format: a message's content is a
# string, or a list of {"type": "image"} / {"type": "text", "text": ...} items. Images go first as
# "<image>\n", then the text, trimmed: the layout Doctor Sun trains on (data.py moves <image> first).
CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}{%- else %}"
    "{{- '<image>\n' * (message['content'] | selectattr('type', 'equalto', 'image') | list | length) }}"
    "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\n') | trim }}"
    "{%- endif %}{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")


# ---- shared pieces ----------------------------------------------------------------------------------

def parse_size(s: str) -> int:
    """'2GB' -> 2 * 10**9 (decimal units, like transformers' max_shard_size); a plain number is bytes."""
    hit = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", s.upper())
    if hit is None:
        raise ValueError(f"cannot parse size {s!r}: use e.g. 2GB, 500MB or a number of bytes")
    return int(float(hit.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[hit.group(2)])


def find_tokenizer(ckpt: Path, explicit: str | None) -> Path:
    """--tokenizer, else the checkpoint's recorded tokenizer (eval.py's rule), else the folder."""
    folder = data.tokenizer_folder(ckpt, explicit)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        how = "given by --tokenizer" if explicit else f"found for {ckpt}"
        raise FileNotFoundError(f"no tokenizer (tokenizer.json or tokenizer.model) in {folder}, the folder "
                                f"{how}: pass --tokenizer DIR")
    return folder


def copy_tokenizer(src: Path, out: Path) -> None:
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, out / f)


def generation_eos(tok_dir: Path, m: model.DoctorSun) -> list[int]:
    """generation_config's eos ids: every id that ends an answer (data.stop_ids), sorted."""
    return sorted(data.stop_ids(data.load_tokenizer(tok_dir), m.config.llm.eos_token_id))


def image_processor_config(c: clip.ClipConfig, pad_to_square: bool) -> dict:
    """CLIP preprocessing: resize the shortest side (bicubic), centre crop, rescale, CLIP mean/std.

    LlavaImageProcessor is CLIPImageProcessor plus `do_pad`: LLaVA's expand2square onto the mean
    colour (int(mean * 255) = (122, 116, 104)), as Doctor Sun's finetune stage trains. Padding
    changes no token count: the crop is always image_size x image_size.
    """
    return {"image_processor_type": "LlavaImageProcessor", "processor_class": "LlavaProcessor",
            "do_convert_rgb": True, "do_pad": pad_to_square,
            "do_resize": True, "size": {"shortest_edge": c.image_size}, "resample": 3,  # PIL bicubic
            "do_center_crop": True, "crop_size": {"height": c.image_size, "width": c.image_size},
            "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(data.CLIP_MEAN), "image_std": list(data.CLIP_STD)}


def clip_processor_config(c: clip.ClipConfig) -> dict:
    """CLIPImageProcessor's config: the same steps without padding (LLaVA pads in its own code, by
    image_aspect_ratio)."""
    cfg = {**image_processor_config(c, False), "image_processor_type": "CLIPImageProcessor",
           "processor_class": "CLIPProcessor"}
    del cfg["do_pad"]
    return cfg


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# ---- ours -> transformers LLaVA ----------------------------------------------------------------------

def add_tokens(tok_dir: Path, m: model.DoctorSun):
    """The tokenizer.json with `<image>` and `<pad>` added as special tokens (those not there yet).

    Returns (tokenizers.Tokenizer, image_id, pad_id, rows), `rows` = the embedding rows needed so
    every id has one. Two tokens, two rows: upstream's Llama-3 script counts one and leaves the last
    id without an embedding row.
    """
    from tokenizers import AddedToken, Tokenizer

    path = tok_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{tok_dir} has no tokenizer.json: the llava-hf processor needs a fast "
                                f"tokenizer (for a sentencepiece tokenizer.model, save it once with "
                                f"transformers' AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))")
    tok = Tokenizer.from_file(str(path))
    lacking = [t for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>") if tok.token_to_id(t) is None]
    if lacking:
        raise ValueError(f"{path} is not a Llama-3 tokenizer (no {lacking}); the llava-hf export writes "
                         f"the Llama-3 chat template only")
    new = [t for t in (IMAGE_TOKEN, PAD_TOKEN) if tok.token_to_id(t) is None]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
    image_id, pad_id = tok.token_to_id(IMAGE_TOKEN), tok.token_to_id(PAD_TOKEN)
    if m.image_token_id >= 0 and m.image_token_id != image_id:  # a model imported from llava-hf
        raise ValueError(f"the checkpoint's image token id is {m.image_token_id} but {path} gives "
                         f"{IMAGE_TOKEN!r} the id {image_id}")
    rows = max(m.config.llm.vocab_size, tok.get_vocab_size(with_added_tokens=True), image_id + 1, pad_id + 1)
    return tok, image_id, pad_id, rows


def resize_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    """Append rows equal to the mean row (computed in fp32), deterministically: a new token starts as
    an 'average' token rather than a random one whose logit could dominate. Old rows stay bitwise."""
    if rows == w.shape[0]:
        return w
    mean = w.float().mean(0, keepdim=True).to(w.dtype)
    return torch.cat([w, mean.expand(rows - w.shape[0], -1)])


def to_llava_hf(m: model.DoctorSun, tok_dir: Path, out: Path, *, dtype: torch.dtype, pad_vocab_to: int = 1,
                max_shard_bytes: int | None = None, pad_to_square: bool = True) -> dict:
    if m.config.projector_type != "mlp2x_gelu":
        raise ValueError(f"transformers' LLaVA has a 2-layer GELU projector; this model's is "
                         f"{m.config.projector_type!r} (use --to llava)")
    tok, image_id, pad_id, rows = add_tokens(tok_dir, m)
    rows = math.ceil(rows / pad_vocab_to) * pad_vocab_to
    llm, vis = replace(m.config.llm, vocab_size=rows), m.config.vision

    state = formats.export_state(m.state_dict(), formats.LLAVA_HF_KEYS, dtype, skip=formats.LLAVA_HF_WRITE_SKIP,
                                 tied=llm.tie_word_embeddings)
    names = formats.invert(formats.LLAVA_HF_KEYS, formats.LLAVA_HF_WRITE_SKIP)
    for key in (names["llm."] + "embed_tokens.weight", names["llm.lm_head."] + "weight"):
        if key in state:  # (no LM head when tied)
            state[key] = resize_rows(state[key], rows)
    checkpoint.save_state(state, out, max_shard_bytes=max_shard_bytes)
    write_json(out / "config.json", formats.llava_hf_config_json(
        vis, llm, image_token_id=image_id, pad_token_id=pad_id, num_image_tokens=m.num_image_tokens, dtype=dtype))
    write_json(out / "generation_config.json", {"bos_token_id": llm.bos_token_id, "pad_token_id": pad_id,
                                                "eos_token_id": generation_eos(tok_dir, m), "do_sample": False})

    # Tokenizer: the edited tokenizer.json; tokenizer_config.json keeps the source's other settings.
    tok.save(str(out / "tokenizer.json"))
    src_cfg = tok_dir / "tokenizer_config.json"
    tcfg = json.loads(src_cfg.read_text()) if src_cfg.is_file() else {}
    tcfg.setdefault("bos_token", "<|begin_of_text|>")
    tcfg.setdefault("eos_token", "<|eot_id|>")
    tcfg.update({
        "added_tokens_decoder": {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                                          "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
                                 for i, t in sorted(tok.get_added_tokens_decoder().items())},
        "pad_token": PAD_TOKEN, "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast", "processor_class": "LlavaProcessor"})
    write_json(out / "tokenizer_config.json", tcfg)
    write_json(out / "special_tokens_map.json", {k: tcfg[k] for k in ("bos_token", "eos_token", "pad_token")})
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)  # where transformers 5 looks first

    # Processor: one <image> -> (image_size / patch)^2 ids, +1 for the class token, -1 for "default"
    # (which drops it): exactly the features the model splices in.
    write_json(out / "preprocessor_config.json", image_processor_config(vis, pad_to_square))
    write_json(out / "processor_config.json", {
        "processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN, "patch_size": vis.patch_size,
        "vision_feature_select_strategy": {v: k for k, v in formats.STRATEGY.items()}[vis.select_feature],
        "num_additional_image_tokens": 1})
    return {"image_token_index": image_id, "pad_token_id": pad_id,
            "vocab_rows": (m.config.llm.vocab_size, rows), "num_image_tokens": m.num_image_tokens}


# ---- ours -> original LLaVA ----------------------------------------------------------------------------

def vision_tower_name(c: clip.ClipConfig) -> str | None:
    """The hub name of the OpenAI CLIP this tower's architecture is (what LLaVA configs record), else None."""
    for name in clip.PRESETS:
        if name.startswith("clip-vit") and c == clip.ClipConfig.from_name(
                name, select_layer=c.select_layer, select_feature=c.select_feature):
            return f"openai/{name}"
    return None


def to_llava(m: model.DoctorSun, tok_dir: Path, out: Path, final_out: Path, *, dtype: torch.dtype,
             max_shard_bytes: int | None, pad_to_square: bool = True, vision_tower: str | None = None) -> dict:
    """`mm_vision_tower` names the CLIP the tower came from (LLaVA reads its config and
    image processor there). For a tower that is no public CLIP, its config goes into OUT/vision_tower
    and the absolute path is recorded, as LLaVA users do with local towers."""
    vis, llm = m.config.vision, m.config.llm
    state = formats.export_state(m.state_dict(), formats.LLAVA_KEYS, dtype, tied=llm.tie_word_embeddings)
    checkpoint.save_state(state, out, max_shard_bytes=max_shard_bytes)
    processor = {**image_processor_config(vis, False), "image_processor_type": "CLIPImageProcessor",
                 "processor_class": "CLIPProcessor"}
    del processor["do_pad"]  # LLaVA pads in its own code, by image_aspect_ratio
    tower = vision_tower or vision_tower_name(vis)
    if tower is None:
        (out / "vision_tower").mkdir()
        write_json(out / "vision_tower" / "config.json", clip.config_to_hf(vis))
        write_json(out / "vision_tower" / "preprocessor_config.json", processor)
        tower = str(final_out.resolve() / "vision_tower")
    write_json(out / "config.json", formats.llava_config_json(
        vis, llm, projector_type=m.config.projector_type, tower=tower, pad_to_square=pad_to_square, dtype=dtype))
    write_json(out / "generation_config.json", {"bos_token_id": llm.bos_token_id,
                                                "eos_token_id": generation_eos(tok_dir, m), "do_sample": False})
    copy_tokenizer(tok_dir, out)  # unchanged: the placeholder is -200, outside the vocabulary
    write_json(out / "preprocessor_config.json", processor)
    return {"mm_vision_tower": tower}


# ---- ours -> a standalone CLIP vision tower -------------------------------------------------------------

def to_clip(vision: clip.VisionTransformer, out: Path, *, dtype: torch.dtype, max_shard_bytes: int | None) -> dict:
    """A CLIPVisionModel folder of `vision` (LoRA already merged by model.from_pretrained)."""
    if lora.lora_modules(vision):
        raise ValueError("the vision tower still holds LoRA adapters: merge them first (model.from_pretrained "
                         "merges on load)")
    c = vision.config
    state = formats.export_state(vision.state_dict(), clip.HF_KEY_MAP, dtype)  # "vision_model.*", the hub layout
    checkpoint.save_state(state, out, max_shard_bytes=max_shard_bytes)
    write_json(out / "config.json", {**clip.config_to_hf(c), "architectures": ["CLIPVisionModel"],
                                     "dtype": str(dtype).removeprefix("torch.")})
    write_json(out / "preprocessor_config.json", clip_processor_config(c))
    # LLaVA's choice of features is no CLIP setting: say it, for whoever builds on this tower.
    return {"image_size": c.image_size, "select_layer": c.select_layer, "select_feature": c.select_feature}


# ---- driver -----------------------------------------------------------------------------------------

def convert(args: argparse.Namespace) -> dict:
    """Write into a temporary folder next to OUT, then rename it: OUT appears complete or not at all."""
    out = Path(args.out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new output folder")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        info = _convert_into(args, tmp, out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _convert_into(args: argparse.Namespace, tmp: Path, out: Path) -> dict:
    src = Path(args.src)
    if args.to == "clip":  # fp32 by default, as OpenAI's CLIP folders are: the tower is small
        model.detect_format(src)
        m = model.from_pretrained(src, dtype=DTYPES[args.dtype or "float32"])  # LoRA merged on load
        return to_clip(m.vision, tmp, dtype=DTYPES[args.dtype or "float32"],
                       max_shard_bytes=parse_size(args.max_shard_size or "5GB"))
    if args.to:
        dtype = DTYPES[args.dtype or ("float16" if args.to == "llava" else "bfloat16")]
        shard = parse_size(args.max_shard_size or ("2GB" if args.to == "llava" else "5GB"))
        model.detect_format(src)  # an unknown layout is the first thing to report
        tok_dir = find_tokenizer(src, args.tokenizer)
        square = (args.image_aspect_ratio == "pad" if args.image_aspect_ratio
                  else data.trained_pad_to_square(src))  # as trained
        m = model.from_pretrained(src, dtype=dtype)  # LoRA merged on load
        if args.to == "llava-hf":
            return to_llava_hf(m, tok_dir, tmp, dtype=dtype, pad_vocab_to=args.pad_vocab_to,
                               max_shard_bytes=shard, pad_to_square=square)
        return to_llava(m, tok_dir, tmp, out, dtype=dtype, max_shard_bytes=shard, pad_to_square=square,
                        vision_tower=args.vision_tower)

    dtype = DTYPES[args.dtype or "bfloat16"]
    if args.src_format == "xtuner":
        fields, state = formats.read_xtuner(src, args.vision, args.llm, dtype)
        m = model.from_state(model.ModelConfig(**fields), state, source=src)
        tok_src = next((d for d in (src / "llm", args.llm and Path(args.llm), src)
                        if d and any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))), None)
    else:
        kind = model.detect_format(src)
        if kind != args.src_format:
            raise ValueError(f"{src} is a {kind!r} checkpoint, not {args.src_format!r}")
        m = model.from_pretrained(src, dtype=dtype, vision=args.vision)
        tok_src = src
    model.save_pretrained(m, tmp, extra={"converted_from": {"format": args.src_format, "path": str(src)}})
    if tok_src is not None:  # eval.py and train.py find the tokenizer in the checkpoint folder
        copy_tokenizer(tok_src, tmp)
    return {"image_token_id": m.image_token_id, "vocab_size": m.config.llm.vocab_size}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--to", choices=["llava-hf", "llava", "clip"], help="export one of our checkpoints")
    way.add_argument("--from", dest="src_format", choices=["llava-hf", "llava", "xtuner"],
                     help="import a foreign checkpoint into our format")
    p.add_argument("src", help="CHECKPOINT (with --to) or SRC folder (with --from)")
    p.add_argument("out", help="output folder (must not exist)")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="weights dtype (default: float16 for --to llava, float32 for --to clip, "
                        "bfloat16 otherwise)")
    p.add_argument("--tokenizer", help="--to: tokenizer folder (default: the checkpoint's recorded one, "
                                       "else the checkpoint folder)")
    p.add_argument("--pad-vocab-to", type=int, metavar="N",
                   help="--to llava-hf: round the embedding rows up to a multiple of N (e.g. 64)")
    p.add_argument("--max-shard-size", help="--to: shard cap, e.g. 2GB (default: 2GB for llava, 5GB for llava-hf)")
    p.add_argument("--image-aspect-ratio", choices=["pad", "square"],
                   help="--to: pad images to a square before resizing (default: as the checkpoint trained)")
    p.add_argument("--vision-tower", help="--to llava: the mm_vision_tower to record (default: the hub "
                                          "name of a known CLIP, else OUT/vision_tower)")
    p.add_argument("--vision", help="--from llava/xtuner: the CLIP folder (the vision tower's base)")
    p.add_argument("--llm", help="--from xtuner: the base LLM folder (for llm_adapter/, or a frozen LLM)")
    args = p.parse_args(argv)
    # An option meant for another direction would be silently ignored: refuse it instead.
    llava = args.to in ("llava-hf", "llava")  # --to clip writes no tokenizer and no LLaVA image policy
    allowed = {"tokenizer": llava, "max_shard_size": bool(args.to), "image_aspect_ratio": llava,
               "pad_vocab_to": args.to == "llava-hf", "vision_tower": args.to == "llava",
               "vision": args.src_format in ("llava", "xtuner"), "llm": args.src_format == "xtuner"}
    for opt, ok in allowed.items():
        if getattr(args, opt) is not None and not ok:
            p.error(f"--{opt.replace('_', '-')} does not apply to "
                    f"{'--to ' + args.to if args.to else '--from ' + args.src_format}")
    if args.pad_vocab_to is None:
        args.pad_vocab_to = 1
    elif args.pad_vocab_to < 1:
        p.error("--pad-vocab-to must be >= 1")
    info = convert(args)
    print(f"wrote {args.out}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    return info


if __name__ == "__main__":
    main()
