"""FSDP2, Ulysses CP and FSDP x CP runs equal the single-process run: losses, grad norms, tangents, weights.

Each case spawns a gloo group on the CPU; rank 0 writes its results and the test compares them with
the single-process rcmfn path (functional_call + torch.func.jvp) on the same weights, data and draws.
"""

import pytest
import torch
import torch.multiprocessing as mp
from parallel_harness import assert_same_run, free_port, init_gloo, train

from parallel.parallelize import ParallelDims

STEPS = 5  # sCM-only student, student with DMD, critic, student, critic (tangent_warmup 1, F = 2)
CASES = {  # name: (world, dims kwargs, families)
    "fsdp2": (2, {"dp_shard": 2}, ("wan", "cosmos")),
    "cp2": (2, {"dp_shard": 1, "cp": 2}, ("wan", "cosmos")),
    "fsdp2_cp2": (4, {"dp_shard": 2, "cp": 2}, ("wan", "cosmos")),
}


def _worker(rank, world, port, dims_kwargs, families, out):
    init_gloo(rank, world, port)
    dims = ParallelDims(world_size=world, **dims_kwargs)
    results = {family: train(family, STEPS, dims) for family in families}
    if rank == 0:
        torch.save(results, out)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def reference():
    return {family: train(family, STEPS) for family in ("wan", "cosmos")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_run_equals_single_process(case, reference, tmp_path):
    world, dims_kwargs, families = CASES[case]
    out = tmp_path / "results.pt"
    mp.spawn(_worker, args=(world, free_port(), dims_kwargs, families, out), nprocs=world)
    results = torch.load(out, weights_only=False)
    for family in families:
        got, want = results[family], reference[family]
        assert [m["phase"] for m in got["metrics"]] == ["student", "student", "critic", "student", "critic"]
        assert_same_run(got, want, f"{case} {family}")
        torch.testing.assert_close(got["tangent"], want["tangent"], rtol=1e-9, atol=1e-11)
