"""Errors a user can fix, and how every command-line tool reports them.

A truncated file, a record without an id, a NaN weight, a flag out of range: the code that finds one
raises `UserError` (or a subclass: checkpoint.CheckpointError, data.SampleError) with a message that
names the file, record, key or flag. Each CLI's `__main__` is `errors.run(main)`, which prints such an
error as one line `error: ...` and exits with status 2 (argparse's status for a bad command line).
Any other exception is a bug in this code and keeps its traceback.

Its own small file, like special_ids.py, because every layer raises it: checkpoint.py at the bottom of
the import graph, data, formats and model above it, and the CLIs (train, eval, convert, chat, data.py
check, demo) on top, which also share the argparse checks below.
"""
from __future__ import annotations

import argparse
import math
import sys


class UserError(ValueError):
    """Bad input, named: which file, record, key or flag, and what is wrong with it. A ValueError, so
    code that already handles bad values (eval's skipped questions, chat's per-line errors) still does."""


def run(main) -> None:
    """A CLI's `__main__`: main()'s int is the exit status (anything else, e.g. a summary dict: 0).
    UserError, OSError (a missing or unreadable path; the message names it) and SystemExit("message")
    (how train.py stops a run) print one `error:` line and exit 2."""
    try:
        result = main()
    except SystemExit as e:
        if not isinstance(e.code, str):  # sys.exit(n), argparse: already said what they had to say
            raise
        fail(e.code)
    except (UserError, OSError) as e:
        fail(e)
    sys.exit(result if isinstance(result, int) else 0)


def fail(message) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors as the same one line (`error: argument --keep: must be >= 1, got 0`),
    not a usage block above it: --help shows the usage."""

    def error(self, message):
        fail(message)


# ---- type= checks: a value that makes no sense is refused when parsed, naming its flag ----------------


def _number(kind, s: str):
    try:
        v = kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return v


def at_least(low, kind=int):
    """type= for a number >= low: at_least(1) for sizes and counts, at_least(0) where 0 means "none"."""
    def check(s: str):
        v = _number(kind, s)
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {s}")
        return v
    return check


def above(low, kind=float):
    """type= for a number > low (a learning rate, a penalty)."""
    def check(s: str):
        v = _number(kind, s)
        if v <= low:
            raise argparse.ArgumentTypeError(f"must be > {low}, got {s}")
        return v
    return check


def between(low, high, kind=float):
    """type= for a number in [low, high] (ratios, probabilities)."""
    def check(s: str):
        v = _number(kind, s)
        if not low <= v <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {s}")
        return v
    return check


def checked_by(parse):
    """type= that runs parse(s) now, so its UserError names the flag, and keeps the string as given
    (for values parsed again later, like a `file[:ratio][@image_root]` data spec)."""
    def check(s: str) -> str:
        try:
            parse(s)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return s
    return check
