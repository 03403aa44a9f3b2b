"""rcmfn's few-step student sampler as a diffusers scheduler: `diffusers.WanPipeline(..., scheduler=...)`.

Importing this module needs diffusers (the `media` / `dev` extras); nothing else in rcmfn imports it, so
diffusers stays an optional dependency. SPEC-rcm §6.1: the student predicts x0 at each TrigFlow time of
[atan sigma_max, m_1, ..., 0] and re-noises it to the next one. diffusers pipelines feed the transformer
the scheduler's sample as it is, with `scheduler.timesteps` as its time input, so the sample kept here is
the network's input x_in = x_t / (cos t + sin t) = (1 - r) x0 + r eps, the rectified-flow state at
r = sin t / (sin t + cos t), and the timestep is timestep_scale r (rcmfn.precond.trigflow_coefficients).
Given the velocity v the network returns there, x0 = x_t cos t - F sin t with the TrigFlow velocity
F = ((cos t - sin t) x_t + v) / (cos t + sin t) (rcmfn.precond.trigflow_denoiser), which simplifies to
x0 = x_in - r v (derived), and the next state is (1 - r') x0 + r' eps' with fresh noise eps'.

rcmfn starts from unit noise in TrigFlow space, x_{t_0} = eps (rcmfn.samplers.consistency_sample), i.e.
x_in = eps / (cos t_0 + sin t_0): pass `latents=scheduler.start_latents(noise)` (or `use_noise`) to the
pipeline for exactly rcmfn's sample. A pipeline left to draw its own latents starts from unit noise at the
network's input scale instead, cos t_0 + sin t_0 times larger (1.012 at sigma_max 80, 1.001 at 800).
Distilled students run without classifier-free guidance: call the pipeline with guidance_scale=1.0.
"""

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from rcmfn.few_step import FewStepSettings
from rcmfn.precond import TIME_SCALE
from rcmfn.rollout import BACKWARD_TIMESTEPS


class FewStepScheduler(SchedulerMixin, ConfigMixin):
    """The consistency sampler of an rCM student (rcmfn.samplers.consistency_sample) for diffusers pipelines.

    `sigma_max` and `mid_times` are the model preset's (the exported model card names them);
    `timestep_scale` is the network's time input per unit of rectified-flow time (Wan 1000, Cosmos 1).
    Fresh noise for each re-noise comes from `use_noise` (rcmfn's [steps, B, ...] noise), else from the
    `generator` passed to `step`, else from `self.generator` (None: torch's global generator).
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        sigma_max: float = 80.0,
        mid_times: tuple[float, ...] = BACKWARD_TIMESTEPS,
        timestep_scale: float = TIME_SCALE,
        num_train_timesteps: int = 1000,
    ):
        self.settings = FewStepSettings(float(sigma_max), tuple(float(m) for m in mid_times))
        self.generator: torch.Generator | None = None
        self.noise: torch.Tensor | None = None
        self._begin_index: int | None = None
        self.set_timesteps(self.settings.max_steps)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None, **_) -> None:
        """The grid of `num_inference_steps` steps (1 .. len(mid_times) + 1); extra diffusers options ignored."""
        self.rf = self.settings.rf_times(num_inference_steps).to(device)  # float64 [k]
        self.rf_next = torch.cat([self.rf[1:], self.rf.new_zeros(1)])
        self.timesteps = (self.config.timestep_scale * self.rf).to(torch.float32)
        self.sigmas = torch.cat([self.rf, self.rf.new_zeros(1)]).to(torch.float32)  # flow-matching sigma = r
        self.num_inference_steps = num_inference_steps
        self._step_index = None

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def start_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """rcmfn's start state, unit noise at TrigFlow time t_0, at the network's input scale:
        noise / (cos t_0 + sin t_0)."""
        t0 = self.settings.trig_times(1)[0]
        return (noise.double() / (torch.cos(t0) + torch.sin(t0))).to(noise.dtype)

    def use_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """Take rcmfn's noise [steps, B, ...] (start state, then each re-noise's fresh noise): later steps
        re-noise with noise[1:]; returns the start latents for the pipeline's `latents=`."""
        self.noise = noise
        return self.start_latents(noise[0])

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """x0 = sample - r v, then (1 - r') x0 + r' eps' (x0 itself at the last step); float64 inside."""
        if self._step_index is None:
            self._step_index = self._begin_index or 0
        k = self._step_index
        if k >= self.num_inference_steps:
            raise ValueError(f"step {k + 1} of a {self.num_inference_steps}-step sample: call set_timesteps first")
        r, r_next = float(self.rf[k]), float(self.rf_next[k])
        x0 = sample.double() - r * model_output.double()
        if r_next > 0:
            if self.noise is not None:
                fresh = self.noise[k + 1].to(sample.device)
            else:
                fresh = randn_tensor(sample.shape, generator=generator or self.generator, device=sample.device)
            x0 = (1.0 - r_next) * x0 + r_next * fresh.double()
        self._step_index = k + 1
        prev = x0.to(sample.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
