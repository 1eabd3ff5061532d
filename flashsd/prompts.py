"""Prompts: what the text encoders read of them.

The text encoders read a fixed number of tokens (CLIP 77, PixArt's T5 120). What they cut off is said in the
logs (which Cog returns with the prediction), never dropped silently.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .request import GenerationRequest

SHOWN_CHARACTERS = 200  # of the cut-off text, in the log line


def _token_limit(pipe, tokenizer) -> tuple[int, str]:
    """How many tokens the pipeline lets this tokenizer produce, and a name for the encoder."""
    if type(tokenizer).__name__.startswith("T5"):
        parameter = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
        limit = parameter.default if parameter is not None and isinstance(parameter.default, int) else tokenizer.model_max_length
        return limit, "T5"
    return tokenizer.model_max_length, "CLIP"


def truncated_prompt_warnings(pipe, model_title: str, request: "GenerationRequest") -> list[str]:
    """One line per prompt and limit, saying how long the prompt is, what is read and what is cut off."""
    texts = [("prompt", request.prompt)]
    if request.guidance_scale > 1 and request.negative_prompt:
        texts.append(("negative_prompt", request.negative_prompt))
    warnings, seen = [], set()
    for attribute in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipe, attribute, None)
        if tokenizer is None:
            continue
        limit, encoder = _token_limit(pipe, tokenizer)
        room = limit - tokenizer.num_special_tokens_to_add()
        for name, text in texts:
            ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
            if len(ids) <= room or (name, encoder, room) in seen:
                continue
            seen.add((name, encoder, room))
            cut = tokenizer.decode(ids[room:], skip_special_tokens=True).strip()
            if len(cut) > SHOWN_CHARACTERS:  # its start and its end, where the last words of a long prompt are
                cut = f"{cut[: SHOWN_CHARACTERS * 2 // 3]} … {cut[-SHOWN_CHARACTERS // 3:]}' ({len(cut)} characters)"
            else:
                cut = f"{cut}'"
            shown = "'" + cut
            warnings.append(
                f"{name} is {len(ids)} tokens long but {model_title}'s {encoder} text encoder reads only the "
                f"first {room} ({limit} with its special tokens): the rest is ignored: {shown}"
            )
    return warnings

