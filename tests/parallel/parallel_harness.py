"""Shared pieces of the tests/parallel tests: tiny networks, a gloo process group, one training run.

The same `train` runs single-process (plain modules, functional_call denoisers, torch.func.jvp
tangents: the rcmfn path) and sharded (FSDP2 / Ulysses CP via parallel/, dual-number tangents), so
the tests compare the two paths on identical weights, data and draws.
"""

import faulthandler
import os
import socket
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import replace
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tensordict import TensorDict

from parallel.mesh import ParallelDims
from parallel.parallelize import ParallelConfig, parallelize
from parallel.sharded_training import init_sharded_state, sharded_networks
from rcmfn.condition import with_text
from rcmfn.loop import LoopConfig, Networks, OptimConfig, train_iteration
from rcmfn.lora import LoraConfig, init_adapters
from rcmfn.lora_linear import adapt_module, is_adapter, lora_denoiser, module_name
from rcmfn.models.cosmos import CosmosDiT, init_random_
from rcmfn.models.cosmos import velocity_net as cosmos_velocity_net
from rcmfn.models.cosmos.configs import TINY_T2I
from rcmfn.models.registry import get_spec
from rcmfn.models.wan import WAN22_TINY, WAN_TINY, WanModel
from rcmfn.models.wan import velocity_net as wan_velocity_net
from rcmfn.models.wan.configs import WAN_I2V_TINY
from rcmfn.models.wan.i2v import image_condition
from rcmfn.models.wan.ti2v import first_frame_condition
from rcmfn.precond import trigflow_denoiser
from rcmfn.step import LossConfig
from rcmfn.time import LogNormal

DTYPE = torch.float64
DEVICE = torch.device("cpu")
# (latent [C, T, H, W], text [L, D], timestep scale): token grids 2x2x2 (Wan) and 1x2x2 (Cosmos).
SHAPES = {
    "wan": ((16, 2, 4, 4), (3, 24), 1000.0),
    "cosmos": ((16, 1, 4, 4), (3, 24), 1.0),
    "wan-i2v": ((16, 2, 4, 4), (3, 24), 1000.0),  # plus 5 image tokens of 20 and a first-frame condition
}
# Wan2.2 TI2V-5B's architecture at tiny size (48 latent channels), trained text- and image-to-video (one sample
# each: per-token timesteps, the modulation CP cuts with the tokens; rcmfn/models/wan/ti2v.py).
SHAPES["wan2.2"] = ((48, 2, 4, 4), (3, 20), 1000.0)
WAN_CONFIGS = {"wan": WAN_TINY, "wan2.2": WAN22_TINY, "wan-i2v": WAN_I2V_TINY}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CRASH_DIR_ENV = "RCMFN_TEST_CRASH_DIR"  # where spawned workers write their Python stacks if a signal kills them
_crash_log = []  # the open stack file of this worker (faulthandler writes to it at the crash)


def spawn_group(worker: Callable, nprocs: int, args: Callable[[int], tuple], attempts: int = 2) -> None:
    """`mp.spawn(worker, args(port), nprocs)` on a fresh port; a worker killed by a signal is retried once.

    Only a signal is retried (a failed assertion or a Python error in a worker raises at once) and the
    crashed worker's Python stack goes into a warning: CI once saw rank 0 of test_fsdp_cp's world-2 group
    abort in glibc's heap check ("malloc(): unaligned tcache chunk detected") before its first collective,
    i.e. while starting up, building the tiny nets or joining the gloo group, before any training step;
    thirty local repeats (glibc's malloc checks on, and the eager cases under valgrind) found nothing.
    """
    for attempt in range(1, attempts + 1):
        # PYTHONFAULTHANDLER: a crash before init_gloo (while importing) prints its stack to stderr too
        with (
            tempfile.TemporaryDirectory() as crash_dir,
            mock.patch.dict(os.environ, {CRASH_DIR_ENV: crash_dir, "PYTHONFAULTHANDLER": "1"}),
        ):
            try:
                mp.spawn(worker, args=args(free_port()), nprocs=nprocs)
                return
            except mp.ProcessExitedException as error:
                if error.signal_name is None or attempt == attempts:
                    raise
                stacks = "".join(open(os.path.join(crash_dir, f)).read() for f in sorted(os.listdir(crash_dir)))
                message = f"gloo worker {error.error_index} died by {error.signal_name}; retrying.\n{stacks}"
                warnings.warn(message, stacklevel=2)


def init_gloo(rank: int, world: int, port: int) -> None:
    folder = os.environ.get(CRASH_DIR_ENV)
    _crash_log.append(open(os.path.join(folder, f"rank{rank}.txt"), "w") if folder else sys.stderr)
    faulthandler.enable(file=_crash_log[-1], all_threads=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def shutdown_gloo() -> None:
    """End a worker's group once every rank is done (entrypoints/distributed.py says why the barrier)."""
    dist.barrier()
    dist.destroy_process_group()


def use(device: str | torch.device, dtype: torch.dtype) -> None:
    """Run the harness on another device / dtype (the GPU tests: CUDA, NCCL, float32)."""
    global DEVICE, DTYPE
    DEVICE, DTYPE = torch.device(device), dtype


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny Wan or Cosmos net (DTYPE, DEVICE) with weights fixed by `seed` (identical on every rank)."""
    torch.manual_seed(seed)
    if family in WAN_CONFIGS:
        return WanModel(WAN_CONFIGS[family]).to(DEVICE, DTYPE)
    model = CosmosDiT(TINY_T2I).to(torch.float64)
    return init_random_(model, torch.Generator().manual_seed(seed)).to(DEVICE, DTYPE)


def tiny_batch(family: str, batch: int = 2, seed: int = 1):
    latent, text, _ = SHAPES[family]
    g = torch.Generator().manual_seed(seed)
    draws = [torch.randn(batch, *shape, generator=g, dtype=torch.float64) for shape in (latent, text, text)]
    x0, cond, uncond = (d.to(DEVICE, DTYPE) for d in draws)
    if family == "wan2.2":  # TI2V: sample 0 image-to-video (its own first frame kept), sample 1 text-to-video
        use = torch.arange(batch, device=DEVICE) % 2 == 0
        cond = first_frame_condition(cond, x0[:, :, :1], use)
        return x0, cond, with_text(cond, uncond)
    if family != "wan-i2v":
        return x0, cond, uncond
    image = torch.randn(batch, WAN_I2V_TINY.image_tokens, WAN_I2V_TINY.image_dim, generator=g, dtype=torch.float64)
    first_frame = torch.randn(batch, *latent, generator=g, dtype=torch.float64)
    cond = image_condition(cond, image.to(DEVICE, DTYPE), first_frame.to(DEVICE, DTYPE))
    return x0, cond, with_text(cond, uncond)  # CFG drops the text only (rcmfn.condition)


def loop_config(method: str = "rcm", seed: int = 3) -> LoopConfig:
    loss = LossConfig(method=method, guidance=2.0, p_G=LogNormal(-0.4, 1.0), p_D=LogNormal(0.0, 1.0))
    optim = OptimConfig(student_lr=1e-3, fake_lr=2e-3, lr_warmup_steps=0, ema_rate=0.1)
    return LoopConfig(loss, optim, tangent_warmup=1, student_update_freq=2, seed=seed)


def three_nets(family: str, lora: LoraConfig | None = None):
    """Teacher, student and fake score: the student and fake score start as copies of the teacher (with
    `lora`: plus the same fresh adapters, the frozen weights left to `init_sharded_state`)."""
    teacher = tiny_model(family)
    student, fake = tiny_model(family), tiny_model(family)
    for module in (student, fake) if lora is not None else ():
        keys = adapt_module(module, get_spec(f"{family}-tiny").lora_targets, lora)
        shapes = {k: tuple(p.shape) for k, p in teacher.named_parameters()}
        adapters = init_adapters(shapes, keys, lora.rank, torch.Generator().manual_seed(11), torch.float64)
        with torch.no_grad():
            for key, value in adapters.items():
                module.get_parameter(module_name(key)).copy_(value.to(DEVICE, DTYPE))
    return student, teacher, fake


def plain_networks(student, teacher, fake, family: str) -> Networks:
    """The single-process rcmfn path: functional_call velocity nets, default torch.func.jvp tangent."""
    scale = SHAPES[family][2] / 1000.0
    vnet = {
        "wan": wan_velocity_net,
        "wan2.2": wan_velocity_net,
        "cosmos": cosmos_velocity_net,
        "wan-i2v": wan_velocity_net,
    }[family]

    def denoiser(module):
        net = vnet(module)
        base = trigflow_denoiser(lambda p, x, c, cond: net(p, x, c * scale, cond))
        frozen = {k: p for k, p in module.named_parameters() if not is_adapter(k)}
        return lora_denoiser(base, frozen) if len(frozen) < len(dict(module.named_parameters())) else base

    for p in teacher.parameters():
        p.requires_grad_(False)
    return Networks(
        student=denoiser(student),
        teacher=denoiser(teacher),
        teacher_params=TensorDict(dict(teacher.named_parameters()), batch_size=[]),
        fake=denoiser(fake),
    )


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().to("cpu", copy=True)


def probe_tangent(nets: Networks, state, family: str) -> torch.Tensor:
    """The student's sCM tangent at a fixed input (the loop only logs its norm)."""
    x0, cond, _ = tiny_batch(family, seed=7)
    t = torch.tensor([0.3, 1.2], dtype=torch.float64, device=DEVICE)
    x_t = torch.cos(t)[:, None, None, None, None] * x0 + torch.sin(t)[:, None, None, None, None] * x0.flip(0)
    velocity = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(9), dtype=DTYPE).to(DEVICE)
    if nets.student_tangent is None:
        from rcmfn.tangent import scm_tangent

        return scm_tangent(nets.student, state.student, x_t, t, cond, velocity)[1]
    return nets.student_tangent(state.student, x_t, t, cond, velocity)[1]


def build(family: str, dims: ParallelDims | None, cfg: LoopConfig, pcfg: ParallelConfig, lora=None):
    """(networks, fresh state, student module, fake module) -- sharded when `dims` is given."""
    student, teacher, fake = three_nets(family, lora)
    fake = fake if cfg.loss.uses_critic else None
    full = () if lora is None else lora.full  # LoRA's tensors trained in full beside the adapters
    if dims is None:
        nets = plain_networks(student, teacher, fake, family)
    else:
        meshes = dims.build_meshes(DEVICE.type)
        for module in (student, teacher, fake):
            if module is not None:
                parallelize(module, meshes, pcfg)
        nets = sharded_networks(student, teacher, fake, SHAPES[family][2], cfg, lora_full=full)
    if fake is None:
        nets = replace(nets, fake=None)
    return nets, init_sharded_state(student, fake, cfg, full), student, fake


def run_steps(state, nets, cfg: LoopConfig, family: str, steps: int) -> list[dict]:
    batch = tiny_batch(family)
    metrics = []
    for _ in range(steps):
        metrics.append(train_iteration(state, nets, lambda gen: batch, cfg))
    return metrics


def snapshot(state) -> dict:
    """Full (unsharded) copies of the student, EMA and fake weights."""
    return {
        "student": {k: full(v) for k, v in state.student.items()},
        "ema": {k: full(v) for k, v in state.ema.items()},
        "fake": {} if state.fake is None else {k: full(v) for k, v in state.fake.items()},
    }


def train(
    family: str,
    steps: int,
    dims: ParallelDims | None = None,
    cfg: LoopConfig | None = None,
    pcfg: ParallelConfig | None = None,
    method: str = "rcm",
    lora: LoraConfig | None = None,
) -> dict:
    """Run `steps` iterations; return metrics per iteration, the probe tangent before training, the
    final student / EMA / fake weights (full tensors). Sharded when `dims` is given (inside a group)."""
    cfg = cfg or loop_config(method)
    nets, state, _, _ = build(family, dims, cfg, pcfg or ParallelConfig(reduce_dtype=None), lora)
    tangent = probe_tangent(nets, state, family)
    metrics = run_steps(state, nets, cfg, family, steps)
    return {"metrics": metrics, "tangent": full(tangent)} | snapshot(state)


def assert_same_run(got: dict, want: dict, what: str = "", rtol: float = 1e-9, atol: float = 1e-11) -> None:
    """Metrics (floats to rtol) and every weight of two runs agree."""
    import math

    for g, w in zip(got["metrics"], want["metrics"], strict=True):
        for key in w:
            if isinstance(w[key], float):
                assert math.isclose(g[key], w[key], rel_tol=rtol, abs_tol=atol), (what, key, g, w)
            else:
                assert g[key] == w[key], (what, key, g, w)
    for name in ("student", "ema", "fake"):
        assert got[name].keys() == want[name].keys(), (what, name)
        for key in want[name]:
            torch.testing.assert_close(
                got[name][key],
                want[name][key],
                rtol=rtol,
                atol=atol,
                msg=lambda m, k=key, n=name: f"{what} {n}.{k}: {m}",
            )
