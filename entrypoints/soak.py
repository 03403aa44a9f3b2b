"""Kill-and-resume soak test: `python -m entrypoints.soak [--kills 50] [--seed 0]` (minutes; not in CI).

Runs a small toy distillation once without interruption, then again under SIGKILL at random moments
(during start-up, the warm start, training and saves; each restart resumes with the same command) until
`--kills` kills have landed, lets the last run finish, and compares: every checkpoint weight of the final
iteration and every metrics.jsonl line must be identical (timing fields aside). Exit status 1 on any
difference. Each kill is SIGKILL of the process group: no handler runs, as when a node dies.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

FLAGS = [
    *"--toy.net.width 32 --toy.net.depth 1 --toy.net.heads 2 --toy.net.mlp-ratio 2 --toy.net.freq-dim 16".split(),
    *"--toy.warm-start.steps 40 --toy.warm-start.batch-size 16 --toy.warm-start.warmup-steps 4".split(),
    *"--toy.batch-size 8 --toy.eval-samples 16 --tangent-warmup 4 --student-update-freq 2".split(),
    *"--log-every 1 --no-progress --cpu-threads 1".split(),
]
TIMING = {"seconds", "tokens_per_s", "train_seconds"}


def _command(output: Path, iterations: int, save_every: int) -> list[str]:
    extra = ["--iterations", str(iterations), "--save-every", str(save_every)]
    return [sys.executable, "-m", "entrypoints.distill", "--output", str(output), *FLAGS, *extra]


def _lines(output: Path) -> list[dict]:
    path = output / "metrics.jsonl"
    if not path.exists():
        return []
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in path.read_text().splitlines()]


def _final_weights(output: Path, iterations: int) -> dict[str, dict[str, torch.Tensor]]:
    folder = output / "checkpoints" / f"step-{iterations:08d}"
    return {name: load_file(folder / f"{name}.safetensors") for name in ("student", "ema", "fake")}


def soak(kills: int, iterations: int, save_every: int, seed: int, workdir: Path) -> bool:
    rng = random.Random(seed)
    straight, killed = workdir / "straight", workdir / "killed"
    start = time.perf_counter()
    proc = subprocess.Popen(_command(straight, iterations, save_every), stdout=subprocess.DEVNULL)
    while proc.poll() is None and len(_lines(straight)) < iterations:
        time.sleep(0.02)
    trained = time.perf_counter() - start  # start-up, warm start and training: where the kills should land
    if proc.wait() != 0:
        raise RuntimeError("the uninterrupted run failed")
    print(f"uninterrupted run: trained after {trained:.1f} s, done after {time.perf_counter() - start:.1f} s")
    want = _final_weights(straight, iterations)
    landed, attempts, completed = 0, 0, 0
    while True:  # killed runs until `kills` have landed; each run that completes is compared, then redone
        attempts += 1
        proc = subprocess.Popen(
            _command(killed, iterations, save_every),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        delay = rng.uniform(0.2, trained) if landed < kills else None
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            landed += 1
            print(f"kill {landed}/{kills} after {delay:.1f} s (log at iteration {len(_lines(killed))})", flush=True)
            continue
        if proc.returncode != 0:
            print(f"a restart failed (exit {proc.returncode}):\n{proc.stderr.read().decode()[-3000:]}", flush=True)
            return False
        completed += 1
        got = _final_weights(killed, iterations)
        same_lines = _lines(killed) == _lines(straight)
        same_weights = all(torch.equal(got[n][k], want[n][k]) for n in want for k in want[n])
        print(
            f"run {completed} completed after {landed} kills: metrics identical {same_lines}, "
            f"weights identical {same_weights}",
            flush=True,
        )
        if not (same_lines and same_weights):
            return False
        if landed >= kills:
            print(f"{landed} kills in {attempts} starts, {completed} completed runs, all identical")
            return True
        shutil.rmtree(killed)  # compared: the next kills go into a fresh run


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m entrypoints.soak", description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=50, help="SIGKILLs that must land before the run may finish")
    p.add_argument("--iterations", type=int, default=60, help="iterations of the toy run")
    p.add_argument("--save-every", type=int, default=3, help="checkpoint interval")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--workdir", type=Path, default=None, help="where the two runs go (default: a temporary folder)")
    args = p.parse_args()
    if args.kills < 1 or args.iterations < 1 or args.save_every < 1:
        p.error("--kills, --iterations and --save-every must be >= 1")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rcmfn-soak-"))
    ok = soak(args.kills, args.iterations, args.save_every, args.seed, workdir)
    print("PASS" if ok else "FAIL", f"({workdir})")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
