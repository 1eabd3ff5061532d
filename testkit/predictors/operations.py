"""The product's Predictor with switches for tests/test_metrics_http.py and tests/test_health_http.py: what an
operator reads (per-prediction metrics, the health check) under slow stages, safety drops and fatal failures.

A marker in a prompt (a word, not A1111 syntax: brackets would make it run alone) switches its pipeline call (every
prediction sharing the call, for the stage delays):
- `#slow`: each forward of a text encoder waits ENCODER_WAIT_S, each call of the denoiser DENOISER_WAIT_S; after the
  call each prediction's logs say "operations: waited <e> s in the text encoders, <d> s in the denoiser";
- `#flag-first`: the safety checker flags that prediction's first image and no other (the CompVis checker flags it,
  the second opinion confirms), so it is left out; without it, no image is flagged;
- `#cuda-error`: the denoiser's second call raises the error torch raises on an illegal memory access (a sticky CUDA
  error: every later CUDA call of the process fails);
- `#stop-thread`: the model's thread is closed before the prediction is queued, as an interpreter shutdown closes
  it (the one way it stops: an exception in a task never ends it).
Everything else is predict.py's Predictor as is (same inputs, so the same OpenAPI schema), run by the real Cog
server in its own worker process:

    COG_PREDICT_TYPE_STUB=testkit/predictors/operations.py:OperationsPredictor python -m cog.server.http
"""

import logging
import time

import torch

from predict import Predictor

ENCODER_WAIT_S = 3.0
DENOISER_WAIT_S = 0.75
# What torch raises on a sticky CUDA error: "CUDA error: " + cudaGetErrorString, then c10's suffix
# (c10/cuda/CUDAMiscFunctions.cpp), as a torch.AcceleratorError.
ILLEGAL_ACCESS = (
    "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronously reported at some "
    "other API call, so the stacktrace below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1"
)

log = logging.getLogger("flashsd")


class OperationsPredictor(Predictor):
    def setup(self) -> None:
        super().setup()
        engine = self.engine
        call = {"slow": False, "cuda-error": False, "denoiser_calls": 0, "encoder_wait": 0.0, "denoiser_wait": 0.0}
        flag_first: list[bool] = []  # one entry per request the safety checker will see, in the call's order
        generate = engine.generate_batch

        def generate_switched(requests, says=None, *args, **options):
            call.update(denoiser_calls=0, encoder_wait=0.0, denoiser_wait=0.0)
            call["slow"] = any("#slow" in request.prompt for request in requests)
            call["cuda-error"] = any("#cuda-error" in request.prompt for request in requests)
            flag_first[:] = ["#flag-first" in request.prompt for request in requests if request.check_safety]
            results = generate(requests, says, *args, **options)
            if call["slow"]:
                for say in says or [log.log]:
                    say(logging.INFO, "operations: waited %.3f s in the text encoders, %.3f s in the denoiser",
                        call["encoder_wait"], call["denoiser_wait"])  # fmt: skip
            return results

        def wait(key: str, seconds: float) -> None:
            time.sleep(seconds)
            call[key] += seconds

        # The waits run in forward hooks registered now, before any of the engine's own: after the module's forward,
        # before anything the engine hooks to its end; so they are the module's time, as a slow kernel's would be.
        def encoder_ran(module, args, output):
            if call["slow"]:
                wait("encoder_wait", ENCODER_WAIT_S)

        def denoiser_called(module, args):
            call["denoiser_calls"] += 1
            if call["cuda-error"] and call["denoiser_calls"] == 2:
                raise torch.AcceleratorError(ILLEGAL_ACCESS)

        def denoiser_ran(module, args, output):
            if call["slow"]:
                wait("denoiser_wait", DENOISER_WAIT_S)

        checker = engine.safety_checker
        compvis_flags = checker.compvis_flags

        def flags_switched(images):
            compvis_flags(images)  # run, for its cost; its verdicts on random weights are not the test's
            flagged = flag_first.pop(0) if flag_first else False
            return [flagged and index == 0 for index in range(len(images))]

        engine.generate_batch = generate_switched
        checker.compvis_flags = flags_switched
        checker.second_opinion.labels = lambda images: ["nsfw"] * len(images)  # confirms every flag
        engine.denoiser.register_forward_pre_hook(denoiser_called)
        engine.denoiser.register_forward_hook(denoiser_ran)
        for name, module in engine.pipe.components.items():
            if name.startswith("text_encoder") and isinstance(module, torch.nn.Module):
                module.register_forward_hook(encoder_ran)

        batcher = self.batcher
        serve = batcher.serve

        async def serve_switched(request):
            if "#stop-thread" in request.prompt:
                batcher.thread.close("the model's thread was shut down (testkit: #stop-thread)")
            return await serve(request)

        batcher.serve = serve_switched
