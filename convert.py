"""Checkpoint conversion: this project's format <-> the LLaVA layouts the ecosystem loads.

    python convert.py --to llava-hf CHECKPOINT OUT [--tokenizer DIR] [--dtype bfloat16] [--pad-vocab-to 64]
    python convert.py --to llava    CHECKPOINT OUT [--tokenizer DIR] [--dtype float16] [--vision-tower NAME]
    python convert.py --to peft     CHECKPOINT OUT [--dtype float32]
    python convert.py --to clip     CHECKPOINT OUT [--dtype float32]
    python convert.py --from llava-hf SRC OUT [--dtype bfloat16]
    python convert.py --from llava    SRC OUT [--vision CLIP_DIR]
    python convert.py --from xtuner   SRC OUT --vision CLIP_DIR [--llm BASE_LLM_DIR]
    python convert.py --from meta     META_DIR OUT [--dtype D] [--max-shard-size 5GB]

CHECKPOINT is any folder `model.from_pretrained` reads (LoRA adapters are merged on load, except
for --to peft). --from keeps the source's dtype unless --dtype is given.

- llava-hf: `transformers`' LlavaForConditionalGeneration + LlavaProcessor (vLLM and SGLang read
  it too). The vocabulary grows by `<image>` and `<pad>`; the processor expands one `<image>` into
  exactly as many ids as the vision tower yields features.
- llava: the original LLaVA layout (LlavaLlamaForCausalLM) in which Doctor Sun was released: no
  `<image>` in the vocabulary (the placeholder is -200 at run time), config = the LLM config plus
  the `mm_*` fields, the vision tower merged into the weights.
- peft: the checkpoint's LoRA adapters, each in a peft folder (`visual_encoder_adapter/`,
  `llm_adapter/`) that `peft.PeftModel.from_pretrained` loads on its part's transformers model
  (CLIPVisionModel, LlamaForCausalLM) named by `base_model_name_or_path`.
- clip: the vision tower alone, LoRA merged, as a Hugging Face CLIPVisionModel folder with its
  CLIPImageProcessor (what xtuner's `convert merge ... --is-clip` writes): the tuned tower for
  another LLaVA training run, or for any CLIP consumer.
- xtuner: what xtuner's `pth_to_hf` writes for a LLaVA model (`llm/` or `llm_adapter/`,
  `projector/`, `visual_encoder_adapter/`) plus the base CLIP; peft LoRA adapters are merged.
- meta: Meta's native Llama 3 / 3.1 release (consolidated.00.pth, params.json, tiktoken
  tokenizer.model) -> a transformers LlamaForCausalLM folder with its tokenizer.json and chat
  template: an LLM to start training from, in the form every tool reads (train.py --llm reads
  the Meta folder directly too). The weights keep the source's dtype unless --dtype is given.

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
import torch.nn as nn
from safetensors.torch import save_file

import checkpoint
import clip
import data
import errors
import formats
import llama
import lora
import model

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")

# The chat templates written for transformers' processor, one per data.TEMPLATES entry a LLaVA model
# is asked with. A message's content is a string, or a list of {"type": "image"} / {"type": "text"}
# items; images go first as "<image>\n", then the text, trimmed: the layout data.py trains on. The
# policy's system prompt is the default when the messages bring none, as eval.py would use it.
_CONTENT = ("{%- if message['content'] is string %}{{- message['content'] | trim }}{%- else %}"
            "{{- '<image>\n' * (message['content'] | selectattr('type', 'equalto', 'image') | list | length) }}"
            "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\n')"
            " | trim }}{%- endif %}")
_SYSTEM = ("{%- set ns = namespace(system=DEFAULT) %}{%- for message in messages %}"
           "{%- if message['role'] == 'system' %}{%- set ns.system = message['content'] if message['content'] "
           "is string else message['content'] | map(attribute='text') | join('\n') %}{%- endif %}{%- endfor %}")
CHAT_TEMPLATES = {
    # Llama-3 Instruct: <|start_header_id|>role<|end_header_id|>\n\n content <|eot_id|>
    "llama3": _SYSTEM + "{{- bos_token }}{%- if ns.system %}{{- '<|start_header_id|>system<|end_header_id|>\n\n'"
              " + ns.system | trim + '<|eot_id|>' }}{%- endif %}"
              "{%- for message in messages if message['role'] != 'system' %}"
              "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}" + _CONTENT +
              "{{- '<|eot_id|>' }}{%- endfor %}"
              "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}",
    # LLaVA-1.5 / Vicuna v1: "{system} USER: {q} ASSISTANT: {a}</s>USER: ..."; a user turn already ends
    # with the answer header, so add_generation_prompt adds nothing.
    "vicuna_v1": _SYSTEM + "{{- bos_token }}{%- if ns.system %}{{- ns.system | trim + ' ' }}{%- endif %}"
                 "{%- for message in messages if message['role'] != 'system' %}"
                 "{%- if message['role'] == 'user' %}{{- 'USER: ' }}" + _CONTENT + "{{- ' ASSISTANT:' }}"
                 "{%- else %}{{- ' ' }}" + _CONTENT + "{{- eos_token }}{%- endif %}{%- endfor %}",
}


def chat_template(policy: data.PromptPolicy) -> str:
    """The processor's chat template for a prompt policy, its system prompt as the default."""
    if policy.template not in CHAT_TEMPLATES:
        raise errors.UserError(f"no chat template is written for the {policy.template!r} prompt format (a "
                               f"{'pretrain' if policy.template == 'caption' else 'text'}-stage checkpoint?); "
                               f"known: {sorted(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[policy.template].replace("DEFAULT", json.dumps(policy.system, ensure_ascii=False))


# ---- shared pieces ----------------------------------------------------------------------------------

def parse_size(s: str) -> int:
    """'2GB' -> 2 * 10**9 (decimal units, like transformers' max_shard_size); a plain number is bytes."""
    hit = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", s.upper())
    if hit is None:
        raise errors.UserError(f"cannot parse size {s!r}: use e.g. 2GB, 500MB or a number of bytes")
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


def image_processor_config(c: clip.ClipConfig, policy: data.PromptPolicy) -> dict:
    """CLIP preprocessing: resize the shortest side (bicubic), centre crop, rescale, CLIP mean/std.

    LlavaImageProcessor is CLIPImageProcessor plus `do_pad`: LLaVA's expand2square onto the mean
    colour (int(mean * 255) = (122, 116, 104)), as Doctor Sun's finetune stage trains. Padding
    changes no token count: the crop is always image_size x image_size.
    """
    return {"image_processor_type": "LlavaImageProcessor", "processor_class": "LlavaProcessor",
            "do_convert_rgb": True, "do_pad": policy.pad_to_square,
            "do_resize": True, "size": {"shortest_edge": c.image_size}, "resample": 3,  # PIL bicubic
            "do_center_crop": True, "crop_size": {"height": c.image_size, "width": c.image_size},
            "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(policy.image_mean), "image_std": list(policy.image_std)}


def clip_processor_config(c: clip.ClipConfig, policy: data.PromptPolicy = data.PromptPolicy()) -> dict:
    """CLIPImageProcessor's config: the same steps without padding (LLaVA pads in its own code, by
    image_aspect_ratio)."""
    cfg = {**image_processor_config(c, replace(policy, pad_to_square=False)),
           "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor"}
    del cfg["do_pad"]
    return cfg


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def part_state(m: model.DoctorSun, part: str) -> dict[str, torch.Tensor]:
    """One part's weights under our names, without LoRA adapters (unmerged, these are the base weights)."""
    return {k: t for k, t in m.state_dict().items() if k.startswith(part + ".") and ".lora_" not in k}


def write_clip_folder(m: model.DoctorSun, folder: Path, dtype: torch.dtype, max_shard_bytes: int | None = None) -> None:
    """The vision tower as a CLIPVisionModel folder: config, weights in the hub layout (`vision_model.*`,
    which transformers 4.x and 5.x both read) and the image processor."""
    folder.mkdir(exist_ok=True)
    checkpoint.save_state(formats.export_state(part_state(m, "vision"), formats.CLIP_KEYS, dtype), folder,
                          max_shard_bytes=max_shard_bytes)
    write_json(folder / "config.json", {**clip.config_to_hf(m.config.vision), "architectures": ["CLIPVisionModel"],
                                        "torch_dtype": str(dtype).removeprefix("torch.")})
    write_json(folder / "preprocessor_config.json", clip_processor_config(m.config.vision))


def write_llama_folder(m: model.DoctorSun, folder: Path, dtype: torch.dtype, tok_dir: Path | None) -> None:
    """The LLM as a LlamaForCausalLM folder (config, weights, and the tokenizer when there is one)."""
    folder.mkdir()
    llm = m.config.llm
    checkpoint.save_state(formats.export_state(part_state(m, "llm"), formats.LLAMA_KEYS, dtype,
                                               tied=llm.tie_word_embeddings), folder)
    write_json(folder / "config.json", {**llama.config_to_hf(llm),
                                        "torch_dtype": str(dtype).removeprefix("torch.")})
    if tok_dir is not None:
        copy_tokenizer(tok_dir, folder)


# ---- ours -> transformers LLaVA ----------------------------------------------------------------------

def add_tokens(tok_dir: Path, m: model.DoctorSun, template: str = "llama3"):
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
    if lacking and template == "llama3":
        raise errors.UserError(f"{path} is not a Llama-3 tokenizer (no {lacking}), but the checkpoint's prompt "
                               f"policy is the Llama-3 chat template")
    new = [t for t in (IMAGE_TOKEN, PAD_TOKEN) if tok.token_to_id(t) is None]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
    image_id, pad_id = tok.token_to_id(IMAGE_TOKEN), tok.token_to_id(PAD_TOKEN)
    if m.image_token_id >= 0 and m.image_token_id != image_id:  # a model imported from llava-hf
        raise errors.UserError(f"the checkpoint's image token id is {m.image_token_id} but {path} gives "
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


def to_llava_hf(m: model.DoctorSun, tok_dir: Path, out: Path, *, dtype: torch.dtype,
                policy: data.PromptPolicy, pad_vocab_to: int = 1, max_shard_bytes: int | None = None) -> dict:
    if m.config.projector_type != "mlp2x_gelu":
        raise errors.UserError(f"transformers' LLaVA has a 2-layer GELU projector; this model's is "
                               f"{m.config.projector_type!r} (use --to llava)")
    template = chat_template(policy)
    tok, image_id, pad_id, rows = add_tokens(tok_dir, m, policy.template)
    rows = math.ceil(rows / pad_vocab_to) * pad_vocab_to
    llm, vis = replace(m.config.llm, vocab_size=rows), m.config.vision

    state = formats.export_state(m.state_dict(), formats.LLAVA_HF_KEYS, dtype, skip=formats.LLAVA_HF_WRITE_SKIP,
                                 tied=llm.tie_word_embeddings)
    names = formats.invert(formats.LLAVA_HF_KEYS, formats.LLAVA_HF_WRITE_SKIP)
    for key in (names["llm."] + "embed_tokens.weight", names["llm.lm_head."] + "weight"):
        if key in state:  # (no LM head when tied)
            state[key] = resize_rows(state[key], rows)
    checkpoint.save_state(state, out, max_shard_bytes=max_shard_bytes)
    write_json(out / "config.json", {**formats.llava_hf_config_json(
        vis, llm, image_token_id=image_id, pad_token_id=pad_id, num_image_tokens=m.num_image_tokens, dtype=dtype),
        data.POLICY_KEY: policy.to_dict()})  # transformers keeps unknown keys; our importer reads it back
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
        "pad_token": PAD_TOKEN, "chat_template": template,
        "tokenizer_class": "PreTrainedTokenizerFast", "processor_class": "LlavaProcessor"})
    write_json(out / "tokenizer_config.json", tcfg)
    write_json(out / "special_tokens_map.json", {k: tcfg[k] for k in ("bos_token", "eos_token", "pad_token")})
    (out / "chat_template.jinja").write_text(template)  # where transformers 5 looks first

    # Processor: one <image> -> (image_size / patch)^2 ids, +1 for the class token, -1 for "default"
    # (which drops it): exactly the features the model splices in.
    write_json(out / "preprocessor_config.json", image_processor_config(vis, policy))
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
             policy: data.PromptPolicy, max_shard_bytes: int | None, vision_tower: str | None = None) -> dict:
    """`mm_vision_tower` names the CLIP the tower came from (LLaVA reads its config and
    image processor there). For a tower that is no public CLIP, its config goes into OUT/vision_tower
    and the absolute path is recorded, as LLaVA users do with local towers."""
    vis, llm = m.config.vision, m.config.llm
    state = formats.export_state(m.state_dict(), formats.LLAVA_KEYS, dtype, tied=llm.tie_word_embeddings)
    checkpoint.save_state(state, out, max_shard_bytes=max_shard_bytes)
    tower = vision_tower or vision_tower_name(vis)
    if tower is None:
        # LLaVA's CLIPVisionTower.load_model reads mm_vision_tower with CLIPVisionModel.from_pretrained
        # before the checkpoint's tower weights go over it: the folder needs weights, and these are ours.
        write_clip_folder(m, out / "vision_tower", dtype)
        tower = str(final_out.resolve() / "vision_tower")
    write_json(out / "config.json", {**formats.llava_config_json(
        vis, llm, projector_type=m.config.projector_type, tower=tower, pad_to_square=policy.pad_to_square,
        dtype=dtype), data.POLICY_KEY: policy.to_dict()})  # LLaVA reads image_aspect_ratio; we read both
    write_json(out / "generation_config.json", {"bos_token_id": llm.bos_token_id,
                                                "eos_token_id": generation_eos(tok_dir, m), "do_sample": False})
    copy_tokenizer(tok_dir, out)  # unchanged: the placeholder is -200, outside the vocabulary
    write_json(out / "preprocessor_config.json", clip_processor_config(vis, policy))
    return {"mm_vision_tower": tower}


# ---- Meta's native Llama 3 -> transformers LlamaForCausalLM ------------------------------------------

def from_meta(src: Path, out: Path, *, dtype: torch.dtype | None, max_shard_bytes: int | None) -> dict:
    """Weights under HF names (llama.py's HF table inverted), config.json, generation_config.json, and
    the tiktoken tokenizer.model as tokenizer.json + tokenizer_config.json (Llama-3 chat template)."""
    tm = src / "tokenizer.model"
    if not (tm.is_file() and data.is_tiktoken_file(tm)):
        raise FileNotFoundError(f"{tm}: Meta's tiktoken tokenizer.model is missing (or is not in tiktoken "
                                f"format); it ships beside consolidated.00.pth")
    cfg, state = formats.read_meta_llama(src, dtype)
    tok = data.tiktoken_tokenizer(tm)
    if tok.get_vocab_size(with_added_tokens=True) != cfg.vocab_size:
        raise errors.UserError(f"{tm} has {tok.get_vocab_size(with_added_tokens=True)} ids but {src}/params.json "
                               f"says vocab_size {cfg.vocab_size}: not this model's tokenizer")
    dtype = dtype or state["embed_tokens.weight"].dtype  # as Meta shipped it (bf16)
    checkpoint.save_state(formats.export_state(state, llama.HF_KEY_MAP, dtype), out, max_shard_bytes=max_shard_bytes)
    write_json(out / "config.json", {**llama.config_to_hf(cfg), "dtype": str(dtype).removeprefix("torch.")})
    write_json(out / "generation_config.json", {"bos_token_id": cfg.bos_token_id,
                                                "eos_token_id": cfg.eos_token_id, "do_sample": False})
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}  # Meta's bos_id / eos_id
    template = chat_template(data.PromptPolicy("llama3", ""))  # on string contents, Llama-3's own template
    write_json(out / "tokenizer_config.json", {
        **special, "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True}
                                 for i, t in sorted(tok.get_added_tokens_decoder().items())},
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": cfg.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast"})
    write_json(out / "special_tokens_map.json", special)
    (out / "chat_template.jinja").write_text(template)
    return {"vocab_size": cfg.vocab_size, "dtype": str(dtype).removeprefix("torch."),
            "layers": cfg.num_hidden_layers}


# ---- ours -> peft adapters ------------------------------------------------------------------------------
# xtuner's folder names (its pth_to_hf output, which `--from xtuner` reads): an adapter, and where its
# base had to be written, the weights it sits on.
PEFT_DIRS = {"vision": ("visual_encoder_adapter", "visual_encoder"), "llm": ("llm_adapter", "llm")}
PEFT_TASKS = {"vision": None, "llm": "CAUSAL_LM"}  # CLIPVisionModel has no peft task; LlamaForCausalLM
HF_MODEL_TYPES = {"vision": ("clip_vision_model", "clip"), "llm": ("llama",)}  # what those classes load


def part_base(ckpt: Path, part: str) -> Path | None:
    """The Hugging Face folder holding `part`'s weights as they are under this checkpoint's adapter,
    followed down the "base" chain as model.from_pretrained loads it; None when the weights changed on
    the way (a checkpoint of the chain stores them: trained, or copied; or a parent's LoRA was merged),
    or come from a folder transformers does not load (another layout model.load_vision reads)."""
    if any(k.startswith(part + ".") and ".lora_" not in k for k, _ in tensor_dtypes(ckpt)):
        return None
    base = checkpoint.load_hf_config(ckpt).get("base") or {}
    if base.get("init"):
        parent = model.resolve_path(ckpt, base["init"])
        if (checkpoint.load_hf_config(parent).get("lora") or {}).get(part):
            return None
        return part_base(parent, part)
    folder = model.resolve_path(ckpt, base[part]).resolve() if base.get(part) else None
    is_hf = folder is not None and (folder / "config.json").is_file() and \
        checkpoint.load_hf_config(folder).get("model_type") in HF_MODEL_TYPES[part]
    return folder if is_hf else None


def peft_targets(module: nn.Module, adapted: list[str]) -> list[str]:
    """peft's target_modules: the adapted layers' last names (q_proj, fc1, ...) when those pick out
    exactly the adapted layers, else their full names (peft matches a name or its dotted suffix)."""
    short = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    same = {n for n, mod in module.named_modules() if isinstance(mod, nn.Linear) and n.rsplit(".", 1)[-1] in short}
    return short if same == set(adapted) else sorted(adapted)


def to_peft(src: Path, out: Path, final_out: Path, *, dtype: torch.dtype) -> dict:
    """Each LoRA adapter of the checkpoint as a peft adapter folder for its part's transformers model
    (CLIPVisionModel, LlamaForCausalLM), whose base_model_name_or_path is the folder the part's weights
    came from. A part without an adapter (trained fully, or frozen) gets none: its weights are no
    adapter. A base found in no folder (a tiny random ViT, weights trained before the adapter) is
    written beside the adapter."""
    configs = {p: c for p, c in (checkpoint.load_hf_config(src).get("lora") or {}).items() if c}
    if not configs:
        raise errors.UserError(f"{src / 'config.json'} records no LoRA adapter (\"lora\"): there is nothing to "
                               f"write as peft adapters; --to llava-hf or --to llava write the whole model")
    m = model.from_pretrained(src, dtype=dtype, merge_lora=False)
    info = {}
    for part in ("vision", "llm"):
        adapter_dir, base_dir = PEFT_DIRS[part]
        if part not in configs:
            info[adapter_dir] = "none (no LoRA on this part)"
            continue
        base = part_base(src, part)
        if base is None:
            if part == "vision":
                write_clip_folder(m, out / base_dir, dtype)
            else:
                tok = data.tokenizer_folder(src)
                has_tok = any((tok / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
                write_llama_folder(m, out / base_dir, dtype, tok if has_tok else None)
            base = final_out.resolve() / base_dir
        module, lcfg = getattr(m, part), configs[part]
        (out / adapter_dir).mkdir()
        adapters = {f"{part}.{k}": t for k, t in lora.lora_state_dict(module).items()}
        save_file({k: t.contiguous() for k, t in formats.peft_state(adapters, part, dtype).items()},
                  str(out / adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_json(out / adapter_dir / "adapter_config.json", formats.peft_config_json(
            r=lcfg["r"], alpha=lcfg["alpha"], dropout=lcfg["dropout"], base=str(base), task_type=PEFT_TASKS[part],
            target_modules=peft_targets(module, sorted(lora.lora_modules(module)))))
        info[adapter_dir] = f"base {base}"
    return info


# ---- the source's dtype --------------------------------------------------------------------------------
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def tensor_dtypes(path: Path):
    """(key, dtype or None for a non-float) of every tensor of a weight folder, reading headers only."""
    for file in checkpoint.weight_files(path):
        if file.suffix == ".safetensors":
            with checkpoint.open_safetensors(file) as f:
                for key in f.keys():
                    yield key, SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
        else:  # weights_only and memory-mapped (checkpoint.iter_tensors): no tensor data is read
            for key, t, _ in checkpoint.iter_tensors(file):
                yield key, t.dtype if t.is_floating_point() else None


def source_dtype(paths, keep=lambda key: True) -> torch.dtype:
    """The one dtype of the float weights (whose keys pass `keep`) in `paths`; float32 when they mix
    dtypes (it holds every bf16 and fp16 value exactly) or have none of bf16/fp16/fp32."""
    found = {dt for p in paths for k, dt in tensor_dtypes(Path(p)) if dt is not None and keep(k)}
    return found.pop() if len(found) == 1 and found <= set(DTYPES.values()) else torch.float32


def from_sources(args: argparse.Namespace, src: Path) -> list[Path]:
    """The weight folders a --from import reads (for xtuner: its parts, and --vision / --llm in their place)."""
    if args.src_format != "xtuner":
        return [src]
    parts = [src / d for d in ("llm", "llm_adapter", "projector", "visual_encoder", "visual_encoder_adapter")]
    extra = [args.vision if not (src / "visual_encoder").is_dir() else None, args.llm]
    return [p for p in parts if p.is_dir()] + [Path(p) for p in extra if p]


# ---- ours -> a standalone CLIP vision tower -------------------------------------------------------------

def to_clip(m: model.DoctorSun, out: Path, *, dtype: torch.dtype, max_shard_bytes: int | None) -> dict:
    """The vision tower alone (LoRA merged by model.from_pretrained) as a CLIPVisionModel folder, what
    xtuner's `convert merge ... --is-clip` writes: the tuned tower for another run, or any CLIP consumer."""
    write_clip_folder(m, out, dtype, max_shard_bytes)
    c = m.config.vision  # LLaVA's choice of features is no CLIP setting: say it, for whoever builds on this
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
    if args.to == "peft":  # the adapters' own dtype unless asked: they are small, and fp32 when trained so
        model.detect_format(src)
        dtype = DTYPES[args.dtype] if args.dtype else source_dtype([src], keep=lambda k: ".lora_" in k)
        return {"dtype": str(dtype).removeprefix("torch."), **to_peft(src, tmp, out, dtype=dtype)}
    if args.to == "clip":  # fp32 by default, as OpenAI's CLIP folders are: the tower is small
        model.detect_format(src)
        dtype = DTYPES[args.dtype or "float32"]
        return to_clip(model.from_pretrained(src, dtype=dtype), tmp, dtype=dtype,
                       max_shard_bytes=parse_size(args.max_shard_size or "5GB"))
    if args.to:
        dtype = DTYPES[args.dtype or ("float16" if args.to == "llava" else "bfloat16")]
        shard = parse_size(args.max_shard_size or ("2GB" if args.to == "llava" else "5GB"))
        model.detect_format(src)  # an unknown layout is the first thing to report
        tok_dir = find_tokenizer(src, args.tokenizer)
        policy, _ = data.prompt_policy(src)  # as trained
        if args.image_aspect_ratio:
            policy = replace(policy, pad_to_square=args.image_aspect_ratio == "pad")
        m = model.from_pretrained(src, dtype=dtype)  # LoRA merged on load
        if args.to == "llava-hf":
            return to_llava_hf(m, tok_dir, tmp, dtype=dtype, policy=policy, pad_vocab_to=args.pad_vocab_to,
                               max_shard_bytes=shard)
        return to_llava(m, tok_dir, tmp, out, dtype=dtype, policy=policy, max_shard_bytes=shard,
                        vision_tower=args.vision_tower)

    if args.src_format == "meta":  # an LLM alone, written as transformers' LlamaForCausalLM
        return from_meta(src, tmp, dtype=DTYPES[args.dtype] if args.dtype else None,
                         max_shard_bytes=parse_size(args.max_shard_size or "5GB"))
    # The source's dtype unless asked: an fp32 source imported as bf16 would be rounded silently.
    dtype = DTYPES[args.dtype] if args.dtype else source_dtype(from_sources(args, src))
    if args.src_format == "xtuner":
        fields, state = formats.read_xtuner(src, args.vision, args.llm, dtype)
        for name, t in state.items():  # its adapters are merged in `dtype`, which can overflow
            if not checkpoint.is_finite(t):
                raise checkpoint.CheckpointError(f"refusing to write {name!r}: it holds NaN or Inf in {dtype}")
        m = model.from_state(model.ModelConfig(**fields), state, source=src)
        tok_src = next((d for d in (src / "llm", args.llm and Path(args.llm), src)
                        if d and any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))), None)
        policy = xtuner_policy(tok_src)
    else:
        kind = model.detect_format(src)
        if kind != args.src_format:
            raise errors.UserError(f"{src} is a {kind!r} checkpoint, not {args.src_format!r}")
        m = model.from_pretrained(src, dtype=dtype, vision=args.vision)
        tok_src = src
        policy, _ = data.prompt_policy(src)
    model.save_pretrained(m, tmp, extra={"converted_from": {"format": args.src_format, "path": str(src)},
                                         data.POLICY_KEY: policy.to_dict()})
    if tok_src is not None:  # eval.py and train.py find the tokenizer in the checkpoint folder
        copy_tokenizer(tok_src, tmp)
    return {"image_token_id": m.image_token_id, "vocab_size": m.config.llm.vocab_size,
            "dtype": str(dtype).removeprefix("torch.")}


def xtuner_policy(tok_dir: Path | None) -> data.PromptPolicy:
    """xtuner's LLaVA finetune configs: its chat template for the LLM (llama3_chat for Llama-3, else
    LLaVA-1.5's Vicuna), SYSTEM = "", pad_image_to_square=True."""
    llama3 = tok_dir is not None and data.load_tokenizer(tok_dir).token_to_id("<|eot_id|>") is not None
    return data.PromptPolicy("llama3" if llama3 else "vicuna_v1", "", True)


def main(argv=None) -> dict:
    p = errors.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--to", choices=["llava-hf", "llava", "peft", "clip"], help="export one of our checkpoints")
    way.add_argument("--from", dest="src_format", choices=["llava-hf", "llava", "xtuner", "meta"],
                     help="import a foreign checkpoint into our format (meta: into a transformers "
                          "Llama folder)")
    p.add_argument("src", help="CHECKPOINT (with --to) or SRC folder (with --from)")
    p.add_argument("out", help="output folder (must not exist)")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="weights dtype (default: float16 for --to llava, bfloat16 for --to llava-hf, float32 "
                        "for --to clip, the adapters' for --to peft, the source's for --from)")
    p.add_argument("--tokenizer", help="--to llava-hf/llava: tokenizer folder (default: the checkpoint's "
                                       "recorded one, else the checkpoint folder)")
    p.add_argument("--pad-vocab-to", type=errors.at_least(1), metavar="N",
                   help="--to llava-hf: round the embedding rows up to a multiple of N (e.g. 64)")
    p.add_argument("--max-shard-size", type=errors.checked_by(parse_size),
                   help="--to llava-hf/llava, --from meta: shard cap, e.g. 2GB (default: 2GB for llava, 5GB otherwise)")
    p.add_argument("--image-aspect-ratio", choices=["pad", "square"],
                   help="--to llava-hf/llava: pad images to a square before resizing (default: as the "
                        "checkpoint trained)")
    p.add_argument("--vision-tower", help="--to llava: the mm_vision_tower to record (default: the hub "
                                          "name of a known CLIP, else OUT/vision_tower)")
    p.add_argument("--vision", help="--from llava/xtuner: the CLIP folder (the vision tower's base)")
    p.add_argument("--llm", help="--from xtuner: the base LLM folder (for llm_adapter/, or a frozen LLM)")
    args = p.parse_args(argv)
    # An option meant for another direction would be silently ignored: refuse it instead.
    whole = args.to in ("llava-hf", "llava")  # the others write no tokenizer and no LLaVA image policy
    allowed = {"tokenizer": whole, "image_aspect_ratio": whole,
               "max_shard_size": whole or args.to == "clip" or args.src_format == "meta",
               "pad_vocab_to": args.to == "llava-hf", "vision_tower": args.to == "llava",
               "vision": args.src_format in ("llava", "xtuner"), "llm": args.src_format == "xtuner"}
    for opt, ok in allowed.items():
        if getattr(args, opt) is not None and not ok:
            p.error(f"--{opt.replace('_', '-')} does not apply to "
                    f"{'--to ' + args.to if args.to else '--from ' + args.src_format}")
    if args.pad_vocab_to is None:
        args.pad_vocab_to = 1
    info = convert(args)
    print(f"wrote {args.out}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    return info


if __name__ == "__main__":
    errors.run(main)
