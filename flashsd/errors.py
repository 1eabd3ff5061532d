"""The failures a person can act on, and the cancellation of a call. Anything else is a bug and keeps its traceback."""


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
