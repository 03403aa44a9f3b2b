"""`ops.attention(q, k, v, scale=None)`: softmax attention over (B, S, H, D) tensors.

Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) reaches a fused forward + tangent kernel;
reverse mode and the plain forward use SDPA's fused backends on CUDA. See `op.py`.
"""

from ops.attention.op import attention

__all__ = ["attention"]
