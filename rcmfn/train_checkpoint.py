"""Training checkpoints: weights in safetensors, optimiser and loop state beside them, written atomically.

Layout of one checkpoint, `<run>/checkpoints/step-<NNNNNNNN>/` (the folder naming and the meta.json of the
sharded runner's checkpoints, parallel/checkpoint.py, so that one reader finds either; runs written before
this layout, `iter-<N>/` with `state.json`, still resume):
  student.safetensors, ema.safetensors, fake.safetensors (if any)  -- flat dotted keys
  optim.pt                                                         -- optimiser state dicts
  meta.json                                                        -- iteration, counters, stage, config, run id
A checkpoint is written into a hidden temporary folder and renamed into place as the last step, so an
interrupted save never replaces or corrupts a complete one; `latest_checkpoint` only sees complete ones.
A save that fails removes its temporary folder; one killed mid-way leaves it for `remove_partial_saves`.
Each checkpoint names the run that wrote it (a random id, kept across resumes); pruning removes only the
saving run's own, so checkpoints of another run in the same folder are never deleted for it.
meta.json records each file's SHA-256 (rcmfn/checksums.py); `newest_sound_checkpoint` verifies them and
the weights' finiteness before a resume trusts a checkpoint, and falls back to the previous one, saying so.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tensordict import TensorDict

from rcmfn.checksums import CorruptCheckpointError, folder_digests, newest_sound, verify_digests
from rcmfn.loop import TrainState

PREFIX, TMP_PREFIX, META = "step-", ".tmp-", "meta.json"
LEGACY_PREFIX, LEGACY_META = "iter-", "state.json"  # the layout before the sharded runner's naming


def _meta_file(path: Path) -> Path:
    return path / META if (path / META).is_file() or not (path / LEGACY_META).is_file() else path / LEGACY_META


def _complete(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first (both namings, ordered by iteration)."""
    found = [*root.glob(f"{PREFIX}*"), *root.glob(f"{LEGACY_PREFIX}*")]
    return sorted((p for p in found if _meta_file(p).is_file()), key=lambda p: int(p.name.split("-")[-1]))


def _flat(params: TensorDict) -> dict[str, torch.Tensor]:
    return {
        ".".join(k) if isinstance(k, tuple) else k: v.detach().contiguous()
        for k, v in params.items(include_nested=True, leaves_only=True)
    }


def _copy_into(params: TensorDict, path: Path) -> None:
    tensors = load_file(path)
    flat = _flat(params)
    if set(tensors) != set(flat):
        missing, unexpected = sorted(set(flat) - set(tensors)), sorted(set(tensors) - set(flat))
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for key, value in flat.items():
            if tensors[key].shape != value.shape:
                raise ValueError(
                    f"checkpoint {path}: {key} has shape {tuple(tensors[key].shape)}, "
                    f"model expects {tuple(value.shape)}"
                )
            value.copy_(tensors[key])


def save_checkpoint(
    run_dir: str | Path, state: TrainState, config: dict, run_id: str, keep: int = 3, record: dict | None = None
) -> Path:
    """Write `state` as checkpoint step-<state.iteration> of run `run_id` under run_dir/checkpoints; keep
    that run's newest `keep`. `record`: more loop facts for meta.json (the stage: rcmfn.stages.stage_record)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{state.iteration:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_and_rename(tmp, final, state, config, run_id, record or {})
    except BaseException:  # disk full, interrupted, ...: no half-written folder is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    own = [path for path in _complete(root) if run_id_of(path) == run_id]
    for old in own[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_and_rename(tmp: Path, final: Path, state: TrainState, config: dict, run_id: str, record: dict) -> None:
    save_file(_flat(state.student), tmp / "student.safetensors")
    save_file(_flat(state.ema), tmp / "ema.safetensors")
    optim = {"student": state.student_opt.state_dict()}
    if state.fake is not None:
        save_file(_flat(state.fake), tmp / "fake.safetensors")
        optim["fake"] = state.fake_opt.state_dict()
    torch.save(optim, tmp / "optim.pt")
    meta = {
        "iteration": state.iteration,
        "student_steps": state.student_steps,
        "critic_steps": state.critic_steps,
        "config": config,
        "run_id": run_id,
        "files": folder_digests(tmp),
    } | record
    (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def remove_partial_saves(run_dir: str | Path) -> None:
    """Remove the temporary folders of saves that never finished (a killed process leaves one). Only for
    a job that holds the run folder (rcmfn/run_lock.py): another job's save in progress looks the same."""
    for tmp in (Path(run_dir) / "checkpoints").glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)


def run_id_of(path: Path) -> str | None:
    """The run that wrote checkpoint `path`; None if it cannot be read or predates run ids."""
    try:
        return json.loads(_meta_file(path).read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest complete checkpoint folder of a run, or None."""
    done = _complete(Path(run_dir) / "checkpoints")
    return done[-1] if done else None


# Settings that change no trained value: a resume may change them (older checkpoints recorded some).
NOT_TRAINING = {"cpu_threads", "max_bad_steps", "overwrite", "progress", "log_every", "toy.eval_samples"}


def _dotted(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= _dotted(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict, now: dict) -> list[str]:
    """'field: checkpoint X vs now Y' for each setting (dotted name) that differs and changes training."""
    a, b = _dotted(saved), _dotted(now)
    keys = sorted(k for k in set(a) | set(b) if k not in NOT_TRAINING and a.get(k) != b.get(k))
    return [f"{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}" for k in keys]


def read_state(path: str | Path) -> dict:
    """A checkpoint's meta.json; CorruptCheckpointError naming it if it cannot be read."""
    meta = _meta_file(Path(path))
    try:
        return json.loads(meta.read_text())
    except (OSError, ValueError) as err:
        raise CorruptCheckpointError(f"checkpoint {path}: {meta.name} cannot be read ({err})") from None


def check_checkpoint_config(path: str | Path, config: dict) -> dict:
    """Raise ValueError naming every setting in which checkpoint `path` differs from `config`."""
    meta = read_state(path)
    if diff := config_differences(meta["config"], config):
        raise ValueError(
            f"checkpoint {path} was written by another configuration ({', '.join(diff)}); "
            "use a new output folder or the same settings"
        )
    return meta


def verify_checkpoint(path: str | Path) -> None:
    """Raise CorruptCheckpointError naming the file of checkpoint `path` that is damaged: a checksum that
    differs from the one written, a weights file that cannot be read, or non-finite weights."""
    path = Path(path)
    meta = read_state(path)
    if "files" in meta:  # checkpoints written before checksums have none to verify
        verify_digests(path, meta["files"])
    for name in sorted(p.name for p in path.glob("*.safetensors")):
        try:
            tensors = load_file(path / name)
        except Exception as err:  # noqa: BLE001 -- any reader error means the file is damaged
            raise CorruptCheckpointError(f"checkpoint {path}: {name} cannot be read ({type(err).__name__})") from None
        if bad := [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]:
            raise CorruptCheckpointError(f"checkpoint {path}: {name} holds non-finite weights ({', '.join(bad[:5])})")


def newest_sound_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint that verifies (`verify_checkpoint`), warning for each newer damaged
    one passed over; None if the run has none. If every checkpoint is damaged, raise naming the newest
    one's fault: a run never restarts from scratch without being told to (--overwrite)."""
    root = Path(run_dir) / "checkpoints"
    return newest_sound(_complete(root)[::-1], verify_checkpoint, root)


def load_checkpoint(path: str | Path, state: TrainState, config: dict) -> TrainState:
    """Load checkpoint `path` into a freshly initialised `state` (same networks); checks the config."""
    path = Path(path)
    meta = check_checkpoint_config(path, config)
    _copy_into(state.student, path / "student.safetensors")
    _copy_into(state.ema, path / "ema.safetensors")
    try:
        optim = torch.load(path / "optim.pt", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- never retried with weights_only=False: that runs pickled code
        raise CorruptCheckpointError(f"checkpoint {path}: optim.pt cannot be read ({type(err).__name__})") from None
    state.student_opt.load_state_dict(optim["student"])
    if state.fake is not None:
        _copy_into(state.fake, path / "fake.safetensors")
        state.fake_opt.load_state_dict(optim["fake"])
    state.iteration = meta["iteration"]
    state.student_steps, state.critic_steps = meta["student_steps"], meta["critic_steps"]
    return state
