"""The training images: a zip or tar archive read safely into the training's own folder, images decoded and paired
with their captions.

What a user's archive may hold, and what happens to it:
- images (`.png .jpg .jpeg .webp .bmp .gif .tif .tiff`), each captioned by a `.txt` file of the same path and stem
  (`dogs/rex.jpg` ↔ `dogs/rex.txt`); an image without one is captioned with the trigger word alone, a caption that
  does not contain the trigger word gets it prepended (cog-sdxl #29, replicate/flux-fine-tuner's convention);
- anything else (other files, captions without an image, macOS/Windows metadata) is skipped and logged by name;
- an image that does not decode, or is larger than `Limits.max_image_bytes` or `Limits.max_image_pixels`, or smaller
  than half the training resolution on its shorter side, is skipped and logged by name; the record
  (training.json) lists every skip with its reason;
- links (symbolic or hard), devices and FIFOs are never created: skipped and logged;
- an entry whose path would leave the folder (`../x`, `/etc/x`, `C:\\x`) refuses the whole archive, as does an
  archive of more than `Limits.max_entries` entries or `Limits.max_total_bytes` of files (counted from the
  headers before anything is decompressed, and again while reading), or one with no usable image.

Entries are never extracted under their own names: each file goes to `<folder>/<n><suffix>` (a counter and a
suffix from a fixed list), so nothing can be written outside the training's folder whatever the archive says.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import lzma
import re
import stat
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from PIL import Image

from ..errors import InputError
from ..input_images import MAX_INPUT_PIXELS, load_image
from .options import TrainingError

log = logging.getLogger("flashsd")

INPUT = "input_images"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_SUFFIX = ".txt"
# Left out without a word each: what macOS's Finder and Windows' Explorer add to the archives they make.
_METADATA = re.compile(r"(^|/)(__MACOSX/|\._[^/]*$|\.DS_Store$|Thumbs\.db$|desktop\.ini$)", re.IGNORECASE)
MIN_SIDE_FRACTION = 0.5  # an image is upscaled at most 2x to the training resolution
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Bounds on what an archive may make this machine do (README, "Fine-tuning")."""

    max_entries: int = 5000  # entries of any kind (folders included)
    max_total_bytes: int = 4 * 10**9  # the files' uncompressed bytes, all together
    max_image_bytes: int = 100 * 10**6  # one image file, uncompressed
    max_image_pixels: int = MAX_INPUT_PIXELS  # one image, decoded (100 megapixels)
    max_caption_bytes: int = 64 * 1024  # one caption file


DEFAULT_LIMITS = Limits()


class TrainingDataError(TrainingError):
    """An archive that cannot be trained on: the message says what was wrong and what is allowed."""


@dataclass(frozen=True)
class Skipped:
    name: str  # the entry's path in the archive
    reason: str


@dataclass(frozen=True)
class TrainingImage:
    name: str  # the entry's path in the archive
    path: Path  # the extracted file, in the training's folder
    caption: str  # as trained: the caption file's text (trigger word prepended if missing) or the trigger word
    caption_source: str  # "file" or "trigger word"
    sha256: str  # of the file's bytes
    size: tuple[int, int]  # (width, height), upright


@dataclass
class TrainingSet:
    images: list[TrainingImage]
    skipped: list[Skipped] = field(default_factory=list)
    archive_sha256: str = ""

    @property
    def sha256(self) -> str:
        """The hash of what is trained on: every image's name, bytes and caption as trained, in name order."""
        digest = hashlib.sha256()
        for image in self.images:
            digest.update(f"{image.name}\t{image.sha256}\t{image.caption}\n".encode())
        return digest.hexdigest()


# -- reading the archive -----------------------------------------------------------------------------------------


@dataclass
class _Entry:
    name: str  # as the archive spells it
    kind: str  # "file", "folder", "link" or "special"
    size: int  # declared uncompressed size
    open: Callable[[], IO[bytes]] | None = None


def _zip_entries(archive: zipfile.ZipFile) -> list[_Entry]:
    entries = []
    for info in archive.infolist():
        mode = info.external_attr >> 16  # the Unix mode, for archives made on Unix
        if info.is_dir():
            kind = "folder"
        elif stat.S_ISLNK(mode):
            kind = "link"
        elif mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            kind = "special"
        else:
            kind = "file"
        entries.append(_Entry(info.filename, kind, info.file_size, lambda info=info: archive.open(info)))
    return entries


def _tar_entries(archive: tarfile.TarFile) -> Iterator[_Entry]:
    # Members one by one (a compressed tar is one stream; its index would decompress everything first).
    for member in archive:
        if member.isdir():
            kind = "folder"
        elif member.issym() or member.islnk():
            kind = "link"
        elif member.isfile():
            kind = "file"
        else:
            kind = "special"
        yield _Entry(member.name, kind, member.size if kind == "file" else 0, lambda m=member: archive.extractfile(m))


def _unsafe(name: str) -> bool:
    """A path that leaves the folder it is extracted into: absolute, with a drive, or with a `..` part."""
    posix = name.replace("\\", "/")
    return posix.startswith("/") or bool(re.match(r"^[A-Za-z]:", posix)) or ".." in PurePosixPath(posix).parts


def _kind_of(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    for magic, kind in ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"%PDF", "a PDF document")):
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if not head:
        return "an empty file"
    return f"a {path.stat().st_size}-byte file starting {head[:8]!r}"


class _Reader:
    """Copies the archive's usable files into `folder` under fixed names, within the limits."""

    def __init__(self, folder: Path, limits: Limits):
        self.folder, self.limits = folder, limits
        self.entries = 0
        self.total = 0  # uncompressed bytes of the files passed over (declared, then counted)
        self.images: dict[str, tuple[Path, str]] = {}  # name -> (extracted file, sha256)
        self.captions: dict[str, bytes] = {}  # name -> raw text
        self.skipped: list[Skipped] = []
        self.metadata_files = 0

    def check_index(self, entries: list[_Entry]) -> None:
        """A zip's whole index, before anything is read: the entry count, the paths, the declared sizes."""
        self._check_count(len(entries))
        for entry in entries:
            self._check_path(entry)
        declared = sum(e.size for e in entries if e.kind == "file")
        if declared > self.limits.max_total_bytes:
            self._too_much()

    def _check_count(self, count: int) -> None:
        if count > self.limits.max_entries:
            raise TrainingDataError(
                f"{INPUT}: the archive has more than {self.limits.max_entries} entries, the most a training takes. "
                "Send fewer files (a few to a few hundred images is typical for a style or subject LoRA)."
            )

    def _check_path(self, entry: _Entry) -> None:
        if _unsafe(entry.name):
            raise TrainingDataError(
                f"{INPUT}: the archive has an entry whose path leaves its folder ({entry.name!r}); such archives "
                "(zip-slip) are refused whole. Make the archive from the folder of images itself."
            )

    def add(self, entry: _Entry) -> None:
        self.entries += 1
        self._check_count(self.entries)
        self._check_path(entry)
        self.total += entry.size
        self._check_total()
        name = entry.name.replace("\\", "/").strip("/")
        if entry.kind == "folder":
            return
        if _METADATA.search(name):
            self.metadata_files += 1
            return
        if entry.kind != "file":
            why = (
                "a link: links are never followed or created"
                if entry.kind == "link"
                else ("not a regular file (a device or FIFO): never created")
            )
            self.skipped.append(Skipped(name, why))
            return
        suffix = PurePosixPath(name).suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            if entry.size > self.limits.max_image_bytes:
                self.skipped.append(Skipped(name, f"{_mb(entry.size)}, more than {_mb(self.limits.max_image_bytes)}"))
                return
            self._copy_image(entry, name, suffix)
        elif suffix == CAPTION_SUFFIX:
            self._read_caption(entry, name)
        else:
            self.skipped.append(Skipped(name, "not an image (" + ", ".join(IMAGE_SUFFIXES) + ") or a .txt caption"))

    def _check_total(self) -> None:
        if self.total > self.limits.max_total_bytes:
            self._too_much()

    def _too_much(self) -> None:
        raise TrainingDataError(
            f"{INPUT}: the archive's files add up to more than {_mb(self.limits.max_total_bytes)} uncompressed, "
            "the most a training takes. Send smaller images (they are scaled to the training resolution anyway)."
        )

    def _stream(self, entry: _Entry, limit: int) -> Iterator[bytes]:
        """The entry's bytes, counted: never more than `limit` for it, nor more than the total allows. A read that
        fails (damaged data, an encrypted or unsupported entry) is _Damaged."""
        counted = 0
        try:
            source = entry.open()
        except _READ_ERRORS as e:
            raise _Damaged(e) from e
        with source:
            while True:
                try:
                    chunk = source.read(_CHUNK)
                except _READ_ERRORS as e:
                    raise _Damaged(e) from e
                if not chunk:
                    return
                counted += len(chunk)
                if counted > entry.size:  # more than its header declared (the declared sizes were counted already)
                    self.total += len(chunk)
                    self._check_total()
                if counted > limit:
                    raise _TooLarge(counted)
                yield chunk

    def _copy_image(self, entry: _Entry, name: str, suffix: str) -> None:
        path = self.folder / f"{len(self.images):05d}{suffix}"
        digest = hashlib.sha256()
        try:
            with open(path, "wb") as out:
                for chunk in self._stream(entry, self.limits.max_image_bytes):
                    digest.update(chunk)
                    out.write(chunk)
        except (_TooLarge, _Damaged) as e:
            path.unlink(missing_ok=True)
            self.skipped.append(Skipped(name, e.reason(self.limits.max_image_bytes)))
            return
        self.images[name] = (path, digest.hexdigest())

    def _read_caption(self, entry: _Entry, name: str) -> None:
        try:
            self.captions[name] = b"".join(self._stream(entry, self.limits.max_caption_bytes))
        except (_TooLarge, _Damaged) as e:
            self.skipped.append(Skipped(name, e.reason(self.limits.max_caption_bytes)))


# What reading an entry's data raises when the data is damaged, encrypted (RuntimeError) or compressed in a way
# Python cannot read (NotImplementedError); OSError covers gzip's and bz2's stream errors.
_READ_ERRORS = (
    zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, EOFError, OSError, RuntimeError,
    NotImplementedError,
)  # fmt: skip
# What reading the archive's index or headers raises when the archive is damaged or truncated.
_ARCHIVE_ERRORS = (zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, EOFError, gzip.BadGzipFile)


class _TooLarge(Exception):
    def __init__(self, size: int):
        self.size = size

    def reason(self, limit: int) -> str:
        return f"more than {_mb(limit)} ({_mb(self.size)} read before stopping)"


class _Damaged(Exception):
    def __init__(self, error: BaseException):
        self.error = error

    def reason(self, limit: int) -> str:
        return f"unreadable in the archive ({type(self.error).__name__}: {str(self.error)[:200]})"


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 10**6 else f"{n} bytes"


def extract(archive: Path, folder: Path, limits: Limits = DEFAULT_LIMITS) -> _Reader:
    """Read `archive` (zip, or tar: plain, gzip, bzip2 or xz) into `folder`, within `limits`."""
    reader = _Reader(folder, limits)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                entries = _zip_entries(z)
                # What the central directory says is checked before a byte is decompressed.
                reader.check_index(entries)
                for entry in entries:
                    reader.add(entry)
        elif _is_tar(archive):
            with tarfile.open(archive, mode="r:*") as t:
                for entry in _tar_entries(t):
                    reader.add(entry)
        else:
            raise TrainingDataError(
                f"{INPUT} must be a zip or tar archive of images (.zip, .tar, .tar.gz); this is {_kind_of(archive)}."
            )
    except _ARCHIVE_ERRORS as e:
        raise TrainingDataError(
            f"{INPUT}: the archive is damaged or truncated ({type(e).__name__}: {e}). Make it again and re-upload it."
        ) from e
    return reader


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, tarfile.TarError, EOFError):
        return False


# -- images and captions -----------------------------------------------------------------------------------------


def caption_for(text: str | None, trigger_word: str) -> tuple[str, str]:
    """(caption as trained, where it came from): the caption file's text with the trigger word prepended if it does
    not contain it as a word, or the trigger word alone."""
    caption = " ".join((text or "").split())  # one line, single spaces
    if not caption:
        return trigger_word, "trigger word"
    if not re.search(rf"(?<!\w){re.escape(trigger_word)}(?!\w)", caption):
        caption = f"{trigger_word} {caption}"
    return caption, "file"


def load_training_set(
    archive: Path, folder: Path, trigger_word: str, resolution: int, limits: Limits = DEFAULT_LIMITS
) -> TrainingSet:
    """The images of `archive` with their captions, extracted into `folder` (which the caller removes)."""
    reader = extract(archive, folder, limits)
    skipped = list(reader.skipped)
    captions: dict[str, str | None] = {}
    for name, raw in reader.captions.items():
        try:
            captions[str(PurePosixPath(name).with_suffix(""))] = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            captions[str(PurePosixPath(name).with_suffix(""))] = None
            skipped.append(Skipped(name, "a caption that is not UTF-8 text (its image is captioned with the trigger word)"))  # fmt: skip
    stems = set()
    images, smallest = [], max(1, int(resolution * MIN_SIDE_FRACTION))
    for name in sorted(reader.images):
        path, sha256 = reader.images[name]
        stem = str(PurePosixPath(name).with_suffix(""))
        stems.add(stem)
        try:
            size = decoded_size(path, name, limits)
        except InputError as e:
            skipped.append(Skipped(name, str(e).removeprefix(f"{INPUT}: {name} ")))
            path.unlink(missing_ok=True)
            continue
        if min(size) < smallest:
            skipped.append(Skipped(
                name, f"{size[0]}x{size[1]}: smaller than {smallest} px (half the training resolution {resolution}) "
                "on its shorter side, it would be upscaled more than 2x",
            ))  # fmt: skip
            path.unlink(missing_ok=True)
            continue
        caption, source = caption_for(captions.get(stem), trigger_word)
        images.append(TrainingImage(name, path, caption, source, sha256, size))
    skipped += [Skipped(name, "a caption without an image of the same name") for name in sorted(reader.captions)
                if str(PurePosixPath(name).with_suffix("")) not in stems]  # fmt: skip
    training_set = TrainingSet(images, sorted(skipped, key=lambda s: s.name), _file_sha256(archive))
    _log(training_set, reader.metadata_files)
    if not images:
        found = f"{len(reader.images)} image file(s), none usable" if reader.images else "no image file"
        reasons = ": " + "; ".join(f"{s.name} ({s.reason})" for s in training_set.skipped[:5]) if skipped else ""
        if len(training_set.skipped) > 5:
            reasons += f"; and {len(training_set.skipped) - 5} more"
        raise TrainingDataError(
            f"{INPUT}: the archive has {found}{reasons}. Send a zip or tar of {', '.join(IMAGE_SUFFIXES)} images, at "
            f"least {smallest} px on the shorter side at resolution {resolution}."
        )
    return training_set


def decoded_size(path: Path, name: str, limits: Limits) -> tuple[int, int]:
    """The upright size of the image in `path`, decoded in full (a damaged file fails here); InputError if not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as probe:  # the header alone
                width, height = probe.size
    except Exception:
        width = height = 0  # load_image says what is wrong with it
    if width * height > limits.max_image_pixels:
        raise InputError(
            f"{INPUT}: {name} is {width}x{height}, more than {limits.max_image_pixels / 1e6:.0f} megapixels"
        )
    with load_image(path, f"{INPUT}: {name}") as image:
        return image.size


def open_image(image: TrainingImage) -> Image.Image:
    """The image as the training reads it: RGB, upright, transparency on white (as predictions read inputs)."""
    return load_image(image.path, f"{INPUT}: {image.name}")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _log(training_set: TrainingSet, metadata_files: int) -> None:
    images = training_set.images
    from_files = sum(1 for i in images if i.caption_source == "file")
    log.info(
        "Training set: %d image(s), %d captioned by their .txt file, %d by the trigger word alone (data sha256 %s)",
        len(images), from_files, len(images) - from_files, training_set.sha256[:16],
    )  # fmt: skip
    for skipped in training_set.skipped:
        log.warning("Skipped %s: %s", skipped.name, skipped.reason)
    if metadata_files:
        log.info("Left out %d macOS/Windows metadata file(s) (__MACOSX/, ._*, .DS_Store, Thumbs.db)", metadata_files)
