"""rcmfn: rCM distillation as pure functions on tensors (see README for the tour)."""
