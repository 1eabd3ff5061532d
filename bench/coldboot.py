"""Cold boot: setup() stage by stage at real size (random weights), against the floor of reading the same bytes.

    python -m bench.coldboot                       # SD1.5 and SDXL, fp16 and fp32, weights built once in a temp dir
    python -m bench.coldboot --models sd15 --dtypes float16 --root /data/coldboot
    python -m bench.coldboot --device cuda --dtypes float16   # on a GPU: the GPU configuration itself

A scaled-to-zero model on Replicate pays setup() on every cold boot. Each model's weights are written once at their
real sizes, random, in the real repos' layout, dtypes and key names (the base's fp16 files, the fp32 VAE fix and Flash
LoRA, the fp16 CompVis safety checker, the fp32 second opinion); tokenizers and scheduler configs come from
testkit/tiny_repos.py. Then, in a fresh process per run, with the weight files evicted from the page cache first
(posix_fadvise DONTNEED on those files alone: nothing else on the machine is touched):

- the floor: reading every weight file the model loads, start to end, in 16 MiB reads (cold, then again warm);
- Engine.load (what setup() runs) with each stage timed where it happens: reading tensors (safetensors), building the
  modules around them, merging the Flash adapter, moving to the device, the safety checker and its second opinion;
  and, outside setup unless FLASHSD_COMPILE=1, one warm-up call at a small size;
- peak host memory (ru_maxrss) against the weights' size on disk.

fp16 on the CPU stands in for the GPU configuration (fp16 files, fp16 modules): the modules stay in host memory here,
where on a GPU they would leave it, so its peak host memory is an upper bound of the GPU's. fp32 is what the CPU
runtime serves with (every fp16 file doubled by the cast).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.common import PROJECT, cpu_model, table

READ_CHUNK = 16 * 2**20
DONE = ".coldboot-complete"
DEFAULT_ROOT = Path(tempfile.gettempdir()) / "flashsd-coldboot"  # built once per model, kept for later runs
# Real configs not committed elsewhere (the denoisers' are in testkit/real_configs). CLIP ViT-L/14's text tower is
# SD1.5's and SDXL's first text encoder; OpenCLIP ViT-bigG/14's text tower SDXL's second (their config.json files in
# the two base repos); the SD VAE (SDXL's fp16 fix has the same architecture); the CompVis checker's vision tower.
CLIP_L_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2,
    pad_token_id=1,
)  # fmt: skip
CLIP_BIGG_TEXT = dict(
    CLIP_L_TEXT, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    projection_dim=1280, hidden_act="gelu",
)  # fmt: skip
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    sample_size=512, scaling_factor=0.18215,
)  # fmt: skip
SAFETY_VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=14, projection_dim=768,
)  # fmt: skip


# --- real-size random weights -------------------------------------------------------------------------------


def saved_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """{key: shape} of `module` as its library saves it (transformers' save-time key names), from meta tensors."""
    state = module.state_dict()
    if hasattr(module, "config") and hasattr(module.config, "to_json_string"):  # a transformers model
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(module, state)
    return {key: tuple(t.shape) for key, t in state.items()}


def write_random_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int) -> int:
    """A safetensors file of random values (uniform in ±0.02) in the layout safetensors' serializer writes, written
    tensor by tensor so that memory holds one tensor at a time. Returns its size."""
    from testkit.real_size import safetensors_header

    name = {torch.float16: "F16", torch.float32: "F32"}[dtype]
    header = safetensors_header(shapes, {"format": "pt"}, name)
    generator = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(header)
        for key in sorted(shapes):
            values = torch.empty(shapes[key], dtype=torch.float32).uniform_(-0.02, 0.02, generator=generator)
            f.write(values.to(dtype).numpy().tobytes())
    os.replace(partial, path)
    return path.stat().st_size


def _meta(build):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build().eval()


def _components(key: str) -> list[tuple[str, str, object, torch.dtype, object]]:
    """(repo id, weights file, meta module or shapes, file dtype, config writer) for every weight file of `key`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from flashsd.models import MODELS
    from testkit.real_size import adapter_tensor_shapes, real_config

    model = MODELS[key]
    base = model.base.id
    unet = _meta(lambda: UNet2DConditionModel.from_config(real_config(key)))
    text = _meta(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)))
    checker_config = CLIPConfig(text_config=CLIP_L_TEXT, vision_config=SAFETY_VISION, projection_dim=768)
    checker_config.architectures = ["StableDiffusionSafetyChecker"]
    checker = _meta(lambda: StableDiffusionSafetyChecker(checker_config))
    half, full = torch.float16, torch.float32
    parts = [
        (base, "unet/diffusion_pytorch_model.fp16.safetensors", unet, half, unet),
        (base, "text_encoder/model.fp16.safetensors", text, half, text),
        (model.adapter.id, "pytorch_lora_weights.safetensors", adapter_tensor_shapes(key), full, None),
        (model.safety_checker.id, "safety_checker/model.fp16.safetensors", checker, half, checker),
        (model.safety_second_opinion.id, "model.safetensors", _second_opinion(), full, "second opinion"),
    ]
    if key == "sd15":
        vae = _meta(lambda: AutoencoderKL(**SD_VAE))
        parts.append((base, "vae/diffusion_pytorch_model.fp16.safetensors", vae, half, vae))
    elif key == "sdxl":
        text_2 = _meta(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT)))
        vae = _meta(lambda: AutoencoderKL(**{**SD_VAE, "scaling_factor": 0.13025, "force_upcast": False}))
        parts += [
            (base, "text_encoder_2/model.fp16.safetensors", text_2, half, text_2),
            (model.vae.id, "diffusion_pytorch_model.safetensors", vae, full, vae),  # the fix ships fp32 only
        ]
    else:
        raise ValueError(f"cold-boot weights are built for sd15 and sdxl, not {key!r}")
    return parts


def _second_opinion():
    from transformers import ViTConfig, ViTForImageClassification

    from testkit.tiny_repos import SECOND_OPINION_CONFIG

    config = {k: v for k, v in SECOND_OPINION_CONFIG.items() if not k.startswith("_")}
    return _meta(lambda: ViTForImageClassification(ViTConfig(**config)))


def build(key: str, root: Path, log=print) -> Path:
    """Build (once) and return a weights root holding `key` at real size with random weights."""
    from flashsd.models import MODELS
    from flashsd.weights import missing_files, repo_dir
    from testkit.tiny_repos import SECOND_OPINION_CONFIG, _json_dump, _quiet, build_repo_files

    model = MODELS[key]
    root = Path(root)
    done = root / f"{DONE}-{key}"
    if done.is_file() and not missing_files(model, root):
        return root
    build_repo_files(root, key)  # the layout, tokenizers, schedulers, configs; weights replaced below
    with _quiet():
        for index, (repo_id, name, source, dtype, config) in enumerate(_components(key)):
            repo = next(r for r in model.repos if r.id == repo_id)
            path = repo_dir(root, repo) / name
            shapes = source if isinstance(source, dict) else saved_shapes(source)
            started = time.perf_counter()
            size = write_random_safetensors(path, shapes, dtype, seed=index)
            log(f"  {repo_id}/{name}: {size / 2**30:.2f} GiB in {time.perf_counter() - started:.0f} s")
            if config == "second opinion":
                _json_dump(path.parent / "config.json", SECOND_OPINION_CONFIG, sort_keys=True)
            elif hasattr(config, "save_config"):  # diffusers
                config.save_config(path.parent)
            elif config is not None:  # transformers
                config.config.save_pretrained(path.parent)
    done.touch()
    return root


def weight_files(key: str, root: Path) -> list[Path]:
    """Every safetensors file the model loads."""
    from flashsd.models import MODELS
    from flashsd.weights import repo_dir

    model = MODELS[key]
    return [repo_dir(root, r) / n for r in model.repos for n in r.files if n.endswith(".safetensors")]


# --- measuring (in a fresh process) ---------------------------------------------------------------------------


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (only theirs), so the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(paths: list[Path]) -> float:
    """Seconds to read every byte of `paths` once, in 16 MiB reads."""
    buffer = bytearray(READ_CHUNK)
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - started


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def disk_read_bytes() -> int:
    """Bytes this process has made the kernel fetch from storage so far (page faults on mapped files included)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes:")).split()[1])


class Stages:
    """Wall time and bytes read from the disk per setup stage, stages nested as they run (time and bytes go to the
    innermost). Bytes, not timed read calls: safetensors maps its files, so the disk is read whenever a tensor is
    first touched, which can be long after it was "loaded"."""

    def __init__(self):
        self.stack: list[str] = []
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.bytes: dict[str, int] = defaultdict(int)
        self.order: list[str] = []

    @contextlib.contextmanager
    def stage(self, name: str):
        if name not in self.order:
            self.order.append(name)
        outer = self.stack[-1] if self.stack else None
        self.stack.append(name)
        started, cpu, read = time.perf_counter(), time.process_time(), disk_read_bytes()
        try:
            yield
        finally:
            elapsed, used = time.perf_counter() - started, time.process_time() - cpu
            fetched = disk_read_bytes() - read
            self.stack.pop()
            self.seconds[name] += elapsed
            self.cpu[name] += used
            self.bytes[name] += fetched
            if outer is not None:
                self.seconds[outer] -= elapsed
                self.cpu[outer] -= used
                self.bytes[outer] -= fetched

    def wrap(self, owner, attribute: str, name) -> None:
        """Time every call of owner.attribute as stage `name` (a string, or a function of the call's arguments)."""
        original = getattr(owner, attribute)
        stages = self

        def timed(*args, **kwargs):
            with stages.stage(name(*args, **kwargs) if callable(name) else name):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)


def page_in(modules) -> None:
    """Touch one value per memory page of every weight: the kernel reads from the disk whatever is not resident."""
    with torch.no_grad():
        for module in modules:
            for tensor in (*module.parameters(), *module.buffers()):
                flat = tensor.detach().reshape(-1)
                flat[:: max(1, 4096 // tensor.element_size())].float().sum()


def probe(args) -> dict:
    """One setup (Engine.load) in this fresh process, stage by stage."""
    paths = weight_files(args.model, Path(args.root))
    if args.cold:
        evict(paths)
    started = time.perf_counter()
    import diffusers
    import diffusers.pipelines.pipeline_utils as pipeline_utils

    from bench.pipeline import quiet
    from flashsd import adapter, engine, safety
    from flashsd.models import MODELS
    from flashsd.runtime import Runtime

    imported = time.perf_counter()
    rss_imports = rss_bytes()
    quiet()
    stages = Stages()
    stages.wrap(pipeline_utils, "load_sub_model", lambda *a, **k: f"base: {k.get('name')}")
    # SDXL's VAE is the fp16 fix, loaded on its own; SD1.5's comes with the base (the same name as its component).
    stages.wrap(diffusers.AutoencoderKL, "from_pretrained",
                lambda path, *a, **k: "VAE (fp16 fix)" if "fp16-fix" in str(path) else "base: vae")  # fmt: skip
    stages.wrap(adapter, "merge", "adapter merge")
    pipeline_class = getattr(diffusers, MODELS[args.model].pipeline)
    for step in ("load_lora_weights", "fuse_lora", "unload_lora_weights"):
        stages.wrap(pipeline_class, step, f"adapter merge: {step}")
    stages.wrap(adapter, "_fingerprints", "adapter merge: verifying which weights changed")
    stages.wrap(safety.SafetyChecker, "load", "safety checker")
    stages.wrap(safety.SecondOpinion, "load", "safety checker: second opinion")
    stages.wrap(torch.nn.Module, "to", lambda self, *a, **k: "move to the device (Module.to)")
    runtime = Runtime(torch.device(args.device), getattr(torch, args.dtype))
    with stages.stage("other (scheduler, mode pipelines, checks)"):
        loaded = engine.Engine.load(MODELS[args.model], Path(args.root), runtime)
        if runtime.device.type == "cpu" and runtime.dtype == torch.float16:
            # fp16 files into fp16 modules on the CPU: the tensors stay mapped onto the files, and what nothing has
            # touched yet is read at the first prediction. A copy to the GPU reads it all in setup: so does this.
            with stages.stage("reading the mapped weights not touched yet (a GPU copy reads them in setup)"):
                page_in(loaded.modules().values())
    setup_s = time.perf_counter() - imported
    peak = peak_rss_bytes()
    warm_up_s = None
    if args.warm_up:
        size = args.warm_up
        begun = time.perf_counter()
        loaded.warm_up([(size, size)], [1])
        warm_up_s = time.perf_counter() - begun
    return {
        "import_s": imported - started, "setup_s": setup_s, "warm_up_s": warm_up_s,
        "stages": [(name, stages.seconds[name], stages.cpu[name], stages.bytes[name]) for name in stages.order],
        "rss_after_imports": rss_imports, "peak_rss": peak, "load_average": os.getloadavg()[0],
        "cuda_max_allocated": torch.cuda.max_memory_allocated() if runtime.device.type == "cuda" else None,
    }  # fmt: skip


def floor(args) -> dict:
    paths = weight_files(args.model, Path(args.root))
    evict(paths)
    cold = read_all(paths)
    warm = read_all(paths)
    return {"cold_s": cold, "warm_s": warm, "bytes": sum(p.stat().st_size for p in paths)}


def _fresh(what: str, **options) -> dict:
    """Run `what` (probe or floor) in a fresh interpreter; its JSON result."""
    command = [sys.executable, "-m", "bench.coldboot", "--run", what]
    for name, value in options.items():
        if value is True:
            command.append(f"--{name.replace('_', '-')}")
        elif value not in (None, False):
            command += [f"--{name.replace('_', '-')}", str(value)]
    done = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("COLDBOOT "))
    return json.loads(line.removeprefix("COLDBOOT "))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def report(key: str, dtype: str, device: str, read: dict, run: dict) -> str:
    weights = read["bytes"]
    rows = [
        (name, f"{seconds:.2f}", f"{cpu:.2f}", f"{fetched / 2**30:.2f}")
        for name, seconds, cpu, fetched in run["stages"]
    ]
    rows.append((
        "setup (Engine.load), total", f"{run['setup_s']:.2f}", f"{sum(c for _, _, c, _ in run['stages']):.2f}",
        f"{sum(f for _, _, _, f in run['stages']) / 2**30:.2f}",
    ))  # fmt: skip
    if run["warm_up_s"] is not None:
        rows.append(("warm-up call (only with FLASHSD_COMPILE=1; not in the total)", f"{run['warm_up_s']:.2f}", "", ""))
    summary = [
        ("floor: reading the weight files, cold / warm", f"{read['cold_s']:.2f} s / {read['warm_s']:.2f} s"),
        ("weights on disk", _gib(weights)),
        ("setup / cold floor (goal <= 1.5)", f"{run['setup_s'] / read['cold_s']:.2f}"),
        ("imports before setup (torch, diffusers, flashsd)", f"{run['import_s']:.2f} s"),
        ("peak RSS / weights (goal <= 1.3 in the GPU configuration)", f"{run['peak_rss'] / weights:.2f}"),
        ("(peak RSS - RSS after imports) / weights", f"{(run['peak_rss'] - run['rss_after_imports']) / weights:.2f}"),
    ]
    if run["cuda_max_allocated"] is not None:
        summary.append(("peak GPU memory allocated / weights", f"{run['cuda_max_allocated'] / weights:.2f}"))
    return "\n".join([
        f"{key}, {dtype} on {device}, random weights at real size, weight files evicted from the page cache first "
        f"(load average {run['load_average']:.1f} on {os.cpu_count()} cores)",
        table(rows, ("stage", "wall s", "CPU s", "GiB read from the disk")),
        table(summary, ("", "")),
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--dtypes", default="float16,float32", help="float16 stands in for the GPU configuration")
    parser.add_argument("--root", default=str(DEFAULT_ROOT))
    parser.add_argument("--warm-up", type=int, default=0, help="also time one warm-up call at this square size")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: the GPU configuration itself (fp16)")
    parser.add_argument("--run", choices=["probe", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        result = probe(args) if args.run == "probe" else floor(args)
        print("COLDBOOT " + json.dumps(result))
        return
    print(f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = {}
    for key in args.models.split(","):
        print(f"Building {key} at real size in {args.root} (once)")
        build(key, Path(args.root))
        for dtype in args.dtypes.split(","):
            read = _fresh("floor", model=key, root=args.root)
            run = _fresh(
                "probe", model=key, root=args.root, dtype=dtype, device=args.device, cold=True,
                warm_up=args.warm_up or None,
            )  # fmt: skip
            results[f"{key}/{dtype}/{args.device}"] = {"floor": read, "setup": run}
            print(report(key, dtype, args.device, read, run), flush=True)
    out = PROJECT / "bench" / "results" / f"coldboot-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"written to {out.relative_to(PROJECT)}")


if __name__ == "__main__":
    main()
