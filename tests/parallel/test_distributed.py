"""torchrun -m entrypoints.distill (the sharded path): clear errors before any GPU work; torchrun runs,
stops at SIGTERM with a checkpoint, resumes from it, and exports the EMA student."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from entrypoints.config import DistillConfig, DistributedConfig, fingerprint
from entrypoints.distributed import build_networks, check_before_gpu, teacher_weights
from parallel import checkpoint
from parallel.mesh import ParallelDims
from parallel.parallelize import ParallelConfig
from rcmfn.models.checkpoint import CheckpointMismatchError, export_checkpoint
from rcmfn.models.registry import build_model, get_spec
from rcmfn.shards import ShardWriter, write_negative_embedding
from tests.conftest import write_lock
from tests.parallel.parallel_harness import free_port

ROOT = Path(__file__).resolve().parents[2]


def _shards(folder: Path, latent=(16, 1, 4, 4), count: int = 8) -> Path:
    g = torch.Generator().manual_seed(0)
    with ShardWriter(folder, latent, (3, 24), "float32", 3) as writer:
        for i in range(count):
            writer.add(torch.randn(latent, generator=g), torch.randn(3, 24, generator=g), f"prompt {i}")
    write_negative_embedding(folder, torch.randn(3, 24, generator=g))
    return folder


def _config(tmp_path, model="cosmos-tiny", **distributed) -> DistillConfig:
    data = distributed.pop("data", None) or _shards(tmp_path / "data")
    d = DistributedConfig(**({"data": data, "random_init": True, "dtype": "float64"} | distributed))
    return DistillConfig(model=model, output=tmp_path / "run", distributed=d)


def test_valid_configuration_passes_the_checks(tmp_path):
    dims, spec, manifest = check_before_gpu(_config(tmp_path, cp=2), world_size=4)
    assert (dims.dp_shard, dims.cp, spec.family.name, manifest.count) == (2, 2, "cosmos", 8)


@pytest.mark.parametrize(
    ("change", "world", "message"),
    [
        ({"cp": 4}, 4, "must divide the attention heads"),  # tiny nets have 2 heads
        ({"dp_shard": 2, "cp": 2}, 2, "must equal the world size"),
        ({"dp_shard": 3}, 4, "must equal the world size"),
        ({"random_init": False}, 1, "teacher checkpoint None not found"),
        ({"random_init": False, "teacher": Path("/nonexistent/teacher.safetensors")}, 1, "not found"),
        ({"data": Path("/nonexistent/data")}, 1, "does not exist"),
        ({"batch_size": 5}, 2, "cannot fill one global batch"),
    ],
)
def test_bad_configuration_fails_before_any_gpu_work(tmp_path, change, world, message):
    with pytest.raises(ValueError, match=message):
        check_before_gpu(_config(tmp_path, **change), world_size=world)


def test_unknown_key_layouts_fail_before_any_gpu_work(tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes(b"")  # only its existence is checked here
    unknown = r"export-layouts: unknown key layout \['comfy'\] for cosmos-tiny; valid: \['diffusers', 'official',"
    with pytest.raises(ValueError, match=unknown):
        check_before_gpu(_config(tmp_path, export_layouts=("official", "comfy")), world_size=1)
    with pytest.raises(ValueError, match=r"teacher-layout: unknown key layout \['comfy'\]"):
        check_before_gpu(_config(tmp_path, random_init=False, teacher=teacher, teacher_layout="comfy"), world_size=1)
    check_before_gpu(_config(tmp_path, export_layouts=("comfy",), export=False), world_size=1)  # no export: unused
    check_before_gpu(_config(tmp_path, export_layouts=("diffusers-folder",)), world_size=1)  # a folder, not a layout
    with pytest.raises(ValueError, match=r"teacher-layout: unknown key layout \['diffusers-folder'\]"):
        check_before_gpu(_config(tmp_path, random_init=False, teacher=teacher, teacher_layout="diffusers-folder"), 1)


def test_cp_must_divide_the_tokens(tmp_path):
    data = _shards(tmp_path / "odd", latent=(16, 1, 2, 6))  # Cosmos: 1 x 3 tokens per frame
    with pytest.raises(ValueError, match=r"divide the tokens per frame H'W' \(3\)"):
        check_before_gpu(_config(tmp_path, data=data, cp=2), world_size=2)


def test_data_must_fit_the_model(tmp_path):
    data = _shards(tmp_path / "wan-data", latent=(16, 2, 4, 4))
    with pytest.raises(ValueError, match="text width 4096"):
        check_before_gpu(
            DistillConfig(
                model="wan1.3b", output=tmp_path / "run", distributed=DistributedConfig(data=data, random_init=True)
            ),
            world_size=1,
        )


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    cfg = _config(tmp_path)
    folder = cfg.output / "checkpoints" / "step-00000004"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"config": {"model": "cosmos2b", "method": "dmd"}}))
    with pytest.raises(ValueError, match="written by another configuration"):
        check_before_gpu(cfg, world_size=1)


def test_a_fresh_run_refuses_a_folder_holding_checkpoints_unless_told_to_overwrite(tmp_path):
    cfg = dataclasses.replace(_config(tmp_path), resume=False)
    folder = cfg.output / "checkpoints" / "step-00000004"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"config": fingerprint(cfg), "iteration": 4}))
    with pytest.raises(ValueError, match=rf"{cfg.output} holds 1 checkpoint \(step-00000004 ... .*--overwrite"):
        check_before_gpu(cfg, world_size=1)
    check_before_gpu(dataclasses.replace(cfg, overwrite=True), world_size=1)  # rank 0 removes it later
    assert folder.is_dir()


def test_checkpoint_past_the_requested_length_is_refused(tmp_path):
    cfg = dataclasses.replace(_config(tmp_path), iterations=2)
    folder = cfg.output / "checkpoints" / "step-00000004"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"config": fingerprint(cfg), "iteration": 4}))
    with pytest.raises(ValueError, match="step-00000004 is at iteration 4, past the requested total of 2 iterations"):
        check_before_gpu(cfg, world_size=1)
    check_before_gpu(dataclasses.replace(cfg, iterations=4), world_size=1)  # the same length resumes


def test_teacher_with_a_missing_key_fails_strict_and_loads_non_strict(tmp_path, capsys):
    """Strict (the default) raises naming the missing key; --distributed.no-strict prints the report and
    gives a full state dict, the missing norm weight freshly initialised to 1."""
    spec = get_spec(_config(tmp_path).model)
    state = build_model(spec, None)[0].state_dict()
    missing = next(name for name, tensor in state.items() if tensor.dim() == 1 and name.endswith("weight"))
    kept = {name: tensor for name, tensor in state.items() if name != missing}
    teacher = tmp_path / "teacher.safetensors"
    export_checkpoint(kept, teacher, spec.key_maps["official"])
    cfg = _config(tmp_path, random_init=False, teacher=teacher)
    with pytest.raises(CheckpointMismatchError, match=missing):
        teacher_weights(cfg, spec)
    loose = _config(tmp_path, random_init=False, teacher=teacher, strict=False)
    weights = teacher_weights(loose, spec)
    assert set(weights) == set(state) and torch.equal(weights[missing], torch.ones_like(state[missing]))
    assert all(torch.equal(weights[name], tensor) for name, tensor in kept.items())
    assert f"1 initialised fresh (not loadable from the file; non-strict load): {missing}" in capsys.readouterr().out


@pytest.fixture
def one_rank_group():
    """A gloo process group of world size 1 in this process (the sharded nets need one)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield ParallelDims(1).build_meshes("cpu")
    dist.destroy_process_group()


@pytest.mark.parametrize("model", ["wan-tiny", "cosmos-tiny"])
def test_fake_score_and_student_start_bit_for_bit_as_the_teacher(one_rank_group, model):
    """bf16 on the CPU, tiny nets built as the run builds them: at iteration 0 the fake score's and the
    student's outputs equal the teacher's bit for bit (Wan's float32 tables included: the teacher is stored
    in bf16 as FSDP all-gathers the trainable nets). Cosmos' trainable nets run the float32 time path
    (trainable_spec), so there the teacher is built with it too; with the run's default they differ."""
    from parallel.sharded_training import init_sharded_state, sharded_networks
    from rcmfn.loop import LoopConfig
    from rcmfn.models.registry import trainable_spec

    cfg = DistillConfig(model=model, distributed=DistributedConfig(random_init=True, dtype="bfloat16"))
    spec, lcfg = get_spec(cfg.model), LoopConfig()
    full = teacher_weights(cfg, spec)
    if spec.family.name == "wan":  # the release's float32 tables, not bf16-representable (random_init draws them)
        assert full["blocks.0.modulation"].dtype == torch.float32

    def build(teacher_spec):
        meshes, cpu = one_rank_group, torch.device("cpu")
        return build_networks(
            teacher_spec, full, meshes, torch.bfloat16, ParallelConfig(), cpu, True, trainable_spec(spec)
        )

    teacher, student, fake = build(trainable_spec(spec))  # = spec for Wan
    if spec.family.name == "cosmos":
        assert student.config.high_precision_time and fake.config.high_precision_time
    nets = sharded_networks(student, teacher, fake, spec.timestep_scale, lcfg)
    state = init_sharded_state(student, fake, lcfg)
    g = torch.Generator().manual_seed(5)
    x_t = torch.randn(2, 16, 2, 4, 4, generator=g, dtype=torch.float64)
    cond = torch.randn(2, 3, 24, generator=g).to(torch.bfloat16)
    t = torch.tensor([0.4, 1.3], dtype=torch.float64)
    with torch.no_grad():
        F_teacher = nets.teacher(nets.teacher_params, x_t, t, cond)
        assert torch.equal(nets.fake(state.fake, x_t, t, cond), F_teacher)
        assert torch.equal(nets.student(state.student, x_t, t, cond), F_teacher)
    if spec.family.name == "cosmos":  # the run's own teacher keeps the released bf16 time path: not bit-equal
        teacher = build(spec)[0]
        released = sharded_networks(student, teacher, fake, spec.timestep_scale, lcfg)
        with torch.no_grad():
            assert not torch.equal(released.teacher(released.teacher_params, x_t, t, cond), F_teacher)


def _torchrun(tmp_path, iterations: int, nproc: int = 2, extra=()) -> subprocess.Popen:
    data = tmp_path / "data" if (tmp_path / "data").exists() else _shards(tmp_path / "data")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "-m",
        "entrypoints.distill",
        "--model",
        "cosmos-tiny",
        "--distributed.random-init",
        "--distributed.dtype",
        "float64",
        "--distributed.data",
        str(data),
        "--output",
        str(tmp_path / "run"),
        "--iterations",
        str(iterations),
        "--student-update-freq",
        "2",
        "--save-every",
        "100",
        "--log-every",
        "1",
        "--no-progress",
        *extra,
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )


def _lines(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_torchrun_stops_at_sigterm_resumes_and_exports(tmp_path):
    run = tmp_path / "run"
    proc = _torchrun(tmp_path, iterations=10_000, extra=["--distributed.cp", "2"])
    deadline = time.monotonic() + 120
    while len(_lines(run)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(_lines(run)) >= 3, proc.communicate()[0].decode()[-3000:]
    os.killpg(proc.pid, signal.SIGTERM)  # what a scheduler does: every process of the job
    output = proc.communicate(timeout=120)[0].decode()
    summary = json.loads((run / "metrics.json").read_text())
    stopped = checkpoint.latest_checkpoint(run)
    assert summary["stopped_by_signal"], output[-3000:]
    assert stopped is not None and checkpoint.read_meta(stopped)["iteration"] == summary["iteration"]
    run_id = checkpoint.read_meta(stopped)["run_id"]

    layouts = ["--distributed.export-layouts", "official", "diffusers", "diffusers-folder"]
    proc = _torchrun(tmp_path, iterations=summary["iteration"] + 2, extra=["--distributed.cp", "2", *layouts])
    output = proc.communicate(timeout=180)[0].decode()
    assert proc.returncode == 0, output[-3000:]
    resumed = [m["iteration"] for m in _lines(run)][-2:]
    assert resumed == [summary["iteration"], summary["iteration"] + 1]
    meta = checkpoint.read_meta(checkpoint.latest_checkpoint(run))
    assert meta["iteration"] == summary["iteration"] + 2 and meta["run_id"] == run_id  # kept on resume
    n = meta["iteration"]  # one sample per iteration (batch 1, one data-parallel rank), 8 per epoch
    assert (meta["loader"]["epoch"], meta["loader"]["position"]) == ((n - 1) // 8, (n - 1) % 8 + 1)
    from safetensors.torch import load_file

    exported = load_file(run / "student_ema.safetensors")
    assert exported and all(t.dtype == torch.bfloat16 and torch.isfinite(t.float()).all() for t in exported.values())
    # The same tensors in the diffusers layout, under the names that layout gives them.
    key_maps = get_spec("cosmos-tiny").key_maps
    as_ours = lambda state, layout: {key_maps[layout].to_ours(k): v for k, v in state.items()}
    diffusers = load_file(run / "student_ema.diffusers.safetensors")
    ours = as_ours(exported, "official")
    assert set(diffusers) == {key_maps["diffusers"].from_ours(n) for n in ours}
    assert all(torch.equal(v, ours[k]) for k, v in as_ours(diffusers, "diffusers").items())
    # The diffusers folder holds the same tensors, and diffusers' own from_pretrained takes it.
    folder = load_file(run / "student_ema.diffusers" / "diffusion_pytorch_model.safetensors")
    assert folder.keys() == diffusers.keys() and all(torch.equal(folder[k], v) for k, v in diffusers.items())
    assert "sigma_max: 80" in (run / "student_ema.diffusers" / "README.md").read_text()
    net = pytest.importorskip("diffusers").CosmosTransformer3DModel.from_pretrained(run / "student_ema.diffusers")
    assert all(torch.equal(t, diffusers[k]) for k, t in net.state_dict().items())
    # The final checkpoint's EMA, read in this process without a process group (what sample --run and
    # convert do with a sharded run), is the exported EMA before its bf16 cast.
    assert not torch.distributed.is_initialized()
    ema = checkpoint.read_weights(checkpoint.latest_checkpoint(run), "ema")
    assert set(ema) == set(ours) and all(torch.equal(ema[k].to(torch.bfloat16), ours[k]) for k in ours)
    from entrypoints.convert import ConvertConfig, convert
    from entrypoints.sample import SampleConfig, student_weights

    weights, ours_names = student_weights(SampleConfig(model="cosmos-tiny", run=run))
    assert ours_names and all(torch.equal(weights[k], v) for k, v in ema.items())

    converted = tmp_path / "ema.diffusers.safetensors"
    report = convert(ConvertConfig("cosmos-tiny", checkpoint.latest_checkpoint(run), converted, dtype="bfloat16"))
    assert report.ok and set(load_file(converted)) == set(diffusers)
    assert all(torch.equal(v, diffusers[k]) for k, v in load_file(converted).items())


def test_torchrun_stops_on_divergence_without_saving_or_exporting(tmp_path):
    """--student-lr 1e6 used to log zero losses and NaN tangents, exit 0 and export NaN weights; now every
    rank stops with the named error, nothing non-finite is written, and the log says what happened."""
    run = tmp_path / "run"
    proc = _torchrun(tmp_path, iterations=40, extra=["--student-lr", "1e6", "--fake-lr", "1e6", "--save-every", "4"])
    output = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode != 0, output[-3000:]
    assert "error: the student diverged" in output or "error: the fake score diverged" in output, output[-3000:]
    assert "DivergenceError" not in output, output[-3000:]  # a named stop, not a worker's traceback
    assert not (run / "student_ema.safetensors").exists()
    lines = _lines(run)  # strict JSON (json.loads of a bare NaN would pass; the file must not hold one)
    assert "NaN" not in (run / "metrics.jsonl").read_text() and "Infinity" not in (run / "metrics.jsonl").read_text()
    assert any(line.get("step_skipped") or line.get("scm_masked") or line.get("fake_score_masked") for line in lines)
    import torch.distributed.checkpoint as dcp

    for step in sorted((run / "checkpoints").glob("step-*")):  # any checkpoint written holds finite weights only
        meta = dcp.FileSystemReader(step).read_metadata().state_dict_metadata
        names = [k for k in meta if k.split(".")[0] in ("student", "ema", "fake")]
        loaded = {k: torch.empty(meta[k].size, dtype=torch.float64) for k in names}
        dcp.load(loaded, storage_reader=dcp.FileSystemReader(step))
        assert names and all(torch.isfinite(t).all() for t in loaded.values()), step


def test_torchrun_refuses_an_output_folder_another_job_holds_on_every_rank(tmp_path, live_pid):
    """Rank 0 takes the lock; the refusal reaches both ranks (no rank left waiting), nothing is written."""
    holder = write_lock(tmp_path / "run", live_pid)
    output = _torchrun(tmp_path, iterations=2).communicate(timeout=180)[0].decode()
    message = f"RunLockedError: run folder {tmp_path / 'run'} is in use by another job: host {holder['host']}, "
    message += f"pid {live_pid}"
    assert output.count(message) == 2, output[-3000:]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]
    assert json.loads((tmp_path / "run" / ".lock").read_text()) == holder


def test_torchrun_overwrite_replaces_another_runs_checkpoints(tmp_path):
    """--no-resume --overwrite: rank 0 removes the old run's checkpoints under the lock, and the new run's
    checkpoints carry one new run id."""
    old = tmp_path / "run" / "checkpoints" / "step-00000099"
    old.mkdir(parents=True)
    (old / "meta.json").write_text(json.dumps({"run_id": "old", "iteration": 99}))
    proc = _torchrun(tmp_path, iterations=2, extra=["--no-resume", "--overwrite"])
    output = proc.communicate(timeout=180)[0].decode()
    assert proc.returncode == 0, output[-3000:]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000002"]
    run_id = checkpoint.read_meta(tmp_path / "run" / "checkpoints" / "step-00000002")["run_id"]
    assert len(run_id) == 32 and run_id != "old"
    assert not (tmp_path / "run" / ".lock").exists()


def test_torchrun_resumes_past_a_damaged_checkpoint_from_the_previous_one(tmp_path):
    """A shard file of the newest checkpoint altered on disk: rank 0's checksum check names it, warns, and
    the job resumes from the previous complete checkpoint."""
    proc = _torchrun(tmp_path, iterations=4, extra=["--save-every", "2", "--distributed.keep-checkpoints", "3"])
    assert proc.communicate(timeout=180)[0] is not None and proc.returncode == 0
    newest = tmp_path / "run" / "checkpoints" / "step-00000004"
    shard = sorted(p for p in newest.iterdir() if p.suffix == ".distcp")[0]
    data = bytearray(shard.read_bytes())
    data[100:140] = bytes(40)
    shard.write_bytes(bytes(data))
    proc = _torchrun(tmp_path, iterations=6, extra=["--save-every", "2", "--distributed.keep-checkpoints", "3"])
    output = proc.communicate(timeout=180)[0].decode()
    assert proc.returncode == 0, output[-3000:]
    assert (
        f"file {shard.name} was altered or damaged" in output and "previous complete checkpoint step-00000002" in output
    )
    resumed = [m["iteration"] for m in _lines(tmp_path / "run")]
    assert resumed == [0, 1, 2, 3, 4, 5]  # iterations 2, 3 re-run from step 2, each logged once


def test_the_sharded_path_runs_without_torchrun(tmp_path):
    """`python -m entrypoints.distill --model cosmos-tiny ...` as the brief writes it: one process, world size 1."""
    data = _shards(tmp_path / "data")
    command = [sys.executable, "-m", "entrypoints.distill", "--model", "cosmos-tiny"]
    command += ["--distributed.random-init", "--distributed.dtype", "float64", "--distributed.data", str(data)]
    command += ["--output", str(tmp_path / "run"), "--iterations", "2", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run(command, cwd=ROOT, env=env | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line["iteration"] for line in _lines(tmp_path / "run")] == [0, 1]
    assert (tmp_path / "run" / "student_ema.safetensors").exists()


def test_the_sharded_path_resumes_a_staged_run_at_a_boundary_bit_for_bit(tmp_path):
    """--stages in the sharded runner: a checkpoint at the dcm -> rcm boundary records the stage, and the
    run resumed from it exports the same EMA student and logs the same losses as the uninterrupted one."""
    import shutil

    from safetensors.torch import load_file

    data = _shards(tmp_path / "data")
    command = [sys.executable, "-m", "entrypoints.distill", "--model", "cosmos-tiny"]
    command += ["--distributed.random-init", "--distributed.dtype", "float64", "--distributed.data", str(data)]
    command += ["--stages", "dcm:2,rcm:3", "--student-update-freq", "2", "--tangent-warmup", "1"]
    command += ["--save-every", "2", "--distributed.keep-checkpoints", "3", "--log-every", "1", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env |= {"OMP_NUM_THREADS": "1"}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = subprocess.run([*command, "--output", str(straight)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = checkpoint.read_meta(straight / "checkpoints" / "step-00000002")
    assert (meta["stage"], meta["stage_method"], meta["stage_start"]) == (1, "rcm", 2)
    shutil.copytree(straight, resumed)
    for later in ("step-00000004", "step-00000005"):
        shutil.rmtree(resumed / "checkpoints" / later)
    done = subprocess.run([*command, "--output", str(resumed)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = lambda run: [{k: v for k, v in m.items() if "loss" in k or k in ("phase", "stage")} for m in _lines(run)]  # noqa: E731
    assert [m["stage"] for m in _lines(straight)] == [0, 0, 1, 1, 1] and losses(straight) == losses(resumed)
    a, b = load_file(straight / "student_ema.safetensors"), load_file(resumed / "student_ema.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
