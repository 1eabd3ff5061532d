"""The committed Cog schema matches predict.py, and predict.py's declarations agree with flashsd.request."""

import ast
import json
import subprocess
import sys

from flashsd import control, request
from testkit.cog_server import PROJECT_ROOT
from testkit.schema import SCHEMA, schema_script


def test_committed_schema_is_current():
    result = subprocess.run(
        [sys.executable, "scripts/openapi-schema", "--check"], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_input_declarations_are_literals_that_cog_build_can_read():
    """`cog build` parses predict.py as text: names, calls and f-strings in Input() are lost or fatal. A negative
    number (`ge=-1`) is a literal to it, as in cog-flux's `lora_scale` (Python's AST spells it as a minus applied
    to a constant)."""

    def literal(node) -> bool:
        negative = isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
        return isinstance(node.operand if negative else node, ast.Constant)

    tree = ast.parse((PROJECT_ROOT / "predict.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "Input"]
    assert calls
    for call in calls:
        for keyword in call.keywords:
            value = keyword.value
            if isinstance(value, ast.List):
                assert all(isinstance(e, ast.Constant) for e in value.elts), keyword.arg
            else:
                assert literal(value), f"line {call.lineno}: {keyword.arg} is not a literal"


def test_declared_limits_agree_with_the_request_rules():
    schemas = json.loads(SCHEMA.read_text())["components"]["schemas"]
    inputs = schemas["Input"]["properties"]
    assert schemas["aspect_ratio"]["enum"] == [request.MATCH_INPUT] + list(request.ASPECT_RATIOS) + [request.CUSTOM]
    assert inputs["aspect_ratio"]["default"] == request.MATCH_INPUT
    assert inputs["prompt_strength"]["default"] == request.DEFAULT_PROMPT_STRENGTH
    assert schemas["output_format"]["enum"] == list(request.OUTPUT_FORMATS)
    for name, low, high in [
        ("width", request.MIN_SIDE, request.MAX_SIDE),
        ("height", request.MIN_SIDE, request.MAX_SIDE),
        ("num_outputs", 1, request.MAX_OUTPUTS),
        ("num_inference_steps", 1, request.MAX_STEPS),
        ("guidance_scale", 0, request.MAX_GUIDANCE),
        ("seed", 0, request.MAX_SEED),
        ("output_quality", 1, 100),
        ("prompt_strength", 0, 1),
        ("lora_scale", request.MIN_LORA_SCALE, request.MAX_LORA_SCALE),
        ("extra_lora_scale", request.MIN_LORA_SCALE, request.MAX_LORA_SCALE),
    ]:
        assert (inputs[name]["minimum"], inputs[name]["maximum"]) == (low, high), name
    assert schemas["Input"]["required"] == ["prompt"]
    assert "nullable" in inputs["seed"] and "default" in inputs["seed"]


def test_control_declarations_agree_with_the_control_rules():
    schemas = json.loads(SCHEMA.read_text())["components"]["schemas"]
    inputs = schemas["Input"]["properties"]
    slots = [f"controlnet_{n}" for n in range(1, control.MAX_CONTROLS + 1)]
    assert sorted(name for name in inputs if name.startswith("controlnet_") and name.count("_") == 1) == slots
    for name in slots:
        assert (
            schemas[name]["enum"] == [control.NONE, *control.CONTROL_TYPES] and inputs[name]["default"] == control.NONE
        )
        image = inputs[f"{name}_image"]
        assert image["format"] == "uri" and image["default"] is None and image["nullable"]
        scale = inputs[f"{name}_conditioning_scale"]
        assert (scale["minimum"], scale["maximum"], scale["default"]) == (
            control.MIN_CONDITIONING_SCALE, control.MAX_CONDITIONING_SCALE, control.DEFAULT_CONDITIONING_SCALE,
        )  # fmt: skip
        assert [inputs[f"{name}_{end}"][key] for end in ("start", "end") for key in ("minimum", "maximum", "default")] == [
            0, 1, 0, 0, 1, 1,
        ]  # fmt: skip


def test_check_accepts_the_file_a_real_cog_build_writes(tmp_path):
    """`cog build`/`cog run`/`cog serve` rewrite the file compact, with the CLI's version: still current."""
    document = json.loads(SCHEMA.read_text())
    document["info"]["version"] = "0.99.0-real-cli"
    rewritten = tmp_path / "openapi_schema.json"
    rewritten.write_text(json.dumps(document, separators=(",", ":")))
    result = schema_script("--check", "--output", str(rewritten))
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_fails_when_an_input_changed(tmp_path):
    document = json.loads(SCHEMA.read_text())
    document["components"]["schemas"]["Input"]["properties"]["num_outputs"]["maximum"] = request.MAX_OUTPUTS + 1
    stale = tmp_path / "openapi_schema.json"
    stale.write_text(json.dumps(document, indent=2))
    result = schema_script("--check", "--output", str(stale))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "out of date" in result.stderr and '"maximum": 4' in result.stderr


def test_check_fails_when_predict_py_changed_but_the_schema_did_not(tmp_path):
    (tmp_path / ".cog").mkdir()
    (tmp_path / ".cog" / "openapi_schema.json").write_text(SCHEMA.read_text())
    source = (PROJECT_ROOT / "predict.py").read_text()
    changed = source.replace("ge=1, le=100, default=80", "ge=1, le=95, default=80")
    assert changed != source
    (tmp_path / "predict.py").write_text(changed)
    result = schema_script("--check", "--root", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert '"maximum": 95' in result.stderr


def _all_bounds(node, where="$"):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("minimum", "maximum"):
                yield f"{where}.{key}", value
            yield from _all_bounds(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _all_bounds(value, f"{where}[{i}]")


def test_every_numeric_bound_is_exact_in_float64_and_safe_in_javascript():
    """Cog's generator keeps ge/le as float64 and JavaScript clients as doubles: an integer beyond 2**53 - 1
    would reach them rounded (2**63 - 5 became 9223372036854776000)."""
    bounds = list(_all_bounds(json.loads(SCHEMA.read_text())))
    assert len(bounds) >= 14, bounds
    for where, value in bounds:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        assert float(value) == value, f"{where}={value} is not exact in float64"  # int == float compares exactly
        assert abs(value) <= 2**53 - 1, f"{where}={value} is beyond JavaScript's safe integers"
    # The largest seed of a full batch, seed + MAX_OUTPUTS - 1, is itself still a safe integer.
    assert request.MAX_SEED + request.MAX_OUTPUTS - 1 == 2**53 - 1


def _project_with(tmp_path, old, new):
    source = (PROJECT_ROOT / "predict.py").read_text()
    assert old in source
    (tmp_path / "predict.py").write_text(source.replace(old, new))
    return schema_script("--stdout", "--root", str(tmp_path))


def test_the_generator_refuses_what_cog_build_would_read_differently(tmp_path):
    """The Go parser rounds bounds to float64, drops a bound it cannot parse and copies string text raw."""
    cases = [
        ("le=9007199254740988", "le=9223372036854775803", "not exact in float64"),
        ("le=9007199254740988", "le=9007199254740993", "not exact in float64"),
        ("le=9007199254740988", "le=9007199254740992", "beyond 2**53 - 1"),
        ("le=9007199254740988", "le=2**53", "plain decimal number"),
        ("le=9007199254740988", "le=9_007_199_254_740_988", "plain decimal number"),
        ('description="How many images to generate."', 'description="How many \\"images\\"."', "plain string literal"),
        ('description="How many images to generate."', 'description="How many " "images."', "plain string literal"),
    ]
    for old, new, message in cases:
        result = _project_with(tmp_path, old, new)
        assert result.returncode != 0 and message in result.stderr, (new, result.stdout, result.stderr)
