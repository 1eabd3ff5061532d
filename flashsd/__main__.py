"""The local command line: the same engine as the Cog predictor, without Docker.

python -m flashsd predict -i prompt="an astronaut riding a horse" -i num_outputs=2
python -m flashsd predict --trained-weights outputs/trained_model.tar -i prompt="a photo of TOK"
python -m flashsd train -i input_images=photos.zip -i trigger_word=TOK -i steps=500
FLASHSD_CONTROLNETS=canny python -m flashsd predict -i prompt="a glass house" -i controlnet_1=canny \
    -i controlnet_1_image=photo.jpg
python -m flashsd sizes
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .control import build_problem, control_inputs, with_controlnets
from .download import ensure_weights
from .engine import Engine
from .errors import DeviceError, InputError, SettingsError, WeightsError
from .images import write_outputs
from .loras.trained import apply_trained_lora, fetch_trained_lora
from .models import MODELS
from .request import build_request, size_table
from .runtime import select_runtime
from .settings import Settings


def _parse_inputs(pairs: list[str]) -> dict:
    """`-i name=value` as with `cog predict`; values are read as JSON where they parse, else as text."""
    inputs = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise InputError(f"-i {pair!r}: write inputs as name=value.")
        try:
            inputs[name] = json.loads(value)
        except json.JSONDecodeError:
            inputs[name] = value
    if isinstance(inputs.get("prompt"), (int, float)):
        inputs["prompt"] = str(inputs["prompt"])
    return inputs


def predict(args) -> int:
    settings = Settings.from_environ()
    model = MODELS[args.model or settings.model]
    problem = build_problem(model, settings.controlnets)  # --model may name one FLASHSD_CONTROLNETS does not fit
    if problem:
        raise SettingsError(
            f"FLASHSD_CONTROLNETS={','.join(settings.controlnets)} with --model {model.key}: {problem}."
        )
    model = with_controlnets(model, settings.controlnets)
    root = Path(args.weights) if args.weights else settings.weights_root
    # As a model version made from a training (Cog's COG_WEIGHTS): the training's LoRA stands for an empty lora_weights.
    trained = fetch_trained_lora(args.trained_weights, model, root, settings.loras)
    inputs = _parse_inputs(args.input)
    controls = control_inputs(inputs)  # controlnet_1=canny -i controlnet_1_image=photo.jpg ...
    # fail on bad input before loading
    request = build_request(model, **inputs, controls=controls, controlnets=settings.controlnets, default_lora=trained)
    runtime = select_runtime(settings.device)
    ensure_weights(model, root)
    engine = Engine.load(model, root, runtime, settings)
    if trained is not None:
        apply_trained_lora(engine.loras, trained)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path in write_outputs(engine.generate(request), request, model, out):
        print(f"wrote {path}")
    return 0


def train(args) -> int:
    """One training, as train.py runs it under Cog: the tar goes to --output-dir."""
    from dataclasses import fields

    from .training import TrainingOptions, run_training

    settings = Settings.from_environ()
    model = MODELS[args.model or settings.model]
    root = Path(args.weights) if args.weights else settings.weights_root
    inputs = _parse_inputs(args.input)
    archive = inputs.pop("input_images", None)
    if archive is None:
        raise InputError("-i input_images=PATH is required: a zip or tar of images.")
    known = {f.name for f in fields(TrainingOptions)}
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise InputError(
            f"unknown training input(s) {', '.join(unknown)}; the inputs are input_images, {', '.join(sorted(known))}."
        )
    if "trigger_word" in inputs:
        inputs["trigger_word"] = str(inputs["trigger_word"])
    tar = run_training(
        Path(str(archive)),
        TrainingOptions(**inputs),
        model,
        root,
        select_runtime(settings.device),
        Path(args.output_dir),
    )
    print(f"wrote {tar}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashsd", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("predict", help="generate images and write them to --output-dir")
    run.add_argument(
        "-i",
        "--input",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a predictor input, as with `cog predict -i` (repeatable)",
    )
    run.add_argument("--model", choices=list(MODELS), help="default: FLASHSD_MODEL or sdxl")
    run.add_argument("--weights", help="weights root (default: FLASHSD_WEIGHTS or weights/)")
    run.add_argument(
        "--trained-weights",
        metavar="TAR",
        help="a training's output (path or URL): its LoRA applies unless -i lora_weights names another, as on a model "
        "version made from the training (Cog's COG_WEIGHTS)",
    )
    run.add_argument("--output-dir", default="outputs")
    learn = commands.add_parser("train", help="train a style LoRA on a zip or tar of images; the tar to --output-dir")
    learn.add_argument("-i", "--input", action="append", default=[], metavar="NAME=VALUE",
                       help="a training input, as train.py declares them (repeatable)")  # fmt: skip
    learn.add_argument("--model", choices=list(MODELS), help="default: FLASHSD_MODEL or sdxl")
    learn.add_argument("--weights", help="weights root (default: FLASHSD_WEIGHTS or weights/)")
    learn.add_argument("--output-dir", default="outputs")
    commands.add_parser("sizes", help="print the aspect-ratio sizes of each model (Markdown)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.command == "sizes":
        ratios = list(size_table(MODELS["sdxl"]))
        keys = {m.native_size: m.key for m in MODELS.values()}
        print("| aspect_ratio | " + " | ".join(f"{n}² models" for n in keys) + " |")
        print("|---|" + "---|" * len(keys))
        for ratio in ratios:
            cells = [f"{w}x{h}" for w, h in (size_table(MODELS[k])[ratio] for k in keys.values())]
            print(f"| {ratio} | " + " | ".join(cells) + " |")
        return 0
    try:
        return train(args) if args.command == "train" else predict(args)
    except (InputError, WeightsError, DeviceError, SettingsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, InputError) else 1


if __name__ == "__main__":
    sys.exit(main())
