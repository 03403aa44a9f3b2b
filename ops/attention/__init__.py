"""`ops.attention(q, k, v, scale=None)`: softmax attention over (B, S, H, D) tensors."""

from ops.attention.reference import attention_reference as attention

__all__ = ["attention"]
