"""Cross-attention over the tokens A1111 reads of a prompt and a negative of different lengths, batched as one.

A1111 runs a prompt and a negative prompt of different numbers of chunks through the UNet apart (its default),
each attending to its own tokens. The worker batches them, as diffusers does, in embeddings of one length, the
shorter padded: the padding is masked out of cross-attention (``encoder_attention_mask``: its keys weigh
exp(-10000), which is 0), so each row attends to its own tokens, as in two calls, in one. What each reads is the
schedule's (``Schedule.attended``): with prompt editing, the longest of the pass's texts of its prompt, as A1111
pads them; with ``pad_conds``, the longer of the two, as A1111's "Pad prompt/negative prompt" option.

The mask goes in as an argument of the UNet's (and each ControlNet's) call, from outside a compiled call
(``src.run.fast_path``), so that FAST_MODE's compiled UNet takes it as one more input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch


class KeyMask:
    """A pass's cross-attention mask (1 a token read, 0 one skipped) for a batch of ``images``: the negative's rows
    for the unguided half of a guided batch, the prompt's for the rest."""

    def __init__(self, attended: tuple[int, int], length: int, images: int, device: torch.device) -> None:
        tokens = torch.arange(length, device=device)
        self.prompt, self.negative = (tokens < read for read in attended)
        self.images = images
        self._made: dict[int, torch.Tensor] = {}

    def rows(self, count: int) -> torch.Tensor:
        """The mask for a batch of ``count`` rows: twice the images under guidance, the images without."""
        assert count in (self.images, 2 * self.images), f"{count} rows for {self.images} images"
        if count not in self._made:
            negatives = [self.negative] * self.images if count == 2 * self.images else []
            self._made[count] = torch.stack([*negatives, *[self.prompt] * self.images]).float()
        return self._made[count]

    def around(self, inner: Any) -> Any:
        """A module's call ``inner``, given the mask for the rows of its ``encoder_hidden_states``."""

        def masked(*args: Any, **kwargs: Any) -> Any:
            states = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]
            return inner(*args, encoder_attention_mask=self.rows(states.shape[0]), **kwargs)

        return masked


@contextlib.contextmanager
def own_tokens(modules: Sequence[torch.nn.Module], mask: KeyMask | None) -> Iterator[None]:
    """``modules`` (the UNet, each ControlNet) called with ``mask`` for the ``with`` block (None: as they are); as
    they were after. Enter it inside anything that swaps their calls (``uncompiled``), so that what it swaps in
    is what gets the mask."""
    if mask is None:
        yield
        return
    kept = [module._compiled_call_impl for module in modules]
    wrappers = [mask.around(module._compiled_call_impl or module._call_impl) for module in modules]
    for module, wrapper in zip(modules, wrappers, strict=True):
        module._compiled_call_impl = wrapper
    try:
        yield
    finally:
        for module, call, wrapper in zip(modules, kept, wrappers, strict=True):
            if module._compiled_call_impl is wrapper:  # not dropped meanwhile (``drop_fast_mode``)
                module._compiled_call_impl = call
