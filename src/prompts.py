"""A1111 prompt text -> weights, chunks of 75 tokens, and CLIP embeddings.

AUTOMATIC1111's prompt syntax, read the way A1111 reads it, in our own words:
``(text)`` multiplies attention by 1.1, ``[text]`` divides by 1.1, ``(text:1.5)``
sets 1.5, brackets nest, ``\\(`` and friends are literal, and ``BREAK`` starts a
new chunk. A prompt of any length is encoded 75 tokens at a time, each chunk
alone, and the chunks are concatenated, so nothing past CLIP's 77 tokens is
dropped. compel does not read this syntax and sd_embed is not on the package
index, hence this module. It knows CLIP and the tokenizer, nothing of RunPod
or pydantic; the engine calls ``encode_prompts`` under the GPU lock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
# Tokens per chunk between its start and end tokens: CLIP reads 77.
CHUNK_TOKENS = 75
# A1111's comma_padding_backtrack: a chunk that fills up within this many tokens after a comma
# moves the words after the comma to the next chunk, so a phrase is not cut in two.
COMMA_BACKTRACK = 20
BREAK = ("BREAK", -1.0)

# One token of the syntax per match; no nested quantifiers, so matching is linear in the text.
_SYNTAX = re.compile(
    r"""
    \\[()\[\]\\]            # an escaped bracket or backslash: literal
    | \\                    # a lone backslash: literal
    | \(                    # open round
    | \[                    # open square
    | :\s*([+-]?[.\d]+)\s*\)  # ":1.5)" closes round with a weight
    | \)                    # close round
    | ]                     # close square
    | [^\\()\[\]:]+         # plain text
    | :                     # a colon that sets no weight
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


class PromptError(ValueError):
    """A prompt that cannot be encoded as asked; the message names the field and the rule."""


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """``text`` as runs of equal attention weight, as A1111's function of the same name.

    ``BREAK`` comes out as ``("BREAK", -1)``, an empty prompt as ``[("", 1.0)]``, and
    unbalanced brackets are tolerated: an unclosed one weighs from where it opened
    to the end, a stray closing one is text.

        >>> parse_prompt_attention("an (important) word")
        [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    pieces: list[str] = []
    # Weights live in an array so that a bracket multiplies its whole range in one vectorised step:
    # each weight is still multiplied by each bracket's factor in the order the brackets close, as in
    # A1111, but a 2,000-character prompt of nested brackets costs milliseconds, not a quadratic loop.
    weights = np.ones(len(text) + 2, dtype=np.float64)
    breaks: list[int] = []
    round_opened: list[int] = []
    square_opened: list[int] = []
    for match in _SYNTAX.finditer(text):
        token, weight = match.group(0), _number(match.group(1))
        if token.startswith("\\"):
            pieces.append(token[1:])  # a lone backslash gives nothing, as in A1111
        elif token == "(":
            round_opened.append(len(pieces))
        elif token == "[":
            square_opened.append(len(pieces))
        elif weight is not None and round_opened:
            weights[round_opened.pop() : len(pieces)] *= weight
        elif token == ")" and round_opened:
            weights[round_opened.pop() : len(pieces)] *= ROUND_MULTIPLIER
        elif token == "]" and square_opened:
            weights[square_opened.pop() : len(pieces)] *= SQUARE_MULTIPLIER
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index > 0:
                    breaks.append(len(pieces))
                    pieces.append(BREAK[0])
                pieces.append(part)
    for start in reversed(round_opened):
        weights[start : len(pieces)] *= ROUND_MULTIPLIER
    for start in reversed(square_opened):
        weights[start : len(pieces)] *= SQUARE_MULTIPLIER
    # A BREAK inside brackets still breaks (A1111 would weigh it and read it as the word "BREAK").
    weights[breaks] = BREAK[1]
    runs = _merged(pieces, weights)
    return runs or [("", 1.0)]


def _number(text: str | None) -> float | None:
    """A weight such as "1.5"; None for no weight, or for dots and digits that make no number ("1.2.3")."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _merged(pieces: list[str], weights: np.ndarray) -> list[tuple[str, float]]:
    """Neighbours of equal weight joined, as A1111 does; BREAK marks stay apart from text."""
    runs: list[tuple[str, float]] = []
    for piece, weight in zip(pieces, weights.tolist(), strict=False):
        if piece == BREAK[0] and weight == BREAK[1]:
            runs.append(BREAK)
        elif runs and runs[-1][1] == weight and runs[-1] != BREAK:
            runs[-1] = (runs[-1][0] + piece, weight)
        else:
            runs.append((piece, weight))
    return runs


@dataclass(frozen=True)
class Chunks:
    """A prompt as CLIP reads it: rows of 77 token ids and their weights."""

    ids: list[list[int]]
    weights: list[list[float]]
    # Tokens of the prompt itself, start, end and padding not counted.
    tokens: int


def to_chunks(text: str, tokenizer: Any) -> Chunks:
    """Tokenize ``text`` and lay its tokens out in chunks of 75, each wrapped in start and end
    tokens and padded to 77, with each token's weight.

    The layout inside a chunk is diffusers': start, the tokens, end, then padding (SD 1.5's
    padding token is its end token, so this is A1111's layout too). BREAK closes a chunk early.
    """
    runs = parse_prompt_attention(text)
    texts = [piece for piece, weight in runs if (piece, weight) != BREAK]
    tokenized = tokenizer(texts, truncation=False, add_special_tokens=False, verbose=False).input_ids if texts else []
    encoded = iter(tokenized)
    comma = tokenizer.convert_tokens_to_ids(",</w>") if ",</w>" in tokenizer.get_vocab() else None
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1
    total = 0

    def close() -> None:
        nonlocal ids, weights, last_comma
        chunks.append((ids, weights))
        ids, weights, last_comma = [], [], -1

    for piece, weight in runs:
        if (piece, weight) == BREAK:
            close()
            continue
        for token in next(encoded):
            total += 1
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK_TOKENS and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                # The chunk is full: the words after its last comma go on to the next one.
                split = last_comma + 1
                carried_ids, carried_weights = ids[split:], weights[split:]
                ids, weights = ids[:split], weights[:split]
                close()
                ids, weights = carried_ids, carried_weights
            if len(ids) == CHUNK_TOKENS:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    rows = [[start, *chunk_ids, end, *[pad] * (CHUNK_TOKENS - len(chunk_ids))] for chunk_ids, _ in chunks]
    row_weights = [
        [1.0, *chunk_weights, *[1.0] * (CHUNK_TOKENS + 1 - len(chunk_weights))] for _, chunk_weights in chunks
    ]
    return Chunks(ids=rows, weights=row_weights, tokens=total)


def empty_chunk(tokenizer: Any) -> tuple[list[int], list[float]]:
    """The chunk of an empty prompt: what a shorter prompt is padded with."""
    padded = to_chunks("", tokenizer)
    return padded.ids[0], padded.weights[0]


@dataclass(frozen=True)
class Encoded:
    """Both prompts' embeddings, the same number of chunks long, and what each held."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    # {"prompt": {"tokens": n, "chunks": c}, "negative_prompt": {...}}
    counts: dict[str, dict[str, int]]


def encode_prompts(
    prompt: str,
    negative_prompt: str,
    *,
    tokenizer: Any,
    text_encoder: Any,
    device: torch.device,
    clip_skip: int = 1,
    max_chunks: int = 8,
) -> Encoded:
    """Encode a prompt and its negative as A1111 does.

    1. Parse and tokenize each into chunks of 75 tokens with their weights.
    2. Pad the shorter with empty chunks, so both have the same length.
    3. Encode each chunk alone, from the layer ``clip_skip`` counts back from the last.
    4. Weight each token's vector, then restore each chunk's mean.
    5. Concatenate the chunks.

    Raises:
        PromptError: a prompt needs more than ``max_chunks`` chunks, or the text encoder has
            fewer layers than ``clip_skip`` asks to skip.
    """
    layers = int(text_encoder.config.num_hidden_layers)
    if clip_skip > layers:
        raise PromptError(f"clip_skip={clip_skip}: this model's text encoder has {layers} layers; use 1 to {layers}")
    # 1. Chunks.
    chunked = {"prompt": to_chunks(prompt, tokenizer), "negative_prompt": to_chunks(negative_prompt, tokenizer)}
    for field, chunks in chunked.items():
        if len(chunks.ids) > max_chunks:
            raise PromptError(
                f"{field}: {chunks.tokens} tokens make {len(chunks.ids)} chunks of {CHUNK_TOKENS}; "
                f"at most {max_chunks} (MAX_PROMPT_CHUNKS)"
            )
    # 2. The same length.
    length = max(len(chunks.ids) for chunks in chunked.values())
    padding_ids, padding_weights = empty_chunk(tokenizer)
    embeds = {}
    for field, chunks in chunked.items():
        missing = length - len(chunks.ids)
        ids = chunks.ids + [padding_ids] * missing
        weights = chunks.weights + [padding_weights] * missing
        # 3-5. Encode, weight, concatenate.
        embeds[field] = torch.cat(
            [
                _encode_chunk(row, row_weights, text_encoder, device, clip_skip)
                for row, row_weights in zip(ids, weights, strict=True)
            ],
            dim=1,
        )
    counts = {field: {"tokens": chunks.tokens, "chunks": len(chunks.ids)} for field, chunks in chunked.items()}
    return Encoded(embeds["prompt"], embeds["negative_prompt"], counts)


def _encode_chunk(
    ids: list[int], weights: list[float], text_encoder: Any, device: torch.device, clip_skip: int
) -> torch.Tensor:
    tokens = torch.tensor([ids], device=device)
    if clip_skip == 1:
        hidden = text_encoder(tokens)[0]
    else:
        # A1111's clip skip N is diffusers' clip_skip N - 1: the output of the N-th layer from the end,
        # through the final layer norm.
        states = text_encoder(tokens, output_hidden_states=True).hidden_states[-clip_skip]
        # transformers 5 keeps the layer norm on CLIPTextModel itself, 4 on its text_model.
        hidden = getattr(text_encoder, "text_model", text_encoder).final_layer_norm(states)
    if all(weight == 1.0 for weight in weights):
        return hidden  # unweighted: exactly what diffusers' own encode_prompt gives
    multipliers = torch.tensor(weights, device=hidden.device, dtype=hidden.dtype).reshape(1, -1, 1)
    mean = hidden.mean()
    weighted = hidden * multipliers
    return weighted * (mean / weighted.mean())
