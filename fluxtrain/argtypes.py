"""argparse types for the commands' numeric options: a bad value is argparse's one-line error (exit code 2) that
names the option, before anything is loaded (`data synth --num -5` reported writing -5 samples)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fluxtrain.data.prompts import MIN_SIZE, parse_prompt, read_prompts


def positive_int(text: str) -> int:
    v = _number(text, int)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1 (got {v})")
    return v


def positive_float(text: str) -> float:
    v = _number(text, float)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {v})")
    return v


def resolution(text: str) -> int:
    """Pixels per side: the VAE's ×8 and the 2×2 patch packing need a multiple of 16."""
    v = positive_int(text)
    if v % 16:
        raise argparse.ArgumentTypeError(f"must be a multiple of 16 (VAE ×8 and 2×2 packing), got {v}")
    return v


def fraction(text: str) -> float:
    v = _number(text, float)
    if not 0.0 <= v <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (got {v})")
    return v


def synth_size(text: str) -> int:
    """The synthetic shapes need room: below MIN_SIZE pixels a complex scene's objects cannot be placed apart."""
    v = positive_int(text)
    if v < MIN_SIZE:
        raise argparse.ArgumentTypeError(f"must be ≥ {MIN_SIZE} (smaller images cannot hold a complex scene), got {v}")
    return v


def prompt_text(text: str) -> str:
    """A prompt: an empty one would sample an unconditioned image and name a grid cell with nothing."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give the text to sample")
    return text


def grammar_prompts(text: str) -> str:
    """A prompts file whose every line is in the shapes grammar (PROMPTS.md): checked before anything is rendered."""
    try:
        prompts = read_prompts(text)
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {err.strerror or err}")
    except ValueError as err:  # not UTF-8
        raise argparse.ArgumentTypeError(str(err))
    if not prompts:
        raise argparse.ArgumentTypeError(f"{text} holds no prompt (one a line; blank lines and # comments are skipped)")
    for p in prompts:
        try:
            parse_prompt(p)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text}: '{p[:80]}' is not in the shapes grammar ({err}): see PROMPTS.md")
    return text


def torch_device(text: str) -> str:
    """cpu, cuda or cuda:N that this machine has."""
    import torch

    try:
        d = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a device: give cpu, cuda or cuda:N") from None
    if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"'{text}': this machine has {torch.cuda.device_count()} CUDA device(s)")
    if d.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"'{text}': give cpu, cuda or cuda:N")
    return text


def output_file(text: str) -> str:
    """A file to write: checked before any work, so that hours of generation are not lost to a bad path."""
    p = Path(text)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: give a file name")
    _writable_parent(p)
    return text


def output_dir(text: str) -> str:
    """A folder to write into (made if missing)."""
    p = Path(text)
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file: give a folder")
    _writable_parent(p)
    return text


def output_path(text: str) -> str:
    """A file or a folder to write (export: a folder, or a .safetensors file). An export is written beside its place
    and then renamed into it, so its parent folder must be writable even where the path exists."""
    _writable_parent(Path(text), beside=True)
    return text


def _writable_parent(p: Path, beside: bool = False) -> None:
    """An existing path must be writable (a read-only folder failed only after every image was made); else the
    nearest existing ancestor must be a folder this process may write in."""
    up = p.absolute().parent
    while not up.exists():
        up = up.parent
    if not up.is_dir():
        raise argparse.ArgumentTypeError(f"{up} is a file, not a folder: give a path outside it")
    if p.exists() and not os.access(p, os.W_OK | (os.X_OK if p.is_dir() else 0)):
        raise argparse.ArgumentTypeError(f"no permission to write {p}")
    if (beside or not p.exists()) and not os.access(up, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"no permission to write in {up}")


def _number(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: '{text}'") from None
