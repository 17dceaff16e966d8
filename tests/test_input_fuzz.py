"""Random malformed requests, native and A1111's, through the real parsers: each is answered or refused with an
InputError, never another exception (a TypeError from an unhashable value used as a key was one).

Seeded, so a failure repeats; the payloads mix the fields the schemas know with values of every JSON type,
nested up to two levels. No model and no torch.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from typing import Any

import pydantic
import pytest

from src import schema
from src.schema import InputError, names_upscale, parse_input, read_a1111
from src.schema import adapters as adapter_fields
from src.schema import images as image_fields
from src.schema import passes as pass_fields
from src.schema import request as request_fields
from src.schema import upscale as upscale_fields
from src.schema.a1111 import A1111_ONLY_FIELDS
from src.schema.upscale import parse_upscale
from src.settings import load_settings

SETTINGS = load_settings({})
SEEDS = range(1, 9)
ROUNDS = 1000  # per seed
MESSAGE_LIMIT = 2048  # as tests/test_schema.py holds every refusal
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
SCALARS: list[Any] = [
    None, True, False, 0, -1, 1, 2, 7, 64, 512, 2**63, 1e308, float("nan"), float("inf"), 0.5, -0.5,
    "", "x", "x" * 3000, "None", "Latent", "Lanczos", "Euler a", "DPM++ 2M Karras", "<lora:a:1>", "0" * 64,
    PNG, "data:image/png;base64," + PNG, "https://127.0.0.1/a.safetensors", [], {}, [1, 2], [PNG],
]  # fmt: skip


def native_names() -> list[str]:
    """Every field name of every model in the request schema, nested ones included."""
    names = set()
    for module in (schema.core, adapter_fields, image_fields, pass_fields, request_fields, upscale_fields):
        for _, model in inspect.getmembers(module, inspect.isclass):
            if issubclass(model, pydantic.BaseModel):
                names |= {field.alias or name for name, field in model.model_fields.items()}
    return sorted(names)


NATIVE = native_names()
A1111 = sorted(A1111_ONLY_FIELDS | {"prompt", "negative_prompt", "seed", "width", "height", "image", "mask"})


class Payloads:
    """Random payloads over ``names``: a few fields set to random values, lists and objects of them."""

    def __init__(self, seed: int, names: list[str]) -> None:
        self.rng, self.names = random.Random(seed), names

    def value(self, depth: int = 0) -> Any:
        if depth < 2 and self.rng.random() < 0.35:
            if self.rng.random() < 0.5:
                return [self.value(depth + 1) for _ in range(self.rng.randint(0, 3))]
            return self.fields(self.rng.randint(0, 4), depth + 1)
        return self.rng.choice(SCALARS)

    def fields(self, count: int, depth: int = 0) -> dict[str, Any]:
        return {self.rng.choice(self.names): self.value(depth) for _ in range(count)}

    def sometimes(self, chance: float, base: dict[str, Any]) -> dict[str, Any] | None:
        """``base`` with up to three random fields over it, at ``chance``; else None."""
        return {**base, **self.fields(self.rng.randint(0, 3))} if self.rng.random() < chance else None


def native(payloads: Payloads) -> dict[str, Any]:
    prompt = payloads.rng.choice(["a fox", "a fox <lora:a:1>", "a fox, (snow:1.2) [dusk:night:0.5] AND a den"])
    data = {"prompt": prompt, **payloads.fields(payloads.rng.randint(1, 5))}
    for name, unit, listed in (
        ("loras", {"name": "a"}, True),
        ("controlnets", {"model": "a", "image": PNG}, True),
        ("hires", {"scale": 2}, False),
        ("outpaint", {"left": 64}, False),
    ):
        if (made := payloads.sometimes(0.3, unit)) is not None:
            data[name] = [made] if listed else made
    if "outpaint" in data:
        data["image"] = PNG
    elif payloads.rng.random() < 0.1:
        data.update(task="upscale", image=PNG)
    return {"id": "fuzz", "input": data}


def a1111(payloads: Payloads) -> dict[str, Any]:
    rng = payloads.rng
    payload = {"prompt": "a fox", **payloads.fields(rng.randint(1, 5))}
    if rng.random() < 0.4:
        payload["enable_hr"] = True
    if rng.random() < 0.3:
        payload["init_images"] = [PNG]
    unit = {"module": "canny", "model": "control_v11p_sd15_canny", "image": PNG, "enabled": True}
    if (made := payloads.sometimes(0.4, unit)) is not None:
        payload["alwayson_scripts"] = {"controlnet": {"args": [made]}}
    if rng.random() < 0.2:
        payload["override_settings"] = payloads.fields(rng.randint(1, 3))
    if rng.random() < 0.5:
        return {"id": "fuzz", "input": payload}
    endpoint = rng.choice(["/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/extra-single-image", "/x", None, 3])
    return {"id": "fuzz", "input": {"api": {"method": "POST", "endpoint": endpoint}, "payload": payload}}


def parse(job: dict[str, Any]) -> None:
    """The job's input as the worker reads it before it looks at the model: A1111's translated, then the
    request or the upscale task parsed."""
    call = read_a1111(job)
    native_job = {"input": call.input} if call is not None else job
    try:
        (parse_upscale if names_upscale(native_job) else parse_input)(native_job, SETTINGS)
    except InputError as error:
        raise InputError(call.renamed(str(error)) if call is not None else str(error)) from None


@pytest.mark.parametrize(("make", "names"), [(native, NATIVE), (a1111, A1111)], ids=["native", "a1111"])
def test_random_malformed_requests_are_answered_or_refused_as_input_errors(
    make: Callable[[Payloads], dict[str, Any]], names: list[str]
) -> None:
    refusals = [
        refusal
        for seed in SEEDS
        for payloads in [Payloads(seed, names)]
        for _ in range(ROUNDS)
        if (refusal := refused(make(payloads))) is not None
    ]
    total = len(SEEDS) * ROUNDS
    assert total / 10 < len(refusals) < total, "the payloads are neither all valid nor all refused"
    assert all(0 < len(message) <= MESSAGE_LIMIT for message in refusals)


def refused(job: dict[str, Any]) -> str | None:
    """The refusal's message, or None when the job is accepted; any exception but an InputError fails the test."""
    try:
        parse(job)
    except InputError as error:
        return str(error)
    except Exception as error:  # what the test is for: any other exception is a bug
        pytest.fail(f"{type(error).__name__}: {error} for {job!r}")
    return None
