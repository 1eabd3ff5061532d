"""The Cog worker's temporary files when predictions run concurrently."""

import os
import tempfile
import time

from flashsd import cog_files


def test_with_concurrent_predictions_only_input_copies_older_than_any_live_request_are_swept(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    folder = cog_files.use_private_tempdir(force=True)
    old, arriving = folder / "tmpold.png", folder / "tmpnew.png"
    for path in (old, arriving):
        path.write_bytes(b"x")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    assert cog_files.sweep_input_copies(older_than_s=900) == 1
    assert not old.exists() and arriving.exists()  # another request's input, still arriving: kept


def test_output_folders_of_the_last_predictions_in_flight_are_kept(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folders = cog_files.OutputFolders(keep=3)
    made = [folders.fresh() for _ in range(5)]
    assert [f.exists() for f in made] == [False, False, True, True, True]
    folders.discard(made[3])
    assert not made[3].exists() and made[4].exists()
    single = cog_files.OutputFolders()
    first, second = single.fresh(), single.fresh()
    assert not first.exists() and second.exists()  # one at a time: the previous one is gone
