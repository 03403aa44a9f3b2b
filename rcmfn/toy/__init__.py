"""The CPU toy problem: an analytic class-conditional Gaussian-mixture teacher (`gmm`), a tiny DiT student
(`tiny_dit`), its flow-matching warm start (`warm_start`), the evaluation's metrics (`metrics`) and figure
(`figure`). Kept apart from rcmfn's top level, which is the rCM math plus data IO; entrypoints/toy.py
wires these into `python -m entrypoints.distill` (the default run) and docs/toy.md reports the study.

The learned-teacher study on real data: scikit-learn's bundled 8x8 digits, a flow-matching teacher trained
on them and a classifier judging samples against held-out digits (`digits`), with Frechet distance and
k-NN precision / recall in its feature space (`feature_metrics`); entrypoints/digits_study.py, docs/digits.md.

A two-expert analytic teacher switched at a boundary time, Wan2.2 A14B's structure in miniature (`experts`);
entrypoints/experts_toy_study.py, docs/toy.md "Two experts".
"""
