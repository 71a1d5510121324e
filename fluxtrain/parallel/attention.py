"""Which SDPA kernel FLUX's attention runs, chosen from outside the model through diffusers' attention backends.

`auto` picks cuDNN on a Hopper GPU in bf16 and flash on other GPUs. cuDNN runs as fluxtrain's opaque op
(parallel/cudnn_attention.py): diffusers' own cuDNN route gave wrong gradients eagerly and NaN compiled (torch 2.11,
H200), while the op matches flash's gradients and trains the 12B model 1.11× faster (bench/RESULTS.md, fifth
session). It is unmeasured on other architectures, so they keep flash. Flash and cuDNN need bf16 on CUDA; in fp32 (and
on CPU) `auto` leaves the choice to torch.
"""

from __future__ import annotations

import torch

DIFFUSERS_BACKEND = {"flash": "_native_flash", "efficient": "_native_efficient", "cudnn": "_native_cudnn",
                     "math": "_native_math"}
NEEDS_BF16_GPU = ("flash", "cudnn")


def resolve_backend(name: str, device_type: str, mixed_precision: str, capability: tuple[int, int] | None = None) -> str:
    """The backend `name` means here: one of DIFFUSERS_BACKEND's keys, or "native" (torch picks per call).
    capability: the GPU's compute capability (default: the current CUDA device's)."""
    if name != "auto":
        return name
    if device_type != "cuda" or mixed_precision != "bf16":
        return "native"
    if capability is None:
        capability = torch.cuda.get_device_capability()
    return "cudnn" if capability[0] == 9 else "flash"  # Hopper (H100, H200): measured there


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
