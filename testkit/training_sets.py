"""A small training set made on the spot: a zip of drawn images (a style: concentric rings in warm colours), some
captioned by a .txt file of the same name, as users upload them. For `make train-demo`, the benchmark and tests that
need an archive without shipping one.

    python -m testkit.training_sets outputs/demo-images.zip [COUNT] [SIZE]
"""

from __future__ import annotations

import io
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CAPTIONS = ("a lighthouse at dawn", "a bowl of fruit on a table", "a cat on a red chair", "a mountain lake")


def sample_image(index: int, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (250, 240 - 20 * (index % 4), 220))
    draw = ImageDraw.Draw(image)
    for ring in range(8, 0, -1):
        radius = size * ring // 16
        centre = (size // 2 + (index * 37) % (size // 4), size // 2 - (index * 23) % (size // 4))
        colour = (200 + 6 * ring, 40 + 20 * ((ring + index) % 6), 30 + 10 * ring)
        draw.ellipse([centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius], fill=colour)
    return image


def write_sample_archive(path: Path, count: int = 4, size: int = 320) -> Path:
    """A zip of `count` PNG images `size` px square under `images/`; the even ones captioned."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(count):
            buffer = io.BytesIO()
            sample_image(i, size).save(buffer, "PNG")
            archive.writestr(f"images/{i:02d}.png", buffer.getvalue())
            if i % 2 == 0:
                archive.writestr(f"images/{i:02d}.txt", CAPTIONS[i % len(CAPTIONS)])
    return path


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(write_sample_archive(Path(sys.argv[1]), *map(int, sys.argv[2:4])))


def png(size=(96, 80), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(size=(80, 96), seed=1) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png(size, seed))).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def make_zip(path: Path, files: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def make_tar(path: Path, files: dict[str, bytes], mode="w:gz") -> Path:
    with tarfile.open(path, mode) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path
