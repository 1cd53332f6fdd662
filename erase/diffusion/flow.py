"""Rectified-flow (flow-matching) time for SD3 and FLUX, in the task's timestep vocabulary.

Methods and attacks speak of a timestep ``t`` in ``[0, num_train_timesteps)``: they draw it with
``randint``, noise with ``task.add_noise(x0, noise, t)``, predict with ``task.predict(.., t, ..)`` and
compare with ``task.denoising_target``. For a flow model that same ``t`` means the noise level of
diffusers' training schedule (``FlowMatchEulerDiscreteScheduler``: ``s = (t + 1) / N`` shifted to
``sigma = shift * s / (1 + (shift - 1) * s)``), and

    x_t = (1 - sigma) x_0 + sigma * noise,   target = noise - x_0 (the velocity),

the transformer reading ``sigma * N`` as its timestep (the value the pipeline passes). Real-valued
``t`` is allowed, so a partially sampled latent's exact noise level maps back to a ``t``
(:meth:`FlowTime.from_model_timestep`) and reaches the model unchanged.
"""

from __future__ import annotations

import torch


class FlowTime:
    def __init__(self, scheduler_config):
        if scheduler_config.get("use_dynamic_shifting", False):
            # FLUX-dev's schedule shifts with the image size at sampling time (mu from the token count); training
            # noise levels are unshifted: diffusers' examples/dreambooth/train_dreambooth_flux.py draws
            # noise_scheduler_copy.timesteps[indices] and their sigmas from the scheduler's __init__ table, which
            # applies `shift` only without use_dynamic_shifting. So shift 1 here; partial samples still map back
            # exactly, since from_model_timestep inverts this same map of the sampler's (shifted) timestep.
            self.shift = 1.0
        else:
            self.shift = float(scheduler_config.get("shift", 1.0))
        self.n = int(scheduler_config.get("num_train_timesteps", 1000))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        s = (t.float() + 1) / self.n
        return self.shift * s / (1 + (self.shift - 1) * s)

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """What the transformer reads for ``t``: ``sigma * N``."""
        return self.sigma(t) * self.n

    def from_model_timestep(self, timestep: torch.Tensor | float) -> torch.Tensor:
        """The ``t`` whose :meth:`model_timestep` is ``timestep`` (a sampler's value), inverting the shift."""
        sigma = torch.as_tensor(timestep, dtype=torch.float32) / self.n
        s = sigma / (self.shift - (self.shift - 1) * sigma)
        return s * self.n - 1

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma(t).to(x0.device, x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return (1 - sigma) * x0 + sigma * noise

    @staticmethod
    def velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0
