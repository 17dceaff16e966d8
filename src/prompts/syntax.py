"""A1111's prompt syntax, read as text: attention weights, BREAK, and prompt editing.

``(text)`` multiplies attention by 1.1, ``[text]`` divides by 1.1, ``(text:1.5)`` sets 1.5,
brackets nest, ``\\(`` and friends are literal, ``BREAK`` starts a new chunk, and prompt
editing (``[from:to:when]``, ``[a|b]``) switches the text from step to step. ``plan_texts``
reads both prompts of a job into the texts each pass runs, on the CPU before the GPU lock,
so that a prompt that cannot run is refused before any work. Pure Python: no tokenizer, no
torch; ``encoding`` turns the texts into CLIP embeddings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from src.errors import clipped

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
# Tokens per chunk between its start and end tokens: CLIP reads 77.
CHUNK_TOKENS = 75
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
# A1111's composable diffusion: "a cat AND a dog :0.8" is two prompts guided at once.
_AND = re.compile(r"\bAND\b")


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


# --- prompt editing: [from:to:when] and [a|b] ------------------------------------------------------

# Square brackets may nest this deep; a prompt that nests deeper is refused before any work. (A1111 sets no
# limit; editing is read recursively, and 500 levels would exhaust Python's stack.)
MAX_BRACKET_DEPTH = 32


@dataclass(frozen=True)
class _Scheduled:
    """``[before:after:when]``: ``before`` up to step ``when``, ``after`` from the next one."""

    before: list[Any]
    after: list[Any]
    when: str  # as written: with a dot, a fraction of the steps; without, a step number


@dataclass(frozen=True)
class _Alternate:
    """``[a|b|c]``: a on step 1, b on step 2, c on step 3, a on step 4, ..."""

    options: list[list[Any]]


@dataclass(frozen=True)
class _Group:
    """``[text]`` that is attention, not editing: kept with its brackets for the attention parser."""

    inside: list[Any]


# A1111's grammar's NUMBER (lark's SIGNED_NUMBER): a sign, a decimal, an exponent.
_NUMBER = re.compile(r"\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*")


def check_nesting(text: str, name: str) -> None:
    """Refuse ``text`` when its square brackets nest deeper than ``MAX_BRACKET_DEPTH``.

    An unclosed bracket counts as open to the end of the text. Reads the text once, without recursion.

    Raises:
        PromptError: too deep; the message names the field ``name``.
    """
    depth = deepest = position = 0
    while position < len(text):
        char = text[position]
        if char == "\\":
            position += 2
            continue
        if char == "[":
            depth += 1
            deepest = max(deepest, depth)
        elif char == "]" and depth:
            depth -= 1
        position += 1
    if deepest > MAX_BRACKET_DEPTH:
        raise PromptError(
            f"{name}: square brackets nest {deepest} deep (an unclosed one counts to the end); "
            f"at most {MAX_BRACKET_DEPTH}"
        )


def prompt_schedule(text: str, steps: int, *, after: int | None = None) -> list[tuple[int, str]]:
    """The prompt as A1111's prompt editing makes it at each of ``steps`` steps: ``(last step, text)``
    pairs, in order, each text differing from the one before. Without editing: ``[(steps, text)]``.

    ``after`` is for the hires pass: the first pass's steps. As in A1111 1.6 and later, a ``when``
    without a dot then counts on from them (``[cat:dog:15]`` after 20 steps is "dog" throughout) and
    a fraction counts from 1.0 (``1.5`` is half of the hires steps).

        >>> prompt_schedule("a [cat:dog:0.5]", 4)
        [(2, 'a cat'), (4, 'a dog')]

    The text must have passed ``check_nesting``.
    """
    if "[" not in text:
        return [(steps, text)]
    nodes = _editing_nodes(text)
    if not _a1111_parses(nodes):
        return [(steps, text)]
    schedule: list[tuple[int, str]] = []
    for step in range(1, steps + 1):
        rendered = _render(nodes, step, steps, after)
        if schedule and schedule[-1][1] == rendered:
            schedule[-1] = (step, rendered)
        else:
            schedule.append((step, rendered))
    return schedule


def _editing_nodes(text: str) -> list[Any]:
    """``text`` as text, editing groups and attention groups; escapes and round brackets stay text."""
    nodes: list[Any] = []
    plain: list[str] = []
    position = 0
    while position < len(text):
        char = text[position]
        if char == "\\":
            plain.append(text[position : position + 2])
            position += 2
            continue
        end = _closing_bracket(text, position) if char == "[" else -1
        if end == -1:
            plain.append(char)
            position += 1
            continue
        nodes.append("".join(plain))
        plain = []
        nodes.append(_group(text[position + 1 : end]))
        position = end + 1
    nodes.append("".join(plain))
    return nodes


def _a1111_parses(nodes: list[Any], strict: bool = False) -> bool:
    """Whether A1111's prompt grammar parses the text ``nodes`` make. Where it does not, A1111 edits nothing (its
    get_schedule falls back to the whole text at every step): a ``|`` outside an alternation, a backslash that
    escapes nothing (one that ends the text, or one before a line break). Out of an alternation the grammar lets
    stray brackets and colons be text; in an alternation's option (``strict``) its own text must be a prompt:
    round brackets paired, a ``:`` only inside them, one a pair at most."""
    skeleton = "".join(re.sub(r"\\.", "", node) if isinstance(node, str) else "\0" for node in nodes)
    if "\\" in skeleton or "|" in skeleton or (strict and not _is_prompt(skeleton)):
        return False
    for node in nodes:
        if isinstance(node, _Group):
            parts = [node.inside]
        elif isinstance(node, _Alternate):
            if not all(_a1111_parses(option, strict=True) for option in node.options):
                return False
            parts = []
        elif isinstance(node, _Scheduled):
            parts = [node.before, node.after]
        else:
            parts = []
        if not all(_a1111_parses(part, strict) for part in parts):
            return False
    return True


def _is_prompt(skeleton: str) -> bool:
    """Whether ``skeleton`` (a text without escapes, its bracketed parts as ``\\0``) is A1111's ``prompt``: its
    round brackets paired, a ``:`` only inside a pair and one a pair at most, no stray square bracket."""
    colons = [0]
    for char in skeleton:
        if char in "[]":
            return False
        if char == "(":
            colons.append(0)
        elif char == ")":
            if len(colons) == 1:
                return False
            colons.pop()
        elif char == ":":
            colons[-1] += 1
            if len(colons) == 1 or colons[-1] > 1:
                return False
    return len(colons) == 1


def _closing_bracket(text: str, start: int) -> int:
    """Where the ``[`` at ``start`` closes, or -1 when it does not."""
    depth = 0
    position = start
    while position < len(text):
        char = text[position]
        if char == "\\":
            position += 2
            continue
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth == 0:
                return position
        position += 1
    return -1


def _group(inside: str) -> Any:
    """What ``[inside]`` is: alternation, a scheduled switch, or attention."""
    options = _split_top(inside, "|")
    if len(options) > 1:
        return _Alternate([_editing_nodes(option) for option in options])
    parts = _split_top(inside, ":")
    if len(parts) in (2, 3) and _NUMBER.fullmatch(parts[-1]):
        before = parts[0] if len(parts) == 3 else ""
        after = parts[1] if len(parts) == 3 else parts[0]
        return _Scheduled(_editing_nodes(before), _editing_nodes(after), parts[-1].strip())
    return _Group(_editing_nodes(inside))


def _split_top(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` outside any bracket and escape."""
    parts, depth, start, position = [], 0, 0, 0
    while position < len(text):
        char = text[position]
        if char == "\\":
            position += 2
            continue
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        elif char == separator and depth == 0:
            parts.append(text[start:position])
            start = position + 1
        position += 1
    parts.append(text[start:])
    return parts


def _render(nodes: list[Any], step: int, steps: int, after: int | None) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Group):
            out.append("[" + _render(node.inside, step, steps, after) + "]")
        elif isinstance(node, _Alternate):
            out.append(_render(node.options[(step - 1) % len(node.options)], step, steps, after))
        else:
            out.append(
                _render(
                    node.before if step <= _switch_step(node.when, steps, after) else node.after, step, steps, after
                )
            )
    return "".join(out)


def _switch_step(when: str, steps: int, after: int | None) -> int:
    """The last step of ``before`` for a ``when`` as written: A1111's get_learned_conditioning_prompt_schedules.

    In the hires pass (``after`` set) a step number counts on from the first pass's ``after`` steps and a
    fraction from 1.0; the result may be 0 or below, which means ``after`` from the first step.
    """
    value = float(when)
    if "." in when:
        value = (value - (1.0 if after is not None else 0.0)) * steps
    elif after is not None:
        value -= after
    # An exponent may make it infinite (1e400): below 0 and past the steps, every value acts alike.
    return int(max(-1.0, min(float(steps), value)))


@dataclass(frozen=True)
class Span:
    """The steps one pass's prompt editing counts over, as A1111 counts them: its model calls, twice the steps
    for a second-order sampler (Heun, DPM2).

    ``steps``: the pass's steps (for img2img, inpaint and outpaint, ``num_inference_steps``, of which the
    pass runs the last part). ``after``: for the hires pass, the first pass's (its model calls).
    """

    steps: int
    after: int | None = None


@dataclass(frozen=True)
class TextPlan:
    """The texts prompt editing makes of a job's two prompts, before anything is encoded:
    for each pass, ``(last step, prompt, negative prompt)`` in order."""

    passes: list[list[tuple[int, str, str]]]

    def texts(self) -> dict[str, str]:
        """Each distinct text once, in order of first use, with the field it first came from."""
        named: dict[str, str] = {}
        for run in self.passes:
            for _, positive, negative in run:
                named.setdefault(positive, "prompt")
                named.setdefault(negative, "negative_prompt")
        return named


def plan_texts(passes: list[tuple[str, str, Span]], *, max_texts: int) -> TextPlan:
    """Read the prompts' editing syntax for each pass, ``(prompt, negative prompt, the steps it counts over)``
    (a hires pass may have prompts of its own): on the CPU, before the job waits for the GPU, so that a
    prompt that cannot run is refused before any work.

    Raises:
        PromptError: brackets nest deeper than ``MAX_BRACKET_DEPTH``, a prompt uses ``AND``, or editing makes more
            than ``max_texts`` distinct texts; the message names the field.
    """
    for index, (prompt, negative_prompt, _) in enumerate(passes):
        prefix = "hires." if index else ""
        check_nesting(prompt, f"{prefix}prompt")
        check_nesting(negative_prompt, f"{prefix}negative_prompt")
        if _AND.search(prompt):  # A1111 splits a prompt at AND, not a negative prompt
            raise PromptError(
                f"{prefix}prompt={clipped(prompt)!r}: AND (A1111's composable diffusion, several prompts guided at "
                "once) is not supported; join the parts into one prompt, or write the word in lower case"
            )
    runs = []
    for prompt, negative_prompt, span in passes:
        positive = prompt_schedule(prompt, span.steps, after=span.after)
        negative = prompt_schedule(negative_prompt, span.steps, after=span.after)
        runs.append(_joint(positive, negative))
    plan = TextPlan(runs)
    texts = plan.texts()
    if len(texts) > max_texts:
        edited = [
            name
            for name, index in (("prompt", 1), ("negative_prompt", 2))
            if len({row[index] for run in runs for row in run}) > 1
        ]
        raise PromptError(
            f"{' and '.join(edited)}: prompt editing makes {len(texts)} distinct texts in this job "
            f"(prompt and negative prompt, every pass); at most {max_texts} (MAX_PROMPT_TEXTS)"
        )
    return plan


def _joint(positive: list[tuple[int, str]], negative: list[tuple[int, str]]) -> list[tuple[int, str, str]]:
    """Two schedules over the same steps, as one: ``(last step, prompt, negative prompt)``."""
    boundaries = sorted({last for last, _ in positive} | {last for last, _ in negative})

    def text_at(schedule: list[tuple[int, str]], step: int) -> str:
        return next(text for last, text in schedule if step <= last)

    return [(last, text_at(positive, last), text_at(negative, last)) for last in boundaries]
