"""A training run's output folder (--out), which the run owns: one run at a time, checkpoints that
say whether they are whole and unaltered, and a metrics file that survives a kill.

    out/.lock                    held (flock) by the run's rank 0 while it runs
    out/step-000050, out/final   checkpoints; trainer_state.json, written last, records each file's
                                 size and sha256, so a resume loads nothing it has not verified
    out/metrics.jsonl            one JSON row per step / evaluation

train.py decides what goes into a checkpoint; this file knows only files. Why each rule exists:
a second run started in a used folder had its checkpoints rotated away by the old run's names and
resumed from the old run's final; two runs in one folder deleted each other's checkpoints; a
same-size damaged file passed a size check and was then unpickled.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path

from checkpoint import sha256

STATE = "trainer_state.json"


# ---- ownership ----------------------------------------------------------------------------------

def claim(out: Path, *, resume: bool, overwrite: bool):
    """Lock `out` for this run and check that it may write there; returns the open lock file, which
    must stay open for the run's lifetime (flock is released when the process ends, even by kill -9,
    so a stale lock never blocks a resume). A folder holding anything of another run is refused
    unless --resume continues it or --overwrite moves it aside to <out>.old-<time>."""
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise SystemExit(f"--out {out} is in use by a running training ({holder}); wait for it, or choose "
                         f"another --out")
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {now()}\n")
    lock.flush()
    used = sorted(p.name for p in out.iterdir() if p.name != ".lock")
    if used and not resume:
        if not overwrite:
            lock.close()
            raise SystemExit(f"--out {out} already holds a run ({', '.join(used[:4])}"
                             f"{', ...' if len(used) > 4 else ''}): pass --resume to continue it, --overwrite to "
                             f"move it aside to {out.name}.old-<time> and start again, or choose another --out")
        aside = out.parent / f"{out.name}.old-{now().replace(':', '')}"
        aside.mkdir()
        for name in used:
            os.replace(out / name, aside / name)
        print(f"--overwrite: moved the previous run in {out} to {aside}")
    return lock


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


# ---- checkpoints --------------------------------------------------------------------------------

def record(folder: Path, hashes: dict[str, str], state: dict) -> None:
    """Write trainer_state.json last: `state` plus every file's size and sha256 (`hashes`, computed
    by the caller, which may share the work between ranks)."""
    files = {name: {"size": (folder / name).stat().st_size, "sha256": h} for name, h in sorted(hashes.items())}
    (folder / STATE).write_text(json.dumps({**state, "files": files}, indent=1))


def files_of(folder: Path) -> list[str]:
    """Every file of a checkpoint but trainer_state.json itself, as relative names."""
    return sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file() and f.name != STATE)


def verify(folder: Path, hashes: bool = True) -> str | None:
    """Why `folder` is not a whole, unaltered checkpoint, or None if it is. Without `hashes`, only
    sizes (cheap: enough to see that a parent stage finished)."""
    try:
        st = json.loads((folder / STATE).read_text())
        files = st["files"]
    except FileNotFoundError:
        return f"no {STATE} (the write was cut before its end)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {STATE} ({e})"
    for name, want in files.items():
        f = folder / name
        if not isinstance(want, dict):
            return f"{STATE} records sizes only (written before checkpoints were hashed): cannot be verified"
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["size"]:
            return f"{name} has {f.stat().st_size} bytes, {STATE} says {want['size']}"
        if hashes and sha256(f) != want["sha256"]:
            return f"{name} is damaged or was changed (sha256 differs from {STATE})"
    extra = set(files_of(folder)) - set(files)
    if hashes and extra:  # DeepSpeed globs its partition files: an added one would be unpickled
        return f"files not written by the run: {sorted(extra)[:3]}"
    return None


def newest_verified(out: Path, hashes: bool = True) -> tuple[Path, dict] | None:
    """The newest checkpoint in `out` that verifies, with its state; each newer one skipped is
    named with the reason, so a damaged checkpoint costs the steps since the one before it.
    Without `hashes`, sizes only: enough to name a checkpoint in a message, without reading ~100 GB."""
    found = []
    for d in [*out.glob("step-*"), out / "final"]:
        try:
            st = json.loads((d / STATE).read_text())
            found.append((int(st["step"]), d.name == "final", d, st))
        except (OSError, ValueError, KeyError, TypeError):
            if d.is_dir():
                print(f"resume: skipping {d}: no readable {STATE} (the write was cut before its end)")
    for _, _, d, st in sorted(found, key=lambda x: x[:2], reverse=True):
        reason = verify(d, hashes)
        if reason is None:
            return d, st
        print(f"resume: skipping {d}: {reason}")
    return None


def replace_folder(tmp: Path, final: Path) -> None:
    """Rename tmp to final; an older `final` (a resumed run that had finished) is swapped out first."""
    if final.exists():
        old = final.parent / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def rotate(out: Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints, by step number (not by name)."""
    steps = sorted(out.glob("step-*"), key=lambda d: int(d.name.split("-")[1]))
    for d in steps[:max(0, len(steps) - keep)]:
        shutil.rmtree(d)


# ---- settings -----------------------------------------------------------------------------------

def changed_settings(saved: dict, now: dict, may_change: set[str]) -> list[str]:
    """`flag: saved -> now` for each resolved setting that differs, except those in `may_change`."""
    return [f"--{k.replace('_', '-')}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(saved.keys() | now.keys())
            if k not in may_change and saved.get(k) != now.get(k)]


# ---- metrics ------------------------------------------------------------------------------------

def read_metrics(path: Path, step: int) -> list[dict]:
    """The rows of a JSONL log (metrics.jsonl, skipped.jsonl) up to `step`. A kill can cut the last
    line short: a line that does not parse is dropped (it lies after the checkpoint a resume starts
    from), never fatal."""
    rows = []
    if path.exists():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            try:
                row = json.loads(line)
            except ValueError:
                print(f"resume: {path} line {n} is cut short; dropped")
                continue
            if row.get("step", step + 1) <= step:
                rows.append(row)
    return rows
