"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint is a directory, so a reader never sees half of one:

    RUN/checkpoints/step-00000120/
        model.safetensors        model weights (shared tensors handled by safetensors)
        optimizer.safetensors    every optimizer's tensor state (Adam moments, steps, ...)
        optimizer.json           every optimizer's non-tensor state (param groups, scalars)
        rng-rank<R>.safetensors  torch (and CUDA) generator states of rank R
        rng-rank<R>.json         numpy and Python generator states of rank R
        state.json               training progress (epoch, batch, step, early stopping, ...)
        config.json              what is needed to rebuild the model (arch, model config, schema)
        checksums.json           size and CRC-32 of every file above (written last)
    RUN/checkpoints/latest.json  {"checkpoint": "step-00000120"}
    RUN/checkpoints/snapshot-00000100/  model.safetensors + config.json (model-only)
    RUN/checkpoints/best.json    {"checkpoint": "snapshot-00000100", "select": "gauc", "score": ..., "epoch": ...}
                                 best by the selection score (default: valid GAUC weighted by users scored)
    RUN/checkpoints/best-SQS.json  {"checkpoint": "snapshot-00000080", ...}  best for one scenario

Everything is first written into a hidden temporary directory next to its final place and
then renamed (``os.rename`` is atomic on one filesystem); pointer files are replaced with
``os.replace``. A run killed at any moment leaves the previous checkpoint and pointer intact.

Damage is found and named, not trusted. ``checksums.json`` lists every file's size and CRC-32;
:meth:`CheckpointManager.verify` checks them before anything is loaded, and unreadable files
(a checkpoint written before checksums, or a missing ``checksums.json``) fail to parse with the
file named. Both raise :class:`CorruptCheckpointError`. ``--resume`` then falls back to the
previous training checkpoint (``keep_checkpoints`` of them are kept) with a warning, all ranks
agreeing on which one (:meth:`mtfm.train.trainer.Trainer.restore`).

Exact resume needs every source of randomness: the model and optimizer tensors, each rank's
RNG states, and the trainer's progress (epoch, batch index inside the epoch, step, the
early-stopping state, the running loss sums). Under torchrun every rank writes its own RNG
files into the same temporary directory; rank 0 writes the rest and renames.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from mtfm.checksum import file_checksum

LATEST = "latest.json"
CHECKSUMS = "checksums.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, or does not fit the current run."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that is truncated, damaged or unreadable; the message names it."""


# --------------------------------------------------------------------------------------------
# Small atomic-write helpers
# --------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace`` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"{path}: not valid JSON (damaged?): {err}") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with a missing or damaged file named in the error."""
    if not path.is_file():
        raise CorruptCheckpointError(f"{path}: missing; the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise CorruptCheckpointError(f"{path}: unreadable (truncated or damaged?): {err}") from None


def write_checksums(ckpt: Path) -> None:
    """Record the size and checksum of every file of ``ckpt`` in ``ckpt/checksums.json``."""
    entries = {}
    for f in sorted(p for p in ckpt.iterdir() if p.is_file() and p.name != CHECKSUMS):
        size, crc = file_checksum(f)
        entries[f.name] = {"size": size, "checksum": crc}
    (ckpt / CHECKSUMS).write_text(json.dumps(entries, indent=2))


def verify_checkpoint(ckpt: Path) -> None:
    """Check every file of ``ckpt`` against its ``checksums.json``; raise
    :class:`CorruptCheckpointError` naming the first that is missing or differs. A checkpoint
    written before checksums were recorded has none: its files are checked as they are parsed."""
    listed = ckpt / CHECKSUMS
    if not listed.is_file():
        return
    for name, want in read_json(listed).items():
        path = ckpt / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{path}: missing; {listed} lists it")
        size, crc = file_checksum(path)
        if size != want["size"]:
            raise CorruptCheckpointError(f"{path}: {size:,} bytes, {listed} says {want['size']:,} (truncated?)")
        if crc != want["checksum"]:
            raise CorruptCheckpointError(f"{path}: checksum {crc}, {listed} says {want['checksum']} (damaged)")


# --------------------------------------------------------------------------------------------
# Optimizer and RNG state <-> (tensors, JSON)
# --------------------------------------------------------------------------------------------


def optimizer_state_to_flat(optimizers: Mapping[str, torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split optimizer state dicts into a flat tensor dict (safetensors) and a JSON tree."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}
    for name, opt in optimizers.items():
        sd = opt.state_dict()
        state_meta: dict[str, dict] = {}
        for pid, entry in sd["state"].items():
            out: dict[str, Any] = {}
            for key, value in entry.items():
                if torch.is_tensor(value):
                    tkey = f"{name}.{pid}.{key}"
                    tensors[tkey] = value.detach().cpu().contiguous()
                    out[key] = {"__tensor__": tkey}
                else:
                    out[key] = value
            state_meta[str(pid)] = out
        meta[name] = {"state": state_meta, "param_groups": sd["param_groups"]}
    return tensors, meta


def optimizer_state_from_flat(
    optimizers: Mapping[str, torch.optim.Optimizer], tensors: dict[str, torch.Tensor], meta: dict, where: str
) -> None:
    if sorted(meta) != sorted(optimizers):
        raise CheckpointError(f"{where}: checkpoint has optimizers {sorted(meta)}, the run has {sorted(optimizers)}")
    for name, opt in optimizers.items():
        state = {
            int(pid): {k: tensors[v["__tensor__"]] if isinstance(v, dict) and "__tensor__" in v else v for k, v in entry.items()}
            for pid, entry in meta[name]["state"].items()
        }
        # JSON turns tuples (Adam's betas) into lists: give them back the optimizer's own types.
        groups = [
            {k: tuple(v) if isinstance(current.get(k), tuple) and isinstance(v, list) else v for k, v in saved.items()}
            for saved, current in zip(meta[name]["param_groups"], opt.param_groups)
        ]
        try:
            opt.load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{where}: optimizer {name!r} does not fit the model: {err}") from None


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """Every generator a training step may draw from, as (tensors, JSON)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    meta = {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [py_version, list(py_state), py_gauss],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    py_version, py_state, py_gauss = meta["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))


# --------------------------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------------------------


def _no_barrier() -> None:
    return None


class CheckpointManager:
    """Writes, lists, prunes and loads the checkpoints of one run directory.

    ``barrier`` synchronises ranks (``torch.distributed.barrier`` under torchrun); rank 0
    writes the shared parts, every rank its own RNG state.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] = _no_barrier,
        keep: int = 2,
    ) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.rank, self.world_size, self.barrier, self.keep = rank, world_size, barrier, keep

    # ---- pointers ---------------------------------------------------------------------------

    def _pointer(self, name: str) -> Path | None:
        path = self.root / name
        if not path.is_file():
            return None
        target = self.root / read_json(path)["checkpoint"]
        if not target.is_dir():
            raise CheckpointError(f"{path}: points to {target}, which does not exist")
        return target

    def latest(self) -> Path | None:
        """The last complete training checkpoint, or None if the run has none yet."""
        return self._pointer(LATEST)

    def best(self) -> Path | None:
        """The best-by-validation model snapshot, or None if no epoch was evaluated yet."""
        return self.snapshot("best")

    # ---- writing ----------------------------------------------------------------------------

    def _publish(self, tmp: Path, name: str, pointer: str | None) -> Path:
        """Rank 0: checksum and flush ``tmp``'s files, rename it to ``name``, point ``pointer``
        (if any) at it."""
        write_checksums(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        final = self.root / name
        old = None
        if final.exists():  # the same step saved twice (e.g. a resumed run): swap it out
            old = self.root / f".old-{name}-{os.getpid()}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        if pointer is not None:
            write_json(self.root / pointer, {"checkpoint": name})
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _fresh_tmp(self, name: str) -> Path:
        tmp = self.root / f".tmp-{name}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self.barrier()
        return tmp

    def save(
        self,
        *,
        step: int,
        model: nn.Module,
        optimizers: Mapping[str, torch.optim.Optimizer],
        state: dict,
        config: dict,
    ) -> Path:
        """A full training checkpoint at ``step``; returns its directory."""
        name = f"step-{step:08d}"
        tmp = self._fresh_tmp(name)
        rng_tensors, rng_meta = capture_rng()
        save_file(rng_tensors, str(tmp / f"rng-rank{self.rank}.safetensors"))
        (tmp / f"rng-rank{self.rank}.json").write_text(json.dumps(rng_meta))
        if self.rank == 0:
            save_model(model, str(tmp / "model.safetensors"))
            opt_tensors, opt_meta = optimizer_state_to_flat(optimizers)
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
            (tmp / "state.json").write_text(json.dumps({**state, "world_size": self.world_size}, indent=2))
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
        self.barrier()
        final = self.root / name
        if self.rank == 0:
            final = self._publish(tmp, name, LATEST)
            self._prune()
        self.barrier()
        return final

    def save_snapshot(self, *, step: int, model: nn.Module, config: dict, pointers: dict[str, dict]) -> Path:
        """A model-only snapshot (weights + config) pointed to by every name in ``pointers``.

        ``pointers`` maps a pointer name (``best``, ``best-HP``, ...) to why the snapshot is
        that best (written beside it as ``<name>.info.json``). One snapshot serves every
        pointer chosen at the same step; snapshots no pointer refers to any more are removed.
        """
        name = f"snapshot-{step:08d}"
        tmp = self._fresh_tmp(name)
        final = self.root / name
        if self.rank == 0:
            save_model(model, str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            for pointer, info in pointers.items():
                (tmp / f"{pointer}.info.json").write_text(json.dumps(info, indent=2))
            final = self._publish(tmp, name, None)
            for pointer, info in pointers.items():  # the reason beside the name (the selection, its score)
                write_json(self.root / f"{pointer}.json", {"checkpoint": name, **info})
            referenced = {read_json(p)["checkpoint"] for p in self.root.glob("best*.json")}
            for old in self.root.glob("snapshot-*"):
                if old.is_dir() and old.name not in referenced:
                    shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return final

    def snapshot(self, pointer: str) -> Path | None:
        """The snapshot a pointer (``best``, ``best-<scenario>``) refers to, or None."""
        return self._pointer(f"{pointer}.json")

    def _prune(self) -> None:
        steps = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        latest = self.latest()
        for p in steps[: max(0, len(steps) - self.keep)]:
            if p != latest:
                shutil.rmtree(p, ignore_errors=True)

    # ---- reading ----------------------------------------------------------------------------

    def load(self, ckpt: Path, *, model: nn.Module, optimizers: Mapping[str, torch.optim.Optimizer]) -> dict:
        """Restore model, optimizers and this rank's RNG from ``ckpt``; return the training state.
        Files are verified against ``checksums.json`` first (:func:`verify_checkpoint`)."""
        verify_checkpoint(ckpt)
        state = read_json(ckpt / "state.json")
        if state.get("world_size") != self.world_size:
            raise CheckpointError(
                f"{ckpt}: written by {state.get('world_size')} rank(s); resuming exactly needs the same "
                f"number, this run has {self.world_size}"
            )
        load_model_weights(ckpt, model)
        optimizer_state_from_flat(
            optimizers, _load_tensors(ckpt / "optimizer.safetensors"), read_json(ckpt / "optimizer.json"), str(ckpt)
        )
        rng_file = ckpt / f"rng-rank{self.rank}.safetensors"
        restore_rng(_load_tensors(rng_file), read_json(ckpt / f"rng-rank{self.rank}.json"))
        return state

    def resume_candidates(self) -> list[Path]:
        """Training checkpoints to resume from, best first: the one ``latest.json`` points at,
        then the older ones still kept, newest first. An unreadable ``latest.json`` is skipped
        with a warning (every kept checkpoint is then a candidate)."""
        steps = sorted((p for p in self.root.glob("step-*") if p.is_dir()), reverse=True)
        try:
            latest = self.latest()
        except CheckpointError as err:
            warnings.warn(f"{err}; trying the checkpoints kept in {self.root}", stacklevel=2)
            return steps
        if latest is None:
            return []
        return [latest] + [p for p in steps if p.name < latest.name]

    def load_resumable(
        self,
        *,
        model: nn.Module,
        optimizers: Mapping[str, torch.optim.Optimizer],
        check: Callable[[Path], None] = lambda ckpt: None,
        agree: Callable[[bool], bool] = lambda ok: ok,
    ) -> tuple[Path, dict]:
        """Load the newest intact training checkpoint (:meth:`resume_candidates`); return it and
        its training state.

        A damaged one (:class:`CorruptCheckpointError`) is skipped with a warning naming the
        file, for the one before it. ``check(ckpt)`` runs before loading (the trainer compares
        settings there; its errors are not damage and stop the resume). ``agree(ok)`` turns
        this rank's verdict into every rank's (under torchrun: a rank that found damage makes
        all ranks fall back together), so ranks never resume from different checkpoints.
        """
        candidates = self.resume_candidates()
        if not candidates:
            raise CheckpointError(f"{self.root}: no checkpoint to resume from")
        problems = []
        for ckpt in candidates:
            check(ckpt)
            try:
                state, problem = self.load(ckpt, model=model, optimizers=optimizers), None
            except CorruptCheckpointError as err:
                state, problem = None, str(err)
            if agree(problem is None):
                return ckpt, state
            problems.append(problem or f"{ckpt}: damaged on another rank")
            warnings.warn(f"cannot resume from {ckpt}: {problems[-1]}; trying the previous checkpoint", stacklevel=2)
        raise CorruptCheckpointError(f"{self.root}: no intact checkpoint to resume from ({'; '.join(problems)})")


def load_model_weights(ckpt: str | Path, model: nn.Module) -> None:
    """Load ``ckpt/model.safetensors`` into ``model``, strictly (every key, every shape)."""
    path = Path(ckpt) / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        missing, unexpected = load_model(model, str(path), strict=True)
    except SafetensorError as err:
        raise CorruptCheckpointError(f"{path}: unreadable (truncated or damaged?): {err}") from None
    except RuntimeError as err:
        raise CheckpointError(f"{path}: does not fit the model: {err}") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}")


def read_checkpoint_config(ckpt: str | Path) -> dict:
    return read_json(Path(ckpt) / "config.json")
