"""The product's Predictor with style-LoRA loading or fusing slowed down on demand, for tests/test_loras_http.py: a
cancel request must land while a LoRA is being loaded or fused, which on tiny weights takes milliseconds.

The file named by FLASHSD_TEST_SLOW switches it: "load" makes each load_lora_weights call wait 3 s once the adapter
layers are attached; "fuse" makes each merged LoRA layer wait 0.1 s (so a cancel lands with some weights fused and
others not). Markers in the logs ("slow-lora: loaded", "slow-lora: merged") say where it is. Everything else is
predict.py's Predictor as is (same inputs, so the same OpenAPI schema):

    COG_PREDICT_TYPE_STUB=testkit/predictors/slow_lora.py:SlowLoraPredictor python -m cog.server.http
"""

import os
import time
from pathlib import Path

from predict import Predictor


def _wait(seconds: float) -> None:
    # Short sleeps: a cancel arrives between Python bytecodes, not inside one long C call.
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)


class SlowLoraPredictor(Predictor):
    def setup(self) -> None:
        super().setup()
        from peft.tuners.lora import layer

        switch = Path(os.environ["FLASHSD_TEST_SLOW"])
        mode = lambda: switch.read_text().strip() if switch.is_file() else ""  # noqa: E731
        pipe = self.engine.pipe
        load = pipe.load_lora_weights

        def slow_load(*args, **kwargs):
            load(*args, **kwargs)
            if mode() == "load":
                print("slow-lora: loaded, waiting", flush=True)
                _wait(3.0)

        merge = layer.Linear.merge

        def slow_merge(self, safe_merge=False, adapter_names=None):  # the signature diffusers inspects
            merge(self, safe_merge=safe_merge, adapter_names=adapter_names)
            if mode() == "fuse":
                print("slow-lora: merged a layer", flush=True)
                _wait(0.1)

        pipe.load_lora_weights = slow_load
        layer.Linear.merge = slow_merge
