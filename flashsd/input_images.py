"""Images sent as inputs: `image` (what image-to-image and inpainting start from) and `mask` (white: repaint,
black: keep). Decoded once, turned upright by their EXIF orientation, converted to RGB (the image) or one
channel (the mask), and fitted to the output size. Every problem a person can fix is an InputError.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

# Largest input accepted (pixels). Outputs are at most 2048 px a side, so anything larger is only decoded to be
# shrunk; 100 MP covers every phone and camera photo. Pillow itself refuses files above 2 x 89.5 MP.
MAX_INPUT_PIXELS = 100_000_000
# JPEGs are decoded at 1/2, 1/4 or 1/8 scale (libjpeg's draft mode) when both sides stay at least this large:
# the largest output side, so no output ever loses detail to it.
DRAFT_MIN_SIDE = 2048
MASK_THRESHOLD = 128  # mask pixels at or above it are repainted (as diffusers binarises at 0.5)
TRANSPARENT_IMAGE_BACKGROUND = (255, 255, 255)  # transparent pixels of `image` are flattened onto white
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
FORMATS_HINT = "PNG, JPEG, WebP, GIF, BMP or TIFF"


def _decode(source, name: str) -> Image.Image:
    """The first frame of `source` (a path or a PIL image), fully decoded and turned upright."""
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            path = Path(os.fspath(source))
        except TypeError:
            raise InputError(f"{name} must be an image file (a URL or an upload), got {source!r}.") from None
        try:
            image = Image.open(path)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            raise InputError(f"{name} could not be read ({e.strerror or e}): send a {FORMATS_HINT} file.") from e
        except Image.DecompressionBombError as e:
            raise InputError(
                f"{name} is too large ({e}); send an image of at most {MAX_INPUT_PIXELS // 1_000_000} megapixels."
            ) from e
        except UnidentifiedImageError as e:
            size = path.stat().st_size if path.is_file() else 0
            what = "an empty file" if size == 0 else f"a {size}-byte file that is not an image Pillow can read"
            raise InputError(f"{name} is not an image: it is {what}. Send a {FORMATS_HINT} file.") from e
        except OSError as e:
            raise InputError(f"{name} could not be read ({e}): send a {FORMATS_HINT} file.") from e
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError(f"{name} has no pixels ({width}x{height}).")
    if width * height > MAX_INPUT_PIXELS:
        raise InputError(
            f"{name} is {width}x{height} ({width * height / 1e6:.0f} megapixels): the limit is "
            f"{MAX_INPUT_PIXELS // 1_000_000} megapixels. Send a smaller image; it is resized to about the model's "
            "native size anyway."
        )
    try:
        if image.format == "JPEG":
            image.draft(None, (DRAFT_MIN_SIDE, DRAFT_MIN_SIDE))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()  # decode now: a truncated or corrupt file fails here, not inside the pipeline
        upright = ImageOps.exif_transpose(image)
    except MemoryError:
        raise
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, EOFError, struct.error, ...
        raise InputError(
            f"{name} could not be decoded ({type(e).__name__}: {e}); the file is damaged or truncated. "
            f"Send a complete {FORMATS_HINT} file."
        ) from e
    finally:
        if image is not source:
            image.close()
    return upright


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """16-bit grayscale (PNG / TIFF) to 8-bit, keeping the full range (Pillow's convert would clip it)."""
    values = np.asarray(image, dtype=np.int64)
    return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), mode="L")


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _flattened(source, name: str, background: tuple[int, int, int], mode: str) -> Image.Image:
    """`source` decoded, upright, 8-bit, with any transparency composited onto `background`, in `mode`."""
    image = _decode(source, name)
    if image.mode in SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_l(image)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba)
    return image.convert(mode)


def load_image(source, name: str = "image") -> Image.Image:
    """An RGB image, upright. Grayscale, palette and CMYK are converted; transparency is flattened onto white."""
    return _flattened(source, name, TRANSPARENT_IMAGE_BACKGROUND, "RGB")


def load_mask(source, name: str = "mask") -> Image.Image:
    """A one-channel ("L") mask, upright: colours count by their luminance, transparent pixels as black (keep)."""
    return _flattened(source, name, (0, 0, 0), "L")


def fit_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` scaled to cover `size` and centre-cropped to it (no stretching): what a different aspect ratio cuts
    off is shared equally by both sides."""
    if image.size == size:
        return image
    return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def fit_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The mask, cropped exactly as fit_image crops the image, then made pure black and white: what the pipeline
    repaints and what flashsd pastes back from the input are the same pixels."""
    if mask.size != size:
        mask = ImageOps.fit(mask, size, method=Image.Resampling.BILINEAR, centering=(0.5, 0.5))
    return mask.point(lambda v: 255 if v >= MASK_THRESHOLD else 0)


def repainted_fraction(mask: Image.Image) -> float:
    return float(np.count_nonzero(np.asarray(mask))) / (mask.width * mask.height)
