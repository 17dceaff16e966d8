"""A prompt and a negative prompt of different lengths, guided as A1111 guides them (src/run/cross_attention.py):
each read alone by default, the shorter padded with empty chunks with ``pad_conds``; with prompt editing, the
pass's texts of a prompt padded to the longest of them. The worker's images are held to A1111's loop written out
(tests/a1111_guidance.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import handler
from src.run.cross_attention import KeyMask, own_tokens
from src.run.fast_path import CompiledCall
from src.run.feature_reuse import FeatureReuse
from tests.a1111_guidance import a1111_txt2img, encoded
from tests.conftest import decode_png

pytestmark = pytest.mark.usefixtures("worker")

# The tiny model's tokenizer reads characters: 75 of them fill a chunk.
LONG = "a red fox, in the snow, under a pale winter sky, with pine trees and a frozen lake behind it, at dawn"
SHORT = "a fox"
JOB = {"num_inference_steps": 4, "seed": 11, "width": 64, "height": 64, "scheduler": "Euler", "num_images": 2}


def run(**fields: Any) -> dict[str, Any]:
    result = asyncio.run(handler.handler({"id": "cross-attention", "input": {**JOB, **fields}}))
    assert "error" not in result, result["error"]
    return result


def base() -> Any:
    return handler.get_engine()._pipeline


def apart(result: dict[str, Any], reference: list[Image.Image]) -> int:
    """The largest difference between the job's images and ``reference``, in grey levels."""
    ours = [np.asarray(decode_png(item["image"]).convert("RGB"), dtype=np.int16) for item in result["images"]]
    theirs = [np.asarray(image.convert("RGB"), dtype=np.int16) for image in reference]
    return max(int(np.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize(("prompt", "negative"), [(LONG, SHORT), (SHORT, LONG), (LONG, "")])
def test_a_prompt_and_a_negative_of_different_lengths_guide_as_a1111s_two_calls(prompt: str, negative: str) -> None:
    result = run(prompt=prompt, negative_prompt=negative)

    counts = result["metadata"]["prompt_tokens"]
    assert counts["prompt"]["chunks"] != counts["negative_prompt"]["chunks"], "the case under test"
    assert result["metadata"]["pad_conds"] is False
    assert apart(result, a1111_txt2img(base(), [prompt], negative, seeds=(11, 12))) <= 1
    if negative:  # the empty negative's padding is the empty prompt again: attention over its keys twice is the same
        padded = a1111_txt2img(base(), [prompt], negative, seeds=(11, 12), pad_cond_uncond=True)
        assert apart(result, padded) > 1, "reading the padding changes the image"


def test_pad_conds_pads_the_shorter_with_empty_chunks_as_a1111s_option() -> None:
    result = run(prompt=LONG, negative_prompt=SHORT, pad_conds=True)

    assert apart(result, a1111_txt2img(base(), [LONG], SHORT, seeds=(11, 12), pad_cond_uncond=True)) <= 1
    assert result["metadata"]["pad_conds"] is True
    assert "Pad conds: True" in decode_png(result["images"][0]["image"]).text["parameters"]
    same = run(prompt=SHORT, negative_prompt="blurry", pad_conds=True)
    assert "Pad conds" not in decode_png(same["images"][0]["image"]).text["parameters"], "written when it padded"


@pytest.mark.parametrize("pad", [False, True])
def test_prompt_editing_pads_a_passs_texts_of_a_prompt_to_the_longest(pad: bool) -> None:
    """A short text for the first steps, then a long one: A1111 encodes them in one batch, the short one padded
    with an empty chunk that it reads, against the negative's own one chunk (or padded too, with ``pad_conds``)."""
    result = run(prompt=f"[{SHORT}:{LONG}:2]", negative_prompt="blurry", pad_conds=pad)

    reference = a1111_txt2img(base(), [SHORT, LONG], "blurry", seeds=(11, 12), pad_cond_uncond=pad, switch_after=[2])
    assert apart(result, reference) <= 1


def test_one_image_and_no_guidance_read_the_prompts_own_tokens() -> None:
    """Without guidance (cfg 1) the UNet reads the prompt alone: its padding, for a longer negative, is masked."""
    result = run(prompt=SHORT, negative_prompt=LONG, guidance_scale=1.0, num_images=1)
    alone = run(prompt=SHORT, negative_prompt="", guidance_scale=1.0, num_images=1)

    assert apart(result, [decode_png(alone["images"][0]["image"])]) <= 1


def test_feature_reuse_reads_the_mask_in_its_outer_blocks() -> None:
    """DeepCache's shortcut (the UNet's first and last blocks) reads each row's own tokens too: a padded, masked
    batch gives what each text alone gives."""
    unet = base().unet
    long, short = encoded(base(), LONG), encoded(base(), SHORT)
    padded = torch.cat([short, torch.zeros_like(short)], dim=1)
    sample = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    t = torch.tensor(500)
    mask = torch.tensor([[1.0] * 154, [1.0] * 77 + [0.0] * 77])

    def twice(reuse: FeatureReuse, *args: Any, **kwargs: Any) -> torch.Tensor:
        reuse(*args, **kwargs)  # whole: keeps the deep features
        return reuse(*args, **kwargs).sample  # the outer blocks on them

    with torch.no_grad():
        batched = twice(FeatureReuse(unet, 2), sample, t, torch.cat([long, padded]), encoder_attention_mask=mask)
        first = twice(FeatureReuse(unet, 2), sample[:1], t, long)
        second = twice(FeatureReuse(unet, 2), sample[1:], t, short)
    torch.testing.assert_close(batched, torch.cat([first, second]), atol=1e-5, rtol=1e-4)


class Reads(torch.nn.Module):
    """What each row's cross-attention would read: the sum of its encoder states under its mask."""

    def forward(
        self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        mask = kwargs.get("encoder_attention_mask")
        weights = torch.ones(encoder_hidden_states.shape[:2]) if mask is None else mask
        return sample + (encoder_hidden_states.sum(-1) * weights).sum(-1)


def test_a_compile_that_fails_with_the_mask_leaves_only_masked_calls_uncompiled() -> None:
    states = torch.ones((2, 154, 2))  # the negative's row, then the prompt's
    module, tried = Reads(), []

    def broken(_graph: torch.fx.GraphModule, _inputs: list[Any]) -> Any:
        tried.append(True)
        raise RuntimeError("the compiler broke (injected)")

    call = CompiledCall(module, backend=broken, graphs=False, fullgraph=True)
    module._compiled_call_impl = call
    for _job in range(2):
        with own_tokens([module], KeyMask((154, 77), 154, 1, torch.device("cpu"))):
            guided = module(torch.zeros(2), torch.tensor(1), encoder_hidden_states=states)
            unguided = module(torch.zeros(1), torch.tensor(1), encoder_hidden_states=states[1:])
        assert guided.tolist() == [154.0, 308.0], "each row its own tokens"
        assert unguided.tolist() == [308.0], "the prompt's row alone"

    assert len(tried) == 1, "not compiled again at each masked call"
    assert module._compiled_call_impl is call, "the unmasked calls keep it"
    assert call.failed_masked
