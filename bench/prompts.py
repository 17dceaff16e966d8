"""What reading prompts as A1111 does costs: parsing, and encoding against diffusers' own encode_prompt.

    python -m bench.prompts [--repeat N] [--out DIR]

On the CPU with the tiny model (its text encoder is small, so the figures show
the worker's own overhead, not CLIP's arithmetic): the time to parse 2,000
characters of nested and unbalanced brackets, and the time to encode a prompt
and an empty negative prompt of about 75 and about 600 tokens, with
``src.prompts.encode_prompts`` and with diffusers' ``encode_prompt`` (which
reads at most 77 tokens). Medians of ``--repeat`` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.machine import load_average, report_header, write_results

SOUPS = {
    "`(` x 2000": "(" * 2000,
    "`(a` x 1000": "(a" * 1000,
    "`[a)` x 666": "[a)" * 666,
    "`(a:1.1)` x 285": "(a:1.1)" * 285,
}


def _median_ms(run: Callable[[], Any], repeat: int) -> float:
    run()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _prompt_of(tokenizer: Any, tokens: int) -> str:
    """A weighted prompt of about ``tokens`` tokens on this tokenizer."""
    phrase = "(a red fox:1.2), [snow], "
    per_phrase = len(tokenizer(phrase, add_special_tokens=False).input_ids)
    return phrase * max(1, tokens // per_phrase)


def run(repeat: int) -> dict[str, Any]:
    from builder.tiny_model import write_tiny_model
    from src.prompts import encode_prompts, parse_prompt_attention
    from src.run.engine import Engine
    from src.settings import load_settings

    report: dict[str, Any] = {**report_header(), "repeat": repeat, "parse_ms": {}, "encode_ms": {}}
    for name, text in SOUPS.items():
        report["parse_ms"][name] = _median_ms(lambda text=text: parse_prompt_attention(text), repeat)
    with tempfile.TemporaryDirectory() as folder:
        engine = Engine.load(load_settings({"MODEL_ID": str(write_tiny_model(Path(folder) / "tiny"))}))
        pipeline = engine._pipeline
        for tokens in (75, 600):
            prompt = _prompt_of(pipeline.tokenizer, tokens)
            with torch.inference_mode():
                ours = _median_ms(
                    lambda prompt=prompt: encode_prompts(
                        prompt,
                        "",
                        tokenizer=pipeline.tokenizer,
                        text_encoder=pipeline.text_encoder,
                        device=torch.device("cpu"),
                    ),
                    repeat,
                )
                plain = _median_ms(
                    lambda prompt=prompt: pipeline.encode_prompt(prompt, "cpu", 1, True, negative_prompt=""),
                    repeat,
                )
            counted = len(pipeline.tokenizer(prompt, add_special_tokens=False).input_ids)
            report["encode_ms"][f"{counted} tokens"] = {"worker": ours, "diffusers_encode_prompt": plain}
    report["load_average_after"] = load_average()
    return report


def markdown(report: dict[str, Any], command: str, seconds: float) -> str:
    lines = [
        f"Machine: {report['machine']} ({report['cpu']}); Python {report['python']}, torch {torch.__version__}; "
        f"{report['date']}.",
        f"Command: `{command}`, {seconds:.0f} s; load average (1 min) {report['load_average_before'][0]} before, "
        f"{report['load_average_after'][0]} after. Medians of {report['repeat']} after one warm-up.",
        "",
        "| bracket soup (about 2,000 characters) | parse_prompt_attention |",
        "| --- | --- |",
        *[f"| {name} | {ms:.2f} ms |" for name, ms in report["parse_ms"].items()],
        "",
        "| prompt (weighted), tiny model | worker: all chunks | diffusers `encode_prompt`: first 77 tokens |",
        "| --- | --- | --- |",
        *[
            f"| {name} | {times['worker']:.1f} ms | {times['diffusers_encode_prompt']:.1f} ms |"
            for name, times in report["encode_ms"].items()
        ],
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    started = time.perf_counter()
    report = run(args.repeat)
    report["seconds"] = time.perf_counter() - started
    command = " ".join(["python -m bench.prompts", *sys.argv[1:]])
    write_results(args.out, "prompts", report, markdown(report, command, report["seconds"]))


if __name__ == "__main__":
    main()
