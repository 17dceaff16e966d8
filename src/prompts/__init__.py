"""A1111 prompt text -> weights, chunks of 75 tokens, and CLIP embeddings.

AUTOMATIC1111's prompt syntax, read the way A1111 reads it, in our own words (compel does
not read it and sd_embed is not on the package index). Two modules, one per stage:

- ``syntax``: the text alone (attention weights, BREAK, prompt editing) and ``plan_texts``,
  which the job's preparation calls before the GPU lock, so that a prompt that cannot run is
  refused before any work. Pure Python: no torch, no tokenizer.
- ``encoding``: the tokenizer's chunks of 75 and CLIP's embeddings (``encode_schedule``),
  under the GPU lock. torch.

It knows CLIP and the tokenizer, nothing of RunPod or pydantic. May import ``src.errors``,
``src.settings``, ``src.storage``, ``src.schema`` and ``src.models``; nothing later
(adapters, prepare, run, finish).
"""

from typing import TYPE_CHECKING, Any

from src.prompts.syntax import (
    BREAK,
    CHUNK_TOKENS,
    MAX_BRACKET_DEPTH,
    ROUND_MULTIPLIER,
    SQUARE_MULTIPLIER,
    PromptError,
    Span,
    TextPlan,
    check_nesting,
    parse_prompt_attention,
    plan_texts,
    prompt_schedule,
)

if TYPE_CHECKING:
    from src.prompts.encoding import (
        COMMA_BACKTRACK,
        RESCALE_RANGE,
        Chunks,
        Encoded,
        Row,
        Schedule,
        empty_chunk,
        encode_prompts,
        encode_schedule,
        to_chunks,
    )

# The encoding's names load torch: they are imported on first use, so that ``prepare``, which reads the
# syntax only, never imports torch.
_ENCODING = frozenset(
    {
        "COMMA_BACKTRACK",
        "RESCALE_RANGE",
        "Chunks",
        "Encoded",
        "Row",
        "Schedule",
        "empty_chunk",
        "encode_prompts",
        "encode_schedule",
        "to_chunks",
    }
)


def __getattr__(name: str) -> Any:
    if name in _ENCODING:
        from src.prompts import encoding

        return getattr(encoding, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BREAK",
    "CHUNK_TOKENS",
    "COMMA_BACKTRACK",
    "MAX_BRACKET_DEPTH",
    "RESCALE_RANGE",
    "ROUND_MULTIPLIER",
    "SQUARE_MULTIPLIER",
    "Chunks",
    "Encoded",
    "PromptError",
    "Row",
    "Schedule",
    "Span",
    "TextPlan",
    "check_nesting",
    "empty_chunk",
    "encode_prompts",
    "encode_schedule",
    "parse_prompt_attention",
    "plan_texts",
    "prompt_schedule",
    "to_chunks",
]
