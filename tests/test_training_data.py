"""Training data (flashsd.training.data): what a user's archive may hold, and what it can never make the machine do.

Archives are made here the way users' tools make them (Python's zipfile and tarfile, which write what zip/tar and the
OS archivers write), plus the hostile ones: zip-slip names, links, bombs (many entries, huge declared or real sizes,
pixel bombs).
"""

from __future__ import annotations

import io
import logging
import stat
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from flashsd.training.data import DEFAULT_LIMITS, Limits, TrainingDataError, load_training_set
from testkit.training_sets import jpeg, make_tar, make_zip, png

RESOLUTION = 64  # images must be at least 32 px on their shorter side


def load(archive: Path, folder: Path, limits: Limits = DEFAULT_LIMITS, trigger="TOK", resolution=RESOLUTION):
    folder.mkdir(exist_ok=True)
    return load_training_set(archive, folder, trigger, resolution, limits)


def files_in(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


# -- images and captions -----------------------------------------------------------------------------------------


def test_images_are_captioned_by_their_txt_file_else_by_the_trigger_word(tmp_path):
    archive = make_zip(tmp_path / "set.zip", {
        "dogs/rex.png": png(seed=1), "dogs/rex.txt": b"a painting of a dog\n\n  in the  snow",
        "dogs/fido.jpg": jpeg(seed=2),
        "cats/tom.png": png(seed=3), "cats/tom.txt": "\ufeffa photo of TOK on a sofa".encode(),  # UTF-8 with a BOM
        "cats/tomcat.png": png(seed=4), "cats/tomcat.txt": b"TOKEN is not the trigger word",
        "rex.png": png(seed=5),  # same stem as dogs/rex, another folder: not its caption
    })  # fmt: skip
    training_set = load(archive, tmp_path / "work")
    captions = {image.name: (image.caption, image.caption_source) for image in training_set.images}
    assert captions == {
        "cats/tom.png": ("a photo of TOK on a sofa", "file"),
        "cats/tomcat.png": ("TOK TOKEN is not the trigger word", "file"),
        "dogs/fido.jpg": ("TOK", "trigger word"),
        "dogs/rex.png": ("TOK a painting of a dog in the snow", "file"),
        "rex.png": ("TOK", "trigger word"),
    }
    assert [image.name for image in training_set.images] == sorted(captions)  # a fixed order, whatever the archive's
    assert training_set.skipped == []


def test_a_tar_of_the_same_files_is_the_same_training_set(tmp_path):
    files = {"a.png": png(seed=1), "a.txt": b"a lighthouse", "b.jpg": jpeg(seed=2)}
    from_zip = load(make_zip(tmp_path / "set.zip", dict(reversed(files.items()))), tmp_path / "zip")
    for mode, suffix in (("w:gz", "tar.gz"), ("w", "tar"), ("w:bz2", "tar.bz2"), ("w:xz", "tar.xz")):
        from_tar = load(make_tar(tmp_path / f"set.{suffix}", files, mode), tmp_path / suffix)
        assert from_tar.sha256 == from_zip.sha256, suffix
    other = load(make_zip(tmp_path / "other.zip", {**files, "a.txt": b"a lighthouse at night"}), tmp_path / "other")
    assert other.sha256 != from_zip.sha256  # the hash covers the captions as trained


def test_other_files_and_damaged_images_are_skipped_and_logged_by_name(tmp_path, caplog):
    good = png(seed=1)
    archive = make_zip(tmp_path / "set.zip", {
        "good.png": good, "notes.md": b"# my dataset", "broken.png": b"\x89PNG\r\n\x1a\nnot really",
        "truncated.jpg": jpeg()[:300], "empty.webp": b"", "orphan.txt": b"a caption without its image",
        "bad-caption.png": png(seed=2), "bad-caption.txt": b"\xff\xfe\x00 not utf-8 \xc3",
        "__MACOSX/._good.png": b"\x00\x05\x16\x07", ".DS_Store": b"\x00\x00\x00\x01Bud1",
    })  # fmt: skip
    with caplog.at_level(logging.INFO, logger="flashsd"):
        training_set = load(archive, tmp_path / "work")
    assert [i.name for i in training_set.images] == ["bad-caption.png", "good.png"]
    assert training_set.images[0].caption == "TOK"  # its caption file is unreadable: the trigger word alone
    skipped = {s.name: s.reason for s in training_set.skipped}
    assert set(skipped) == {"notes.md", "broken.png", "truncated.jpg", "empty.webp", "orphan.txt", "bad-caption.txt"}
    assert "not an image" in skipped["notes.md"] and "not an image" in skipped["empty.webp"]
    assert "could not be read (Truncated File Read)" in skipped["truncated.jpg"]
    assert "without an image" in skipped["orphan.txt"] and "not UTF-8" in skipped["bad-caption.txt"]
    for name in skipped:
        assert f"Skipped {name}: " in caplog.text
    assert "Left out 2 macOS/Windows metadata file(s)" in caplog.text


@pytest.mark.parametrize(
    "files, message",
    [
        ({}, "has no image file"),
        ({"readme.md": b"hello", "a.txt": b"a caption"}, "has no image file: a.txt (a caption without an image"),
        ({"a.png": b"not a png", "b.jpg": b""}, "2 image file(s), none usable: a.png (is not an image"),
    ],
)
def test_an_archive_without_a_usable_image_is_refused_saying_what_it_holds(tmp_path, files, message):
    with pytest.raises(TrainingDataError, match="input_images: the archive") as error:
        load(make_zip(tmp_path / "set.zip", files), tmp_path / "work")
    assert message in str(error.value)
    assert "Send a zip or tar of" in str(error.value)


def test_a_file_that_is_no_archive_is_refused_naming_what_it_is(tmp_path):
    single = tmp_path / "photo.png"
    single.write_bytes(png())
    with pytest.raises(TrainingDataError, match="must be a zip or tar archive of images .* this is a PNG image"):
        load(single, tmp_path / "work")
    damaged = tmp_path / "cut.zip"
    damaged.write_bytes(make_zip(tmp_path / "whole.zip", {"a.png": png()}).read_bytes()[:-30])
    with pytest.raises(TrainingDataError, match="damaged or truncated|must be a zip or tar"):
        load(damaged, tmp_path / "work2")


def test_images_too_small_for_the_resolution_are_skipped(tmp_path):
    archive = make_zip(tmp_path / "set.zip", {"big.png": png((200, 64)), "small.png": png((200, 63))})
    training_set = load(archive, tmp_path / "work", resolution=128)
    assert [i.name for i in training_set.images] == ["big.png"]
    (skipped,) = training_set.skipped
    assert (
        skipped.name == "small.png"
        and "200x63: smaller than 64 px (half the training resolution 128)" in skipped.reason
    )
    with pytest.raises(TrainingDataError, match="at least 128 px on the shorter side at resolution 256"):
        load(archive, tmp_path / "work2", resolution=256)


# -- hostile archives --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil.png", "a/../../evil.png", "/tmp/evil.png", "C:\\evil.png", "..\\evil.png"])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_a_path_that_leaves_the_folder_refuses_the_archive_and_writes_nothing(tmp_path, name, kind):
    files = {"fine.png": png(), name: png(seed=9)}
    archive = (make_zip if kind == "zip" else make_tar)(tmp_path / f"slip.{kind}", files)
    work = tmp_path / "a" / "b" / "work"
    work.mkdir(parents=True)
    before = files_in(tmp_path)
    with pytest.raises(TrainingDataError, match="leaves its folder .*zip-slip"):
        load_training_set(archive, work, "TOK", RESOLUTION)
    created = files_in(tmp_path) - before
    # A zip's whole index is checked before anything is written; a tar is read in order (its first entry may be there).
    assert created <= ({"a/b/work/00000.png"} if kind == "tar" else set()), created
    assert not list(Path("/tmp").glob("evil.png"))


def test_links_and_special_files_are_never_created_or_followed(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(seed=7))
    archive = tmp_path / "links.tar"
    with tarfile.open(archive, "w") as t:
        for name, data in {"a.png": png(seed=1)}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for name, kind, target in [("sym.png", tarfile.SYMTYPE, str(secret)), ("hard.png", tarfile.LNKTYPE, "a.png"),
                                   ("fifo.png", tarfile.FIFOTYPE, ""), ("dev.png", tarfile.CHRTYPE, "")]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            t.addfile(info)
    zipped = tmp_path / "links.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("a.png", png(seed=1))
        link = zipfile.ZipInfo("sym.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16  # what `zip --symlinks` writes: the target as the content
        z.writestr(link, str(secret))
    for path, links in ((archive, {"sym.png", "hard.png", "fifo.png", "dev.png"}), (zipped, {"sym.png"})):
        work = tmp_path / f"work-{path.suffix[1:]}"
        training_set = load(path, work)
        assert [i.name for i in training_set.images] == ["a.png"]
        reasons = {s.name: s.reason for s in training_set.skipped}
        assert set(reasons) == links
        for name, reason in reasons.items():
            assert reason.startswith("not a regular file" if name in ("fifo.png", "dev.png") else "a link"), name
        assert all(p.is_file() and not p.is_symlink() for p in work.iterdir())
        assert training_set.images[0].sha256 != _sha256(secret.read_bytes())


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_too_many_entries_refuse_the_archive(tmp_path):
    files = {f"{i}.txt": b"" for i in range(11)}
    for kind, make in (("zip", make_zip), ("tar", make_tar)):
        with pytest.raises(TrainingDataError, match="more than 10 entries"):
            load(make(tmp_path / f"many.{kind}", files), tmp_path / f"work-{kind}", Limits(max_entries=10))
    load(make_zip(tmp_path / "ok.zip", {**dict(list(files.items())[:9]), "a.png": png()}), tmp_path / "ok",
         Limits(max_entries=10))  # fmt: skip


def test_a_zip_bomb_is_refused_from_its_index_before_anything_is_decompressed(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.png", png())
        with z.open("zeros.png", "w", force_zip64=True) as f:
            for _ in range(64):
                f.write(bytes(4 * 1024 * 1024))  # 256 MB of zeros, 250 KB compressed
    assert bomb.stat().st_size < 1_000_000
    opened = []
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, *a, **k: opened.append(a) or pytest.fail("read"))
    started = time.perf_counter()
    with pytest.raises(TrainingDataError, match="add up to more than 100 MB uncompressed"):
        load(bomb, tmp_path / "work", Limits(max_total_bytes=100 * 10**6))
    assert opened == [] and time.perf_counter() - started < 2


def test_a_compressed_tar_bomb_stops_at_the_total_bound(tmp_path):
    bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(bomb, "w:gz") as t:
        for i in range(4):
            info = tarfile.TarInfo(f"zeros{i}.png")
            info.size = 32 * 1024 * 1024
            t.addfile(info, io.BytesIO(bytes(info.size)))
    work = tmp_path / "work"
    with pytest.raises(TrainingDataError, match="add up to more than 50 MB"):
        load(bomb, work, Limits(max_total_bytes=50 * 10**6, max_image_bytes=40 * 10**6))
    assert sum(p.stat().st_size for p in work.iterdir()) <= 40 * 1024 * 1024  # stopped on the second file's header


def test_an_image_over_the_size_bounds_is_skipped_without_being_decoded(tmp_path):
    # 12000 x 12000 one-bit pixels: 144 megapixels in a 20 KB PNG (a pixel bomb); and a 120 KB file over a 60 KB bound.
    buffer = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buffer, "PNG")
    assert len(buffer.getvalue()) < 60_000 < len(png((200, 200)))
    archive = make_zip(
        tmp_path / "set.zip", {"bomb.png": buffer.getvalue(), "big.png": png((200, 200)), "a.png": png((40, 40))}
    )
    started = time.perf_counter()
    training_set = load(archive, tmp_path / "work", Limits(max_image_bytes=60_000))
    assert time.perf_counter() - started < 2
    assert [i.name for i in training_set.images] == ["a.png"]
    reasons = {s.name: s.reason for s in training_set.skipped}
    assert "12000x12000, more than 100 megapixels" in reasons["bomb.png"]
    assert "more than" in reasons["big.png"] and "bytes" in reasons["big.png"]


def test_the_readme_states_the_bounds_the_code_applies():
    from testkit.cog_server import PROJECT_ROOT

    readme = (PROJECT_ROOT / "README.md").read_text()
    limits = Limits()
    for row in (
        f"| entries (files and folders) | {limits.max_entries:,} |",
        f"| all files, uncompressed | {limits.max_total_bytes / 1e9:g} GB |",
        f"| one image file | {limits.max_image_bytes / 1e6:g} MB |",
        f"| one image, decoded | {limits.max_image_pixels / 1e6:g} megapixels |",
        f"| one caption file | {limits.max_caption_bytes // 1024} KB |",
    ):
        assert row in readme, row
