"""FAST_MODE: the UNet compiled whole and replayed as CUDA graphs, the VAE's decoder compiled.

At batch 1, SD 1.5's UNet is bound by kernel launches and Python, not by the GPU: plain diffusers ran 33 UNet
steps/s on an H200 at batch 1 and at batch 4 alike (BENCHMARKS.md). FAST_MODE takes that overhead away:

- channels_last, the layout tensor cores read; fused QKV projections, one matmul of three (with LoRAs they stay
  apart, and the UNet gets its hot-swap slots instead, src/adapters/loras.py);
- the whole UNet compiled by inductor with dynamic shapes, so that one compile serves each size and batch, and,
  in the high memory profile, replayed as CUDA graphs (torch.compile's "reduce-overhead"), one recorded per shape;
- the VAE's decoder compiled too, without CUDA graphs: its activations are large and it runs once a job.

Each compiled call is wrapped (``CompiledCall``): a UNet evaluation starts a new CUDA-graph step and its output is
copied out of the graph's memory, which the next replay overwrites (a scheduler may keep it, as PNDM does); a
compile that fails leaves that module uncompiled instead of failing the job; a square image or a batch of one is
not a special case compiled again. ``uncompiled`` runs the modules as written, for what changes them
per job (DeepCache's feature reuse) and for the warm-up's reference image.

The compiled call sits where ``torch.nn.Module.compile`` puts it (``_compiled_call_impl``), so the modules keep
their names and parameters: model swaps copy into them, LoRAs hot-swap into their slots, and neither compiles
again (tests/test_fast_path.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

if TYPE_CHECKING:
    from src.adapters.loras import Loras

log = logging.getLogger(__name__)


# Dynamic shapes as jobs vary: a square image (width equal to height) and a batch of one (no CFG) are no special
# cases compiled again, as torch's duck sizing and its 0/1 specialization would make them.
_SHAPES = {"use_duck_shape": False, "backed_size_oblivious": True}
# The UNet's float constants (a ResNet's output scale, an attention's rescale, epsilons) kept as constants: with
# dynamic shapes torch makes each an input, a float64 tensor on the CPU, and a graph with CPU inputs is not
# recorded as a CUDA graph (torch/_dynamo/variables/builder.py says so where it specializes floats).
_FLOATS = {"specialize_float": True}


class CompiledCall:
    """A module's call compiled with dynamic shapes; as CUDA graphs with ``graphs``. If compiling fails, the
    module runs as written from then on (a compile that failed would be tried again, at its cost, each call)."""

    def __init__(
        self, module: torch.nn.Module, *, backend: Any, graphs: bool, fullgraph: bool, timestep: bool = False
    ) -> None:
        """``timestep``: the module is the UNet, whose second argument is the timestep (``_float_timestep``)."""
        self.module, self.graphs, self.timestep = module, graphs, timestep
        self.name = type(module).__name__
        # Set when compiling with a cross-attention mask failed: such calls run as written from then on.
        self.failed_masked = False
        options: dict[str, Any] = {"mode": "reduce-overhead"} if graphs else {}
        call = _same_batch(module._call_impl) if timestep else module._call_impl
        self.compiled = torch.compile(call, backend=backend, fullgraph=fullgraph, dynamic=True, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        masked = kwargs.get("encoder_attention_mask") is not None
        if masked and self.failed_masked:
            return self.module._call_impl(*args, **kwargs)
        if self.timestep:
            args = _float_timestep(args)
        try:
            with (
                torch.fx.experimental._config.patch(**_shape_options()),  # type: ignore[attr-defined]
                torch._dynamo.config.patch(_known(torch._dynamo.config, _FLOATS)),
            ):
                if not self.graphs:
                    return self.compiled(*args, **kwargs)
                torch.compiler.cudagraph_mark_step_begin()
                return _copied(self.compiled(*args, **kwargs))
        except torch._dynamo.exc.TorchDynamoException as error:
            if masked:  # the other jobs keep the compiled graphs they have
                log.warning(
                    "FAST_MODE: compiling the %s with a cross-attention mask failed; such calls run "
                    "uncompiled from now on: %s",
                    self.name,
                    error,
                )
                self.failed_masked = True
                return self.module._call_impl(*args, **kwargs)
            log.warning("FAST_MODE: compiling the %s failed; it runs uncompiled from now on: %s", self.name, error)
            self.module._compiled_call_impl = None
            return self.module._call_impl(*args, **kwargs)


def _same_batch(call: Any) -> Any:
    """The UNet's ``call``, telling the compiler that a cross-attention mask (``src.run.cross_attention``) and the
    encoder states have the sample's batch. With dynamic shapes each is a size of its own, and attention's reshape
    of the mask (diffusers' ``view(batch, heads, -1, keys)``) cannot be traced without knowing them equal."""

    def checked(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("encoder_attention_mask") is not None:
            states = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
            torch._check(kwargs["encoder_attention_mask"].shape[0] == sample.shape[0])
            torch._check(states.shape[0] == sample.shape[0])
        return call(sample, *args, **kwargs)

    return checked


def _shape_options() -> dict[str, Any]:
    """``_SHAPES``, less what this torch does not have (an older torch compiles those cases again)."""
    return _known(torch.fx.experimental._config, _SHAPES)


def _known(config: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``options``, less those ``config`` (a torch config module) does not have."""
    return {name: value for name, value in options.items() if hasattr(config, name)}


def _float_timestep(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The UNet's arguments with its timestep (the second) a float32 tensor. Schedulers give int64 (DPM++ 2M Karras
    and the SDE ones, DDIM, LCM), float32 (Euler, Heun, LMS, DPM++ 2M, UniPC) or float64 (DPM2) timesteps, and a
    new dtype compiles the whole UNet again, inside a job; the UNet's time embedding casts it to float32 first thing
    (diffusers' get_timestep_embedding), so the result is the same."""
    if len(args) < 2 or not isinstance(args[1], torch.Tensor) or args[1].dtype == torch.float32:
        return args
    return (args[0], args[1].to(torch.float32), *args[2:])


def _copied(output: Any) -> Any:
    """The UNet's output, out of the CUDA graph's memory: a tuple (``return_dict=False``) or its output class."""
    if isinstance(output, tuple):
        return tuple(item.clone() if isinstance(item, torch.Tensor) else item for item in output)
    output.sample = output.sample.clone()
    return output


def apply_fast_mode(
    pipeline: StableDiffusionPipeline, loras: Loras, *, graphs: bool, backend: Any = "inductor"
) -> None:
    """FAST_MODE on ``pipeline``: channels_last, fused QKV projections or LoRA hot-swap slots, the UNet and the
    VAE's decoder compiled; the UNet replayed as CUDA graphs with ``graphs``. ``backend`` is torch.compile's
    (tests count graphs with a counting one, on the CPU)."""
    unet, vae = pipeline.unet, pipeline.vae
    unet.to(memory_format=torch.channels_last)
    vae.to(memory_format=torch.channels_last)
    if loras.files:
        loras.prepare_slots()
        # PEFT's layers may break the graph where they need Python; each part is compiled (and recorded) apart.
        fullgraph = False
    else:
        pipeline.fuse_qkv_projections()
        fullgraph = True
    # Compiled again for each number of LoRAs on (none, 1, 2, ...), with and without ControlNet residuals and a
    # cross-attention mask, and wherever a guard of the card's own kernels' choice falls: more variants than
    # torch.compile keeps by default (8), after which it would run them uncompiled.
    limit = 16 * (loras.slot_count + 2)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    unet._compiled_call_impl = CompiledCall(unet, backend=backend, graphs=graphs, fullgraph=fullgraph, timestep=True)
    vae.decoder._compiled_call_impl = CompiledCall(vae.decoder, backend=backend, graphs=False, fullgraph=True)
    log.info(
        "FAST_MODE: channels_last, %s, the UNet compiled whole%s, the VAE decoder compiled",
        "LoRA hot-swap slots (QKV projections unfused)" if loras.files else "fused QKV projections",
        " and replayed as CUDA graphs" if graphs else "",
    )


def compiled_modules(pipeline: Any) -> list[torch.nn.Module]:
    """The modules of ``pipeline`` that FAST_MODE compiled."""
    return [module for module in (pipeline.unet, pipeline.vae.decoder) if module._compiled_call_impl is not None]


@contextlib.contextmanager
def uncompiled(*modules: torch.nn.Module) -> Iterator[None]:
    """``modules`` run as written for the ``with`` block, compiled or not; as they were after."""
    kept = [module._compiled_call_impl for module in modules]
    for module in modules:
        module._compiled_call_impl = None
    try:
        yield
    finally:
        for module, call in zip(modules, kept, strict=True):
            module._compiled_call_impl = call


def drop_fast_mode(pipeline: Any) -> None:
    """The compiled calls dropped for good: the worker serves on with the modules as written."""
    for module in compiled_modules(pipeline):
        module._compiled_call_impl = None


def grey_levels_apart(first: list[Any], second: list[Any]) -> tuple[float, int]:
    """Mean and largest difference between two lists of images, in grey levels (0 to 255)."""
    pairs = zip(first, second, strict=True)
    stacked = np.stack([np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)) for a, b in pairs])
    return float(stacked.mean()), int(stacked.max())
