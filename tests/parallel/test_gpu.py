"""The FSDP 2 and CP 2 equality checks on two CUDA devices through NCCL (float64, and float32 with the
Triton attention-JVP kernel under Ulysses). Skipped without two GPUs."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.mesh import ParallelDims
from parallel.parallelize import ParallelConfig
from tests.parallel import parallel_harness as harness

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]
CASES = {"fsdp2": {"dp_shard": 2}, "cp2": {"dp_shard": 1, "cp": 2}}
TOLERANCES = {torch.float64: (1e-9, 1e-11), torch.float32: (2e-3, 1e-4)}


def _on(device: str, dtype: torch.dtype) -> None:
    harness.use(device, dtype)


def _worker(rank, world, port, dtype, out):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    _on(f"cuda:{rank}", dtype)
    pcfg = ParallelConfig(reduce_dtype=None)
    results = {
        case: {f: harness.train(f, 5, ParallelDims(world_size=world, **kw), pcfg=pcfg) for f in ("wan", "cosmos")}
        for case, kw in CASES.items()
    }
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nccl_runs_equal_the_single_gpu_run(dtype, tmp_path):
    out = tmp_path / "results.pt"
    mp.spawn(_worker, args=(2, harness.free_port(), dtype, out), nprocs=2)
    results = torch.load(out, weights_only=False)
    _on("cuda:0", dtype)
    reference = {f: harness.train(f, 5) for f in ("wan", "cosmos")}
    rtol, atol = TOLERANCES[dtype]
    for case in CASES:
        for family, want in reference.items():
            got = results[case][family]
            worst = max(
                (got[n][k] - want[n][k]).abs().max().item() for n in ("student", "ema", "fake") for k in want[n]
            )
            print(
                f"{dtype} {case} {family}: max weight difference {worst:.3g}, "
                f"tangent {(got['tangent'] - want['tangent']).abs().max().item():.3g}"
            )
            harness.assert_same_run(got, want, f"{dtype} {case} {family}", rtol=rtol, atol=atol)
            torch.testing.assert_close(got["tangent"], want["tangent"], rtol=rtol, atol=atol)
