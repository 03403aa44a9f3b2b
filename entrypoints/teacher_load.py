"""The teacher that `prepare --from-teacher` samples: a checkpoint (one network, or a two-expert pair switched
at its boundary) or random weights, as one sample(noise, rf_times, cond, uncond) -> x0 function."""

import torch

from entrypoints.sample import DTYPES as NET_DTYPES
from entrypoints.sample import SampleConfig, load_denoiser
from entrypoints.sample_experts import load_expert_pair, teacher_row
from entrypoints.teacher_data_config import sampler_settings
from rcmfn.models.registry import ModelSpec, get_spec, random_model
from rcmfn.precond import trigflow_denoiser
from rcmfn.samplers import teacher_euler_sample
from rcmfn.switch import EXPERTS


def load_teacher(cfg, spec: ModelSpec, device: torch.device):
    """sample(noise, rf_times, cond, uncond) -> x0 of the teacher (--teacher-model's network, else `spec`'s):
    the checkpoint, loaded strictly by entrypoints.sample's loader, or random weights (--random-teacher; the
    family's random init: Cosmos draws every layer since its release init zeroes some). A two-expert teacher
    is its pair, switched at the boundary with each expert's guidance unless --guidance (sample_experts.py)."""
    t = cfg.teacher_data
    if t.teacher_model not in (None, cfg.model):
        spec = get_spec(t.teacher_model)
    loader = SampleConfig(model=cfg.model, layout=t.teacher_layout, strict=True, dtype=t.teacher_dtype)

    def load(spec, path, seed=cfg.seed):
        if path is not None:
            return load_denoiser(spec, path, False, loader, device)
        module = random_model(spec, NET_DTYPES[t.teacher_dtype], device, seed)
        params = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        return trigflow_denoiser(spec.velocity_net(module.eval()), net_dtype=NET_DTYPES[t.teacher_dtype]), params

    if spec.experts is None:
        denoise, params, w = *load(spec, t.teacher), sampler_settings(cfg)[0]
        return lambda noise, rf, cond, uncond: teacher_euler_sample(denoise, params, noise, rf, cond, uncond, w)
    pair = {e: load(spec, None, cfg.seed + i) for i, e in enumerate(EXPERTS)} if t.teacher is None else None
    pair = pair or load_expert_pair(spec, t.teacher, t.teacher_layout, lambda s, p: load(s, p))
    return lambda noise, rf, cond, uncond: teacher_row(pair, spec.experts, rf, uncond, t.guidance)[2](noise[None], cond)
