"""The two kinds of failure a person can act on. Anything else is a bug and keeps its traceback."""


class InputError(ValueError):
    """A request the user can fix: the message says what was wrong and what is allowed."""


class WeightsError(RuntimeError):
    """Weights that are missing, broken or unfit: the message names the file and the fix."""


class DeviceError(RuntimeError):
    """No usable device for the configured runtime (FLASHSD_DEVICE=cuda without a working GPU)."""
