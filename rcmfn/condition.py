"""What a network call is conditioned on: a text embedding, or the text plus an image condition.

Every network in rcmfn is called as net(params, x, timestep, cond) and the training loop, the rollout,
the samplers and the losses pass `cond` (and CFG's `uncond`) through without looking inside, except
for its batch size (`cond.shape[0]`). So a condition is either
- a tensor: the text-encoder states [B, L, D] (text-to-video, the toy), or
- a TensorDict of batch size [B] holding "text" and whatever else the family's net reads (Wan I2V:
  "image", the CLIP image states, and "latent", the first-frame mask + latent; rcmfn.models.wan.i2v).
A TensorDict indexes, concatenates, expands and moves like a tensor and passes through torch.compile and
torch.func.jvp as a constant: only the noisy latent and the time carry the sCM tangent (SPEC-rcm §2.4),
so the image condition contributes none, as the text does not.

CFG's unconditional input replaces the text only and keeps the rest: the official I2V sampler passes the
same `clip_fea` and `y` to the conditional and the unconditional call and changes only the context
(Wan-Video/Wan2.1 wan/image2video.py:284-296). `with_text` is that rule.
"""

import torch
from tensordict import TensorDict

Condition = torch.Tensor | TensorDict
TEXT = "text"


def text_of(cond: Condition) -> torch.Tensor:
    """The text-encoder states [B, L, D] of a condition."""
    return cond if isinstance(cond, torch.Tensor) else cond[TEXT]


def with_text(cond: Condition, text: torch.Tensor) -> Condition:
    """`cond` with its text replaced by `text` ([B, L, D], or [L, D] for every sample): CFG's uncondition
    (module docstring). A tensor condition is the text itself, so the result is `text` broadcast to B."""
    batch = cond.shape[0]
    text = text.expand(batch, *text.shape[-2:]) if text.dim() == 2 else text
    if text.shape[0] != batch:
        raise ValueError(f"text batch {text.shape[0]} does not match the condition's batch {batch}")
    if isinstance(cond, torch.Tensor):
        return text
    out = cond.copy()  # shallow: the other entries are shared, not copied
    out[TEXT] = text
    return out


def make_condition(text: torch.Tensor, **extra: torch.Tensor) -> Condition:
    """The condition of `text` [B, L, D] and the extra entries (each [B, ...]); the text alone if none."""
    if not extra:
        return text
    for name, tensor in extra.items():
        if tensor.shape[0] != text.shape[0]:
            raise ValueError(f"condition entry {name!r} has batch {tensor.shape[0]}; the text has {text.shape[0]}")
    return TensorDict({TEXT: text, **extra}, batch_size=[text.shape[0]])
