"""Prompts: what the text encoders read of them.

SDXL, SD1.5 and SD3 (its two CLIP encoders; T5 stays off, as the Flash SD3 recipe has it) read prompts as A1111
does: its emphasis syntax (flashsd.prompt_syntax) and any length, in 75-token chunks each encoded on its own with
its own start and end tokens, then concatenated (`PromptEncoder`). A prompt with no syntax and at most 75 tokens
is given to the pipeline as text, exactly as before. PixArt's T5 reads plain text up to its 120 tokens; what it
cuts off is said in the logs (which Cog returns with the prediction), never dropped silently.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import InputError
from .prompt_syntax import Span, is_plain, parse

if TYPE_CHECKING:
    from .models import FlashModel
    from .request import GenerationRequest

log = logging.getLogger("flashsd")

SHOWN_CHARACTERS = 200  # of the cut-off text, in the log line


def _max_sequence_length(pipe) -> int:
    """The T5 tokens the pipeline's call reads by default (PixArt-α's 120, SD3's 256)."""
    return inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default


def _token_limit(pipe, tokenizer) -> tuple[int, str]:
    """How many tokens the pipeline lets this tokenizer produce, and a name for the encoder."""
    if type(tokenizer).__name__.startswith("T5"):
        return _max_sequence_length(pipe), "T5"
    return tokenizer.model_max_length, "CLIP"


def truncated_prompt_warnings(
    pipe, model_title: str, request: GenerationRequest, *, clip_reads_everything: bool = False
) -> list[str]:
    """One line per prompt and limit, saying how long the prompt is, what is read and what is cut off. With
    `clip_reads_everything` (prompts encoded in chunks) the CLIP tokenizers cut nothing and are not looked at."""
    texts = [("prompt", request.prompt)]
    if request.guidance_scale > 1 and request.negative_prompt:
        texts.append(("negative_prompt", request.negative_prompt))
    warnings, seen = [], set()
    for attribute in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipe, attribute, None)
        if tokenizer is None:
            continue
        limit, encoder = _token_limit(pipe, tokenizer)
        if encoder == "CLIP" and clip_reads_everything:
            continue
        room = limit - tokenizer.num_special_tokens_to_add()
        for name, text in texts:
            ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
            if len(ids) <= room or (name, encoder, room) in seen:
                continue
            seen.add((name, encoder, room))
            cut = tokenizer.decode(ids[room:], skip_special_tokens=True).strip()
            if len(cut) > SHOWN_CHARACTERS:  # its start and its end, where the last words of a long prompt are
                cut = f"{cut[: SHOWN_CHARACTERS * 2 // 3]} … {cut[-SHOWN_CHARACTERS // 3 :]}' ({len(cut)} characters)"
            else:
                cut = f"{cut}'"
            shown = "'" + cut
            warnings.append(
                f"{name} is {len(ids)} tokens long but {model_title}'s {encoder} text encoder reads only the "
                f"first {room} ({limit} with its special tokens): the rest is ignored: {shown}"
            )
    return warnings


def prompt_notes(model: FlashModel, request: GenerationRequest) -> list[str]:
    """Log lines for what is sent but not read: a negative prompt with guidance at most 1, where diffusers never
    reads it (API clients and UIs send a default one with every request: a note, not an error), and A1111 syntax
    given to a model that reads plain text only."""
    notes = []
    if request.negative_prompt.strip() and request.guidance_scale <= 1:
        notes.append(
            f"negative_prompt ignored: it has an effect only when guidance_scale is above 1 (it is "
            f"{request.guidance_scale:g}; Flash models are distilled to run without guidance)"
        )
    if model.prompt_encoding is None and not is_plain(request.prompt):
        notes.append(
            f"{model.title} reads the prompt as plain text: A1111 weights, brackets and BREAK are read only by the "
            "CLIP text encoders of SDXL, SD3 and SD1.5"
        )
    return notes


# -- A1111's long prompts and weights on CLIP ----------------------------------------------------------------------

CHUNK_TOKENS = 75  # prompt tokens per chunk; with its start and end tokens a chunk is CLIP's 77
# A1111's "comma_padding_backtrack" setting, default 20: when a chunk is full, the words after its last comma (if
# at most this many tokens back) move to the next chunk, so a phrase is not cut in two.
COMMA_BACKTRACK = 20
COMMA = ",</w>"  # CLIP's vocabulary entry for a comma ending a word, as A1111 looks it up
# Chunks per text-encoder call: a 5,000-character prompt can make hundreds (every BREAK is one), and SDXL's and
# SD3's encoders keep every layer's hidden states; 16 at a time bound that memory to ~100 MB on CLIP-G in fp16.
ENCODE_BATCH = 16


@dataclass(frozen=True)
class Chunks:
    """A prompt for one CLIP tokenizer: CLIP-sized rows of ids (start, up to 75 tokens, end, padding) and a weight
    per id (1 for the special tokens and the padding)."""

    ids: list[list[int]]
    weights: list[list[float]]
    tokens: int  # the prompt's own tokens, all chunks together


def chunk_tokens(tokenizer, segments: list[list[Span]]) -> Chunks:
    """A1111's chunking of a parsed prompt (its modules/sd_hijack_clip.py, tokenize_line): 75 tokens a chunk, a
    BREAK ends the current chunk (even an empty one), a phrase after the last comma moves to the next chunk when it
    would be cut (COMMA_BACKTRACK), and an empty prompt is one empty chunk. Each span is tokenised on its own."""
    comma = _comma_id(tokenizer)
    rows: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1
    count = 0

    def close() -> None:
        nonlocal ids, weights, last_comma
        rows.append((ids, weights))
        ids, weights, last_comma = [], [], -1

    for index, spans in enumerate(segments):
        if index:
            close()
        texts = [span.text for span in spans]
        tokenized = (
            tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids if texts else []
        )
        for span, tokens in zip(spans, tokenized):
            count += len(tokens)
            for token in tokens:
                if token == comma:
                    last_comma = len(ids)
                elif len(ids) == CHUNK_TOKENS and last_comma != -1 and CHUNK_TOKENS - last_comma <= COMMA_BACKTRACK:
                    carried = ids[last_comma + 1 :], weights[last_comma + 1 :]
                    ids, weights = ids[: last_comma + 1], weights[: last_comma + 1]
                    close()
                    ids, weights = carried
                if len(ids) == CHUNK_TOKENS:
                    close()
                ids.append(token)
                weights.append(span.weight)
    if ids or not rows:
        close()
    padded_weights = [[1.0, *w] + [1.0] * (CHUNK_TOKENS + 1 - len(w)) for _, w in rows]
    return Chunks([_row(tokenizer, ids) for ids, _ in rows], padded_weights, count)


def _row(tokenizer, ids: list[int]) -> list[int]:
    """What the pipeline's own `tokenizer(text, padding="max_length")` gives for these ids: start, ids, end, then
    the tokenizer's padding (SDXL's and SD3's second tokenizer pad with "!", the others with the end token)."""
    return [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (CHUNK_TOKENS - len(ids))


def _comma_id(tokenizer) -> int | None:
    found = tokenizer.convert_tokens_to_ids(COMMA)
    return None if found == tokenizer.unk_token_id else found  # (CLIP's unknown token is its end token)


@dataclass(frozen=True)
class Encoding:
    """One text through the family's CLIP encoders: (1, 77 x chunks, width) and, where the family has one, the
    pooled embedding of its first chunk (as A1111 takes it)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None
    chunks: int
    tokens: int
    weights: tuple[float, float]  # the smallest and largest weight of the prompt's own tokens
    breaks: int


# How each family's pipeline encodes a prompt (diffusers 0.42's encode_prompt), so a plain prompt's embeddings
# here are the pipeline's own, bit for bit:
#   sd    one CLIP, its last hidden state (final layer norm applied); no pooled embedding
#   sdxl  two CLIPs, each one's penultimate hidden state, side by side; pooled: the second one's projection
#   sd3   the same two, pooled: both projections side by side; then widened with zeros to the transformer's
#         joint width and followed by T5's block, which is zeros without T5 (_get_t5_prompt_embeds)
FAMILIES = ("sd", "sdxl", "sd3")


class PromptEncoder:
    """A1111-style prompt embeddings for one pipeline, keeping the previous prediction's (reused when the same
    text comes again with the same text encoders). What changes the text encoders' weights in place either names
    their state in pipeline_arguments' `weights` (the engine passes the fused style LoRAs) or calls forget()."""

    def __init__(self, pipe, family: str):
        if family not in FAMILIES:
            raise ValueError(f"unknown prompt encoding family {family!r}")
        self.pipe = pipe
        self.family = family
        self._previous: dict[tuple, Encoding] = {}
        self._last_call: tuple[tuple, dict] | None = None  # the previous call's texts and arguments, padded
        self.reused = 0  # encodings taken from the previous prediction, in the last call (for logs and benchmarks)

    def forget(self) -> None:
        self._previous, self._last_call = {}, None

    def _encoders(self) -> list[tuple[object, torch.nn.Module]]:
        pipe = self.pipe
        if self.family == "sd":
            return [(pipe.tokenizer, pipe.text_encoder)]
        return [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]

    def needs_embeddings(self, text: str) -> bool:
        """Whether the pipeline must be given embeddings rather than the text: the text has A1111 syntax or is
        longer than one chunk."""
        if not is_plain(text):
            return True
        return any(
            len(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids) > CHUNK_TOKENS
            for tokenizer, _ in self._encoders()
        )

    def pipeline_arguments(self, prompt: str, negative_prompt: str | None, weights: Hashable = ()) -> dict:
        """The embedding arguments of the pipeline call, or {} when every text used is plain and fits in one chunk
        (then the pipeline reads the text itself). `negative_prompt` is None without guidance; `weights` names the
        text encoders' weights (embeddings made under other weights are not reused)."""
        texts = {"prompt": prompt} | ({} if negative_prompt is None else {"negative_prompt": negative_prompt})
        if not any(self.needs_embeddings(text) for text in texts.values()):
            self._previous, self._last_call, self.reused = {}, None, 0
            return {}
        # A replaced text encoder, or other weights in one, is a new key.
        modules = (tuple(id(module) for _, module in self._encoders()), weights)
        call = (tuple(texts.items()), modules)
        if self._last_call is not None and self._last_call[0] == call:  # the same texts again: nothing to redo
            self.reused = len(texts)
            for name, text in texts.items():
                _log_encoding(name, self._previous[(text, modules)], reused=True)
            return dict(self._last_call[1])
        current: dict[tuple, Encoding] = {}
        encoded: dict[str, Encoding] = {}
        self.reused = 0
        for name, text in texts.items():
            key = (text, modules)
            encoding = current.get(key)
            if encoding is None and key in self._previous:
                encoding = self._previous[key]
                self.reused += 1
            if encoding is None:
                encoding = self._encode(name, text)
            current[key] = encoded[name] = encoding
            _log_encoding(name, encoding, reused=key in self._previous)
        # A shorter text is padded, as A1111 pads it, with chunks of the empty prompt (reused like any text).
        chunks = max(encoding.chunks for encoding in encoded.values())
        if any(encoding.chunks < chunks for encoding in encoded.values()):
            key = ("", modules)
            empty = current.get(key) or self._previous.get(key) or self._encode("negative_prompt", "")
            current[key] = empty
        self._previous = current
        arguments = {}
        for name, encoding in encoded.items():
            embeds = encoding.embeds
            if encoding.chunks < chunks:
                embeds = torch.cat([embeds, empty.embeds.repeat(1, chunks - encoding.chunks, 1)], dim=1)
            prefix = "" if name == "prompt" else "negative_"
            arguments[f"{prefix}prompt_embeds"] = self._finish(embeds)
            if encoding.pooled is not None:
                arguments[f"{prefix}pooled_prompt_embeds"] = encoding.pooled
        self._last_call = (call, arguments)  # (the pipelines never change these tensors in place)
        return dict(arguments)

    def _finish(self, embeds: torch.Tensor) -> torch.Tensor:
        """SD3: CLIP's embeddings widened with zeros to the transformer's joint width, then T5's block (zeros)."""
        if self.family != "sd3":
            return embeds
        width = self.pipe.transformer.config.joint_attention_dim
        t5_tokens = _max_sequence_length(self.pipe)
        widened = torch.nn.functional.pad(embeds, (0, width - embeds.shape[-1]))
        t5 = torch.zeros((1, t5_tokens, width), dtype=self.pipe.text_encoder.dtype, device=embeds.device)
        return torch.cat([widened, t5], dim=-2)

    @torch.no_grad()
    def _encode(self, name: str, text: str) -> Encoding:
        segments = parse(text)
        per_encoder = [chunk_tokens(tokenizer, segments) for tokenizer, _ in self._encoders()]
        chunks = max(len(c.ids) for c in per_encoder)  # equal for the real CLIPs, which share one vocabulary
        hidden, pooled = [], []
        for (tokenizer, encoder), chunked in zip(self._encoders(), per_encoder):
            empty = _row(tokenizer, [])
            ids = torch.tensor(chunked.ids + [empty] * (chunks - len(chunked.ids)), device=encoder.device)
            weights = chunked.weights + [[1.0] * len(empty)] * (chunks - len(chunked.ids))
            states = []
            for start in range(0, chunks, ENCODE_BATCH):
                output = encoder(ids[start : start + ENCODE_BATCH], output_hidden_states=self.family != "sd")
                states.append(output[0] if self.family == "sd" else output.hidden_states[-2])
                if start == 0 and (self.family == "sd3" or encoder is getattr(self.pipe, "text_encoder_2", None)):
                    pooled.append(output[0][:1])  # the projection of the first chunk
            states = torch.cat(states)
            hidden.append(_emphasised(states, torch.tensor(weights, dtype=torch.float64, device=states.device), name))
        embeds = torch.cat(hidden, dim=-1).reshape(1, chunks * hidden[0].shape[1], -1)
        span_weights = [span.weight for spans in segments for span in spans] or [1.0]
        return Encoding(
            embeds=embeds,
            pooled=torch.cat(pooled, dim=-1) if pooled else None,
            chunks=chunks,
            tokens=max(c.tokens for c in per_encoder),
            weights=(min(span_weights), max(span_weights)),
            breaks=len(segments) - 1,
        )


def _emphasised(states: torch.Tensor, weights: torch.Tensor, name: str) -> torch.Tensor:
    """A1111's emphasis ("Original", its default, in its modules/sd_emphasis.py): each chunk's hidden states times
    their tokens' weights, then scaled back to the chunk's original mean (per text encoder). A chunk whose weights are all 1 is returned untouched, so a weight
    of 1.0 is exactly no weight. Computed in float64, where even thousands of nested brackets stay finite."""
    plain = (weights == 1).all(dim=1)
    if bool(plain.all()):
        return states
    wide = states.to(torch.float64)
    weighted = wide * weights[:, :, None]
    weighted = weighted * (wide.mean(dim=(1, 2)) / weighted.mean(dim=(1, 2)))[:, None, None]
    result = torch.where(plain[:, None, None], states, weighted.to(states.dtype))
    if not bool(torch.isfinite(result).all()):
        raise InputError(
            f"{name}'s weights are too extreme for the text encoder (weights from {weights.min().item():g} to "
            f"{weights.max().item():g}; nested brackets multiply): the embeddings they give are beyond what "
            f"{str(states.dtype).removeprefix('torch.')} holds. Use weights of about 0 to 2, as prompts usually do."
        )
    return result


def _log_encoding(name: str, encoding: Encoding, reused: bool) -> None:
    notes = []
    low, high = encoding.weights
    if (low, high) != (1.0, 1.0):
        notes.append(f"weights {low:.3g} to {high:.3g}")
    if encoding.breaks:
        notes.append(f"{encoding.breaks} BREAK")
    if reused:
        notes.append("embeddings of the previous prediction reused")
    log.info(
        "%s: %d tokens in %d chunk(s) of up to %d, each encoded on its own%s",
        name, encoding.tokens, encoding.chunks, CHUNK_TOKENS, "".join(f"; {note}" for note in notes),
    )  # fmt: skip
