"""The multimodal model: CLIP ViT -> projector -> spliced into LLaMA's input embeddings.

    pixel_values (n_img, 3, S, S) --vision--> (n_img, N, D_vit) --projector--> (n_img, N, D_llm)
    input_ids (B, T) with N placeholder ids per image --embed_tokens--> (B, T, D_llm)
    masked_scatter the image rows into the placeholder positions --llm--> logits (B, T, V)

The data pipeline writes one placeholder id per image feature (N per image), so splicing is one
`masked_scatter` after checking that the counts match.

`from_pretrained` reads this project's checkpoints (full or partial, with LoRA adapters) and, through
formats.py, the transformers-LLaVA and original-LLaVA layouts; this file names no foreign key.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import clip
import llama
import formats
import lora
import projector

from special_ids import IGNORE_INDEX, IMAGE_TOKEN_ID
FORMAT = "doctor-sun"  # marks this project's own checkpoint folders (config.json "format")


@dataclass
class ModelConfig:
    vision: clip.ClipConfig
    llm: llama.LlamaConfig
    projector_type: str = "mlp2x_gelu"
    image_token_id: int = IMAGE_TOKEN_ID

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_tokens

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        if name not in presets:
            raise KeyError(f"unknown model preset {name!r}; known: {sorted(presets)}")
        vision, llm = presets[name]
        return cls(vision=clip.ClipConfig.from_name(vision), llm=llama.LlamaConfig.from_name(llm),
                   **overrides)

    def to_dict(self) -> dict:
        return {"vision": asdict(self.vision), "llm": asdict(self.llm),
                "projector_type": self.projector_type, "image_token_id": self.image_token_id}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(vision=clip.ClipConfig(**d["vision"]), llm=llama.LlamaConfig(**d["llm"]),
                   projector_type=d.get("projector_type", "mlp2x_gelu"),
                   image_token_id=d.get("image_token_id", IMAGE_TOKEN_ID))


# (vision preset, llm preset). Doctor Sun = LLaVA-1.5 recipe on a Llama-3.1-8B-Instruct derivative.
presets: dict[str, tuple[str, str]] = {
    "doctor-sun": ("clip-vit-large-patch14-336", "Llama-3.1-8B-Instruct"),
    "llava-llama3-8b": ("clip-vit-large-patch14-336", "Llama-3-8B-Instruct"),
    "llava-llama2-7b": ("clip-vit-large-patch14-336", "Llama-2-7b-chat-hf"),
    "tiny": ("tiny", "tiny"),
}


class DoctorSun(nn.Module):
    """The three parts. `vision` / `llm`, if given, are already-built (loaded) parts; the others are
    created here, randomly initialised, or empty when built under `torch.device("meta")`."""

    def __init__(self, config: ModelConfig, *, vision: clip.VisionTransformer | None = None,
                 llm: llama.Llama | None = None):
        super().__init__()
        for name, part, want in (("vision", vision, config.vision), ("llm", llm, config.llm)):
            if part is not None and part.config != want:
                raise ValueError(f"the given {name} part's config differs from the model config: "
                                 f"{part.config} vs {want}")
        self.config = config
        self.vision = vision if vision is not None else clip.VisionTransformer(config.vision)
        self.projector = projector.build(config.projector_type, config.vision.hidden_size,
                                         config.llm.hidden_size)
        self.llm = llm if llm is not None else llama.Llama(config.llm)

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    # ---- splicing ---------------------------------------------------------------------------

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_img, 3, S, S) -> (n_img, N, D_llm)."""
        # A frozen ViT needs no autograd graph (pretrain stage, or finetune without ViT LoRA):
        # skipping it saves the activations of every ViT layer.
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(needs_grad):
            feats = self.vision(pixel_values)  # (n_img, N, D_vit)
        return self.projector(feats.to(self.projector[0].weight.dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with image features scattered into the placeholder positions."""
        is_img = input_ids == self.image_token_id
        # The placeholder may lie outside the vocabulary (-200): look up a harmless id instead.
        embeds = self.llm.embed_tokens(input_ids.masked_fill(is_img, 0))  # (B, T, D)
        n_slots = int(is_img.sum())
        if pixel_values is None:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} image placeholder tokens but no "
                                 f"pixel_values were given")
            return embeds
        feats = self.encode_images(pixel_values)  # (n_img, N, D)
        if n_slots != feats.shape[0] * feats.shape[1]:
            raise ValueError(f"image placeholders and image features do not match: input_ids hold "
                             f"{n_slots} placeholder tokens, the {feats.shape[0]} image(s) give "
                             f"{feats.shape[0] * feats.shape[1]} features ({feats.shape[1]} each)")
        return embeds.masked_scatter(is_img.unsqueeze(-1), feats.to(embeds.dtype))

    # ---- training / scoring -----------------------------------------------------------------

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None,
                position_ids=None):
        """Without labels: logits (B, T, V) for the (expanded) sequence.

        With labels: (loss_sum, num_tokens) — the cross-entropy *summed* over supervised tokens
        and their count, so training can divide by the count of the whole global batch
        (all micro-batches and ranks) instead of averaging per-micro-batch means. Logits are
        then computed only at supervised positions, a chunk at a time, with each chunk's
        gradient taken at once (llama.LMHead): with a 128k vocabulary the (B, T, V) logits
        would be the largest activation of the step.
        """
        embeds = self.embed(input_ids, pixel_values)
        hidden = self.llm.forward_hidden(embeds, attention_mask=attention_mask,
                                         position_ids=position_ids)  # (B, T, D)
        if labels is None:
            return self.llm.lm_head(hidden)
        targets = labels[:, 1:]  # logits at t predict token t+1
        sel = targets != IGNORE_INDEX
        h = hidden[:, :-1][sel]  # (n, D)
        y = targets[sel]  # (n,)
        if isinstance(self.llm.lm_head, llama.LMHead):
            loss_sum = self.llm.lm_head(h, y)
        else:  # a head someone wrapped (LoRA on lm_head): plain logits, then the loss
            loss_sum = F.cross_entropy(self.llm.lm_head(h).float(), y, reduction="sum")
        if y.numel() == 0:
            # Keep every trainable parameter in the graph (DDP/ZeRO expect a gradient for each).
            loss_sum = loss_sum + 0.0 * hidden.sum()
        return loss_sum, y.numel()

    # ---- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=32, *,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, stop_token_ids=None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None,
                 streamer: Callable[[torch.Tensor], None] | None = None,
                 repetition_penalty: float = 1.0) -> torch.Tensor:
        """Batched greedy (default) or sampled decoding with a KV cache.

        Prompts must be left-padded (attention_mask 0 on the left) so that every row's next token
        lands in the same column. Returns only the new tokens, (B, n) with n <= max_new_tokens;
        a row that emitted a stop token keeps it and is then filled with `pad_token_id`.
        `streamer`, if given, receives each step's (B,) tokens as they are produced.
        `repetition_penalty` != 1 penalises every token of the prompt and of the answer so far (see `_pick`).
        """
        if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generate() needs left padding: some rows end with padding")
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        stops = torch.tensor(sorted(set(_as_list(stop_token_ids if stop_token_ids is not None
                                                 else self.config.llm.eos_token_id))),
                             dtype=torch.long, device=input_ids.device)
        if pad_token_id is None:
            pad_token_id = int(stops[0]) if stops.numel() else 0
        dtype = self.llm.embed_tokens.weight.dtype
        caches = self.llm.make_kv_caches(B, T + max_new_tokens, dtype=dtype, device=input_ids.device)
        # Positions count real tokens only, like transformers' generate; pads are masked anyway.
        pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat([attention_mask, attention_mask.new_ones(B, max_new_tokens)], dim=1)
        x = self.embed(input_ids, pixel_values)
        hidden = self.llm.forward_hidden(x, attention_mask=mask[:, :T], position_ids=pos,
                                         kv_caches=caches, input_pos=0)
        next_pos = pos[:, -1:] + 1
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        seen = _seen(input_ids, attention_mask, self.config.llm.vocab_size) if repetition_penalty != 1.0 else None
        out = []
        for step in range(max_new_tokens):
            logits = self.llm.lm_head(hidden[:, -1]).float()  # (B, V)
            tok = _pick(logits, do_sample, temperature, top_k, top_p, generator, seen, repetition_penalty)
            tok = tok.masked_fill(done, pad_token_id)
            out.append(tok)
            if seen is not None:
                seen[torch.arange(B, device=tok.device), tok] = True
            if streamer is not None:
                streamer(tok)
            done |= torch.isin(tok, stops)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            x = self.llm.embed_tokens(tok[:, None])
            hidden = self.llm.forward_hidden(x, attention_mask=mask[:, :T + step + 1],
                                             position_ids=next_pos, kv_caches=caches,
                                             input_pos=T + step)
            next_pos = next_pos + 1
        return torch.stack(out, dim=1) if out else input_ids.new_zeros(B, 0)


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return [int(x)] if isinstance(x, int) else [int(v) for v in x]


def _seen(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: which vocabulary ids occur in each row's real tokens (image placeholders lie outside)."""
    real = (input_ids >= 0) & (input_ids < vocab_size)
    if attention_mask is not None:
        real &= attention_mask.bool()  # pads are not text (transformers would penalise the pad id too)
    seen = torch.zeros(input_ids.shape[0], vocab_size + 1, dtype=torch.bool, device=input_ids.device)
    seen.scatter_(1, input_ids.masked_fill(~real, vocab_size), True)  # column V collects the rest
    return seen[:, :vocab_size]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: logits (B, V) of seen tokens are divided by
    `penalty` where positive and multiplied where negative, so penalty > 1 always makes a repeat
    less likely (a plain division would make a negative logit likelier)."""
    if not penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def _pick(logits, do_sample, temperature, top_k, top_p, generator, seen=None,
          repetition_penalty: float = 1.0) -> torch.Tensor:
    if seen is not None and repetition_penalty != 1.0:  # on the raw logits, before temperature, as transformers
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / max(temperature, 1e-5)
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Session:
    """One conversation's decoding state, batch 1: KV caches holding the keys/values of `ids`.

    Each turn calls `generate` with the whole conversation so far, ending at the next answer header
    (image placeholders, history, the new question). It must extend `ids`; only the new tail is
    prefilled, so a later turn re-encodes neither the image nor the history. The caches hold token
    ids, not pixels: a conversation about another image needs a new Session.

    The caches start at the first turn's need (at least 256 positions) and are reallocated at twice
    the size, the filled prefix copied, whenever a turn needs more, up to max_position_embeddings.
    """

    def __init__(self, model: DoctorSun):
        self.model = model
        self.ids: list[int] = []  # the tokens whose keys/values the caches hold
        self.caches: nn.ModuleList | None = None
        self.seen: torch.Tensor | None = None  # (1, V) bool: tokens of the conversation (repetition penalty)

    @property
    def capacity(self) -> int:
        return 0 if self.caches is None else self.caches[0].k_cache.shape[2]

    def _reserve(self, n: int) -> None:
        limit = self.model.config.llm.max_position_embeddings
        if n > limit:
            raise ValueError(f"this turn needs {n} positions (conversation + max_new_tokens); the model's "
                             f"context is {limit}: start a new conversation")
        if n <= self.capacity:
            return
        w = self.model.llm.embed_tokens.weight
        caches = self.model.llm.make_kv_caches(1, min(max(n, 2 * self.capacity, 256), limit), w.dtype, w.device)
        k = len(self.ids)
        for old, new in zip(self.caches or [], caches):
            new.k_cache[:, :, :k] = old.k_cache[:, :, :k]  # (1, n_kv, k, hd)
            new.v_cache[:, :, :k] = old.v_cache[:, :, :k]
        self.caches = caches

    @torch.no_grad()
    def generate(self, ids: list[int], pixel_values: torch.Tensor | None = None, max_new_tokens: int = 256, *,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, stop_token_ids=None, generator: torch.Generator | None = None,
                 streamer: Callable[[torch.Tensor], None] | None = None) -> list[int]:
        """The answer's tokens after `ids`, a stop token included if one was drawn: what
        DoctorSun.generate gives for the same `ids` as one prompt. `pixel_values` (1, 3, S, S) are
        encoded only when the new tail holds the image's placeholders."""
        m, n = self.model, len(self.ids)
        if list(ids[:n]) != self.ids or len(ids) == n:
            raise ValueError(f"the conversation ({len(ids)} tokens) must extend the {n} tokens the KV cache "
                             f"holds; start a new Session to change the history")
        self._reserve(len(ids) + max_new_tokens)
        V = m.config.llm.vocab_size
        new = torch.tensor([ids[n:]], device=m.llm.embed_tokens.weight.device)  # (1, T)
        x = m.embed(new, pixel_values if bool((new == m.image_token_id).any()) else None)  # (1, T, D)
        hidden = m.llm.forward_hidden(x, kv_caches=self.caches, input_pos=n)  # (1, T, D)
        self.ids = list(ids)
        seen = _seen(new, None, V)
        self.seen = seen if self.seen is None else self.seen | seen
        stops = set(_as_list(stop_token_ids if stop_token_ids is not None else m.config.llm.eos_token_id))
        out = []
        for step in range(max_new_tokens):
            logits = m.llm.lm_head(hidden[:, -1]).float()  # (1, V)
            tok = _pick(logits, do_sample, temperature, top_k, top_p, generator, self.seen, repetition_penalty)
            out.append(int(tok))
            self.seen[0, out[-1]] = True
            if streamer is not None:
                streamer(tok)
            if out[-1] in stops or step == max_new_tokens - 1:
                break  # the last token is not fed: the next turn starts with it (or with what replaces it)
            hidden = m.llm.forward_hidden(m.llm.embed_tokens(tok[:, None]), kv_caches=self.caches,
                                          input_pos=len(self.ids))  # (1, 1, D)
            self.ids.append(out[-1])
        return out


# ---- loading ----------------------------------------------------------------------------------

def from_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device=None, *,
                    merge_lora: bool = True, vision: str | Path | None = None) -> DoctorSun:
    """Load our checkpoint, a transformers LLaVA folder or an original LLaVA folder.

    Foreign layouts are translated by formats.py into (config, state dict under our names);
    `vision` gives the CLIP folder for an original-LLaVA checkpoint that does not carry its tower.
    """
    if detect_format(path) == "ours":
        m = _load_ours(Path(path), dtype, merge_lora)
    else:
        fields, state = formats.read(path, dtype, vision=vision)
        m = from_state(ModelConfig(**fields), state, source=path)
    return m.to(device) if device is not None else m


def detect_format(path: str | Path) -> str:
    """"ours", "llava-hf" or "llava"; an error naming the folder for anything else."""
    cfg = checkpoint.load_hf_config(path)
    kind = "ours" if cfg.get("format") == FORMAT else formats.detect(path)
    if kind is None:
        raise checkpoint.CheckpointError(f"{path}: unknown checkpoint layout (config.json has model_type="
                                         f"{cfg.get('model_type')!r}; expected a doctor-sun checkpoint, a "
                                         f"transformers LLaVA folder or an original LLaVA folder)")
    return kind


def from_state(cfg: ModelConfig, state: checkpoint.State, source: str | Path = "") -> DoctorSun:
    """Build on meta and adopt a complete state dict (our names): every tensor must be there."""
    with torch.device("meta"):
        m = DoctorSun(cfg)
    tied = ("llm.lm_head.",) if cfg.llm.tie_word_embeddings else ()
    checkpoint.assign(m, state, source=source, allow_missing=tied)
    return _finish(m)


def _finish(m: DoctorSun) -> DoctorSun:
    if m.config.llm.tie_word_embeddings:
        m.llm.tie_weights()  # assign=True replaced the embedding Parameter the head shared
    checkpoint.materialized(m)
    return m.eval()


# ---- one part from its own folder ------------------------------------------------------------------
# Training starts from a vision tower and an LLM released on their own. Hugging Face folders are read
# by clip.py / llama.py; other layouts of a single part are formats.py's.

def vision_config(path: str | Path, **select) -> clip.ClipConfig:
    """The tower's config; `select` (select_layer, select_feature) are LLaVA's choices."""
    if formats.is_openclip(path):  # an open_clip folder or an OpenAI state-dict file
        return formats.openclip_vision_config(path, **select)
    return clip.config_from_hf(checkpoint.load_hf_config(path), **select)


def llm_config(path: str | Path) -> llama.LlamaConfig:
    if formats.is_meta_llama(path):
        return formats.meta_llama_config(formats.meta_params(path), Path(path) / "params.json")
    return llama.config_from_hf(checkpoint.load_hf_config(path))


def load_vision(path: str | Path, dtype: torch.dtype = torch.float32, **select) -> clip.VisionTransformer:
    if formats.is_openclip(path):
        cfg, state = formats.read_openclip(path, dtype, **select)
        with torch.device("meta"):
            vision = clip.VisionTransformer(cfg)
        checkpoint.assign(vision, state, source=path)
        checkpoint.materialized(vision)
        return vision.eval()
    return clip.from_pretrained(path, dtype=dtype, **select)


def load_llm(path: str | Path, dtype: torch.dtype = torch.float32) -> llama.Llama:
    """An HF LlamaForCausalLM folder, or Meta's native layout (consolidated.00.pth + params.json)."""
    if not formats.is_meta_llama(path):
        return llama.from_pretrained(path, dtype=dtype)
    cfg, state = formats.read_meta_llama(path, dtype)
    with torch.device("meta"):
        m = llama.Llama(cfg)
    checkpoint.assign(m, state, source=path)
    checkpoint.materialized(m)
    return m.eval()


# ---- our own format ---------------------------------------------------------------------------
#
# config.json = {"format": "doctor-sun", "model": ModelConfig.to_dict(),
#                "lora": {"vision": LoRAConfig fields | null, "llm": ... | null},
#                "base": {"init": parent checkpoint | null, "vision": HF CLIP folder | null,
#                         "llm": HF Llama folder | null},
#                ...anything else the writer wants to record (train.py records its whole run)}
# model.safetensors holds our parameter names. A checkpoint may hold only some weights (a
# training stage saves only what it trained); "base" says where the rest comes from: first the
# parent checkpoint ("init", loaded recursively and LoRA-merged), else the HF folders. Then the
# LoRA adapters named in "lora" are injected and every tensor of this folder is loaded on top.


def save_pretrained(m: DoctorSun, folder: str | Path, *, state_dict: dict | None = None,
                    base: dict | None = None, lora_configs: dict | None = None,
                    extra: dict | None = None, max_shard_bytes: int | None = None) -> None:
    """Write our format. `state_dict` defaults to every weight (a self-contained checkpoint)."""
    folder = Path(folder)
    sd = dict(state_dict if state_dict is not None else m.state_dict())
    if m.config.llm.tie_word_embeddings:
        sd.pop("llm.lm_head.weight", None)  # saved once, as the embedding
    cfg = {"format": FORMAT, "model": m.config.to_dict(),
           "lora": {k: (asdict(v) if v is not None else None) for k, v in (lora_configs or {}).items()},
           "base": base or {}, "weights": sorted(sd), **(extra or {})}
    checkpoint.save_state(sd, folder, max_shard_bytes=max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False, default=str))


def _load_ours(path: Path, dtype, merge_lora: bool) -> DoctorSun:
    cfg_json = checkpoint.load_hf_config(path)
    cfg = ModelConfig.from_dict(cfg_json["model"])
    base = cfg_json.get("base") or {}
    for part, recorded in (base.get("sha256") or {}).items():
        checkpoint.check_fingerprint(resolve_path(path, base[part]), recorded, path)
    if base.get("init"):
        m = _load_ours(resolve_path(path, base["init"]), dtype, merge_lora=True)
        if m.config.to_dict() != cfg.to_dict():
            raise checkpoint.CheckpointError(f"{path}: model config differs from its parent {base['init']}")
    else:  # the frozen parts from their HF folders, the rest from this folder
        vision = llm = None
        if base.get("vision"):
            vision = load_vision(resolve_path(path, base["vision"]), dtype, select_layer=cfg.vision.select_layer,
                                 select_feature=cfg.vision.select_feature)
        if base.get("llm"):
            llm = load_llm(resolve_path(path, base["llm"]), dtype)
        with torch.device("meta"):
            m = DoctorSun(cfg, vision=vision, llm=llm)
    for part, lcfg in (cfg_json.get("lora") or {}).items():
        if lcfg:
            lora.inject(getattr(m, part), lora.LoRAConfig(**{**lcfg, "targets": tuple(lcfg["targets"])}))
    ignore = ("llm.lm_head.",) if cfg.llm.tie_word_embeddings else ()
    loaded = set(checkpoint.load_state(m, path, {"": ""}, ignore=ignore, dtype=dtype, strict=False))
    adapters = [n for n in m.state_dict() if ".lora_" in n]
    missing = [n for n in adapters if n not in loaded]
    if missing:
        raise checkpoint.CheckpointError(f"{path}: LoRA adapter weights missing: {missing[:5]}")
    # config.json lists what was saved: a tensor gone from the file must not come from the base instead.
    gone = sorted(set(cfg_json.get("weights", ())) - loaded)
    if gone:
        raise checkpoint.CheckpointError(f"{path}: config.json lists weights its safetensors files lack: {gone[:5]}")
    m = _finish(m)
    if merge_lora:
        lora.merge_and_unload(m)
    return m


def resolve_path(ckpt: Path, ref: str) -> Path:
    """Base paths are stored as given; relative ones are tried against the checkpoint's folder."""
    p = Path(ref)
    if p.exists() or p.is_absolute():
        return p
    return ckpt / p


def build(name_or_config: str | ModelConfig = "tiny", seed: int = 0, dtype=torch.float32) -> DoctorSun:
    """A randomly initialised model (the tiny CPU demo, or tests)."""
    cfg = ModelConfig.from_name(name_or_config) if isinstance(name_or_config, str) else name_or_config
    torch.manual_seed(seed)
    return DoctorSun(cfg).to(dtype)
