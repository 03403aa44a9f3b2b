"""Sharded training checkpoints with torch.distributed.checkpoint (DCP): periodic, at SIGTERM, resumable.

Layout under `<run>/checkpoints/`:
  step-<NNNNNNNN>/            one complete checkpoint: DCP shards + .metadata, and meta.json
  .tmp-step-<NNNNNNNN>/       a save in progress (or one killed mid-way): never read, removed later
Every rank writes its shards into the temporary folder; rank 0 then writes meta.json (iteration,
counters, data-loader position, configuration, run id) and renames the folder into place, after a barrier,
as the last step. A kill at any moment therefore leaves the previous complete checkpoint untouched,
and `latest_checkpoint` (the newest `step-*` with a meta.json) is always loadable. DCP stores the
DTensor shards with their global layout, so a checkpoint loads on another world size too. Pruning
removes only the saving run's own checkpoints (by run id), never another run's in the same folder.

The counterpart of rcmfn/train_checkpoint.py (single process, safetensors) for sharded state.
"""

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from rcmfn.checksums import CorruptCheckpointError, folder_digests, newest_sound, verify_digests
from rcmfn.loop import TrainState

PREFIX, TMP_PREFIX, META = "step-", ".tmp-step-", "meta.json"
T = TypeVar("T")


def stepped_optimizers(state: TrainState) -> list[str]:
    """The networks whose optimiser has taken a step (has state to save)."""
    names = ["student"] + ([] if state.fake is None else ["fake"])
    return [n for n in names if getattr(state, f"{n}_opt").state]


def _tensors(state: TrainState, student: nn.Module, fake: nn.Module | None, optimizers: list[str]) -> dict:
    """What DCP saves and loads in place: weights, EMA and the states of `optimizers` (FQN-keyed).

    An optimiser that has not stepped yet is left out: `get_optimizer_state_dict` initialises an empty
    AdamW by stepping it on zero gradients, a phantom step that shifts Adam's bias correction for the rest
    of the run (a save before the fake score's first step made `--save-every 1` and `--save-every 20`
    diverge from iteration 4: 31 optimiser steps counted for 30 real ones).
    """
    tensors = {"student": dict(state.student.items()), "ema": dict(state.ema.items())}
    if state.fake is not None:
        tensors["fake"] = dict(state.fake.items())
    modules = {"student": student, "fake": fake}
    for name in optimizers:
        tensors[f"{name}_optim"] = get_optimizer_state_dict(modules[name], getattr(state, f"{name}_opt"))
    return tensors


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_checkpoint(
    run_dir: str | os.PathLike,
    state: TrainState,
    student: nn.Module,
    fake: nn.Module | None,
    meta: dict,
    run_id: str,
    keep: int = 2,
) -> Path:
    """Collective: write `state` as step-<iteration> of run `run_id`; keep that run's newest `keep`.

    `meta` (JSON-serialisable: loader position, configuration, ...) is stored with the loop counters and
    `run_id` (the same on every rank; rank 0's is the one written).
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"{PREFIX}{state.iteration:08d}"
    tmp = root / f"{TMP_PREFIX}{state.iteration:08d}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    optimizers = stepped_optimizers(state)
    dcp.save(_tensors(state, student, fake, optimizers), checkpoint_id=str(tmp))
    _barrier()
    if _rank() == 0:
        counters = {
            "iteration": state.iteration,
            "student_steps": state.student_steps,
            "critic_steps": state.critic_steps,
            "run_id": run_id,
            "optimizer_states": optimizers,
            "files": folder_digests(tmp, skip=(META,)),  # verified before a resume trusts the shards
        }
        (tmp / META).write_text(json.dumps(counters | meta, indent=1, sort_keys=True))
        if final.exists():  # the same iteration saved twice (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        own = [path for path in sorted(root.glob(f"{PREFIX}*")) if _run_id_of(path) == run_id]
        for old in own[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _run_id_of(path: Path) -> str | None:
    """The run that wrote checkpoint `path`; None if it cannot be read or predates run ids."""
    try:
        return read_meta(path).get("run_id")
    except (OSError, ValueError):
        return None


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `run_dir`/checkpoints, or None."""
    root = Path(run_dir) / "checkpoints"
    done = [p for p in sorted(root.glob(f"{PREFIX}*")) if (p / META).is_file()]
    return done[-1] if done else None


def newest_sound_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint whose files match their recorded checksums (rank-local; call it on one
    rank), warning for each newer damaged one passed over; None if there is none. If every checkpoint is
    damaged, raise naming the newest one's fault: a run never restarts from scratch unasked."""
    root = Path(run_dir) / "checkpoints"
    done = [p for p in sorted(root.glob(f"{PREFIX}*"), reverse=True) if (p / META).is_file()]

    def verify(path: Path) -> None:
        try:
            meta = read_meta(path)
        except (OSError, ValueError) as err:
            raise CorruptCheckpointError(f"checkpoint {path}: {META} cannot be read ({err})") from None
        verify_digests(path, meta.get("files", {}))  # checkpoints from before checksums have none

    return newest_sound(done, verify, root)


def read_meta(path: str | os.PathLike) -> dict:
    """The meta.json of a checkpoint folder (rank-local file read; no collective)."""
    return json.loads((Path(path) / META).read_text())


WEIGHTS = ("ema", "student", "fake")


def read_weights(path: str | os.PathLike, which: str = "ema") -> dict[str, torch.Tensor]:
    """One network's full weights (`which`: ema, student or fake) from checkpoint `path`, on the CPU, in
    one process and without a process group: for sampling, converting and exporting a sharded run.

    DCP's metadata gives every saved tensor's global shape and dtype; the tensors are allocated whole
    and filled by DCP's own reader, so the result does not depend on the world size that saved it.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if which not in WEIGHTS:
        raise ValueError(f"which must be one of {WEIGHTS}; got {which!r}")
    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = f"{which}."
    template = {
        key.removeprefix(prefix): torch.empty(item.size, dtype=item.properties.dtype)
        for key, item in metadata.items()
        if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)
    }
    if not template:
        saved = sorted({key.split(".")[0] for key in metadata})
        raise ValueError(f"checkpoint {path} holds no {which!r} weights; it holds {saved}")
    dcp.load({which: template}, checkpoint_id=str(path), no_dist=True)
    return template


def load_checkpoint(path: str | os.PathLike, state: TrainState, student: nn.Module, fake: nn.Module | None) -> dict:
    """Collective: load checkpoint `path` into a freshly built `state` in place; return its meta.

    The state must have the same networks (names and shapes; DCP raises naming a missing key
    otherwise); the optimiser states are created first so that DCP can fill them in place.
    """
    meta = read_meta(path)
    saved = meta.get("optimizer_states", ["student"] + ([] if state.fake is None else ["fake"]))
    tensors = _tensors(state, student, fake, saved)
    dcp.load(tensors, checkpoint_id=str(path))
    modules = {"student": student, "fake": fake}
    for name in saved:  # an optimiser saved before its first step stays empty, as it was
        set_optimizer_state_dict(modules[name], getattr(state, f"{name}_opt"), tensors[f"{name}_optim"])
    state.iteration, state.student_steps, state.critic_steps = (
        meta["iteration"],
        meta["student_steps"],
        meta["critic_steps"],
    )
    return meta


def rank_zero_first(claim: Callable[[], T]) -> T:
    """Collective: run `claim` on rank 0 while the other ranks wait; return its result on every rank.

    An exception `claim` raises is raised on every rank, so a refused job (output folder locked, say)
    fails everywhere with rank 0's message instead of leaving the others waiting in their next collective.
    """
    outcome: list = [None, None]  # result, exception
    if _rank() == 0:
        try:
            outcome[0] = claim()
        except Exception as err:
            outcome[1] = err
    if dist.is_initialized():
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def agree_to_stop(local: bool, device: torch.device) -> bool:  # stop flags: rcmfn/stop_signal.py
    """Collective: True on every rank if any rank wants to stop (one tiny all-reduce)."""
    if not dist.is_initialized():
        return local
    flag = torch.tensor([1.0 if local else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
