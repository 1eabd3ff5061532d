"""Automatic1111's emphasis syntax, read the way A1111 reads it.

    (text)      text's weight x 1.1; nested, ((text)) x 1.21
    [text]      text's weight / 1.1
    (text:1.4)  text's weight x 1.4 (a weight of 1.0 is no weight at all)
    \\( \\) \\[ \\] \\\\  the character itself; any other backslash is dropped
    BREAK       (upper case, a word of its own) ends the current 75-token chunk

Where this comes from: the A1111 wiki, "Features: Attention/emphasis" and "Infinite prompt length" (BREAK), and
the behaviour of `parse_prompt_attention` in A1111's modules/prompt_parser.py (its docstring examples are this
module's test table). Written here because no maintained library reads this syntax: compel 2.5.1's parser reads
`(cat:1.2)` as the text "cat:1 . 2" at weight 1, `((x))` at weight 1 and `[x]` literally, and has no BREAK.

Malformed input is never an error, as in A1111: an unclosed `(` or `[` weighs the text up to the end, a `)` or `]`
with nothing to close is text, and a weight that is not a number (`(cat:abc)`) is text inside a plain `( )`.
Two deliberate differences from A1111, where it would fail or misread:
- a weight made of digits and dots that is still no finite number (`(cat:1.2.3)`, 400 digits) is read as text
  like `(cat:abc)`; A1111 stops with a ValueError, or multiplies by infinity;
- BREAK inside brackets is still a BREAK; A1111 would multiply its marker and then feed the word "BREAK" to
  CLIP with a negative weight.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

ROUND = 1.1  # (text)
SQUARE = 1 / 1.1  # [text]

# One lexical token of the syntax; the alternatives are A1111's, in its order of precedence. Group 1 is the number
# of a `:weight)` closing a round bracket (A1111 allows spaces around it since version 1.7).
_TOKEN = re.compile(
    r"""
      \\[()\[\]\\]                 # an escaped bracket or backslash
    | \\                           # a lone backslash (dropped)
    | \( | \[
    | :\s*([+-]?[.\d]+)\s*\)       # :1.2) closes a round bracket with that weight
    | \) | \]
    | [^\\()\[\]:]+                # text
    | :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


@dataclass(frozen=True)
class Span:
    text: str
    weight: float


def _number(text: str) -> float | None:
    """The weight `text` stands for, or None where it is no finite number ("1.2.3", "." or 400 digits)."""
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def parse(prompt: str) -> list[list[Span]]:
    """The prompt as BREAK-separated segments, each a list of spans of text with their weight. Adjacent spans of
    the same weight are merged (so each is tokenised as one text) and empty spans are left out."""
    texts: list[str] = []
    segment_of: list[int] = []  # which BREAK-separated segment each text belongs to
    # (first text, end, multiplier): a bracket weighs the texts from its opening to its closing, in closing order.
    events: list[tuple[int, int, float]] = []
    round_open: list[int] = []
    square_open: list[int] = []
    segment = 0

    def add(text: str) -> None:
        texts.append(text)
        segment_of.append(segment)

    def close(brackets: list[int], multiplier: float) -> None:
        events.append((brackets.pop(), len(texts), multiplier))

    for match in _TOKEN.finditer(prompt):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            add(token[1:])
        elif token == "(":
            round_open.append(len(texts))
        elif token == "[":
            square_open.append(len(texts))
        elif weight is not None and round_open:
            number = _number(weight)
            if number is None:  # `:1.2.3)`: the colon part is text and the `)` closes the bracket plainly
                add(token[: token.rindex(")")])
            close(round_open, ROUND if number is None else number)
        elif token == ")" and round_open:
            close(round_open, ROUND)
        elif token == "]" and square_open:
            close(square_open, SQUARE)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index:
                    segment += 1
                add(part)
    # Brackets left open weigh everything after them: round ones first, each from the outermost, as A1111 does.
    events += [(start, len(texts), ROUND) for start in round_open]
    events += [(start, len(texts), SQUARE) for start in square_open]

    # Applied one bracket after another, as A1111 does, so the floats are its own to the last bit; numpy keeps
    # thousands of brackets over thousands of texts cheap.
    weights = np.ones(len(texts))
    with np.errstate(over="ignore", under="ignore"):  # a product past float's range is infinite, then refused
        for start, end, multiplier in events:
            weights[start:end] *= multiplier

    segments: list[list[Span]] = [[] for _ in range(segment + 1)]
    previous: tuple[int, float] | None = None
    for text, weight, where in zip(texts, weights.tolist(), segment_of):
        if previous == (where, weight):
            segments[where][-1] = Span(segments[where][-1].text + text, weight)
        else:
            segments[where].append(Span(text, weight))
        previous = (where, weight)
    return [[span for span in spans if span.text] for spans in segments]


def is_plain(prompt: str) -> bool:
    """Whether A1111 would read `prompt` as itself: one segment, all of the text, every weight 1. (Such a prompt
    is given to the pipeline as text, exactly as before this syntax was read.)"""
    segments = parse(prompt)
    return (
        len(segments) == 1
        and "".join(span.text for span in segments[0]) == prompt
        and all(span.weight == 1.0 for span in segments[0])
    )
