# Recipes for everyday work; `just --list` shows them.

# Run the whole test suite (CPU; Triton kernels run under the interpreter).
test *args:
    python -m pytest -q {{args}}

# Distil the embedded toy teacher on the CPU (a few minutes).
demo *args:
    python -m entrypoints.distill {{args}}

# Benchmarks (GPU): attention op, models.
bench what="attention" *args:
    python -m entrypoints.bench {{what}} {{args}}

# Lint and format check.
lint:
    ruff check .
    ruff format --check .

# The toy study in docs/toy.md (sCM / DMD / rCM students vs teacher samplers).
study *args:
    python -m entrypoints.toy_study {{args}}
