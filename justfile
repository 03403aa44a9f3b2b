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

# On a CUDA machine: the ops suite at full size, then the models' and parallel/'s GPU tests.
gpu-check out="out":
    bash scripts/gpu_ops.sh {{out}} tests
    python -m pytest -q -m gpu tests/rcmfn tests/parallel

# Lint and format check.
lint:
    ruff check .
    ruff format --check .

# The toy study in docs/toy.md (sCM / DMD / rCM students vs teacher samplers).
study *args:
    python -m entrypoints.toy_study {{args}}

# The toy default (or any distill flags after --) over several seeds, each against the quality bar.
seeds *args:
    python -m entrypoints.toy_seeds {{args}}

# The learned-teacher study in docs/digits.md (real 8x8 digits; about 25 CPU minutes on one thread).
digits *args:
    python -m entrypoints.digits_study {{args}}
