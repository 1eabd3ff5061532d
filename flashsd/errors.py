"""The failures a person can act on, and the cancellation of a call. Anything else is a bug and keeps its traceback.
What any message or log line may say of a URL or a token: `redact`."""

import re
from urllib.parse import urlsplit

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")


class InputError(ValueError):
    """A request the user can fix: the message says what was wrong and what is allowed."""


class WeightsError(RuntimeError):
    """Weights that are missing, broken or unfit: the message names the file and the fix."""


class DeviceError(RuntimeError):
    """No usable device for the configured runtime (FLASHSD_DEVICE=cuda without a working GPU)."""


class Stopped(Exception):
    """A call (a pipeline call, a LoRA download or load) ended early because no prediction waits for its result
    any more (every one it served was cancelled)."""


class SettingsError(ValueError):
    """A setting of the container (an environment variable) with a value it cannot run with: fails setup."""


def redact(text: str, token: str | None = None) -> str:
    """`text` as messages and logs may say it: each URL without its user info, query and fragment (where download
    keys, signatures and passwords go), and `token` (a Hugging Face token) as `<token>`."""

    def shown(url: re.Match) -> str:
        try:
            parts = urlsplit(url.group())
        except ValueError:  # not parseable (a bad IPv6 host): nothing of it is said
            return "<url>"
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"

    text = _URL.sub(shown, text)
    return text.replace(token, "<token>") if token else text
