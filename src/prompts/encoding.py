"""Prompt texts -> chunks of 75 tokens with their weights -> CLIP embeddings, as A1111 encodes them.

A prompt of any length is encoded 75 tokens at a time, each chunk alone, and the chunks are
concatenated, so nothing past CLIP's 77 tokens is dropped. Textual-inversion embeddings take
their places in a chunk. ``encode_schedule`` runs under the GPU lock, on the texts that
``syntax.plan_texts`` read before it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from src.prompts.syntax import BREAK, CHUNK_TOKENS, PromptError, TextPlan, parse_prompt_attention

# The tokens CLIP reads of one chunk: its 75, with the start and end tokens around them.
ROW_TOKENS = CHUNK_TOKENS + 2
# A1111's comma_padding_backtrack: a chunk that fills up within this many tokens after a comma
# moves the words after the comma to the next chunk, so a phrase is not cut in two.
COMMA_BACKTRACK = 20
# The mean rescale after weighting is applied when it changes the scale by at most this much.
RESCALE_RANGE = (0.1, 10.0)


@dataclass
class Row:
    """One chunk as CLIP reads it: 77 token ids, their weights, and the embedding vectors to put in."""

    ids: list[int]
    weights: list[float]
    # (position in the row, vectors) of each textual-inversion embedding the chunk holds.
    vectors: list[tuple[int, torch.Tensor]]


@dataclass(frozen=True)
class Chunks:
    """A prompt as CLIP reads it, chunk by chunk."""

    rows: list[Row]
    # Tokens of the prompt itself, start, end and padding not counted; an embedding counts its vectors.
    tokens: int
    # The embeddings it named, in order of first use.
    embeddings: list[str]


class _ChunkBuilder:
    """Lays tokens out in chunks of 75, as A1111 does: a full chunk near a comma carries the words
    after the comma to the next, and an embedding moves to the next chunk whole."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.comma = _vocabulary(tokenizer).comma
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.rows: list[Row] = []
        self.current = Row([], [], [])
        self.last_comma = -1
        self.tokens = 0

    def close(self) -> None:
        """End the current chunk: wrap it in start and end tokens and pad it to 77 (diffusers' layout)."""
        row = self.current
        padding = CHUNK_TOKENS - len(row.ids)
        row.ids = [self.tokenizer.bos_token_id, *row.ids, self.tokenizer.eos_token_id, *[self.pad] * padding]
        row.weights = [1.0, *row.weights, *[1.0] * (padding + 1)]
        self.rows.append(row)
        self.current, self.last_comma = Row([], [], []), -1

    def add_token(self, token: int, weight: float) -> None:
        row = self.current
        if token == self.comma:
            self.last_comma = len(row.ids)
        elif (
            len(row.ids) == CHUNK_TOKENS and self.last_comma != -1 and CHUNK_TOKENS - self.last_comma <= COMMA_BACKTRACK
        ):
            # The chunk is full: the words after its last comma go on to the next one.
            split = self.last_comma + 1
            carried = Row(row.ids[split:], row.weights[split:], [])
            row.ids, row.weights = row.ids[:split], row.weights[:split]
            self.close()
            self.current = carried
        if len(self.current.ids) == CHUNK_TOKENS:
            self.close()
        self.current.ids.append(token)
        self.current.weights.append(weight)
        self.tokens += 1

    def add_embedding(self, vectors: torch.Tensor, weight: float) -> None:
        if len(self.current.ids) + len(vectors) > CHUNK_TOKENS:
            self.close()
        self.current.vectors.append((len(self.current.ids) + 1, vectors))  # + 1: after the start token
        self.current.ids += [self.pad] * len(vectors)
        self.current.weights += [weight] * len(vectors)
        self.tokens += len(vectors)

    def finish(self) -> list[Row]:
        if self.current.ids or not self.rows:
            self.close()
        return self.rows


def to_chunks(text: str, tokenizer: Any, embeddings: Mapping[str, Any] | None = None) -> Chunks:
    """Tokenize ``text`` and lay its tokens out in chunks of 75, each wrapped in start and end
    tokens and padded to 77, with each token's weight.

    The layout inside a chunk is diffusers': start, the tokens, end, then padding (SD 1.5's
    padding token is its end token, so this is A1111's layout too). BREAK closes a chunk early.
    A whole word that is the name of one of ``embeddings`` (objects with ``vectors``) stands for
    its vectors, which take as many places in the chunk.

    Raises:
        PromptError: an embedding has more vectors than a chunk holds.
    """
    runs = parse_prompt_attention(text)
    texts = [piece for piece, weight in runs if (piece, weight) != BREAK]
    tokenized = iter(
        tokenizer(texts, truncation=False, add_special_tokens=False, verbose=False).input_ids if texts else []
    )
    embeddings = embeddings or {}
    names = _name_tokens(tokenizer, embeddings)
    word_ends = _vocabulary(tokenizer).word_ends if names else frozenset()
    builder = _ChunkBuilder(tokenizer)
    used: list[str] = []
    for piece, weight in runs:
        if (piece, weight) == BREAK:
            builder.close()
            continue
        tokens = next(tokenized)
        position = 0
        while position < len(tokens):
            found = _embedding_at(tokens, position, names, word_ends)
            if found is None:
                builder.add_token(tokens[position], weight)
                position += 1
                continue
            name, length = found
            vectors = embeddings[name].vectors
            if len(vectors) > CHUNK_TOKENS:
                raise PromptError(f"the embedding {name!r} has {len(vectors)} vectors; a chunk holds {CHUNK_TOKENS}")
            builder.add_embedding(vectors, weight)
            position += length
            used += [name] if name not in used else []
    return Chunks(rows=builder.finish(), tokens=builder.tokens, embeddings=used)


def _name_tokens(tokenizer: Any, embeddings: Mapping[str, Any]) -> list[tuple[str, list[int]]]:
    """Each embedding's name as tokens, longest first, so that a longer name wins over its prefix."""
    named = [(name, tokenizer(name, add_special_tokens=False, verbose=False).input_ids) for name in embeddings]
    return sorted((item for item in named if item[1]), key=lambda item: -len(item[1]))


@dataclass(frozen=True)
class _Vocabulary:
    """What chunking needs from the tokenizer's vocabulary of 49,408 entries, read once per tokenizer."""

    comma: int | None
    # The tokens that end a word (CLIP's BPE marks them with ``</w>``).
    word_ends: frozenset[int]


# Keyed weakly: a tokenizer that is let go takes its entry with it.
_VOCABULARIES: weakref.WeakKeyDictionary[Any, _Vocabulary] = weakref.WeakKeyDictionary()


def _vocabulary(tokenizer: Any) -> _Vocabulary:
    """The tokenizer's ``_Vocabulary``; the caller holds the GPU lock, so no two threads build it at once."""
    known = _VOCABULARIES.get(tokenizer)
    if known is None:
        vocabulary = tokenizer.get_vocab()
        known = _Vocabulary(
            comma=vocabulary.get(",</w>"),
            word_ends=frozenset(token for text, token in vocabulary.items() if text.endswith("</w>")),
        )
        _VOCABULARIES[tokenizer] = known
    return known


def _embedding_at(
    tokens: list[int], position: int, names: list[tuple[str, list[int]]], word_ends: frozenset[int]
) -> tuple[str, int] | None:
    """The embedding whose name is the whole word at ``position``, and its length in tokens."""
    if not names or (position > 0 and tokens[position - 1] not in word_ends):
        return None
    for name, name_tokens in names:
        if tokens[position : position + len(name_tokens)] == name_tokens and name_tokens[-1] in word_ends:
            return name, len(name_tokens)
    return None


def empty_chunk(tokenizer: Any) -> Row:
    """The chunk of an empty prompt: what a shorter prompt is padded with."""
    return to_chunks("", tokenizer).rows[0]


@dataclass(frozen=True)
class Encoded:
    """Both prompts' embeddings, the same number of chunks long, and what each held."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    # {"prompt": {"tokens": n, "chunks": c}, "negative_prompt": {...}}
    counts: dict[str, dict[str, int]]
    # The textual-inversion embeddings either prompt named.
    embeddings: list[str] = field(default_factory=list)


def encode_prompts(
    prompt: str,
    negative_prompt: str,
    *,
    tokenizer: Any,
    text_encoder: Any,
    device: torch.device,
    clip_skip: int = 1,
    max_chunks: int = 8,
    embeddings: Mapping[str, Any] | None = None,
) -> Encoded:
    """Encode a prompt and its negative as A1111 does, as written (no prompt editing).

    1. Parse and tokenize each into chunks of 75 tokens with their weights.
    2. Pad the shorter with empty chunks, so both have the same length.
    3. Encode each chunk alone, from the layer ``clip_skip`` counts back from the last.
    4. Weight each token's vector, then restore each chunk's mean.
    5. Concatenate the chunks.

    Raises:
        PromptError: a prompt needs more than ``max_chunks`` chunks, or the text encoder has
            fewer layers than ``clip_skip`` asks to skip.
    """
    plan = TextPlan([[(1, prompt, negative_prompt)]])
    encoding = {"tokenizer": tokenizer, "text_encoder": text_encoder, "device": device, "clip_skip": clip_skip}
    return encode_schedule(plan, max_chunks=max_chunks, embeddings=embeddings, **encoding).first


def _chunked(text: str, name: str, tokenizer: Any, embeddings: Mapping[str, Any] | None, max_chunks: int) -> Chunks:
    """``to_chunks``, refused past ``max_chunks``; ``name`` is the field the text came from."""
    chunks = to_chunks(text, tokenizer, embeddings)
    if len(chunks.rows) > max_chunks:
        raise PromptError(
            f"{name}: {chunks.tokens} tokens make {len(chunks.rows)} chunks of {CHUNK_TOKENS}; "
            f"at most {max_chunks} (MAX_PROMPT_CHUNKS)"
        )
    return chunks


def _encode_chunk(row: Row, text_encoder: Any, device: torch.device, clip_skip: int) -> torch.Tensor:
    tokens = torch.tensor([row.ids], device=device)
    with _embeddings_put_in(text_encoder, row.vectors):
        return _weighted(_hidden_states(text_encoder, tokens, clip_skip), row.weights)


@contextlib.contextmanager
def _embeddings_put_in(text_encoder: Any, vectors: list[tuple[int, torch.Tensor]]) -> Iterator[None]:
    """For one call: the token-embedding layer's output holds each embedding's vectors at its place.

    A hook on the shared text encoder, removed as the call ends; the caller holds the GPU lock.
    """
    if not vectors:
        yield
        return

    def put_in(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for position, values in vectors:
            output[0, position : position + len(values)] = values.to(device=output.device, dtype=output.dtype)
        return output

    handle = text_encoder.get_input_embeddings().register_forward_hook(put_in)
    try:
        yield
    finally:
        handle.remove()


def _hidden_states(text_encoder: Any, tokens: torch.Tensor, clip_skip: int) -> torch.Tensor:
    if clip_skip == 1:
        hidden = text_encoder(tokens)[0]
    else:
        # A1111's clip skip N is diffusers' clip_skip N - 1: the output of the N-th layer from the end,
        # through the final layer norm.
        states = text_encoder(tokens, output_hidden_states=True).hidden_states[-clip_skip]
        # transformers 5 keeps the layer norm on CLIPTextModel itself, 4 on its text_model.
        hidden = getattr(text_encoder, "text_model", text_encoder).final_layer_norm(states)
    return hidden


def _weighted(hidden: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Each token's vector times its weight, then the chunk brought back to its mean, as A1111 does."""
    if all(weight == 1.0 for weight in weights):
        return hidden  # unweighted: exactly what diffusers' own encode_prompt gives
    # In float32, then back to the encoder's dtype: in float16 a large weight times a value passes 65504 (inf),
    # and a sum over 77 x 768 values loses the digits that matter.
    multipliers = torch.tensor(weights, device=hidden.device, dtype=torch.float32).reshape(1, -1, 1)
    weighted = hidden.float() * multipliers
    ratio = hidden.float().mean() / weighted.mean()
    # A weighted mean near zero, or of the other sign, would blow the chunk up (A1111 does not guard this);
    # the weights then stand without the rescale.
    if RESCALE_RANGE[0] <= float(ratio) <= RESCALE_RANGE[1]:
        weighted = weighted * ratio
    return weighted.to(hidden.dtype)


@dataclass(frozen=True)
class Schedule:
    """Each pass's prompts over its steps, as prompt editing switches them: ``(last step, Encoded)``
    in order. Every Encoded of a job has the same number of chunks, so they can replace each other.

    ``attended`` gives, for each pass, how many of those tokens (77 a chunk) cross-attention reads of its prompts
    and of its negatives; the rest is masked out. As A1111 encodes a pass's texts of one prompt in one batch, each
    padded with empty chunks to the longest (read), and runs a prompt and a negative of different lengths apart
    (its default): the prompt's longest text and the negative's. With its option ``pad_cond_uncond``, the shorter
    is padded to the longer, and both read the longest of all.
    """

    passes: list[list[tuple[int, Encoded]]]
    attended: list[tuple[int, int]]
    # Whether a pass's prompts and negatives differ in length and the shorter's padding is read (A1111's "Pad conds").
    padded: bool = False

    @property
    def length(self) -> int:
        """The tokens of each of the job's embeddings, read or not."""
        return int(self.first.prompt_embeds.shape[1])

    def masked(self, pass_index: int) -> bool:
        """Whether the pass's cross-attention skips some of the embeddings' tokens."""
        return min(self.attended[pass_index]) < self.length

    @property
    def first(self) -> Encoded:
        return self.passes[0][0][1]

    def at(self, pass_index: int, index: int) -> Encoded:
        """The prompts for the step ``index`` (from 0) of the pass ``pass_index``.

        As A1111's reconstruct_cond_batch, which compares its denoiser's step counter (from 0) with each
        text's last step (from 1): a text ending at step k still serves the step k + 1 (its index k).
        """
        schedule = self.passes[pass_index]
        return next((encoded for last, encoded in schedule if index <= last), schedule[-1][1])

    @property
    def embeddings(self) -> list[str]:
        return list(dict.fromkeys(name for run in self.passes for _, encoded in run for name in encoded.embeddings))


def _not_finite(name: str, chunks: Chunks, dtype: torch.dtype) -> str:
    """Why a text's encoding is not finite: its weights, when one is past what ``dtype`` holds once encoded."""
    largest = max((abs(weight) for row in chunks.rows for weight in row.weights), default=1.0)
    return (
        f"{name}: its weights (the largest {largest:g}) take its text encoding past what {dtype} holds "
        f"(at most {torch.finfo(dtype).max:g}); use smaller weights"
    )


def encode_schedule(
    plan: TextPlan,
    *,
    tokenizer: Any,
    text_encoder: Any,
    device: torch.device,
    clip_skip: int = 1,
    max_chunks: int = 8,
    embeddings: Mapping[str, Any] | None = None,
    on_encoded: Callable[[int, int], None] | None = None,
    pad_conds: bool = False,
) -> Schedule:
    """Encode each distinct text of ``plan`` once, all padded to the same number of chunks; of each pass, what
    cross-attention reads of them (``Schedule.attended``), as A1111 with its option ``pad_cond_uncond`` at
    ``pad_conds``.

    ``on_encoded(done, total)`` is called after each text, so that the caller can stop a job that runs
    past its deadline.

    Raises:
        PromptError: a text needs more than ``max_chunks`` chunks, or the text encoder has fewer layers
            than ``clip_skip`` asks to skip.
    """
    layers = int(text_encoder.config.num_hidden_layers)
    if clip_skip > layers:
        raise PromptError(f"clip_skip={clip_skip}: this model's text encoder has {layers} layers; use 1 to {layers}")
    # 1. Chunks, every text's, before any is encoded: a text too long is refused before the work.
    texts = plan.texts()
    chunked = {text: _chunked(text, name, tokenizer, embeddings, max_chunks) for text, name in texts.items()}
    # 2. The same length for all, so that any can replace any other between steps.
    length = max(len(chunks.rows) for chunks in chunked.values())
    # 3-5. Encode, weight and concatenate each text's chunks.
    embeds: dict[str, torch.Tensor] = {}
    for done, (text, chunks) in enumerate(chunked.items(), start=1):
        rows = chunks.rows + [empty_chunk(tokenizer)] * (length - len(chunks.rows))
        embeds[text] = torch.cat([_encode_chunk(row, text_encoder, device, clip_skip) for row in rows], dim=1)
        if not bool(torch.isfinite(embeds[text]).all()):
            raise PromptError(_not_finite(texts[text], chunks, embeds[text].dtype))
        if on_encoded is not None:
            on_encoded(done, len(chunked))
    pairs: dict[tuple[str, str], Encoded] = {}
    for run in plan.passes:
        for _, positive, negative in run:
            if (positive, negative) not in pairs:
                first, second = chunked[positive], chunked[negative]
                pairs[positive, negative] = Encoded(
                    embeds[positive],
                    embeds[negative],
                    {
                        "prompt": {"tokens": first.tokens, "chunks": len(first.rows)},
                        "negative_prompt": {"tokens": second.tokens, "chunks": len(second.rows)},
                    },
                    list(dict.fromkeys(first.embeddings + second.embeddings)),
                )
    return Schedule(
        [[(last, pairs[positive, negative]) for last, positive, negative in run] for run in plan.passes],
        *_attended(plan, chunked, pad_conds),
    )


def _attended(plan: TextPlan, chunked: Mapping[str, Chunks], pad_conds: bool) -> tuple[list[tuple[int, int]], bool]:
    """``Schedule.attended`` and ``Schedule.padded``: each pass's longest prompt and longest negative, in tokens;
    with ``pad_conds`` both the longer of the two."""
    own = [
        (max(len(chunked[text].rows) for _, text, _ in run), max(len(chunked[text].rows) for _, _, text in run))
        for run in plan.passes
    ]
    attended = [(max(chunks),) * 2 if pad_conds else chunks for chunks in own]
    tokens = [(prompt * ROW_TOKENS, negative * ROW_TOKENS) for prompt, negative in attended]
    return tokens, pad_conds and any(prompt != negative for prompt, negative in own)
