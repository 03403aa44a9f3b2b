"""Shared fixtures: a small random velocity network with parameters in a TensorDict; processes alive and
gone, and a run folder's lock written as another job would (rcmfn/run_lock.py)."""

import importlib.util
import json
import socket
import subprocess

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from rcmfn.run_lock import LOCK_NAME

MEDIA_MODULES = ("transformers", "diffusers", "av")


def has_media() -> bool:
    """Whether the media extra (pip install 'rcmfn[media]': text encoders, VAEs, MP4) is installed."""
    return all(importlib.util.find_spec(m) is not None for m in MEDIA_MODULES)


def require_media() -> None:
    """Skip the calling test or fixture unless the media extra is installed."""
    if not has_media():
        pytest.skip("needs the media extra (transformers, diffusers, av)")


class SmallVelocityNet(nn.Module):
    """v(x_in, c_noise, cond): a two-layer MLP over x, the time and a pooled condition (test stand-in)."""

    def __init__(self, dim: int, cond_dim: int, hidden: int = 32):
        super().__init__()
        self.inp = nn.Linear(dim + cond_dim + 2, hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x, c_noise, cond):
        flat = x.flatten(1)
        time = torch.stack([torch.sin(c_noise / 300.0), torch.cos(c_noise / 700.0)], dim=1).to(flat.dtype)
        h = torch.tanh(self.inp(torch.cat([flat, time, cond.mean(dim=1).to(flat.dtype)], dim=1)))
        return self.out(h).reshape(x.shape)


def make_small_net(shape=(3, 1, 2, 2), cond_dim=5, dtype=torch.float64, seed=0):
    """Return (net(params, x_in, c_noise, cond), params TensorDict) for a random small network."""
    torch.manual_seed(seed)
    dim = 1
    for s in shape:
        dim *= s
    module = SmallVelocityNet(dim, cond_dim).to(dtype)
    params = TensorDict(dict(module.named_parameters()), batch_size=[])

    def net(p, x_in, c_noise, cond):
        return torch.func.functional_call(module, dict(p.items()), (x_in, c_noise, cond))

    return net, params


@pytest.fixture
def small_net():
    return make_small_net()


@pytest.fixture
def live_pid():
    """The pid of another process that stays alive for the test."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def write_lock(folder, pid: int, host: str | None = None) -> dict:
    """Write `folder`/.lock as job `pid` on `host` (this one by default) would; return what it holds."""
    holder = {"host": host or socket.gethostname(), "pid": pid, "started": "2025-01-01T00:00:00+00:00"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps(holder))
    return holder


def cli_flags(module: str) -> list[str]:
    """The sorted flags `python -m <module> --help` lists (wide terminal, no PATH): for CLI snapshot tests."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={"COLUMNS": "200", "PATH": ""},
    ).stdout
    return sorted({word.split("=")[0].strip(",") for word in out.split() if word.startswith("--")})
