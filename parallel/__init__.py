"""Parallelism applied from outside the models: FSDP2, Ulysses context parallelism, activation
checkpointing, per-block compile (`parallelize.py` states the order), and sharded checkpoints.

Reading order: parallelize.py, mesh.py, fsdp.py, sharded_training.py (the loop's state and denoisers
over sharded networks, and the sCM tangent through them), context_parallel.py, checkpoint.py; the
runner is entrypoints/distributed.py, the numbers docs/scale.md. Importing this package does nothing;
importing context_parallel registers its collectives as `rcmfn::` ops.
"""
