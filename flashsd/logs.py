"""What the logs say, for a person reading a Replicate prediction's logs.

- One progress line per denoising step in tqdm's format (`75%|███████▌  | 3/4 [00:01<00:00, 2.9it/s]`), ending at
  N/N: Replicate's clients compute `prediction.progress` from such lines with the regex
  `^\\s*(\\d+)%\\s*\\|.+?\\|\\s*(\\d+)/(\\d+)` (replicate-python #152, replicate-javascript #207).
- Library messages known to be harmless in flashsd's recipe are left out, every other warning still shows:
  diffusers' "No LoRA keys associated to CLIPTextModel..." (the Flash LoRA files hold no text-encoder layers)
  and "The config attributes {...} were passed to LCMScheduler, but are not expected" (the base repo's scheduler
  config, read by another scheduler class as the model cards do).
"""

from __future__ import annotations

import inspect
import logging
import re
import time
from collections.abc import Callable, Sequence

from tqdm import tqdm

from .errors import Stopped

log = logging.getLogger("flashsd")

# (logger, message pattern) of what is left out.
# (A denoiser without LoRA keys is no noise: flashsd.adapter makes that an error.)
KNOWN_NOISE = (
    ("diffusers.loaders.lora_base", re.compile(r"^No LoRA keys associated to CLIPText\w* found")),
    ("diffusers.configuration_utils", re.compile(r"were passed to \w*Scheduler, but are not expected")),
)


class _LeaveOut(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def leave_out_known_noise() -> None:
    """Install the filters (once: a second call adds nothing)."""
    for name, pattern in KNOWN_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _LeaveOut) and f.pattern is pattern for f in logger.filters):
            logger.addFilter(_LeaveOut(pattern))


Say = Callable[..., None]  # logging.Logger.log's signature: (level, message, *args)


class StepProgress:
    """Logs a tqdm-format line after each denoising step of one pipeline call, through each of `says` (one per
    prediction sharing the call; default: the flashsd logger), and stops the call when `stop()` says so."""

    def __init__(self, total: int, says: Sequence[Say] = (), stop: Callable[[], bool] | None = None):
        self.total = total
        self.done = 0
        self.started = time.perf_counter()
        self.says = list(says) or [log.log]
        self.stop = stop

    def step(self) -> None:
        self.done += 1
        line = tqdm.format_meter(self.done, self.total, time.perf_counter() - self.started)
        for say in self.says:
            say(logging.INFO, "%s", line)
        if self.stop is not None and self.done < self.total and self.stop():
            raise Stopped(f"stopped after step {self.done} of {self.total}: no prediction waits for these images")

    def pipeline_arguments(self, pipe) -> dict:
        """The call arguments that make `pipe` report each step: diffusers' `callback_on_step_end`, or the older
        `callback` / `callback_steps` (PixArt-α's pipeline)."""
        parameters = inspect.signature(pipe.__call__).parameters
        if "callback_on_step_end" in parameters:
            return {"callback_on_step_end": self._on_step_end}
        if "callback" in parameters:
            return {"callback": self._on_step, "callback_steps": 1}
        return {}

    def _on_step_end(self, pipe, step, timestep, callback_kwargs):
        self.step()
        return callback_kwargs

    def _on_step(self, step, timestep, latents):
        self.step()
