"""Output encoding: time per megapixel and file size for webp, jpg and png, the WebP method × quality
and PNG compress_level grids the defaults in flashsd/images.py were chosen from, and parallel encoding.

    python -m bench.encode            # the grid alone (bench/run.py --sections encode runs it too)
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

from bench.common import medians, ms, table, wall_and_cpu_medians  # noqa: E402

SIZE = 1024
MEGAPIXELS = SIZE * SIZE / 1e6
DEFAULT_QUALITY = 80  # predict.py's output_quality default
WEBP_METHODS = range(0, 7)
QUALITIES = (70, 80, 90)
PNG_LEVELS = range(0, 10)


def photo_like(size: int = SIZE, seed: int = 0) -> Image.Image:
    """A deterministic stand-in for a generated photo: soft-edged shapes of flat colour (objects and
    edges), a 1/f texture (natural images' amplitude spectrum) and a little fine grain. Random noise would
    be the worst case for every encoder and flat colour the best. Calibrated to where photographs sit:
    JPEG q80 ≈ 1.5 bits/pixel at ≈ 34 dB PSNR. Encoding time depends on content (busier images take
    longer), so figures are for this image."""
    rng = np.random.default_rng(seed)
    canvas = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(40, 200, 3)))
    draw = ImageDraw.Draw(canvas)
    for _ in range(60):
        x, y = rng.integers(-size // 4, size, 2)
        w, h = rng.integers(size // 16, size // 2, 2)
        shape = draw.ellipse if rng.random() < 0.6 else draw.rectangle
        shape((int(x), int(y), int(x + w), int(y + h)), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    base = np.asarray(canvas.filter(ImageFilter.GaussianBlur(2.5)), dtype=np.float32)
    fy, fx = np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    texture = np.empty((size, size, 3), np.float32)
    shared = None
    for c in range(3):
        spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f
        spectrum[0, 0] = 0
        field = np.fft.irfft2(spectrum, s=(size, size))
        field /= field.std()
        shared = field if shared is None else shared
        texture[..., c] = 0.8 * shared + 0.2 * field  # mostly luminance, some chroma
    grain = rng.normal(0, 0.8, (size, size, 3))
    pixels = base * (1 + 0.08 * texture) + 6 * texture + grain
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def _save(image: Image.Image, fmt: str, **options) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer


def psnr(image: Image.Image, encoded: io.BytesIO) -> float:
    """Peak signal-to-noise ratio of the decoded file against the original, in dB (inf: lossless)."""
    encoded.seek(0)
    decoded = np.asarray(Image.open(encoded).convert("RGB"), dtype=np.float64)
    mse = float(((decoded - np.asarray(image, dtype=np.float64)) ** 2).mean())
    return round(10 * np.log10(255.0**2 / mse), 2) if mse else float("inf")


def _row(image: Image.Image, timing: tuple[float, float], fmt: str, **options) -> dict:
    encoded = _save(image, fmt, **options)
    megapixels = image.width * image.height / 1e6
    return {
        **options,
        "ms_per_mp": ms(timing[0] / megapixels),
        "cpu_ms_per_mp": ms(timing[1] / megapixels),
        "kib": round(encoded.tell() / 1024, 1),
        "psnr_db": psnr(image, encoded),
    }


def grid(image: Image.Image, repeats: int = 3) -> dict:
    """Time per MP (wall and CPU), size and PSNR for every WebP method × quality and every PNG
    compress_level."""
    webp, png = [], []
    for quality in QUALITIES:
        cases = {m: (lambda m=m: _save(image, "WEBP", quality=quality, method=m)) for m in WEBP_METHODS}
        times = wall_and_cpu_medians(cases, repeats, warmup=0)
        webp += [_row(image, times[m], "WEBP", quality=quality, method=m) for m in WEBP_METHODS]
    cases = {lv: (lambda lv=lv: _save(image, "PNG", compress_level=lv)) for lv in PNG_LEVELS}
    times = wall_and_cpu_medians(cases, repeats, warmup=0)
    png = [_row(image, times[lv], "PNG", compress_level=lv) for lv in PNG_LEVELS]
    return {"webp": webp, "png": png}


def defaults(image: Image.Image, repeats: int = 7) -> dict:
    """The product's own encoder (flashsd.images.encode_image, metadata included) at the default quality,
    per format; and four images encoded at once (encode_images) against one after another."""
    from flashsd import images

    parameters = "a prompt\nSteps: 4, Sampler: LCM, CFG scale: 0, Seed: 1, Size: 1024x1024, Model: Flash SDXL"
    megapixels = image.width * image.height / 1e6
    out: dict = {
        "image": f"{image.width}x{image.height} synthetic photo",
        "quality": DEFAULT_QUALITY,
        "webp_method": images.WEBP_METHOD,
        "png_compress_level": images.PNG_COMPRESS_LEVEL,
        "formats": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cases = {
            fmt: (lambda fmt=fmt: images.encode_image(image, folder / f"x.{fmt}", fmt, DEFAULT_QUALITY, parameters))
            for fmt in images.PIL_FORMATS
        }
        times = wall_and_cpu_medians(cases, repeats)
        for fmt in images.PIL_FORMATS:
            out["formats"][fmt] = {
                "ms_per_mp": ms(times[fmt][0] / megapixels),
                "cpu_ms_per_mp": ms(times[fmt][1] / megapixels),
                "kib": round((folder / f"x.{fmt}").stat().st_size / 1024, 1),
            }
        batch = [photo_like(image.width, seed) for seed in range(4)]
        jobs = [(im, folder / f"b{i}.webp", "webp", DEFAULT_QUALITY, parameters) for i, im in enumerate(batch)]
        parallel = medians(
            {
                "serial": lambda: [images.encode_image(*job) for job in jobs],
                "parallel": lambda: images.encode_images(jobs),
            },
            repeats=max(3, repeats // 2),
        )
    out["four_webp"] = {
        "serial_ms": ms(parallel["serial"]),
        "parallel_ms": ms(parallel["parallel"]),
        "speedup": round(parallel["serial"] / parallel["parallel"], 2),
    }
    return out


def run(repeats: int = 7, with_grid: bool = True) -> dict:
    image = photo_like()
    result = defaults(image, repeats)
    if with_grid:
        result["grid"] = grid(image)
    return result


def report(result: dict) -> str:
    lines = [
        f"Encoding ({result['image']}, quality {result['quality']}, webp method {result['webp_method']}, "
        f"png compress_level {result['png_compress_level']}; wall / CPU ms per megapixel)"
    ]
    lines.append(
        table(
            [(fmt, v["ms_per_mp"], v["cpu_ms_per_mp"], v["kib"]) for fmt, v in result["formats"].items()],
            ("format", "ms/MP", "CPU ms/MP", "KiB"),
        )
    )
    p = result["four_webp"]
    lines.append(
        f"4 webp images: one after another {p['serial_ms']} ms, encode_images {p['parallel_ms']} ms ({p['speedup']}x)"
    )
    if "grid" in result:
        by = {(r["method"], r["quality"]): r for r in result["grid"]["webp"]}
        cell = lambda r: f"{r['ms_per_mp']} / {r['cpu_ms_per_mp']} ms, {r['kib']} KiB, {r['psnr_db']} dB"  # noqa: E731
        lines.append("WebP method x quality (wall / CPU ms per MP, size, PSNR)")
        lines.append(
            table(
                [(m, *[cell(by[m, q]) for q in QUALITIES]) for m in WEBP_METHODS],
                ("method", *[f"q{q}" for q in QUALITIES]),
            )
        )
        lines.append("PNG compress_level")
        lines.append(
            table(
                [(r["compress_level"], r["ms_per_mp"], r["cpu_ms_per_mp"], r["kib"]) for r in result["grid"]["png"]],
                ("level", "ms/MP", "CPU ms/MP", "KiB"),
            )
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(run()))
