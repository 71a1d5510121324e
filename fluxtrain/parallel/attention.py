"""Which SDPA kernel FLUX's attention runs, chosen from outside the model through diffusers' attention backends.

`auto` pins flash on a GPU in bf16: cuDNN's backward failed on an H100 with torch 2.11 and crashed inside compiled
blocks (bench/RESULTS.md), and torch's own choice may pick it. Flash and cuDNN need bf16 on CUDA; in fp32 (and on
CPU) `auto` leaves the choice to torch. diffusers' cuDNN backend makes q/k/v contiguous first.
"""

from __future__ import annotations

import torch

DIFFUSERS_BACKEND = {"flash": "_native_flash", "efficient": "_native_efficient", "cudnn": "_native_cudnn",
                     "math": "_native_math"}
NEEDS_BF16_GPU = ("flash", "cudnn")


def resolve_backend(name: str, device_type: str, mixed_precision: str) -> str:
    """The backend `name` means here: one of DIFFUSERS_BACKEND's keys, or "native" (torch picks per call)."""
    if name != "auto":
        return name
    return "flash" if device_type == "cuda" and mixed_precision == "bf16" else "native"


def check_backend(name: str, device_type: str, mixed_precision: str) -> str | None:
    """A one-line reason why `name` can't run here, or None."""
    if name in NEEDS_BF16_GPU and (device_type != "cuda" or mixed_precision != "bf16"):
        return (f"model.attention_backend = {name} needs bf16 on a CUDA GPU (here: {mixed_precision} on "
                f"{device_type}): set parallel.mixed_precision = bf16, or model.attention_backend = auto")
    return None


def apply_attention_backend(model: torch.nn.Module, name: str, device_type: str, mixed_precision: str) -> str:
    """Set every attention module's backend; returns the one resolved (for the log)."""
    backend = resolve_backend(name, device_type, mixed_precision)
    problem = check_backend(backend, device_type, mixed_precision)
    if problem:
        raise ValueError(problem)
    if backend != "native":
        from diffusers.utils import logging as dlogging

        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()  # set_attention_backend warns that the API is experimental, every time
        try:
            if backend == "cudnn":
                from fluxtrain.parallel import cudnn_attention

                cudnn_attention.install()
            model.set_attention_backend(DIFFUSERS_BACKEND[backend])
        finally:
            dlogging.set_verbosity(level)
    return backend
