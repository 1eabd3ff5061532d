"""Comparing images by their pixels: "within one level" is a max_difference of at most 1 (of 255)."""

import numpy as np


def pixels(image) -> np.ndarray:
    """A PIL image's RGB values as signed integers (so differences do not wrap)."""
    return np.asarray(image.convert("RGB")).astype(np.int16)


def max_difference(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())
