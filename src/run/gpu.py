"""GPU fitness: does this torch build have kernels for this card, and does fp16 work?

Used by the worker at startup (as runpod fitness checks, so a broken worker
refuses jobs instead of failing them) and by ``builder/selfcheck.py``.
"""

from __future__ import annotations

import re
from typing import Any

CU126_INSTALL = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"


def has_kernels(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch build compiled for ``arch_list`` runs on a GPU of ``capability``.

    A cubin for sm_XY runs on any GPU of the same major version X with minor >= Y;
    PTX for compute_XY is compiled at load time for any GPU of capability >= X.Y.
    """
    major, minor = capability
    for arch in arch_list:
        match = re.fullmatch(r"(sm|compute)_(\d+)(\d)a?", arch)
        if not match:
            continue
        kind, arch_major, arch_minor = match.group(1), int(match.group(2)), int(match.group(3))
        if kind == "sm" and arch_major == major and arch_minor <= minor:
            return True
        if kind == "compute" and (arch_major, arch_minor) <= (major, minor):
            return True
    return False


def kernel_advice(capability: tuple[int, int], arch_list: list[str], cuda_version: str | None) -> str | None:
    """None when the build fits the GPU; else what to do about it."""
    if has_kernels(capability, arch_list):
        return None
    sm = f"sm_{capability[0]}{capability[1]}"
    if capability < (7, 5):
        return (
            f"this torch build (CUDA {cuda_version}) has no kernels for {sm} ({', '.join(arch_list)}): "
            "Pascal and Volta cards need PyTorch's CUDA 12.6 build, the last with them (up to PyTorch 2.14). "
            f"Install it: {CU126_INSTALL}"
        )
    return (
        f"this torch build (CUDA {cuda_version}) has no kernels for {sm} ({', '.join(arch_list)}): "
        "install a build that lists it, such as the CUDA 12.8 one: "
        "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
    )


def fp16_finite(torch: Any) -> bool:
    """A small fp16 matmul on the GPU gives finite numbers."""
    a = torch.randn(256, 256, device="cuda", dtype=torch.float16)
    return bool(torch.isfinite(a @ a.T).all())


def check_kernels() -> None:
    """Fitness check: raise when this torch build cannot run on the GPU."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is visible, and DEVICE asks for the GPU")
    advice = kernel_advice(torch.cuda.get_device_capability(0), list(torch.cuda.get_arch_list()), torch.version.cuda)
    if advice is not None:
        raise RuntimeError(advice)


def check_fp16() -> None:
    """Fitness check: raise when fp16 math on the GPU gives NaN or infinity."""
    import torch

    if not fp16_finite(torch):
        raise RuntimeError("an fp16 matmul gave NaN or infinity on this GPU: set DTYPE=float32")
