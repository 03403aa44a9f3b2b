"""The run folder both runners write (created, proven writable, kept to one run's checkpoints), and the
process group of one that a sharded run without torchrun gets.

The lock that keeps it to one job at a time is rcmfn/run_lock.py.
"""

import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open


def prepare_output(path: Path) -> None:
    """Create the run folder and prove it is writable before any work starts. The probe file has a
    unique name: every rank of a torchrun job probes the same folder at once."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ValueError(f"output folder {path} is not writable: {err}") from err


def check_fresh_output(path: Path, overwrite: bool) -> list[Path]:
    """A run that resumes nothing must not share its folder with another run's checkpoints (either runner's;
    their pruning and resuming would mix): refuse such a folder, or with `overwrite` return them for removal.
    Hidden entries are saves in progress or killed, not checkpoints."""
    root = path / "checkpoints"
    found = sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []
    if found and not overwrite:
        raise ValueError(
            f"output folder {path} holds {len(found)} checkpoint{'s' if len(found) > 1 else ''} "
            f"({found[0].name} ... {found[-1].name}) that this run does not resume; pass --overwrite to delete "
            "them and start afresh, or resume them (--resume, with their settings) or use another --output"
        )
    return found


def single_process_group_env() -> None:
    """Without torchrun: a process group of one (this process, the local GPU or the CPU) on a free local
    port, and a note on how to use every visible GPU."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available() and (count := torch.cuda.device_count()) > 1:
        print(
            f"running on 1 of the {count} visible GPUs; to use all of them: torchrun --nproc_per_node={count} "
            f"-m entrypoints.distill {' '.join(sys.argv[1:])}",
            file=sys.stderr,
            flush=True,
        )


def is_training_checkpoint(folder: Path) -> bool:
    """A checkpoint folder of either runner (the toy's safetensors files, or a sharded run's DCP shards)."""
    return folder.is_dir() and any((folder / meta).is_file() for meta in ("meta.json", "state.json"))


def newest_training_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint of a run folder, whichever runner wrote it (none: None)."""
    from parallel import checkpoint as sharded
    from rcmfn import train_checkpoint as single

    found = [p for p in (single.latest_checkpoint(run), sharded.latest_checkpoint(run)) if p is not None]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def refuse_adapters(names, folder: Path) -> None:
    """A --lora-rank run's checkpoints hold adapters only (rcmfn/lora.py), not a network: say so."""
    if any(name.endswith((".lora_down", ".lora_up")) for name in names):
        raise ValueError(
            f"{folder} holds LoRA adapters (a --lora-rank run), not whole weights: use the sharded run's merged "
            "export (student_ema.safetensors), or rcmfn.lora.merge them onto the teacher's weights"
        )


def training_weights(folder: Path, which: str = "ema"):
    """One network's weights (`which`: ema, student or fake) of a training checkpoint folder of either
    runner, in our key names, read in this process without a process group: the toy's safetensors file
    (a path), or a sharded run's tensors read from its DCP shards (a name -> tensor dict)."""
    from parallel.checkpoint import WEIGHTS, read_weights

    if which not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}; got {which!r}")
    if (folder / f"{which}.safetensors").is_file():
        with safe_open(folder / f"{which}.safetensors", "pt") as f:
            refuse_adapters(f.keys(), folder)
        return folder / f"{which}.safetensors"
    if (folder / ".metadata").is_file():
        weights = read_weights(folder, which)
        refuse_adapters(weights, folder)
        return weights
    raise FileNotFoundError(f"{folder} holds no {which} weights ({which}.safetensors or DCP shards)")


def check_resume_length(ckpt: Path, iteration: int, total: int) -> None:
    """Refuse to resume a checkpoint past the requested length: nothing would train, and the longer-trained
    model would be evaluated and labelled as a `total`-iteration one."""
    if iteration > total:
        raise ValueError(
            f"checkpoint {ckpt} is at iteration {iteration}, past the requested total of {total} iterations; "
            f"pass --iterations {iteration} or more to resume it, or use another --output"
        )
