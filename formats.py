"""Other projects' checkpoint layouts: one home, one key table per layout, read and written through it.

Each layout is a table {their prefix: our prefix} plus the translation of its config.json. Reading
turns a foreign folder into (our model-config fields, a state dict under our names); writing runs
the same table backwards (`invert`), and checks that every name it writes reads back to where it
came from, so the two directions cannot drift apart. Nothing here builds a model: `model.py` asks
`read` for the pair, `convert.py` writes with `export_state` and the `*_config` functions.

    transformers LLaVA   LlavaForConditionalGeneration (+ processor): vLLM, SGLang and HF read it
    original LLaVA       LlavaLlamaForCausalLM + `mm_*` config keys: how Doctor Sun was released
    xtuner               `pth_to_hf` output: llm/ or llm_adapter/, projector/, visual_encoder_adapter/
    Meta native Llama 3  consolidated.00.pth + params.json: the LLM alone, as Meta publishes it
    OpenAI / OpenCLIP    a CLIP's vision tower alone: open_clip's saved folder, or an OpenAI state dict
    peft                 LoRA adapters on a transformers CLIPVisionModel / LlamaForCausalLM (written)

The CLIP and Llama parts in Hugging Face folders are not foreign: `clip.py` and `llama.py` read them
themselves, and the tables below reuse their key maps for the parts. A part in another layout (a
Meta LLM, an OpenCLIP tower) is read here and built by `model.load_llm` / `model.load_vision`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

import checkpoint
import clip
import errors
import llama
import lora

# ---- transformers' LlavaForConditionalGeneration ---------------------------------------------------
# Every generation of its names: hub checkpoints (llava-hf/*: `vision_tower.vision_model.*`), what 5.24
# writes on disk (`language_model.model.*`, `vision_tower.*` with no `vision_model` level) and 5.x
# in-memory names (`model.language_model.*`).
LLAVA_HF_KEYS = {
    "model.language_model.": "llm.",
    "language_model.model.": "llm.",
    "lm_head.": "llm.lm_head.",
    "language_model.lm_head.": "llm.lm_head.",
    "model.vision_tower.vision_model.": "vision.",
    "vision_tower.vision_model.": "vision.",
    "model.vision_tower.": "vision.",
    "vision_tower.": "vision.",
    "model.multi_modal_projector.linear_1.": "projector.0.",
    "multi_modal_projector.linear_1.": "projector.0.",
    "model.multi_modal_projector.linear_2.": "projector.2.",
    "multi_modal_projector.linear_2.": "projector.2.",
}
# Names starting with "model." are transformers 5.x in-memory names, unknown to older readers. Without
# them we write the hub layout, which every transformers version reads (5.24 renames on load).
LLAVA_HF_WRITE_SKIP = ("model.",)
STRATEGY = {"default": "patch", "full": "cls_patch"}  # vision_feature_select_strategy -> select_feature

# ---- original LLaVA (LlavaLlamaForCausalLM) ---------------------------------------------------------
LLAVA_KEYS = {
    "model.": "llm.",
    "lm_head.": "llm.lm_head.",
    "model.vision_tower.vision_tower.vision_model.": "vision.",
    "model.mm_projector.": "projector.",
}

# Derived buffers some writers saved, never loaded: CLIP's position ids, and the RoPE buffers of
# transformers < 4.36 (LLaVA-1.5-era checkpoints).
_POSITION_IDS = tuple(p + "embeddings.position_ids" for p in (
    "model.vision_tower.vision_tower.vision_model.", "vision_tower.vision_model.",
    "model.vision_tower.vision_model.", "vision_tower.", "model.vision_tower."))


def _rotary(cfg: llama.LlamaConfig, *prefixes: str) -> tuple[str, ...]:
    return tuple(p + k for p in prefixes for k in llama.hf_ignore(cfg))


def detect(folder: str | Path) -> str | None:
    """"llava-hf", "llava", or None for a folder that is neither."""
    cfg = checkpoint.load_hf_config(folder)
    if cfg.get("model_type") == "llava":
        return "llava-hf"
    if "mm_vision_tower" in cfg or "mm_projector_type" in cfg:
        return "llava"
    return None


def read(folder: str | Path, dtype: torch.dtype, *, vision: str | Path | None = None):
    """A llava-hf or original-LLaVA folder -> (ModelConfig fields, our state dict)."""
    kind = detect(folder)
    if kind == "llava-hf":
        return read_llava_hf(Path(folder), dtype)
    if kind == "llava":
        return read_llava(Path(folder), dtype, vision)
    raise errors.UserError(f"{folder} is neither a transformers LLaVA nor an original LLaVA folder")


# ---- reading -------------------------------------------------------------------------------------------

def llava_hf_config(hf: dict, where: str | Path = "config.json") -> dict:
    """A LlavaConfig dict -> ModelConfig fields."""
    if hf.get("projector_hidden_act", "gelu") != "gelu":
        raise errors.UserError(f"{where}: projector_hidden_act {hf['projector_hidden_act']!r} is not supported")
    if not hf.get("multimodal_projector_bias", True):
        raise errors.UserError(f"{where}: a projector without bias is not supported")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise errors.UserError(f"vision_feature_layer {layer!r}: only a single layer is supported")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in STRATEGY:
        raise errors.UserError(f"vision_feature_select_strategy {strategy!r} not in {sorted(STRATEGY)}")
    if not isinstance(hf.get("vision_config"), dict) or not isinstance(hf.get("text_config"), dict):
        raise errors.UserError(f"{where}: a LLaVA config needs vision_config and text_config dicts")
    vision = clip.config_from_hf(hf["vision_config"], select_layer=layer, select_feature=STRATEGY[strategy])
    return dict(vision=vision, llm=llama.config_from_hf(hf["text_config"]), projector_type="mlp2x_gelu",
                image_token_id=int(hf.get("image_token_index", hf.get("image_token_id"))))


def read_llava_hf(folder: Path, dtype: torch.dtype):
    cfg = llava_hf_config(checkpoint.load_hf_config(folder), folder)
    ignore = _POSITION_IDS + _rotary(cfg["llm"], "language_model.", "model.language_model.")
    if cfg["llm"].tie_word_embeddings:
        ignore += ("lm_head.", "language_model.lm_head.")  # a copy of the embedding some savers add
    return cfg, checkpoint.read_state(folder, LLAVA_HF_KEYS, ignore=ignore, dtype=dtype)


def llava_vision_config(hf: dict, folder: Path, vision: str | Path | None) -> tuple[clip.ClipConfig, str]:
    """The tower's config from `mm_vision_tower` (a local CLIP folder, or a known hub name) -> (config, tower)."""
    tower = str(vision or hf.get("mm_vision_tower", ""))
    if tower and not Path(tower).is_absolute() and (folder / tower).is_dir():
        tower = str(folder / tower)  # a tower shipped inside the checkpoint folder
    select = dict(select_layer=hf.get("mm_vision_select_layer", -2),
                  select_feature=hf.get("mm_vision_select_feature", "patch"))
    if tower and Path(tower, "config.json").is_file():
        return clip.config_from_hf(checkpoint.load_hf_config(tower), **select), tower
    try:  # a hub name such as "openai/clip-vit-large-patch14-336": the matching preset
        return clip.ClipConfig.from_name(tower.rstrip("/").split("/")[-1], **select), tower
    except (KeyError, ValueError):
        raise errors.UserError(f"{folder}: mm_vision_tower {tower!r} is neither a local CLIP folder nor "
                               f"a known preset; pass vision=PATH") from None


def read_llava(folder: Path, dtype: torch.dtype, vision: str | Path | None = None):
    """Original LLaVA. LLaVA-1.5 releases leave the tower out (it is the stock CLIP named in
    `mm_vision_tower`); Doctor Sun's release carries it merged in. Either way the result is whole."""
    hf = checkpoint.load_hf_config(folder)
    vcfg, tower = llava_vision_config(hf, folder, vision)
    cfg = dict(vision=vcfg, llm=llama.config_from_hf(hf), projector_type=hf.get("mm_projector_type", "linear"))
    ignore = _POSITION_IDS + _rotary(cfg["llm"], "") + ("lm_head.",) * cfg["llm"].tie_word_embeddings
    state = checkpoint.read_state(folder, LLAVA_KEYS, ignore=ignore, dtype=dtype)
    if not any(k.startswith("vision.") for k in state):
        if not (tower and Path(tower).is_dir()):
            raise errors.UserError(f"{folder} holds no vision tower weights and mm_vision_tower "
                                   f"{tower!r} is not a local folder; pass vision=PATH")
        _merge(state, checkpoint.read_state(tower, _under("vision.", clip.HF_KEY_MAP),
                                            ignore=clip.HF_IGNORE, dtype=dtype))
    return cfg, state


# ---- xtuner --------------------------------------------------------------------------------------------

def read_xtuner(src: Path, vision: str | Path | None, llm: str | Path | None, dtype: torch.dtype):
    """xtuner's pth_to_hf output for LLaVA + the base CLIP (+ the base LLM for `llm_adapter/` or a
    frozen LLM). xtuner's LLaVAModel uses hidden_states[-2] without the class token: our defaults.
    peft LoRA adapters are merged into the weights they adapt."""
    vdir = src / "visual_encoder" if (src / "visual_encoder").is_dir() else vision  # a fully trained ViT
    if vdir is None:
        raise errors.UserError(f"{src} has no visual_encoder/ folder: the vision tower is missing; pass "
                               f"--vision CLIP_DIR (the CLIP that training started from)")
    adapter = src / "llm_adapter"
    if (src / "llm").is_dir():  # the LLM trained fully
        ldir = src / "llm"
    elif adapter.is_dir() or llm:  # LoRA on the LLM, or a frozen LLM (pretrain stage)
        ldir = llm or json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not (ldir and Path(ldir).is_dir()):
            raise errors.UserError(f"{adapter} is a LoRA adapter and its base {ldir!r} is not a local "
                                   f"folder: pass --llm BASE_LLM_DIR")
    else:
        raise errors.UserError(f"{src} has neither llm/ nor llm_adapter/: pass --llm BASE_LLM_DIR (the frozen LLM)")

    pdir = src / "projector"
    pcfg = checkpoint.load_hf_config(pdir)  # xtuner's ProjectorConfig
    if pcfg.get("hidden_act", "gelu") != "gelu" or not pcfg.get("bias", True):
        raise errors.UserError(f"{pdir}/config.json: only a GELU projector with biases is supported, got "
                               f"hidden_act={pcfg.get('hidden_act')!r}, bias={pcfg.get('bias')!r}")
    lcfg = llama.config_from_hf(checkpoint.load_hf_config(ldir))
    cfg = dict(vision=clip.config_from_hf(checkpoint.load_hf_config(vdir)), llm=lcfg,
               projector_type=f"mlp{pcfg.get('depth', 2)}x_gelu")
    state = checkpoint.read_state(vdir, _under("vision.", clip.HF_KEY_MAP), ignore=clip.HF_IGNORE, dtype=dtype)
    if (src / "visual_encoder_adapter").is_dir():
        merge_peft_adapter(state, src / "visual_encoder_adapter", _under("vision.", clip.HF_KEY_MAP))
    llm_ignore = llama.hf_ignore(lcfg) + ("lm_head.",) * lcfg.tie_word_embeddings
    _merge(state, checkpoint.read_state(ldir, _under("llm.", llama.HF_KEY_MAP), ignore=llm_ignore, dtype=dtype))
    if adapter.is_dir():
        merge_peft_adapter(state, adapter, _under("llm.", llama.HF_KEY_MAP))
    _merge(state, checkpoint.read_state(pdir, {"model.": "projector."}, dtype=dtype))  # model.0.* / model.2.*
    return cfg, state


def merge_peft_adapter(state: checkpoint.State, folder: Path, key_map: dict[str, str]) -> list[str]:
    """Fold a peft LoRA adapter folder into the weights of `state`; `key_map` maps HF module names to ours.

    peft saves `base_model.model.<HF module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r);
    each adapted weight becomes W + (lora_alpha / r) * B @ A, computed in fp32 (lora.merged_weight).
    """
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no adapter_config.json in {folder}")
    acfg = json.loads(cfg_path.read_text())
    unsupported = {k: acfg[k] for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern",
                                        "modules_to_save") if acfg.get(k)}
    if acfg.get("bias", "none") != "none":
        unsupported["bias"] = acfg["bias"]
    if acfg.get("peft_type", "LORA") != "LORA" or unsupported:
        raise errors.UserError(f"{cfg_path}: only plain LoRA adapters are supported (peft_type "
                               f"{acfg.get('peft_type')!r}, unsupported settings {unsupported})")
    files = [folder / f for f in ("adapter_model.safetensors", "adapter_model.bin") if (folder / f).is_file()]
    if not files:
        raise FileNotFoundError(f"no adapter_model.safetensors or adapter_model.bin in {folder}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t, file in checkpoint.iter_tensors(files[0]):
        hit = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        name = checkpoint.rename(hit.group(1), key_map) if hit else None
        weight = state.get(f"{name}.weight")
        if weight is None or weight.dim() != 2:
            raise checkpoint.CheckpointError(f"unexpected key {key!r} in {file}: not a LoRA weight of a "
                                             f"linear layer")
        if not checkpoint.is_finite(t):
            raise checkpoint.CheckpointError(f"{key!r} in {file} holds NaN or Inf values")
        pairs.setdefault(name, {})[hit.group(2)] = t
    if not pairs:
        raise checkpoint.CheckpointError(f"{files[0]} holds no LoRA weights")
    scaling = float(acfg["lora_alpha"]) / int(acfg["r"])
    for name, ab in sorted(pairs.items()):
        w = state[f"{name}.weight"]
        if set(ab) != {"A", "B"}:
            raise checkpoint.CheckpointError(f"{files[0]}: {name} has lora_{''.join(ab)} but not both A and B")
        if ab["A"].shape != (int(acfg["r"]), w.shape[1]) or ab["B"].shape != (w.shape[0], int(acfg["r"])):
            raise checkpoint.CheckpointError(f"{files[0]}: {name}: LoRA shapes {tuple(ab['A'].shape)}, "
                                             f"{tuple(ab['B'].shape)} do not fit the weight {tuple(w.shape)} "
                                             f"at r={acfg['r']}")
        state[f"{name}.weight"] = lora.merged_weight(w, ab["A"], ab["B"], scaling)
    return sorted(pairs)


def _under(prefix: str, key_map: dict[str, str]) -> dict[str, str]:
    """A part's key map, moved under our model's `prefix` ("vision.", "llm.")."""
    return {k: prefix + v for k, v in key_map.items()}


def _merge(state: checkpoint.State, more: checkpoint.State) -> None:
    for name in more:
        if name in state:
            raise checkpoint.CheckpointError(f"{name!r} comes from two files: {state.origin[name][1]} "
                                             f"and {more.origin[name][1]}")
    state.update(more)
    state.origin.update(more.origin)


# ---- OpenAI / OpenCLIP CLIP: the vision tower alone ---------------------------------------------------
# open_clip's `VisionTransformer` under the `visual.` prefix of its CLIP; OpenAI's released state dicts
# use the same names. What a user points us at (`train.py --vision PATH`):
#   - a folder as open_clip saves and publishes it (`save_for_hf`, hub repos): open_clip_config.json
#     ({"model_cfg": {"vision_cfg": ..., "quick_gelu": ...}, "preprocess_cfg": ...}) beside
#     open_clip_model.safetensors or open_clip_pytorch_model.bin;
#   - one state-dict file (.safetensors / .bin / .pt) in OpenAI's layout, its architecture read from
#     the tensor shapes as open_clip's `build_model_from_openai_state_dict` does, with QuickGELU.
# A folder that also has a Hugging Face config.json (some hub repos ship both) is read as Hugging Face.
OPENCLIP_CONFIG, OPENCLIP_WEIGHTS = "open_clip_config.json", (
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth")  # open_clip's own preference order (factory._find_checkpoint_in_dir)
OPENCLIP_KEYS = {
    "visual.conv1.": "embeddings.patch_embedding.",
    "visual.class_embedding": "embeddings.class_embedding",
    "visual.positional_embedding": "embeddings.position_embedding.weight",
    "visual.ln_pre.": "pre_layrnorm.",
    "visual.ln_post.": "post_layernorm.",
}
# Inside `visual.transformer.resblocks.{i}.`; repeated per block by `openclip_keys`, because a prefix
# table renames only the start of a name and these names change after the block index.
OPENCLIP_BLOCK_KEYS = {
    "ln_1.": "layer_norm1.",
    "attn.in_proj_": "self_attn.in_proj_",  # q, k, v fused: not one of our names, split by _split_qkv
    "attn.out_proj.": "self_attn.out_proj.",
    "ln_2.": "layer_norm2.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}
# The text tower, CLIP's image->joint-space projection (`visual.proj`, HF's visual_projection, unused by
# LLaVA's features), and the integers OpenAI's JIT archives carry as state.
OPENCLIP_IGNORE = ("visual.proj", "token_embedding.", "positional_embedding", "transformer.", "ln_final.",
                   "text_projection", "logit_scale", "logit_bias", "attn_mask", "text.",
                   "input_resolution", "context_length", "vocab_size")
# Every image is normalised with OpenAI CLIP's statistics (data.CLIP_MEAN / CLIP_STD, open_clip's
# OPENAI_DATASET_MEAN / STD); a tower trained with others would silently see other pixels.
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# vision_cfg fields whose non-default values change the tower's computation in ways clip.py lacks.
OPENCLIP_UNSUPPORTED = dict(timm_model_name=None, ls_init_value=None, no_ln_pre=False, attentional_pool=False,
                            pos_embed_type="learnable", act_kwargs=None, block_type=None, qk_norm=False,
                            scaled_cosine_attn=False, scale_heads=False, scale_attn_inner=False,
                            scale_attn=False, scale_fc=False)


def openclip_keys(num_layers: int) -> dict[str, str]:
    """The whole {open_clip prefix: our prefix} table for a tower of `num_layers` blocks."""
    blocks = {f"visual.transformer.resblocks.{i}.{theirs}": f"encoder.layers.{i}.{ours}"
              for i in range(num_layers) for theirs, ours in OPENCLIP_BLOCK_KEYS.items()}
    return {**OPENCLIP_KEYS, **blocks}


def is_openclip(path: str | Path) -> bool:
    """A single weights file, or a folder with open_clip_config.json and no Hugging Face config.json."""
    path = Path(path)
    return path.is_file() or ((path / OPENCLIP_CONFIG).is_file() and not (path / "config.json").is_file())


def openclip_config(cfg: dict, where: str | Path = OPENCLIP_CONFIG, **select) -> clip.ClipConfig:
    """open_clip's model config (or its open_clip_config.json) -> ClipConfig; `select` = LLaVA's choices."""
    pre = cfg.get("preprocess_cfg") or {}
    for k, want in (("mean", OPENAI_MEAN), ("std", OPENAI_STD)):
        if k in pre and not torch.allclose(torch.tensor(pre[k], dtype=torch.float64), torch.tensor(want, dtype=torch.float64)):
            raise errors.UserError(f"{where}: preprocess_cfg {k} {pre[k]} is not OpenAI CLIP's {list(want)}, "
                                   f"which our image pipeline normalises with")
    cfg = cfg.get("model_cfg", cfg)
    v = cfg.get("vision_cfg")
    if not isinstance(v, dict):
        raise errors.UserError(f"{where}: no vision_cfg dict (got {type(v).__name__})")
    bad = {k: v[k] for k, default in OPENCLIP_UNSUPPORTED.items() if v.get(k, default) != default}
    if set(v.get("norm_kwargs") or {}) - {"eps"}:
        bad["norm_kwargs"] = v["norm_kwargs"]
    if not isinstance(v.get("layers", 12), int):
        bad["layers"] = v["layers"]  # a list of stage depths: open_clip's ModifiedResNet
    if bad:
        raise errors.UserError(f"{where}: vision_cfg settings clip.py does not implement: {bad}")
    sizes = {}
    for k, default in (("image_size", 224), ("patch_size", 16)):
        x = v.get(k, default)
        if isinstance(x, (list, tuple)):
            if len(set(x)) != 1:
                raise errors.UserError(f"{where}: non-square {k} {x} is not supported")
            x = x[0]
        sizes[k] = int(x)
    width = int(v.get("width", 768))
    return clip.ClipConfig(
        **sizes, hidden_size=width, num_hidden_layers=v.get("layers", 12),
        num_attention_heads=int(v.get("heads") or width // v.get("head_width", 64)),
        intermediate_size=int(width * v.get("mlp_ratio", 4.0)),  # open_clip's int(d_model * mlp_ratio)
        hidden_act="quick_gelu" if cfg.get("quick_gelu", False) else "gelu",  # its nn.GELU is the erf form
        layer_norm_eps=float((v.get("norm_kwargs") or {}).get("eps", 1e-5)), **select)


def openclip_config_from_shapes(shapes: dict[str, tuple], where: str | Path, **select) -> clip.ClipConfig:
    """An OpenAI state dict's architecture from its shapes (open_clip's build_model_from_openai_state_dict):
    heads = width / 64 and QuickGELU, as every OpenAI CLIP has."""
    if "visual.conv1.weight" not in shapes or "visual.positional_embedding" not in shapes:
        kind = "a ResNet CLIP" if "visual.layer1.0.conv1.weight" in shapes else "no CLIP ViT"
        raise errors.UserError(f"{where}: {kind} (no visual.conv1.weight / visual.positional_embedding)")
    width, channels, patch, _ = shapes["visual.conv1.weight"]
    positions = shapes["visual.positional_embedding"][0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise errors.UserError(f"{where}: visual.positional_embedding has {positions} rows, not 1 + a square grid")
    layers = sum(k.startswith("visual.transformer.resblocks.") and k.endswith(".attn.in_proj_weight")
                 for k in shapes)
    mlp = shapes.get("visual.transformer.resblocks.0.mlp.c_fc.weight", (4 * width,))[0]
    return clip.ClipConfig(image_size=patch * grid, patch_size=patch, hidden_size=width, num_hidden_layers=layers,
                           num_attention_heads=width // 64, intermediate_size=mlp, hidden_act="quick_gelu",
                           layer_norm_eps=1e-5, num_channels=channels, **select)


def _openclip_file(path: Path) -> Path:
    if path.is_file():
        return path
    found = [path / f for f in OPENCLIP_WEIGHTS if (path / f).is_file()]
    if not found:
        raise FileNotFoundError(f"{path} has {OPENCLIP_CONFIG} but none of {list(OPENCLIP_WEIGHTS)}")
    return found[0]


def _shapes(file: Path) -> dict[str, tuple]:
    """Tensor shapes without reading the data (safetensors' header; a memory-mapped .bin)."""
    try:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a JIT archive (OpenAI's released .pt) or a pickle with code is refused here
        raise errors.UserError(f"{file}: not a safetensors file or a weights-only state dict ({e}); for OpenAI's "
                               f"TorchScript .pt, save its state_dict() once") from None
    if not isinstance(state, dict):
        raise errors.UserError(f"{file}: holds a {type(state).__name__}, not a state dict")
    return {k: tuple(t.shape) for k, t in state.items() if isinstance(t, torch.Tensor)}


def openclip_vision_config(path: str | Path, **select) -> clip.ClipConfig:
    path = Path(path)
    if path.is_file():
        return openclip_config_from_shapes(_shapes(path), path, **select)
    where = path / OPENCLIP_CONFIG
    try:
        cfg = json.loads(where.read_text())
    except json.JSONDecodeError as e:
        raise checkpoint.CheckpointError(f"{where}: not valid JSON ({e})") from None
    return openclip_config(cfg, where, **select)


def read_openclip(path: str | Path, dtype: torch.dtype, **select) -> tuple[clip.ClipConfig, checkpoint.State]:
    """An open_clip folder or an OpenAI state-dict file -> (ClipConfig, the tower's state under clip.py's names)."""
    cfg = openclip_vision_config(path, **select)
    file = _openclip_file(Path(path))
    state = checkpoint.read_state(file, openclip_keys(cfg.num_hidden_layers), ignore=OPENCLIP_IGNORE, dtype=dtype)
    _split_qkv(state, cfg)
    return cfg, state


def _split_qkv(state: checkpoint.State, cfg: clip.ClipConfig) -> None:
    """nn.MultiheadAttention's in_proj (3D, D) stacks q, k, v in that order: our q_proj, k_proj, v_proj."""
    D = cfg.hidden_size
    for fused in [n for n in state if ".self_attn.in_proj_" in n]:
        key, file = state.origin.pop(fused)
        t = state.pop(fused)
        if t.shape[0] != 3 * D:
            raise checkpoint.CheckpointError(f"wrong shape for {key!r} in {file}: {tuple(t.shape)}, expected "
                                             f"({3 * D}, ...) = q, k, v of width {D}")
        block, kind = fused.split(".in_proj_")  # "encoder.layers.{i}.self_attn", "weight" | "bias"
        for proj, part in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3)):
            state[f"{block}.{proj}.{kind}"] = part.contiguous()
            state.origin[f"{block}.{proj}.{kind}"] = (key, file)


# ---- writing -------------------------------------------------------------------------------------------

def invert(table: dict[str, str], skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{foreign prefix: ours} -> {ours: foreign prefix}, ignoring foreign prefixes in `skip`.

    Where the reader accepts several names for one of ours, the longest wins: the full hub path
    `vision_tower.vision_model.` rather than the shortened `vision_tower.` that transformers 5.24 writes.
    """
    out = {}
    for foreign, ours in sorted(table.items(), key=lambda kv: len(kv[0])):
        if not foreign.startswith(skip):
            out[ours] = foreign
    return out


def export_state(state_dict: dict[str, torch.Tensor], table: dict[str, str], dtype: torch.dtype, *,
                 skip: tuple[str, ...] = (), tied: bool = False) -> dict[str, torch.Tensor]:
    """Our state dict under the foreign names of `table`, cast to `dtype`.

    A tied LM head is written once, as the embedding. Each name must map back through the table to
    where it came from, or what we write would not be what we (and the other side) read. NaN or Inf
    is never written (the loader refuses it in the source; this catches what a LoRA merge or the cast
    made of finite weights, e.g. past fp16's 65504).
    """
    writer = invert(table, skip)
    out = {}
    for name, t in state_dict.items():
        if name == "llm.lm_head.weight" and tied:
            continue
        key = checkpoint.rename(name, writer)
        if key is None or checkpoint.rename(key, table) != name:
            raise ValueError(f"{name!r} has no foreign name that reads back (got {key!r})")
        out[key] = t.to(dtype) if t.is_floating_point() else t
        if not checkpoint.is_finite(out[key]):
            raise checkpoint.CheckpointError(f"refusing to write {key!r} (our {name!r}): it holds NaN or Inf "
                                             f"in {dtype}")
    return out


def llava_hf_config_json(vision: clip.ClipConfig, llm: llama.LlamaConfig, *, image_token_id: int,
                         pad_token_id: int, num_image_tokens: int, dtype: torch.dtype) -> dict:
    """The config.json of LlavaForConditionalGeneration (the inverse of `llava_hf_config`)."""
    strategy = {v: k for k, v in STRATEGY.items()}[vision.select_feature]
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "dtype": str(dtype).removeprefix("torch."),
        "text_config": {**llama.config_to_hf(llm), "pad_token_id": pad_token_id},
        "vision_config": clip.config_to_hf(vision),
        "image_token_index": image_token_id, "image_token_id": image_token_id,
        "image_seq_length": num_image_tokens, "vision_feature_layer": vision.select_layer,
        "vision_feature_select_strategy": strategy, "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True, "tie_word_embeddings": llm.tie_word_embeddings}


def llava_config_json(vision: clip.ClipConfig, llm: llama.LlamaConfig, *, projector_type: str, tower: str,
                      pad_to_square: bool, dtype: torch.dtype) -> dict:
    """The config.json of LLaVA's LlavaLlamaForCausalLM: the LLM's config plus the `mm_*` keys."""
    return {
        **llama.config_to_hf(llm), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "torch_dtype": str(dtype).removeprefix("torch."),
        "image_aspect_ratio": "pad" if pad_to_square else "square", "mm_hidden_size": vision.hidden_size,
        "mm_projector_type": projector_type, "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_vision_select_feature": vision.select_feature,
        "mm_vision_select_layer": vision.select_layer, "mm_vision_tower": tower, "use_mm_proj": True,
        # The tower's weights are in this checkpoint. LLaVA builds the tower with delay_load=True
        # (llava/model/llava_arch.py, LlavaMetaModel.__init__); CLIPVisionTower.__init__ (clip_encoder.py)
        # creates its CLIPVisionModel before the checkpoint's weights load only if this key is set.
        # Without it the tower's keys find no module and are dropped, and load_pretrained_model
        # (llava/model/builder.py) then loads the stock CLIP named by mm_vision_tower. xtuner's LLaVA
        # export writes the same key.
        "unfreeze_mm_vision_tower": True,
        "use_cache": True}


# ---- Meta's native Llama 3 / 3.1 layout (a single LLM) -------------------------------------------------
# What Meta publishes (and `llama model download` fetches): consolidated.00.pth (the state dict of
# llama_models' reference `Transformer`), params.json (its `ModelArgs`) and a tiktoken tokenizer.model
# (read by data.Tokenizer). The names below are our llama.py names, for model.load_llm.
META_KEYS = {"tok_embeddings.": "embed_tokens.", "norm.": "norm.", "output.": "lm_head."}
META_LAYER_KEYS = {  # under "layers.{i}." on both sides
    "attention.wq.": "self_attn.q_proj.", "attention.wk.": "self_attn.k_proj.",
    "attention.wv.": "self_attn.v_proj.", "attention.wo.": "self_attn.o_proj.",
    "feed_forward.w1.": "mlp.gate_proj.", "feed_forward.w3.": "mlp.up_proj.",
    "feed_forward.w2.": "mlp.down_proj.",
    "attention_norm.": "input_layernorm.", "ffn_norm.": "post_attention_layernorm.",
}
# ModelArgs defaults (llama_models/llama3/args.py) for keys a params.json omits; max_seq_len and
# max_batch_size size Meta's KV cache at run time and say nothing about the weights.
META_PARAMS = dict(n_kv_heads=None, multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5,
                   rope_theta=500000.0, use_scaled_rope=False)
META_REQUIRED = ("dim", "n_layers", "n_heads", "vocab_size")
META_RUNTIME = ("max_seq_len", "max_batch_size")
# Llama 3.1's frequency-band RoPE scaling: the constants of apply_scaling in llama_models' model.py.
META_SCALED_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}
META_NUM_SPECIAL = 256  # Meta's tokenizer adds 256 special ids after the BPE ranks


def meta_keys(num_layers: int) -> dict[str, str]:
    """The full table {Meta prefix: our prefix}: the layer entries repeated for each layer."""
    table = dict(META_KEYS)
    for i in range(num_layers):
        table.update({f"layers.{i}.{k}": f"layers.{i}.{v}" for k, v in META_LAYER_KEYS.items()})
    return table


def is_meta_llama(folder: str | Path) -> bool:
    """A folder in Meta's native layout: params.json beside consolidated.NN.pth."""
    folder = Path(folder)
    return (folder / "params.json").is_file() and any(folder.glob("consolidated.*.pth"))


def meta_ffn_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU width exactly as Meta's FeedForward computes it: 2/3 of 4*dim, scaled, rounded up."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_llama_config(params: dict, where: str | Path = "params.json") -> llama.LlamaConfig:
    """A params.json dict -> LlamaConfig.

    The special ids follow Meta's tokenizer (the 256 specials come right after the BPE ranks):
    <|begin_of_text|> first; generation stops at <|end_of_text|>, <|eom_id|> and <|eot_id|>, the
    stop tokens of Meta's Tokenizer. Meta's files do not say the trained context: 8192 for Llama 3,
    131072 once 3.1's scaled RoPE is on.
    """
    unknown = sorted(set(params) - set(META_PARAMS) - set(META_REQUIRED) - set(META_RUNTIME))
    missing = [k for k in META_REQUIRED if k not in params]
    if unknown or missing:
        raise errors.UserError(f"{where}: not a Llama 3 params.json we can read (unknown keys {unknown}, "
                               f"missing {missing})")
    p = {**META_PARAMS, **params}
    if p["vocab_size"] <= META_NUM_SPECIAL:  # Llama 2's params.json says -1 (the size is the tokenizer's)
        raise errors.UserError(f"{where}: vocab_size {p['vocab_size']} is not a Llama 3 vocabulary")
    base = p["vocab_size"] - META_NUM_SPECIAL
    return llama.LlamaConfig(
        vocab_size=p["vocab_size"], hidden_size=p["dim"], num_hidden_layers=p["n_layers"],
        num_attention_heads=p["n_heads"], num_key_value_heads=p["n_kv_heads"] or p["n_heads"],
        intermediate_size=meta_ffn_size(p["dim"], p["multiple_of"], p["ffn_dim_multiplier"]),
        rms_norm_eps=float(p["norm_eps"]), rope_theta=float(p["rope_theta"]),
        rope_scaling=dict(META_SCALED_ROPE) if p["use_scaled_rope"] else None,
        max_position_embeddings=131072 if p["use_scaled_rope"] else 8192,
        bos_token_id=base, eos_token_id=[base + 1, base + 8, base + 9])


def meta_params(folder: str | Path) -> dict:
    path = Path(folder) / "params.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise checkpoint.CheckpointError(f"{path}: not valid JSON ({e})") from None


def meta_interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q or k rows (n_heads * hd, D): Meta's order -> rotate-half order (transformers'
    convert_llama_weights_to_hf.py `permute`).

    Meta's RoPE rotates dims (2i, 2i+1) of each head as one complex number; ours rotates (i, i + hd/2).
    Reordering each head's rows [0, 1, 2, 3, ...] -> [0, 2, 4, ..., 1, 3, 5, ...] makes the same
    projection produce the same rotated vector. For k, n_heads is the number of KV heads.
    """
    rows, d = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, d).transpose(1, 2).reshape(rows, d)


def read_meta_llama(folder: str | Path, dtype: torch.dtype | None = None):
    """Meta's native folder -> (LlamaConfig, state dict under llama.py's names, q/k in rotate-half order).

    consolidated.00.pth is read with weights_only=True (no code is unpickled) and memory-mapped.
    `dtype` None keeps the file's dtype (bf16 as Meta ships it).
    """
    folder = Path(folder)
    shards = sorted(folder.glob("consolidated.*.pth"))
    if len(shards) != 1:
        raise errors.UserError(f"{folder}: {len(shards)} model-parallel shards {[s.name for s in shards]}; only "
                               f"single-file checkpoints (consolidated.00.pth, the 8B sizes) are supported")
    cfg = meta_llama_config(meta_params(folder), folder / "params.json")
    state = checkpoint.read_state(shards[0], meta_keys(cfg.num_hidden_layers), dtype=dtype,
                                  ignore=("rope.freqs",))  # derived; some Meta savers kept it
    for i in range(cfg.num_hidden_layers):
        for proj, heads in (("q_proj", cfg.num_attention_heads), ("k_proj", cfg.num_key_value_heads)):
            name = f"layers.{i}.self_attn.{proj}.weight"
            want = (heads * cfg.head_dim, cfg.hidden_size)
            if name not in state or tuple(state[name].shape) != want:
                key, file = state.origin.get(name, (name.replace(f"self_attn.{proj}", "attention.w" + proj[0]),
                                                    shards[0]))
                got = tuple(state[name].shape) if name in state else "missing"
                raise checkpoint.CheckpointError(f"{key!r} in {file}: expected shape {want} from "
                                                 f"params.json, got {got}")
            state[name] = meta_interleaved_to_halves(state[name], heads)
    return cfg, state


# ---- the parts alone, and peft adapters on them ------------------------------------------------------------
# A CLIPVisionModel folder and a LlamaForCausalLM folder, under our model's prefixes.
CLIP_KEYS = _under("vision.", clip.HF_KEY_MAP)
LLAMA_KEYS = _under("llm.", llama.HF_KEY_MAP)

# peft names an adapter weight `base_model.model.<module of the transformers model>.lora_A.weight` and
# matches module names exactly on load: an adapter under other names loads nothing, with only a warning.
# The names are those of transformers 5, whose CLIPVisionModel has no `vision_model.` level (4.x's has;
# `merge_peft_adapter` reads both). Part -> (its table, foreign prefixes not to write).
PEFT_PREFIX = "base_model.model."
PEFT_PARTS = {"vision": (CLIP_KEYS, ("vision_model.",)), "llm": (LLAMA_KEYS, ())}


def peft_state(adapters: dict[str, torch.Tensor], part: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A part's adapters under our names ("vision.encoder.layers.0.mlp.fc1.lora_A") -> peft's names
    ("base_model.model.encoder.layers.0.mlp.fc1.lora_A.weight"), through the part's own table."""
    table, skip = PEFT_PARTS[part]
    return {f"{PEFT_PREFIX}{k}.weight": t for k, t in export_state(adapters, table, dtype, skip=skip).items()}


def peft_config_json(*, r: int, alpha: float, dropout: float, target_modules: list[str], base: str,
                     task_type: str | None) -> dict:
    """adapter_config.json of a plain peft LoRA: W + (lora_alpha / r) B A, as lora.py computes."""
    return {"peft_type": "LORA", "base_model_name_or_path": base, "task_type": task_type, "r": r,
            "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": target_modules, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
            "init_lora_weights": True, "inference_mode": True}
