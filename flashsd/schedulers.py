"""The Flash SD3 scheduler: a flow-matching Euler step that re-noises with fresh Gaussian noise.

Flash SD3 was distilled against `FlashFlowMatchEulerDiscreteScheduler`, a class that only ever lived in a
diffusers fork. This is an independent implementation of its maths (REFERENCE.md §2), written against
diffusers' public scheduler base classes so the stock SD3 pipelines (text-to-image, img2img, inpaint) can
use it unchanged.

Reproducibility per image: the stock pipelines call `scheduler.step(...)` without a generator, so the fresh
noise would come from the global RNG. `noise_generators()` lets the caller hand in each image's own
generator (the one that drew its initial latents), so image i of a batch gets exactly the noise of a
single-image run with the same seed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

Generators = torch.Generator | Sequence[torch.Generator] | None

# Options of the stock FlowMatchEulerDiscreteScheduler that would change the sigma schedule. A base
# repo's config may carry them, and diffusers drops them silently when the class changes; Flash was
# distilled with a fixed shift, so ignoring one that a config turns on would silently change the grid.
_SCHEDULE_CHANGING_OPTIONS = (
    "use_dynamic_shifting",
    "shift_terminal",
    "invert_sigmas",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
)


class FlashFlowMatchEulerDiscreteScheduler(SchedulerMixin, ConfigMixin):
    """Flow-matching Euler with fresh noise at every step (LCM-style), for Flash SD3.

    Config: `num_train_timesteps` (T) and `shift`; nothing else is honoured. With
    σ(s) = shift·s / (1 + (shift−1)·s), `set_timesteps(N)` gives σ_i = σ(u_i/T) for
    u = linspace(T·σ_max, T·σ_min, N), where σ_max = σ(1) = 1 and σ_min = σ(1/T), timesteps σ_i·T and
    sigmas [σ_0 … σ_{N−1}, 0]. `step` at index k: x̂0 = x − σ_k·v, then σ_{k+1}·ε + (1−σ_{k+1})·x̂0.
    """

    # Loading a stock flow-match config into this class (and back) is expected; listing it keeps
    # diffusers from warning about that class's options, which are handled in `from_config`.
    _compatibles = ["FlowMatchEulerDiscreteScheduler"]
    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be at least 1, got {num_train_timesteps}")
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        T = num_train_timesteps
        # Kept as Python floats: σ_min is where the inference grid ends (before the second shift).
        self.sigma_max = 1.0
        self.sigma_min = self._shift_sigma(torch.tensor(1.0 / T, dtype=torch.float64)).item()
        # Until set_timesteps is called, expose the training grid σ(k/T), k = T … 1, like the stock class.
        train = self._shift_sigma(torch.arange(T, 0, -1, dtype=torch.float64) / T)
        self.num_inference_steps = None
        self.timesteps = (train * T).to(torch.float32)
        self.sigmas = train.to(torch.float32)
        self._step_index = None
        self._begin_index = None
        self._generators: Generators = None

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        # A stock config may ask for a schedule this class cannot give; refuse it instead of silently
        # sampling on a different grid. Explicit kwargs win over the config, as in diffusers.
        if isinstance(config, dict):
            asked = {**config, **kwargs}
            wanted = [name for name in _SCHEDULE_CHANGING_OPTIONS if asked.get(name)]
            if wanted:
                raise ValueError(
                    f"{cls.__name__} uses the fixed shift the Flash SD3 recipe was distilled with; the "
                    f"scheduler config asks for {', '.join(f'{n}={asked[n]!r}' for n in wanted)}, which it "
                    "cannot honour. Load a config without these options (or set them to false/null)."
                )
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _shift_sigma(self, s: torch.Tensor) -> torch.Tensor:
        shift = self.config.shift
        return shift * s / (1 + (shift - 1) * s)

    # --- what the SD3 pipelines read -----------------------------------------------------------------

    @property
    def step_index(self) -> int | None:
        """Index of the next step; None until the first `step` after `set_timesteps`."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First step index, set by img2img/inpaint (`set_begin_index`) when strength < 1."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Build the N-step grid. Custom `sigmas` stand for u/T and are shifted too, as in the stock class."""
        if mu is not None:
            raise ValueError(
                f"{type(self).__name__} has a fixed shift ({self.config.shift}); resolution-dependent "
                "shifting (mu) is not part of the Flash SD3 recipe."
            )
        T = self.config.num_train_timesteps
        if sigmas is not None:
            if num_inference_steps is not None and num_inference_steps != len(sigmas):
                raise ValueError(f"got num_inference_steps={num_inference_steps} and {len(sigmas)} custom sigmas")
            s = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        else:
            if num_inference_steps is None or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
            # The end point T·σ_min is already shifted, and σ() below shifts it again (σ(σ(1/T)) ≈ 0.0089
            # at shift 3, not 0.0030). That is §2 read literally, and it is the grid the stock
            # FlowMatchEulerDiscreteScheduler (which the fork extended) builds for the same config.
            n = num_inference_steps
            s = torch.linspace(self.sigma_max * T, self.sigma_min * T, n, dtype=torch.float64) / T
        if len(s) < 1:
            raise ValueError("at least one sigma is needed")
        sig = self._shift_sigma(s)  # float64 until here, so float32 rounding happens once
        self.num_inference_steps = len(sig)
        self.timesteps = (sig * T).to(dtype=torch.float32, device=device)
        # Sigmas stay on the CPU: step and scale_noise read them as Python numbers, so a GPU run does not
        # synchronise on them at every step.
        self.sigmas = torch.cat([sig, sig.new_zeros(1)]).to(torch.float32)
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: float | torch.Tensor) -> int:
        """Position of `timestep` in the current grid (nearest entry; it must be close to one)."""
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        schedule = self.timesteps.detach().to("cpu", torch.float64)
        distance = (schedule - t).abs()
        index = int(torch.argmin(distance))  # first of equals, so a repeated timestep starts at its first use
        if distance[index] > 1e-3 * max(1.0, abs(t)):
            raise ValueError(f"timestep {t} is not in the current schedule {schedule.tolist()}")
        return index

    def _sigma_for(self, timestep: float | torch.Tensor) -> torch.Tensor:
        """σ for each element of `timestep`: the grid's own σ when it is a grid timestep, else t/T."""
        ts = torch.as_tensor(timestep).detach().to("cpu", torch.float64).reshape(-1)
        schedule = self.timesteps.detach().to("cpu", torch.float64)
        out = ts / self.config.num_train_timesteps
        for i, t in enumerate(ts.tolist()):
            hits = (schedule == t).nonzero()
            if len(hits):
                out[i] = float(self.sigmas[int(hits[0])])
        return out.to(torch.float32)

    def scale_noise(
        self,
        sample: torch.Tensor,
        timestep: float | torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Forward flow-matching process: σ·noise + (1−σ)·sample, with one σ per batch item or one for all.

        σ is looked up from the timestep itself rather than from step_index/begin_index as the stock class
        does; the two agree for every call the SD3 pipelines make, and the lookup cannot drift.
        """
        if noise is None:
            raise ValueError("scale_noise needs the noise tensor to mix in")
        sigma = self._sigma_for(timestep).to(sample.device)
        sigma = sigma.reshape(-1, *([1] * (sample.ndim - 1)))
        mixed = sigma * noise.to(torch.float32) + (1.0 - sigma) * sample.to(torch.float32)
        return mixed.to(sample.dtype)

    # --- per-image noise ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def noise_generators(self, generators: Generators) -> Iterator[FlashFlowMatchEulerDiscreteScheduler]:
        """Within the block, `step` draws its fresh noise from `generators` (one per image, or one for all).

        Pass the same generators the pipeline gets, so each image's noise stream continues from its own
        initial latents. The previous setting is restored on exit, exception or not (so blocks may nest).
        """
        previous = self._generators
        self._generators = generators
        try:
            yield self
        finally:
            self._generators = previous

    def _fresh_noise(self, sample: torch.Tensor, generators: Generators) -> torch.Tensor:
        if generators is None:
            return randn_tensor(sample.shape, device=sample.device, dtype=torch.float32)
        if isinstance(generators, torch.Generator):
            # One generator for the whole batch, drawn at once as diffusers' randn_tensor does.
            return torch.randn(sample.shape, generator=generators, device=generators.device, dtype=torch.float32).to(
                sample.device
            )
        generators = list(generators)
        if len(generators) != sample.shape[0]:
            raise ValueError(f"got {len(generators)} generators for a batch of {sample.shape[0]}; pass one per image")
        # Image i draws only from generator i, so its noise does not depend on the batch it is in.
        per_image = [
            torch.randn(sample.shape[1:], generator=g, device=g.device, dtype=torch.float32).to(sample.device)
            for g in generators
        ]
        return torch.stack(per_image)

    # --- the update ---------------------------------------------------------------------------------

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: Generators = None,
        return_dict: bool = True,
    ) -> FlowMatchEulerDiscreteSchedulerOutput | tuple[torch.Tensor]:
        """One Flash step from `sample` (at `timestep`) given the velocity `model_output`.

        Noise comes from `generator` if given, else from the generators of an enclosing
        `noise_generators` block, else from the global RNG. The last step returns x̂0 and draws nothing,
        so a generator's stream after a run does not depend on whether noise was wasted there.
        """
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not torch.is_floating_point(timestep)):
            # An int here is almost always a loop index from enumerate(), not a timestep.
            raise ValueError("step() takes a timestep from scheduler.timesteps, not an integer index")
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps before step")
        if self._step_index is None:
            # img2img/inpaint start part-way in (begin_index); text-to-image finds its place from t.
            begin = self._begin_index
            self._step_index = begin if begin is not None else self.index_for_timestep(timestep)
        k = self._step_index
        if k >= self.num_inference_steps:
            raise IndexError(f"step index {k} is past the last of {self.num_inference_steps} steps")

        sigma, sigma_next = float(self.sigmas[k]), float(self.sigmas[k + 1])
        x0 = sample.to(torch.float32) - sigma * model_output.to(torch.float32)
        if k + 1 < self.num_inference_steps:
            eps = self._fresh_noise(sample, generator if generator is not None else self._generators)
            prev = sigma_next * eps + (1.0 - sigma_next) * x0
        else:
            prev = x0
        self._step_index = k + 1

        prev = prev.to(sample.dtype)
        if not return_dict:
            return (prev,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)
