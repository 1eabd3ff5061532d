"""flashsd.weights and scripts/download-weights against a fake hub on 127.0.0.1 (testkit/fake_hub.py).

No test reaches the real hub: HF_ENDPOINT points at the fake one, HF_HOME at a temporary folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flashsd.download import HubUnreachable, download, ensure_weights
from flashsd.errors import WeightsError
from flashsd.models import MODELS, FlashModel, HubRepo
from flashsd.weights import missing_files, repo_dir
from testkit.fake_hub import FakeHub, closed_port
from testkit.fake_model import ADAPTER_FILES, ADAPTER_REV, BASE_REV, BIG, BIG_SIZE, Log, named_bytes, tiny_model

PROJECT = Path(__file__).resolve().parent.parent
SCRIPT = PROJECT / "scripts" / "download-weights"
TOKEN = "hf_fakeTOKENvalue1234567890abcdef"

# In the repo but not listed: never fetched.
BASE_EXTRAS = {
    "README.md": b"# base\n",
    "unet/diffusion_pytorch_model.bin": b"pickle",
    "vae_1_0/config.json": b"{}",
    "unet/diffusion_pytorch_model.fp16.safetensors": named_bytes("fp16", 1000),
}


@pytest.fixture
def hub(hf_env, monkeypatch, base_files):
    with FakeHub() as hub:
        hub.add_repo("fake-org/tiny-base", BASE_REV, base_files | BASE_EXTRAS)
        hub.add_repo("fake-org/tiny-flash", ADAPTER_REV, ADAPTER_FILES)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "weights"


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts}


def expected_files(base_files: dict[str, bytes]) -> dict[str, bytes]:
    return {f"fake-org/tiny-base/{k}": v for k, v in base_files.items()} | {
        f"fake-org/tiny-flash/{k}": v for k, v in ADAPTER_FILES.items()
    }


def assert_snapshot(root: Path, base_files: dict[str, bytes]) -> None:
    expected = expected_files(base_files)
    assert files_under(root) == set(expected)
    for rel, data in expected.items():
        assert (root / rel).read_bytes() == data, rel


# -- layout ------------------------------------------------------------------------------------------------------


def test_repo_dir_is_the_repos_org_and_name_under_the_root(tmp_path):
    repo = MODELS["sdxl"].vae
    assert repo_dir(tmp_path, repo) == tmp_path / "madebyollin" / "sdxl-vae-fp16-fix"
    with pytest.raises(WeightsError):
        repo_dir(tmp_path, HubRepo("../evil", "x", ()))


def test_missing_files_lists_what_is_not_on_disk(tmp_path, base_files):
    model = tiny_model(base_files)
    assert len(missing_files(model, tmp_path)) == len(base_files) + 1
    target = tmp_path / "fake-org" / "tiny-flash" / "pytorch_lora_weights.safetensors"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x")
    assert target not in missing_files(model, tmp_path)


# -- download ----------------------------------------------------------------------------------------------------


def test_fetches_exactly_the_listed_files_into_the_repo_layout(hub, root, base_files):
    log = Log()
    report = download(tiny_model(base_files), root, log=log)

    assert_snapshot(root, base_files)
    assert len(report.fetched) == len(base_files) + 1
    assert report.bytes_fetched == sum(map(len, expected_files(base_files).values()))
    assert hub.count(contains="README") == hub.count(contains=".bin") == hub.count(contains="vae_1_0") == 0
    assert "fake-org/tiny-base: fetching 6 of 6 files" in log.text
    assert "fake-org/tiny-flash: fetching 1 of 1 files" in log.text


def test_second_run_fetches_nothing_and_says_so(hub, root, base_files):
    model = tiny_model(base_files)
    download(model, root, log=Log())
    hub.reset_counts()

    log = Log()
    report = download(model, root, log=log)

    assert report.nothing_fetched and report.bytes_fetched == 0
    assert hub.count() == 0, hub.requests  # not even a HEAD
    assert f"fake-org/tiny-base: all 6 files present at rev {BASE_REV[:7]}; nothing to fetch" in log
    assert f"fake-org/tiny-flash: all 1 files present at rev {ADAPTER_REV[:7]}; nothing to fetch" in log
    assert_snapshot(root, base_files)


def test_dropped_connection_resumes_where_it_stopped(hub, root, base_files):
    hub.drop_once.add(("fake-org/tiny-base", BIG))

    download(tiny_model(base_files), root, log=Log())

    assert_snapshot(root, base_files)
    cdn_gets = [r for r in hub.requests if r.server == "cdn" and r.method == "GET"]
    ranges = [r.range for r in cdn_gets if r.range]
    assert ranges == [f"bytes={10 * 2**20}-"], cdn_gets  # the retry asked only for the bytes it lacked
    assert not list(root.rglob("*.incomplete"))


def test_corrupted_transfer_is_detected_and_fetched_again(hub, root, base_files):
    hub.corrupt_once |= {("fake-org/tiny-base", BIG), ("fake-org/tiny-base", "unet/config.json")}
    log = Log()

    report = download(tiny_model(base_files), root, log=log)

    assert_snapshot(root, base_files)
    assert sorted(report.repos[0].repaired) == sorted([BIG, "unet/config.json"])
    assert f"fake-org/tiny-base/{BIG} arrived corrupted (sha256" in log.text
    assert "fake-org/tiny-base/unet/config.json arrived corrupted (git sha1" in log.text
    assert hub.file_gets("unet/config.json") == 2


def test_corruption_that_never_stops_is_an_error(hub, root, base_files):
    class Always(set):
        def discard(self, item):  # never used up
            pass

    hub.corrupt_once = Always({("fake-org/tiny-flash", "pytorch_lora_weights.safetensors")})
    with pytest.raises(WeightsError, match=r"arrived corrupted 3 times") as e:
        download(tiny_model(base_files), root, log=Log())
    assert "fake-org/tiny-flash/pytorch_lora_weights.safetensors" in str(e.value)
    assert not (root / "fake-org/tiny-flash/pytorch_lora_weights.safetensors").exists()


def test_file_damaged_on_disk_is_fetched_again(hub, root, base_files):
    model = tiny_model(base_files)
    download(model, root, log=Log())
    damaged = [root / "fake-org/tiny-base" / BIG, root / "fake-org/tiny-flash/pytorch_lora_weights.safetensors"]
    damaged[0].write_bytes(b"\0" * BIG_SIZE)  # same size, other bytes
    damaged[1].write_bytes(b"short")
    later = time.time() + 5  # huggingface_hub's metadata allows 1 s of clock slack
    for path in damaged:
        os.utime(path, (later, later))
    hub.reset_counts()
    log = Log()

    report = download(model, root, log=log)

    assert_snapshot(root, base_files)
    assert report.fetched == [f"fake-org/tiny-base/{BIG}", "fake-org/tiny-flash/pytorch_lora_weights.safetensors"]
    assert "does not match the hub (sha256" in log.text
    assert "does not match the hub (5 bytes, the hub says 70000)" in log.text


def test_verify_rehashes_files_whose_damage_kept_the_timestamp(hub, root, base_files):
    model = tiny_model(base_files)
    download(model, root, log=Log())
    path = root / "fake-org/tiny-base/tokenizer/spiece.model"
    st = path.stat()
    path.write_bytes(b"\1" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    assert download(model, root, log=Log()).nothing_fetched  # the cheap check cannot see it
    report = download(model, root, log=Log(), verify=True)

    assert report.fetched == ["fake-org/tiny-base/tokenizer/spiece.model"]
    assert_snapshot(root, base_files)


def test_files_copied_in_by_hand_are_hashed_not_fetched(hub, root, base_files):
    for rel, data in expected_files(base_files).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    log = Log()

    report = download(tiny_model(base_files), root, log=log)

    assert report.nothing_fetched
    assert hub.file_gets() == 0 and hub.count("HEAD") == len(base_files) + 1
    assert "(checked against the hub); nothing to fetch" in log.text
    hub.reset_counts()
    assert download(tiny_model(base_files), root, log=Log()).nothing_fetched
    assert hub.count() == 0


def test_new_pin_with_same_files_transfers_nothing(hub, root, base_files):
    download(tiny_model(base_files), root, log=Log())
    new_rev = hashlib.sha1(b"base v2").hexdigest()
    hub.add_repo("fake-org/tiny-base", new_rev, base_files)
    hub.reset_counts()

    report = download(tiny_model(base_files, base_rev=new_rev), root, log=Log())

    assert report.nothing_fetched and hub.file_gets() == 0


# -- refusals and errors -----------------------------------------------------------------------------------------


def test_pickle_files_are_refused_before_any_request(hub, root, base_files):
    model = tiny_model(base_files | {"unet/diffusion_pytorch_model.bin": b""})
    for call in (
        lambda: download(model, root, log=Log()),
        lambda: ensure_weights(model, root, log=Log()),
        lambda: missing_files(model, root),
    ):
        with pytest.raises(WeightsError, match=r"unet/diffusion_pytorch_model\.bin, a pickle file"):
            call()
    for suffix in (".ckpt", ".pt", ".pth", ".pkl"):
        with pytest.raises(WeightsError, match="pickle"):
            download(tiny_model({f"model{suffix}": b""}), root, log=Log())
    assert hub.count() == 0


def test_gated_repo_without_token_says_accept_license_and_set_hf_token(hub, root, base_files):
    hub.repos["fake-org/tiny-base"].token = TOKEN
    model = tiny_model(base_files, gated=True)

    with pytest.raises(WeightsError) as e:
        download(model, root, log=Log())

    msg = str(e.value)
    assert "https://huggingface.co/fake-org/tiny-base" in msg and "HF_TOKEN" in msg and "license" in msg
    assert "no Hugging Face token was found" in msg
    assert hub.file_gets() == 0  # found out before transferring anything (the adapter included)


def test_gated_repo_with_wrong_token_says_so_without_showing_it(hub, root, base_files, monkeypatch):
    hub.repos["fake-org/tiny-base"].token = TOKEN
    monkeypatch.setenv("HF_TOKEN", "hf_wrongTOKEN0987654321")

    with pytest.raises(WeightsError) as e:
        download(tiny_model(base_files, gated=True), root, log=Log())

    msg = str(e.value)
    assert "refused the Hugging Face token from HF_TOKEN" in msg and "https://huggingface.co/fake-org/tiny-base" in msg
    assert "hf_wrongTOKEN" not in msg


def test_gated_repo_with_token_works_and_the_token_is_never_shown(hub, root, base_files, monkeypatch, capfd, caplog):
    hub.repos["fake-org/tiny-base"].token = TOKEN
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    log = Log()

    download(tiny_model(base_files, gated=True), root, log=log)

    assert_snapshot(root, base_files)
    out, err = capfd.readouterr()
    for text in (out, err, caplog.text, log.text):
        assert TOKEN not in text and TOKEN[:12] not in text
    for path in [*root.rglob("*"), *Path(os.environ["HF_HOME"]).rglob("*")]:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    # The token goes to the hub, never to the CDN the hub redirects to.
    assert all(r.authorization is None for r in hub.requests if r.server == "cdn")
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests if r.server == "hub")


@pytest.mark.parametrize(
    "change, expect",
    [
        ("repo", r"Repository fake-org/no-such-repo was not found .*HTTP 404.*model_index\.json at revision"),
        ("revision", r"Revision 0{40} of fake-org/tiny-base does not exist .*HTTP 404 for model_index\.json"),
        ("file", r"fake-org/tiny-base at revision [0-9a-f]{40} has no file unet/missing\.json \(HTTP 404"),
    ],
)
def test_missing_repo_revision_or_file_is_named(hub, root, base_files, change, expect):
    model = tiny_model(base_files)
    base = model.base
    if change == "repo":
        base = HubRepo("fake-org/no-such-repo", base.revision, base.files)
    elif change == "revision":
        base = HubRepo(base.id, "0" * 40, base.files)
    else:
        base = HubRepo(base.id, base.revision, base.files + ("unet/missing.json",))
    model = dataclasses.replace(model, base=base)

    with pytest.raises(WeightsError, match=expect):
        download(model, root, log=Log())
    assert hub.file_gets() == 0


def test_no_network_fails_fast_naming_endpoint_and_repo(hf_env, monkeypatch, root, base_files):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    started = time.monotonic()

    with pytest.raises(HubUnreachable) as e:
        download(tiny_model(base_files), root, log=Log())

    assert time.monotonic() - started < 3
    msg = str(e.value)
    assert endpoint in msg and "fake-org/tiny-base" in msg and "HF_ENDPOINT" in msg
    assert "Connection refused" in msg and str(root / "fake-org" / "tiny-base") in msg


def test_hub_that_never_answers_fails_after_the_timeout(hf_env, monkeypatch, root, base_files):
    with socket.socket() as silent:  # accepts connections (kernel backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
        started = time.monotonic()

        with pytest.raises(HubUnreachable, match=r"no answer within 1 s \(ReadTimeout\)"):
            download(tiny_model(base_files), root, log=Log())

    assert time.monotonic() - started < 3


# -- ensure_weights ----------------------------------------------------------------------------------------------


def test_ensure_weights_with_everything_present_makes_no_request(hub, root, base_files, monkeypatch):
    model = tiny_model(base_files)
    download(model, root, log=Log())
    hub.reset_counts()
    log = Log()

    ensure_weights(model, root, log=log)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    ensure_weights(model, root, log=log)

    assert hub.count() == 0 and log == []


def test_ensure_weights_fetches_what_is_missing(hub, root, base_files):
    model = tiny_model(base_files)
    download(model, root, log=Log())
    (root / "fake-org/tiny-flash/pytorch_lora_weights.safetensors").unlink()
    hub.reset_counts()

    ensure_weights(model, root, log=Log())

    assert_snapshot(root, base_files)
    assert hub.file_gets() == 1


def test_ensure_weights_without_network_names_the_files_and_the_command(hf_env, monkeypatch, root, base_files):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")

    with pytest.raises(WeightsError) as e:
        ensure_weights(tiny_model(base_files), root, log=Log())

    msg = str(e.value)
    assert "7 file(s) missing (fake-org/tiny-base/model_index.json," in msg and "and 4 more" in msg
    assert "scripts/download-weights --model tiny" in msg and "cog exec scripts/download-weights" in msg
    assert str(root / "fake-org" / "tiny-base") in msg and "Traceback" not in msg


# -- scripts/download-weights ------------------------------------------------------------------------------------


def serve_model(hub: FakeHub, model: FlashModel, *, big: str | None = None, big_size: int = 0) -> dict[str, bytes]:
    """Serve every repo of a real model at its pinned revision, with tiny stand-in files."""
    served = {}
    for repo in model.repos:
        files = {f: (named_bytes(f"{repo.id}/{f}", big_size if f == big else 2000)) for f in repo.files}
        hub.add_repo(repo.id, repo.revision, files, token=TOKEN if repo.gated else None)
        served |= {f"{repo.id}/{f}": data for f, data in files.items()}
    return served


def run_script(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=PROJECT
    )


@pytest.fixture
def script_env(hf_env) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "FLASHSD_"))}
    return env | {"HF_HOME": str(hf_env), "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def test_script_is_an_executable_python_script():
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().startswith("#!/usr/bin/env python3\n")


def test_script_downloads_a_model_then_has_nothing_to_fetch(hf_env, script_env, tmp_path):
    with FakeHub() as hub:
        served = serve_model(hub, MODELS["sd15"])
        env = script_env | {"HF_ENDPOINT": hub.url, "FLASHSD_MODEL": "sd15"}

        first = run_script("--root", str(tmp_path / "w"), env=env)
        assert first.returncode == 0, first.stderr
        assert files_under(tmp_path / "w") == set(served)
        assert all((tmp_path / "w" / rel).read_bytes() == data for rel, data in served.items())

        hub.reset_counts()
        second = run_script("--root", str(tmp_path / "w"), env=env)
        assert second.returncode == 0, second.stderr
        assert second.stdout.count("nothing to fetch") == len(MODELS["sd15"].repos) and hub.count() == 0


def test_script_gated_model_needs_a_token_and_never_shows_it(hf_env, script_env, tmp_path):
    with FakeHub() as hub:
        served = serve_model(hub, MODELS["sd3"])
        env = script_env | {"HF_ENDPOINT": hub.url, "FLASHSD_WEIGHTS": str(tmp_path / "w")}

        denied = run_script("--model", "sd3", env=env)
        assert denied.returncode == 1
        assert "https://huggingface.co/stabilityai/stable-diffusion-3-medium-diffusers" in denied.stderr
        assert "HF_TOKEN" in denied.stderr and "license" in denied.stderr
        assert "Traceback" not in denied.stderr + denied.stdout

        allowed = run_script("--model", "sd3", env=env | {"HF_TOKEN": TOKEN})
        assert allowed.returncode == 0, allowed.stderr
        assert files_under(tmp_path / "w") == set(served)
        assert TOKEN not in allowed.stdout + allowed.stderr
        for path in (tmp_path / "w").rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), path


def test_script_without_network_fails_within_seconds_without_traceback(hf_env, script_env, tmp_path):
    env = script_env | {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    started = time.monotonic()

    result = run_script("--model", "sdxl", "--root", str(tmp_path / "w"), env=env, timeout=30)

    assert time.monotonic() - started < 10
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert "Could not reach the Hugging Face hub at http://127.0.0.1:" in result.stderr
    assert "stabilityai/stable-diffusion-xl-base-1.0" in result.stderr


def test_script_rejects_an_unknown_model(script_env):
    result = run_script("--model", "sdxxl", env=script_env)
    assert result.returncode == 2 and "unknown model 'sdxxl'" in result.stderr


def test_script_interrupted_exits_130_and_the_next_run_resumes(hf_env, script_env, tmp_path):
    model = MODELS["sd15"]
    big = "unet/diffusion_pytorch_model.fp16.safetensors"
    with FakeHub(delay_per_chunk=0.02) as hub:  # 2 MB in 16 KB chunks: ~2.5 s
        served = serve_model(hub, model, big=big, big_size=2 * 2**20)
        env = script_env | {"HF_ENDPOINT": hub.url}
        root = tmp_path / "w"
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--model", "sd15", "--root", str(root)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=PROJECT,
        )
        deadline = time.monotonic() + 30
        while hub.body_bytes_sent < 256 * 1024 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "interrupted; run again to resume" in err and "Traceback" not in out + err
        assert not list(root.rglob("*.incomplete"))
        done_before = files_under(root)
        assert f"{model.base.id}/{big}" not in done_before

        hub.delay_per_chunk = 0
        hub.reset_counts()
        again = run_script("--model", "sd15", "--root", str(root), env=env)
        assert again.returncode == 0, again.stderr
        assert files_under(root) == set(served)
        assert all((root / rel).read_bytes() == data for rel, data in served.items())
        assert hub.file_gets() == len(served) - len(done_before)  # what the first run finished stays


def test_partial_files_left_by_a_killed_run_are_removed(hub, root, base_files):
    # huggingface_hub 2.4 never resumes a partial file across runs; a SIGKILLed run leaves it behind.
    partial = root / "fake-org/tiny-base/.cache/huggingface/download/unet/abc.deadbeef.1234abcd.incomplete"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * 1000)
    os.utime(partial, (time.time() - 2 * 3600,) * 2)
    log = Log()

    download(tiny_model(base_files), root, log=log)

    assert not partial.exists() and "removed 1.00kB of partial files" in log.text


def test_unwritable_root_is_a_clear_error(hub, tmp_path, base_files):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")

    with pytest.raises(WeightsError, match=f"Cannot write the weights under {blocker}/fake-org/tiny-base"):
        download(tiny_model(base_files), blocker, log=Log())


def test_script_fetches_the_controlnets_the_build_names_with_the_depth_estimator(hf_env, script_env, tmp_path):
    from flashsd.control import with_controlnets

    with FakeHub() as hub:
        served = serve_model(hub, with_controlnets(MODELS["sd15"], ("canny", "depth")))
        env = script_env | {"HF_ENDPOINT": hub.url, "FLASHSD_MODEL": "sd15", "FLASHSD_CONTROLNETS": "depth,canny"}
        result = run_script("--root", str(tmp_path / "w"), env=env)
        assert result.returncode == 0, result.stderr
        assert files_under(tmp_path / "w") == set(served)
        assert {"lllyasviel/control_v11p_sd15_canny/diffusion_pytorch_model.fp16.safetensors",
                "depth-anything/Depth-Anything-V2-Small-hf/model.safetensors"} <= set(served)  # fmt: skip


def test_script_refuses_controlnets_for_a_model_that_takes_none(script_env):
    result = run_script("--model", "pixart", "--controlnets", "canny", env=script_env)
    assert result.returncode == 2 and "Flash PixArt takes no ControlNet" in result.stderr
