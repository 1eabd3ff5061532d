"""The training's Cog schema: train.py's declarations agree with flashsd.training.options, the committed schema holds
the training document Cog merges into it (coglet validates /trainings against TrainingInput), and the generator keeps
them in step."""

import json

from flashsd.training import options
from testkit.cog_server import PROJECT_ROOT
from testkit.schema import SCHEMA, schema_script


def test_the_training_document_is_merged_into_the_committed_schema():
    document = json.loads(SCHEMA.read_text())
    schemas = document["components"]["schemas"]
    for name in ("TrainingInput", "TrainingOutput", "TrainingRequest", "TrainingResponse"):
        assert name in schemas, name
    assert {"/trainings", "/trainings/{training_id}/cancel", "/predictions"} <= set(document["paths"])
    assert schemas["TrainingOutput"] == {
        "title": "Output", "type": "object", "required": ["weights"],
        "properties": {"weights": {"title": "Weights", "type": "string", "format": "uri"}},
    }  # fmt: skip
    assert schemas["TrainingInput"]["required"] == ["input_images"]
    assert schemas["Input"]["title"] == "Input" and schemas["TrainingInput"]["title"] == "TrainingInput"


def test_train_py_declares_the_limits_and_defaults_of_the_options():
    inputs = json.loads(SCHEMA.read_text())["components"]["schemas"]["TrainingInput"]["properties"]
    expected = {
        "steps": (1, options.MAX_STEPS, options.DEFAULT_STEPS),
        "learning_rate": (options.MIN_LEARNING_RATE, options.MAX_LEARNING_RATE, options.DEFAULT_LEARNING_RATE),
        "lora_rank": (1, options.MAX_RANK, options.DEFAULT_RANK),
        "resolution": (options.MIN_RESOLUTION, options.MAX_RESOLUTION, None),
        "batch_size": (1, options.MAX_BATCH_SIZE, options.DEFAULT_BATCH_SIZE),
        "seed": (0, options.MAX_SEED, None),
    }
    for name, (low, high, default) in expected.items():
        assert (inputs[name]["minimum"], inputs[name]["maximum"], inputs[name]["default"]) == (low, high, default), name
    assert inputs["trigger_word"]["default"] == options.DEFAULT_TRIGGER_WORD
    assert inputs["train_text_encoder"]["default"] is False
    assert inputs["resolution"]["nullable"] and inputs["seed"]["nullable"]
    assert all(prop.get("description") for prop in inputs.values())


def test_check_fails_when_train_py_changed_but_the_schema_did_not(tmp_path):
    (tmp_path / ".cog").mkdir()
    (tmp_path / ".cog" / "openapi_schema.json").write_text(SCHEMA.read_text())
    for name in ("predict.py", "cog.yaml"):
        (tmp_path / name).write_text((PROJECT_ROOT / name).read_text())
    source = (PROJECT_ROOT / "train.py").read_text()
    changed = source.replace("ge=1, le=8, default=1", "ge=1, le=4, default=1")
    assert changed != source
    (tmp_path / "train.py").write_text(changed)
    result = schema_script("--check", "--root", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "predict.py:Predictor and train.py:train" in result.stderr and '"maximum": 4' in result.stderr


def test_without_a_train_line_the_schema_has_no_training_document(tmp_path):
    for name in ("predict.py", "train.py"):
        (tmp_path / name).write_text((PROJECT_ROOT / name).read_text())
    (tmp_path / "cog.yaml").write_text('predict: "predict.py:Predictor"\n')
    result = schema_script("--stdout", "--root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert "/trainings" not in document["paths"] and "TrainingInput" not in document["components"]["schemas"]
