"""Write tiny random-weight ESRGAN-family upscalers, and files an upscaler folder must refuse.

Usage::

    python -m builder.tiny_upscalers OUT_DIR [--bad]

The models are spandrel's own architectures at tiny sizes, saved as published ones are, so spandrel detects
them from their tensors as it detects the real files: ``tiny-esrgan-4x.pth`` (ESRGAN's RRDB network, the
layout of ``4x-UltraSharp.pth`` and ``RealESRGAN_x4plus.pth``: 8 filters, 1 block), ``tiny-compact-2x.safetensors``
(Real-ESRGAN's compact SRVGG network, as ``realesr-general-x4v3``: 8 features, 2 convolutions). Nothing is
downloaded; the weights are random, so an upscaled image is noise-tinted, not sharper. ``--bad`` adds, under
``bad/``: a 1x restoration model (not super-resolution), tensors no architecture has, a pickle that builds
an object, and a TorchScript-style ``.pt``.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY = {"tiny-esrgan-4x": ".pth", "tiny-compact-2x": ".safetensors"}


def _esrgan(seed: int) -> dict[str, torch.Tensor]:
    from spandrel.architectures.ESRGAN.__arch.RRDB import RRDBNet

    torch.manual_seed(seed)
    return RRDBNet(num_filters=8, num_blocks=1, scale=4).state_dict()


def _compact(seed: int, scale: int) -> dict[str, torch.Tensor]:
    from spandrel.architectures.Compact.__arch.SRVGG import SRVGGNetCompact

    torch.manual_seed(seed)
    return SRVGGNetCompact(num_feat=8, num_conv=2, upscale=scale).state_dict()


class _Payload:
    """What a hostile pickle builds when it is unpickled plainly; a weights-only loader refuses it."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("a pickle ran code",))


def write_tiny_upscalers(directory: Path, *, bad: bool = False, seed: int = 0) -> Path:
    """Write the tiny upscalers (and, with ``bad``, the files to refuse) into ``directory``; return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(_esrgan(seed), directory / "tiny-esrgan-4x.pth")
    save_file(
        {name: tensor.contiguous() for name, tensor in _compact(seed, 2).items()},
        directory / "tiny-compact-2x.safetensors",
    )
    if bad:
        folder = directory / "bad"
        folder.mkdir(exist_ok=True)
        save_file(_compact(seed, 1), folder / "restoration-1x.safetensors")
        save_file({"encoder.weight": torch.zeros(4, 4)}, folder / "unknown.safetensors")
        (folder / "hostile.pth").write_bytes(pickle.dumps({"weight": _Payload()}))
        (folder / "scripted.pt").write_bytes(b"PK\x03\x04 not opened")
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m builder.tiny_upscalers", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--bad", action="store_true", help="also write files an upscaler folder must refuse")
    args = parser.parse_args(argv)
    print(write_tiny_upscalers(args.out_dir, bad=args.bad))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
