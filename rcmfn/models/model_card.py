"""The README.md model card of an exported student: what it is and the sampler settings it needs.

Every number comes from the values passed in (a model preset's FewStepSettings and guidance, the spec's
diffusers config), never from strings written here, so the card says what `entrypoints.sample` does.
"""

from rcmfn.few_step import FewStepSettings, describe_grid
from rcmfn.models.family import ModelSpec


def model_card(name: str, spec: ModelSpec, settings: FewStepSettings, teacher_guidance: float | None) -> str:
    """Markdown card of the student network `name` (a registry name) exported for diffusers."""
    class_name, _ = spec.diffusers_config()
    grids = "\n".join(f"- {describe_grid(settings, k, spec.timestep_scale)}" for k in range(1, settings.max_steps + 1))
    distilled = (
        f"distilled from a teacher sampled with classifier-free guidance w = {teacher_guidance:g}"
        if teacher_guidance is not None
        else "distilled from its teacher"
    )
    return f"""---
library_name: diffusers
tags: [rcm, consistency-distillation, few-step]
---

# {name} rCM student ({class_name})

A few-step student of the {spec.family.name} network `{name}`, {distilled} by rCM (score-regularized
continuous-time consistency distillation, arXiv 2510.08431) with rcmfn. It predicts the teacher's
rectified-flow velocity; its sampler is the consistency sampler, not the teacher's solver.

## Sampler settings

- steps: 1 to {settings.max_steps}
- sigma_max: {settings.sigma_max:g} (first TrigFlow time atan(sigma_max))
- mid times (TrigFlow, k steps use the first k - 1): {list(settings.mid_times)}
- shift: none; the grid below is the student's own (the teacher's timestep shift does not apply)
- guidance: none; run with guidance_scale = 1.0 (the teacher's guidance is distilled into the weights)
- start: unit Gaussian noise; each step predicts x0 and re-noises it with fresh noise to the next time

{grids}

## Loading

```python
import diffusers
from rcmfn.diffusers_scheduler import FewStepScheduler

transformer = diffusers.{class_name}.from_pretrained("<this folder>")
scheduler = FewStepScheduler(
    sigma_max={settings.sigma_max!r}, mid_times={list(settings.mid_times)!r}, timestep_scale={spec.timestep_scale!r}
)
# A pipeline that feeds the scheduler's sample to the transformer as it is (diffusers.WanPipeline) takes
# scheduler=scheduler; call it with guidance_scale=1.0, and latents=scheduler.start_latents(noise) for
# exactly rcmfn's start. Pipelines that scale the transformer's input themselves need their own sampler.
```
"""
