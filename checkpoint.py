"""Reading and writing weight folders, shared by every loader and writer.

Why one module: the CLIP, Llama, multimodal and converter code all read the same on-disk
layouts (a single `model.safetensors`, shards with `model.safetensors.index.json`, or a legacy
`pytorch_model.bin`). Each caller owns its *key map* (clip.py and llama.py their Hugging Face
names, formats.py the LLaVA layouts); this file only streams tensors, renames them by that table
and loads them strictly.

Loading is lazy and strict, the way gpt-fast and torchtitan do it:
  1. the caller builds the module on the `meta` device (no memory, no random init),
  2. tensors are streamed one at a time with `safe_open` and cast to the target dtype once,
  3. `load_state_dict(strict=True, assign=True)` adopts them as the parameters.
Peak memory is the size of the loaded model, not twice it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import errors


def embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding(num, dim); built on the meta device (step 1 above) it skips its random init:
    `normal_` on meta runs a Python reference that imports torch._dynamo, about 1 s of every load."""
    on_meta = torch.get_default_device().type == "meta"
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim) if on_meta else None)


class CheckpointError(errors.UserError):
    """A checkpoint that cannot be read or does not fit the module: names the file and the key."""


def load_hf_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def weight_files(path: str | Path) -> list[Path]:
    """The weight files of a folder (or a single file), safetensors preferred over .bin."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a shard index (a JSON object with a weight_map): "
                                      f"{type(e).__name__}: {e}") from None
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that are not there: {missing}")
            return [path / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise FileNotFoundError(f"no weights in {path} (looked for model.safetensors[.index.json], "
                            f"pytorch_model.bin[.index.json], *.safetensors)")


def iter_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield (key, tensor, file) one tensor at a time from a folder or file."""
    for file in weight_files(path):
        if file.suffix == ".safetensors":
            with open_safetensors(file) as f:
                for key in f.keys():
                    yield key, f.get_tensor(key), file
        else:
            for key, tensor in load_bin(file).items():
                yield key, tensor, file


@contextlib.contextmanager
def open_safetensors(file: Path):
    """`safe_open`, with a damaged file named: safetensors' own error ("invalid header length") names none."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); truncated or damaged?") from None


def load_bin(file: Path) -> dict:
    """A legacy pickle checkpoint: weights_only refuses arbitrary code; mmap avoids a copy."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        # torch's message is paragraphs; keep the sentence that says what is wrong (for a refused
        # pickle: "WeightsUnpickler error: Unsupported global: GLOBAL ...").
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        why = next((line for line in lines if "Unpickler error" in line), lines[0]).split(". ")[0]
        raise CheckpointError(f"{file}: cannot be read as a weights-only torch checkpoint ({why})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: holds a {type(state).__name__}, not a state dict")
    return state


def is_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in a float tensor. aminmax reads it once with no temporary (NaN propagates to
    both ends): 10x faster than isfinite(t).all() on CPU, which allocates a bool per element."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def rename(key: str, key_map: dict[str, str]) -> str | None:
    """Rename by the longest matching prefix of `key_map`; None when no prefix matches."""
    best = None
    for src in key_map:
        if key.startswith(src) and (best is None or len(src) > len(best)):
            best = src
    return None if best is None else key_map[best] + key[len(best):]


class State(dict):
    """Tensors under our names; `origin[name]` = (the key in the file, the file), for error messages."""

    def __init__(self):
        super().__init__()
        self.origin: dict[str, tuple[str, Path]] = {}


def read_state(path: str | Path, key_map: dict[str, str], *, ignore: tuple[str, ...] = (),
               dtype: torch.dtype | None = None) -> State:
    """Stream the tensors of `path`, renamed by `key_map` (longest prefix wins), floats cast once.

    Keys starting with a prefix in `ignore` are skipped; a key no prefix maps, two keys mapping to one
    name, and NaN or Inf values (which load without complaint and turn every answer into "!!!!") are
    errors naming the key and the file.
    """
    state = State()
    for key, tensor, file in iter_tensors(path):
        if any(key.startswith(p) for p in ignore):
            continue
        name = rename(key, key_map)
        if name is None:
            raise CheckpointError(f"unexpected key {key!r} in {file}")
        if name in state:
            raise CheckpointError(f"key {name!r} appears twice (again in {file})")
        cast = dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype
        state[name] = tensor.to(dtype) if cast else tensor
        if not is_finite(state[name]):
            raise CheckpointError(f"{key!r} in {file} " + (f"overflows {dtype} (its values are finite in "
                                  f"{tensor.dtype})" if cast and is_finite(tensor) else "holds NaN or Inf values"))
        state.origin[name] = (key, file)
    return state


def assign(module: nn.Module, state: State, *, strict: bool = True, source: str | Path = "",
           allow_missing: tuple[str, ...] = ()) -> list[str]:
    """Adopt `state` as `module`'s tensors (`load_state_dict(assign=True)`), after checking it fits.

    A name the module lacks or a wrong shape is an error naming the file's key; with `strict`, so is
    a module tensor the state lacks (except names starting with `allow_missing`). Floats keep the
    state's dtype. Returns the names loaded.
    """
    expected = module.state_dict(keep_vars=True)
    for name, tensor in state.items():
        key, file = state.origin.get(name, (name, source))
        if name not in expected:
            raise CheckpointError(f"unexpected key {key!r} in {file}"
                                  + (f" (mapped to {name!r})" if name != key else ""))
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"wrong shape for {key!r} in {file}: checkpoint "
                                  f"{tuple(tensor.shape)}, model expects {tuple(expected[name].shape)}")
    missing = [k for k in expected if k not in state and not k.startswith(allow_missing)]
    if strict and missing:
        raise CheckpointError(f"missing keys in {source}: {missing[:10]}"
                              + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    module.load_state_dict(state, strict=False, assign=True)
    return list(state)


def load_state(module: nn.Module, path: str | Path, key_map: dict[str, str], *,
               ignore: tuple[str, ...] = (), dtype: torch.dtype | None = None,
               strict: bool = True, allow_missing: tuple[str, ...] = ()) -> list[str]:
    """`read_state` + `assign`: stream the tensors of `path` into `module` (usually built on `meta`).

    With strict=False, missing keys are allowed (several sources fill one model) but unknown keys and
    wrong shapes are still errors. Returns the names that were loaded.
    """
    expected = module.state_dict(keep_vars=True)
    state = read_state(path, key_map, ignore=ignore, dtype=dtype)
    if dtype is None:  # floats take the module's dtype
        for name, t in state.items():
            if name in expected and t.is_floating_point():
                state[name] = t.to(expected[name].dtype)
    return assign(module, state, strict=strict, source=path, allow_missing=allow_missing)


def materialized(module: nn.Module) -> None:
    """Raise if any parameter or buffer is still on `meta` (i.e. no source provided it)."""
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers())
            if t.is_meta]
    if left:
        raise CheckpointError(f"no weights were loaded for: {left[:10]}"
                              + (f" and {len(left) - 10} more" if len(left) > 10 else ""))


def save_state(state_dict: dict[str, torch.Tensor], folder: str | Path, *,
               max_shard_bytes: int | None = None, metadata: dict | None = None) -> list[Path]:
    """Write `state_dict` as model.safetensors, or as size-capped shards plus an index."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage; tied weights are saved once by callers.
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    meta = {"format": "pt", **(metadata or {})}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, str(folder / "model.safetensors"), metadata=meta)
        return [folder / "model.safetensors"]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=meta)
        files.append(folder / name)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


# ---- fingerprints -------------------------------------------------------------------------------
# A training checkpoint that stores only what it trained re-reads the frozen rest from its base
# folders. It records their sha256, and loading refuses a base that changed since (re-trained,
# replaced), instead of silently combining new frozen weights with old trained ones.

FINGERPRINTED = (".safetensors", ".bin", ".pth", ".pt")  # weights; plus config.json / params.json


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(path: str | Path) -> dict[str, str]:
    """sha256 of the files a loader reads from `path`: its weights and configs (a file: itself)."""
    path = Path(path)
    if path.is_file():
        return {path.name: sha256(path)}
    return {f.name: sha256(f) for f in sorted(path.iterdir())
            if f.is_file() and (f.suffix in FINGERPRINTED or f.name in ("config.json", "params.json"))}


def check_fingerprint(path: str | Path, recorded: dict[str, str], user: str | Path) -> None:
    """Raise, naming the file, if `path` no longer holds what `user` recorded of it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{user} re-reads its frozen weights from {path}, which no longer exists; "
                              f"load a self-contained checkpoint (a run's final) instead")
    now = fingerprint(path)
    for name, h in recorded.items():
        if now.get(name) != h:
            what = "is missing" if name not in now else "changed (sha256 differs)"
            raise CheckpointError(f"{user} re-reads its frozen weights from {path}, but {name} there {what} "
                                  f"since the checkpoint was written (re-trained or replaced?); load a "
                                  f"self-contained checkpoint (a run's final) instead")
