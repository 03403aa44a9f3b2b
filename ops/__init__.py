"""Custom operators used by rcmfn models (attention with a fused forward-mode rule)."""

from ops.attention import attention

__all__ = ["attention"]
