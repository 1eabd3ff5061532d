"""The committed Cog schema matches predict.py, and predict.py's declarations agree with flashsd.request."""
import ast
import json
import subprocess
import sys

from flashsd import request
from tests.cog_server import PROJECT_ROOT

SCHEMA = PROJECT_ROOT / ".cog" / "openapi_schema.json"


def test_committed_schema_is_current():
    result = subprocess.run(
        [sys.executable, "scripts/openapi-schema", "--check"], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_input_declarations_are_literals_that_cog_build_can_read():
    """`cog build` parses predict.py as text: names, calls and f-strings in Input() are lost or fatal."""
    tree = ast.parse((PROJECT_ROOT / "predict.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "Input"]
    assert calls
    for call in calls:
        for keyword in call.keywords:
            value = keyword.value
            if isinstance(value, ast.List):
                assert all(isinstance(e, ast.Constant) for e in value.elts), keyword.arg
            else:
                assert isinstance(value, ast.Constant), f"line {call.lineno}: {keyword.arg} is not a literal"


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
    ]:
        assert (inputs[name]["minimum"], inputs[name]["maximum"]) == (low, high), name
    assert schemas["Input"]["required"] == ["prompt"]
    assert "nullable" in inputs["seed"] and "default" in inputs["seed"]
