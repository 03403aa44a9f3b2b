"""Parallelism applied from outside the models: FSDP2, Ulysses context parallelism, activation
checkpointing, per-block compile (`parallelize.py` states the order), and sharded checkpoints.

Reading order: parallelize.py, fsdp.py (the sCM tangent through sharded networks), context_parallel.py,
checkpoint.py; the runner is entrypoints/distributed.py, the numbers docs/scale.md. Importing this
package does nothing; importing context_parallel registers its collectives as `rcmfn::` ops.
"""
