"""The CPU toy problem: an analytic class-conditional Gaussian-mixture teacher (`gmm`), a tiny DiT student
(`tiny_dit`), its flow-matching warm start (`warm_start`), the evaluation's metrics (`metrics`) and figure
(`figure`). Kept apart from rcmfn's top level, which is the rCM math plus data IO; entrypoints/toy.py
wires these into `python -m entrypoints.distill` (the default run) and docs/toy.md reports the study.
"""
