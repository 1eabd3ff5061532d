"""predict.py's Predictor as tests and benchmarks drive it. `predictor_inputs` for calling predict() in process;
oom.py, slow_lora.py and operations.py are Predictors with fault switches, for the real Cog server to run
(COG_PREDICT_TYPE_STUB=testkit/predictors/oom.py:OomPredictor)."""

from __future__ import annotations

import inspect


def predictor_inputs(predictor_class, **overrides) -> dict:
    """Every input of predict() at its declared default (calling predict() directly does not resolve
    cog's Input() defaults), then the overrides."""
    inputs = {}
    for name, parameter in inspect.signature(predictor_class.predict).parameters.items():
        if name == "self":
            continue
        default = getattr(parameter.default, "default", parameter.default)
        inputs[name] = None if default is inspect.Parameter.empty or "Undefined" in type(default).__name__ else default
    inputs.update(overrides)
    return inputs
