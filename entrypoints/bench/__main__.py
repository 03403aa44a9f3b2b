"""`python -m entrypoints.bench attention|models|step ...`: see entrypoints/bench/__init__.py."""

import argparse

import torch

import entrypoints.bench as package
from entrypoints.bench.attention import add_attention
from entrypoints.bench.common import write_json
from entrypoints.bench.models import add_models
from entrypoints.bench.step import add_step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m entrypoints.bench", description=package.__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="benchmark", required=True)
    add_attention(subparsers)
    add_models(subparsers)
    add_step(subparsers)
    args = parser.parse_args(argv)
    tiny = args.benchmark in ("models", "step") and args.config.endswith("-tiny")
    if not torch.cuda.is_available() and not tiny:
        parser.error("benchmarks need a CUDA device (only `models` and `step` with `--config *-tiny` run on the CPU)")
    write_json(args.run(args), args.json)


if __name__ == "__main__":
    main()
