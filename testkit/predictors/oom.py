"""The product's Predictor with one fault switch, for tests/test_robustness_http.py.

A prompt containing `[inject-oom]` makes the denoiser's second call raise torch.cuda.OutOfMemoryError, where a
CUDA allocation would fail mid-denoising on a GPU. Everything else is predict.py's Predictor as is (same inputs,
so the same OpenAPI schema), run by the real Cog server in its own worker process:

    COG_PREDICT_TYPE_STUB=testkit/predictors/oom.py:OomPredictor python -m cog.server.http
"""

import torch

from predict import Predictor

MARKER = "[inject-oom]"
MESSAGE = (
    "CUDA out of memory. Tried to allocate 30.00 GiB. GPU 0 has a total capacity of 79.11 GiB of which "
    "2.13 GiB is free."
)


class OomPredictor(Predictor):
    def setup(self) -> None:
        super().setup()
        engine = self.engine
        state = {"armed": False, "calls": 0}
        generate = engine.generate_batch

        def generate_armed(requests, *args, **options):
            state["armed"], state["calls"] = any(MARKER in request.prompt for request in requests), 0
            return generate(requests, *args, **options)

        def fail_second_call(module, args, kwargs):
            if state["armed"]:
                state["calls"] += 1
                if state["calls"] == 2:
                    raise torch.cuda.OutOfMemoryError(MESSAGE)

        engine.generate_batch = generate_armed
        getattr(engine.pipe, engine.model.denoiser).register_forward_pre_hook(fail_second_call, with_kwargs=True)
