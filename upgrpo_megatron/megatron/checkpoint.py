"""Training checkpoints: megatron-core `dist_checkpointing` for the model, atomic directories, checksums.

Layout of `checkpoints/step_000010/`:
    model/            dist_checkpointing (torch_dist) — loadable at another TP/EP layout
    optim/rank_R.pt   optimizer state of each rank (torch.save; resumed at the same layout only), or
    optim/distributed/  the distributed optimizer's slices (dist_checkpointing, see megatron/optimizer.py)
    extra.pt          step, scheduler, RNG states, data position (rank 0; plain tensors and numbers)
    metadata.json     architecture, step, layout it was saved at
    model_config.yaml the recipe's model section; tokenizer files when the run has a tokenizer
    COMPLETE          written last: sha256 of every other file

A checkpoint is written into `.step_000010.tmp/` and renamed into place only after COMPLETE is written, so
a crash at any point leaves either the previous checkpoints untouched or a `.tmp` directory that
`latest_complete_checkpoint` ignores (and reports). Everything is read back with `weights_only=True`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps

from upgrpo_megatron import console
from upgrpo_megatron.config import read_model_config
from upgrpo_megatron.errors import UpgrpoError

FORMAT_VERSION = 1


class CheckpointError(UpgrpoError, ValueError):
    """A checkpoint cannot be used (incomplete, corrupt, other architecture)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def sha256_file(path) -> str:
    """The file's sha256 (hashed straight from a memory map: no copies, and the GIL is released meanwhile)."""
    import mmap

    h = hashlib.sha256()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                h.update(mm)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RESULTS_MANAGER = None


def results_queue_dies_with_us() -> None:
    """megatron's dist_checkpointing collects its writers' results through a multiprocessing Manager queue: a
    server process it spawns at the first save and never stops. A trainer killed by SIGKILL (OOM killer, node
    agent) left that server behind (found here: an idle ~270 MB orphan after each killed run). Start the server
    ourselves, from the saving (main) thread, with a parent-death signal; megatron then uses it. Call it
    before every `dist_checkpointing.save` (the first one makes the queue)."""
    global _RESULTS_MANAGER
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    _writers_die_with_us(fa)
    if getattr(fa, "_results_queue", "absent") is not None:  # made already (or megatron no longer has it)
        return
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from upgrpo_megatron.parent_death import die_with_parent

    _RESULTS_MANAGER = SyncManager(ctx=mp.get_context("spawn"))
    _RESULTS_MANAGER.start(initializer=die_with_parent)
    fa._results_queue = _RESULTS_MANAGER.Queue()


def _writers_die_with_us(fa) -> None:
    """megatron forks one writer process per write bucket from the saving thread
    (`write_preloaded_data_multiproc`). A writer busy when the trainer was SIGKILLed outlived it, blocked on a
    results queue nobody reads, and kept the multiprocessing resource tracker alive (seen in CI). Wrap the
    writers' target so each sets a parent-death signal first (in a forked child only; the saving thread is the
    main one, which lives as long as the trainer)."""
    import functools
    import os

    from upgrpo_megatron.parent_death import die_with_parent

    cls = getattr(fa, "FileSystemWriterAsync", None)
    original = getattr(cls, "write_preloaded_data", None)
    if original is None or getattr(original, "_dies_with_parent", False):
        return
    saver = os.getpid()

    @functools.wraps(original)  # keeps the signature megatron inspects
    def write_preloaded_data(*args, **kwargs):
        if os.getpid() != saver:
            die_with_parent()
        return original(*args, **kwargs)

    write_preloaded_data._dies_with_parent = True
    cls.write_preloaded_data = staticmethod(write_preloaded_data)


def save_checkpoint(path, module, *, optimizer=None, extra_state: Optional[dict] = None, model_cfg=None,
                    tokenizer=None, extra_files: Optional[dict] = None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    Args:
        tokenizer: anything with `save_pretrained(dir)` (a transformers tokenizer, `convert.TokenizerFiles`).
        extra_files: {name in the checkpoint: source path} copied in by rank 0 (e.g. the HF config.json a
            checkpoint was converted from), covered by the COMPLETE checksums like everything else.
    """
    path = Path(path)
    tmp = begin_checkpoint(path) if _rank() == 0 else path.parent / f".{path.name}.tmp"
    _barrier()
    results_queue_dies_with_us()
    dist_checkpointing.save(module.sharded_state_dict(), str(tmp / "model"))
    if optimizer is not None:
        from upgrpo_megatron.megatron import optimizer as moptim

        if moptim.is_distributed(optimizer):
            moptim.save_distributed(optimizer, module, tmp / "optim" / "distributed")
        else:
            torch.save(optimizer.state_dict(), tmp / "optim" / f"rank_{_rank()}.pt")
    _barrier()
    from upgrpo_megatron import faults

    faults.maybe_kill_in_checkpoint((extra_state or {}).get("step"))
    if _rank() == 0:
        layout = {"world_size": dist.get_world_size() if dist.is_initialized() else 1,
                  "tp": ps.get_tensor_model_parallel_world_size(), "ep": ps.get_expert_model_parallel_world_size(),
                  "etp": ps.get_expert_tensor_parallel_world_size()}
        finish_checkpoint(tmp, path, layout=layout, extra_state=extra_state, model_cfg=model_cfg,
                          tokenizer=tokenizer, extra_files=extra_files)
    _barrier()
    return path


def begin_checkpoint(path) -> Path:
    """(One process) a fresh `.NAME.tmp/` beside `path` with empty `model/` and `optim/`: where a checkpoint
    is written before `finish_checkpoint` moves it into place."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    path.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "optim" / "distributed").mkdir(parents=True)  # distributed/: the distributed optimizer's slices
    (tmp / "model").mkdir()
    return tmp


def finish_checkpoint(tmp, path, *, layout: dict, extra_state: Optional[dict] = None, model_cfg=None,
                      tokenizer=None, extra_files: Optional[dict] = None,
                      known_sums: Optional[dict] = None) -> Path:
    """(One process, after the model and optimizer files are in `tmp`) write extra.pt, metadata.json,
    model_config.yaml, the tokenizer and `extra_files`, then COMPLETE with the sha256 of every file, and
    rename `tmp` into place (a previous copy of `path` is moved aside first, so a crash never leaves neither).

    `layout`: world_size, tp, ep, etp the model was saved at. `known_sums`: {relative path: sha256} of files
    whose digest the writer computed while writing them (they are not read again)."""
    tmp, path = Path(tmp), Path(path)
    torch.save(extra_state or {}, tmp / "extra.pt")
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, tmp / name)
    meta = {"format_version": FORMAT_VERSION, "format": "megatron-core dist_checkpointing (torch_dist)",
            "step": (extra_state or {}).get("step"), **{k: layout[k] for k in ("world_size", "tp", "ep", "etp")},
            "architecture": model_cfg.architecture if model_cfg is not None else None}
    (tmp / "metadata.json").write_text(json.dumps(meta, indent=2))
    if model_cfg is not None:
        (tmp / "model_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(model_cfg), sort_keys=False))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    known = known_sums or {}
    sums = {}
    for p in files:
        rel = str(p.relative_to(tmp))
        sums[rel] = known.get(rel) or sha256_file(p)
    (tmp / "COMPLETE").write_text(json.dumps(sums, indent=1))
    _fsync_dir(tmp)
    old = None
    if path.exists():  # re-saving a step: move the old copy aside first, so a crash never leaves neither
        old = path.parent / f".{path.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def verify_checkpoint(path) -> Optional[str]:
    """None when the checkpoint is complete and every checksum matches; else what is wrong."""
    path = Path(path)
    marker = path / "COMPLETE"
    if not marker.exists():
        return "no COMPLETE marker (the write did not finish)"
    try:
        sums = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return "COMPLETE marker is unreadable"
    for rel, digest in sums.items():
        f = path / rel
        if not f.exists():
            return f"{rel} is missing"
        if sha256_file(f) != digest:
            return f"{rel} does not match its checksum"
    return None


def safe_torch_load(path) -> object:
    """The only `torch.load` in the project: tensors, numbers, strings and containers of them, never code
    (`weights_only=True`). A file holding anything else is refused with a CheckpointError naming it."""
    import pickle

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"{path}: not a plain-tensor torch file, refusing to unpickle it ({first[:160]})") from None


def _step_of(p: Path) -> int:
    try:
        return int(p.name.split("_")[-1])
    except ValueError:
        return -1


def latest_complete_checkpoint(ckpt_dir, report=console.say) -> Optional[Path]:
    """The newest checkpoint that verifies; partial or corrupt ones are skipped and reported."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.exists():
        return None
    for tmp in sorted(ckpt_dir.glob(".step_*.tmp")):
        if _rank() == 0 and report:
            report(f"ignoring partial checkpoint {tmp} (a write was interrupted; it is removed at the next save)")
    for old in sorted(ckpt_dir.glob(".step_*.old")):
        final = ckpt_dir / old.name[1:-len(".old")]
        if not final.exists() and verify_checkpoint(old) is None and _rank() == 0:
            # a crash between the two renames of a re-save: the old copy is complete, put it back
            os.rename(old, final)
            if report:
                report(f"restored checkpoint {final} from {old.name} (a re-save was interrupted)")
    for p in sorted((d for d in ckpt_dir.glob("step_*") if d.is_dir()), key=_step_of, reverse=True):
        problem = verify_checkpoint(p)
        if problem is None:
            return p
        if _rank() == 0 and report:
            report(f"ignoring checkpoint {p}: {problem}")
    return None


def prune_checkpoints(ckpt_dir, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and interrupted writes."""
    ckpt_dir = Path(ckpt_dir)
    for stale in list(ckpt_dir.glob(".step_*.tmp")) + list(ckpt_dir.glob(".step_*.old")):
        shutil.rmtree(stale, ignore_errors=True)
    complete = sorted((d for d in ckpt_dir.glob("step_*") if (d / "COMPLETE").exists()), key=_step_of)
    for old in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def check_architecture(path, model_cfg) -> None:
    meta_path = Path(path) / "metadata.json"
    if model_cfg is None or not meta_path.exists():
        return
    cfg_path = Path(path) / "model_config.yaml"
    if cfg_path.exists():
        saved = read_model_config(cfg_path)
        for k in ("architecture", "hidden_size", "num_layers", "num_experts", "num_attention_heads",
                  "num_query_groups", "head_dim", "moe_ffn_hidden_size", "vocab_size"):
            if getattr(saved, k) != getattr(model_cfg, k):
                raise CheckpointError(f"checkpoint {path} is for another model: {k}={getattr(saved, k)!r}, the "
                                      f"recipe has model.{k}={getattr(model_cfg, k)!r}")
        # settings that leave every weight's shape alone but change what the model computes: the recipe's value is
        # used, so say so (a top-k or rope base the checkpoint was not trained with is rarely what was meant)
        for k in ("moe_router_topk", "norm_topk_prob", "rope_theta", "norm_epsilon", "first_k_dense_layers",
                  "tie_word_embeddings", "shared_expert_ffn_hidden_size"):
            if getattr(saved, k) != getattr(model_cfg, k) and _rank() == 0:
                console.warn(f"checkpoint {path} was saved with model.{k}={getattr(saved, k)!r}; the recipe's "
                             f"{getattr(model_cfg, k)!r} is used")


def load_checkpoint(path, module, *, optimizer=None, model_cfg=None) -> dict:
    """Collective. Loads the model (any layout), the optimizer (same layout only) and returns extra_state."""
    path = Path(path)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} cannot be used: {problem}")
    check_architecture(path, model_cfg)
    state = dist_checkpointing.load(module.sharded_state_dict(), str(path / "model"))
    module.load_state_dict(state)
    optim_file = path / "optim" / f"rank_{_rank()}.pt"
    meta = json.loads((path / "metadata.json").read_text())
    # the optimizer's shards follow the layout, expert tensor parallelism included (a file without "etp" was
    # written before it was recorded, at etp 1)
    same_layout = (meta.get("world_size"), meta.get("tp"), meta.get("ep"), meta.get("etp", 1)) == (
        dist.get_world_size() if dist.is_initialized() else 1, ps.get_tensor_model_parallel_world_size(),
        ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size())
    from upgrpo_megatron.megatron import optimizer as moptim

    distributed = optimizer is not None and moptim.is_distributed(optimizer)
    saved_distributed = (path / "optim" / "distributed" / "metadata.json").exists()
    if distributed and saved_distributed and same_layout:
        moptim.load_distributed(optimizer, module, path / "optim" / "distributed")
    elif optimizer is not None and not distributed and optim_file.exists() and same_layout:
        optimizer.load_state_dict(safe_torch_load(optim_file))
    elif optimizer is not None and _rank() == 0:
        why = "saved at another layout" if not same_layout else "saved with the other optimizer kind"
        console.warn(f"optimizer state of {path} not restored ({why}); starting Adam moments fresh")
    return safe_torch_load(path / "extra.pt")
