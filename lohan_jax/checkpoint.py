"""Checkpoints: the trainer's whole state (fp32 master weights and Adam moments wherever they live: HBM, host
RAM or disk; Adam's step count) plus the data position (the loop step: batches are a function of (seed, step)),
the config and a manifest. orbax's CheckpointManager commits each one atomically (written into a temporary
directory, renamed when complete; temporaries of a killed run are removed on open) and keeps the newest N.

Format: every array is a zarr3 array with a crc32c digest per chunk. An engine unit is one [3, n] array
(master, mu, nu): the layout of the disk tier (lohan_jax.tiers.store), so a unit whose state lives on disk is
checkpointed by hard-linking its current generation's files (no byte through RAM; copied file by file when
the checkpoint is on another filesystem). The reference trainer's pytree is saved leaf by leaf. On restore
every chunk's digest is checked as it is read and the manifest is checked against the trainer: a truncated,
corrupted or missing file is an error naming it, and `restore` falls back to the newest older checkpoint
that is valid. A checkpoint of another model or plan is an error, never a fallback.

Asynchronous saving: `save` returns once the state is captured at the step boundary, and a background thread
writes and commits. Device arrays are copied to host (the next update donates them); host-resident state is
copied into a RAM snapshot when available RAM allows it, otherwise it is written by tasks queued on the
engine's host worker, which runs a unit's tasks in submission order, so each unit is written before its
next update touches it (the writes then overlap the GPU's next forward and backward, not the CPU AdamW);
disk-resident units are pinned in the store so their generation outlives the next write until linked. One
save is in flight at a time; the next `save`, `wait`, `restore` or `close` re-raises its failure.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from lohan_jax import faults
from lohan_jax.config import config_to_dict
from lohan_jax.tiers.store import CHUNK_ELEMS, link_or_copy_tree

log = logging.getLogger(__name__)
FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or is missing, truncated or corrupt; the message names the file."""


class CheckpointMismatch(ValueError):
    """A checkpoint is intact but of another model or plan."""


# ---- arrays: zarr3 + crc32c --------------------------------------------------------------------------------
def _spec(path: Path, shape: tuple | None = None, dtype: str | None = None) -> dict:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}, "fill_missing_data_reads": False}
    if shape is not None:
        if len(shape) == 2 and shape[0] == 3:  # a unit's (master, mu, nu): the disk tier's chunking
            chunk = [3, max(1, min(shape[1], CHUNK_ELEMS))]
        else:  # a pytree leaf: split along the leading axis into chunks of about as many elements
            row = int(np.prod(shape[1:], dtype=np.int64))
            chunk = [max(1, min(shape[0], 3 * CHUNK_ELEMS // max(row, 1))), *shape[1:]]
        spec["metadata"] = {"shape": list(shape), "data_type": dtype,
                            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
                            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}
    return spec


def write_array(path: Path, rows: np.ndarray | tuple) -> int:
    """Write an array (or the rows of a [len(rows), n] array, stacked chunk by chunk so that no full copy is
    made) with a digest per chunk. Returns the bytes written."""
    if isinstance(rows, tuple):
        n, shape = rows[0].shape[0], (len(rows), rows[0].shape[0])
        dtype = rows[0].dtype
    else:
        shape, dtype = rows.shape, rows.dtype
    arr = ts.open(_spec(path, shape, np.dtype(dtype).name), create=True, delete_existing=True).result()
    if not isinstance(rows, tuple):
        arr.write(rows).result()
        return rows.nbytes
    pending = []
    for lo in range(0, n, CHUNK_ELEMS):
        if faults.hit("checkpoint_write") == "enospc":
            raise faults.disk_full(f"writing {path}")
        hi = min(n, lo + CHUNK_ELEMS)
        pending.append(arr[:, lo:hi].write(np.stack([r[lo:hi] for r in rows])))
        if len(pending) > 1:  # two chunks in flight: the disk stays busy, RAM stays at two chunks
            pending.pop(0).result()
    for p in pending:
        p.result()
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def read_array(path: Path) -> np.ndarray:
    """Read an array, checking every chunk's digest; CheckpointError names the file on any failure."""
    if not (path / "zarr.json").is_file():
        raise CheckpointError(f"{path / 'zarr.json'} is missing")
    try:
        return ts.open(_spec(path)).result().read().result()
    except Exception as e:
        raise CheckpointError(f"{path} is corrupt or truncated: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# ---- what a trainer's state is made of -------------------------------------------------------------------
@dataclasses.dataclass
class _Entry:
    name: str
    shape: tuple
    dtype: str
    array: np.ndarray | None = None  # an owned copy: written from the background thread
    link: tuple | None = None  # (store, unit name, generation, directory): a pinned disk-tier generation
    done: threading.Event | None = None  # written by a host-worker task (live arrays); error in `error`
    error: list = dataclasses.field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def _is_engine(trainer: Any) -> bool:
    return hasattr(trainer, "units") and hasattr(trainer, "worker")


def _capture(trainer: Any, arrays_dir: Path, snapshot_ok) -> tuple[list[_Entry], int]:
    """Capture the trainer's state at a step boundary; returns the entries and Adam's step count."""
    if not _is_engine(trainer):
        state = trainer.state_dict()
        leaves = [np.array(x) for x in _leaves(state)]  # owned host copies (the next step donates the buffers)
        entries = [_Entry(f"leaf{i}", a.shape or (1,), a.dtype.name, array=a.reshape(a.shape or (1,)))
                   for i, a in enumerate(leaves)]
        return entries, int(np.asarray(state["step"]).reshape(-1)[0])
    engine = trainer
    engine.worker.drain()
    host_nbytes = sum(12 * u.layout.size for u in engine.units if u.host_updated and not u.on_disk)
    snapshot = snapshot_ok(host_nbytes)
    entries = []
    for u in engine.units:
        n = u.layout.size  # (a data-parallel engine pads its flat vectors: the checkpoint holds the n values)
        shape = (3, n)
        if u.on_disk:
            if u.write is not None:
                u.write.result()  # the generation to link is the one this step wrote
            if engine.store._n.get(u.name) == n:
                path, gen = engine.store.pin(u.name)
                entries.append(_Entry(u.name, shape, "float32", link=(engine.store, u.name, gen, path)))
            else:
                state = engine.store.read(u.name).result()
                entries.append(_Entry(u.name, shape, "float32", array=np.ascontiguousarray(state[:, :n])))
        elif u.host_updated:
            rows = (u.master[:n], u.mu[:n], u.nu[:n])
            if snapshot:
                entries.append(_Entry(u.name, shape, "float32", array=np.stack(rows)))
            else:  # written in place before this unit's next update (the worker keeps per-unit order)
                e = _Entry(u.name, shape, "float32")
                e.done = engine.worker.submit(u.index, f"checkpoint:{u.name}", None,
                                              lambda _g, e=e, rows=rows: _guarded(e, arrays_dir, rows))
                entries.append(e)
        else:
            entries.append(_Entry(u.name, shape, "float32", array=np.stack([np.array(a)[:n] for a in u.dev_state])))
    return entries, int(engine._step)


def _guarded(entry: _Entry, arrays_dir: Path, rows: tuple) -> None:
    """A host-worker task: a failure is kept for the saving thread, never raised into training's worker."""
    try:
        write_array(arrays_dir / entry.name, rows)
    except BaseException as e:  # noqa: BLE001
        entry.error.append(e)


def _leaves(tree: Any) -> list:
    import jax
    return jax.tree.leaves(tree)


# ---- orbax: the committed item holding the arrays -------------------------------------------------------
class _ArraysHandler(ocp.CheckpointHandler):
    """Moves the arrays, written beforehand into a staging directory, into orbax's temporary directory."""

    def save(self, directory, args):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for child in Path(args.staging).iterdir():
            os.replace(child, directory / child.name)

    def restore(self, directory, args=None):
        return Path(directory)

    def metadata(self, directory):
        return None


@ocp.args.register_with_handler(_ArraysHandler, for_save=True)
@dataclasses.dataclass
class _ArraysSave(ocp.args.CheckpointArgs):
    staging: str


@ocp.args.register_with_handler(_ArraysHandler, for_restore=True)
@dataclasses.dataclass
class _ArraysRestore(ocp.args.CheckpointArgs):
    pass


def committed_steps(directory: str | Path) -> list[int]:
    """The steps of the committed checkpoints in `directory` (orbax renames a step directory into place only once
    it is complete); [] where there is none, or no directory."""
    d = Path(directory)
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir()) if d.is_dir() else []


# ---- the checkpointer ---------------------------------------------------------------------------------------
class Checkpointer:
    def __init__(self, directory: str | Path, max_to_keep: int = 3, async_save: bool = True,
                 ram_budget_bytes: int | None = None):
        """ram_budget_bytes: RAM a host snapshot may take (default: half of what is available now)."""
        self.directory = Path(directory).resolve()
        self.async_save = async_save
        self._ram_budget = ram_budget_bytes
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create the checkpoint directory {self.directory}: {e}") from None
        for stale in self.directory.glob(".staging-*"):  # a save of a killed run
            shutil.rmtree(stale, ignore_errors=True)
        self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False, cleanup_tmp_directories=True))
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_save_s = 0.0  # time save() blocked the caller
        self.last_write_s = 0.0  # time the write took until committed

    # ---- saving --------------------------------------------------------------------------------------------
    def save(self, step: int, trainer: Any, cfg: Any = None) -> None:
        """Checkpoint `trainer` after `step` optimizer steps (so a resumed run starts with batch `step`)."""
        t0 = time.perf_counter()
        self.wait()
        if hasattr(trainer, "check_nonfinite"):
            trainer.check_nonfinite()  # a torn step (lohan_jax.engine.guard) is never saved
        staging = self.directory / f".staging-{step}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "arrays").mkdir(parents=True)
        entries, adam_step = _capture(trainer, staging / "arrays", self._snapshot_fits)
        written = sum(e.nbytes for e in entries if e.link is None)
        meta = {"format": FORMAT, "step": step, "adam_step": adam_step, "time": time.time(),
                "trainer": "engine" if _is_engine(trainer) else "reference",
                "config": config_to_dict(cfg) if cfg is not None else None,
                "arrays": {e.name: {"shape": list(e.shape), "dtype": e.dtype} for e in entries}}
        try:
            free = shutil.disk_usage(self.directory).free
            if written * 1.02 > free:
                raise CheckpointError(
                    f"not enough disk for checkpoint {step} in {self.directory}: it needs {written / 2**30:.2f} "
                    f"GiB, {free / 2**30:.2f} GiB are free; {self._intact()}. Free space, lower "
                    "train.keep_checkpoints, or put the run directory on a larger disk")
        except BaseException:
            self._abandon(step, staging, entries)
            raise
        self._thread = threading.Thread(target=self._write, args=(step, staging, entries, meta),
                                        name=f"checkpoint-{step}", daemon=True)
        self._thread.start()
        if not self.async_save:
            self.wait()
        self.last_save_s = time.perf_counter() - t0

    def _snapshot_fits(self, nbytes: int) -> bool:
        if not self.async_save or nbytes == 0:
            return False
        budget = self._ram_budget
        if budget is None:
            from lohan_jax.engine.memory import available_ram_bytes
            avail = available_ram_bytes()
            budget = avail // 2 if avail else 0
        return nbytes <= budget

    def _write(self, step: int, staging: Path, entries: list[_Entry], meta: dict) -> None:
        t0 = time.perf_counter()
        try:
            for e in entries:
                if faults.hit("checkpoint_write") == "enospc":
                    raise faults.disk_full(f"writing {staging / 'arrays' / e.name}")
                if e.array is not None:
                    write_array(staging / "arrays" / e.name, e.array)
                    e.array = None
                elif e.link is not None:
                    store, name, gen, path = e.link
                    link_or_copy_tree(path, staging / "arrays" / name)
                    store.unpin(name, gen)
                    e.link = None
                else:
                    e.done.wait()
                    if e.error:
                        raise e.error[0]
            if (self.directory / str(step)).exists():  # an older run's checkpoint of this step (restored past it)
                shutil.rmtree(self.directory / str(step))
                self._manager.reload()
            self._manager.save(step, args=ocp.args.Composite(arrays=_ArraysSave(str(staging / "arrays")),
                                                             meta=ocp.args.JsonSave(meta)), force=True)
            self.last_write_s = time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 (re-raised by wait())
            self._error = e
            self._abandon(step, staging, entries)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _abandon(self, step: int, staging: Path, entries: list[_Entry]) -> None:
        for e in entries:
            if e.done is not None:
                e.done.wait()  # the worker may still be writing into the staging directory
            if e.link is not None:
                e.link[0].unpin(e.link[1], e.link[2])
                e.link = None
        shutil.rmtree(staging, ignore_errors=True)
        for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):  # give the space back
            shutil.rmtree(tmp, ignore_errors=True)

    def wait(self) -> None:
        """Wait for the save in flight; a failure is raised here as a CheckpointError naming the path."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            if isinstance(e, CheckpointError):
                raise e
            raise CheckpointError(f"writing a checkpoint into {self.directory} failed: {_first_line(e)}; "
                                  f"{self._intact()}") from e

    def _intact(self) -> str:
        steps = self.all_steps(wait=False)
        return f"the last checkpoint (step {steps[-1]}) is intact" if steps else "no earlier checkpoint exists"

    # ---- finding and restoring ---------------------------------------------------------------------------
    def all_steps(self, wait: bool = True) -> list[int]:
        """Committed checkpoints (committed_steps), after a save in flight when `wait`."""
        if wait:
            self.wait()
        return committed_steps(self.directory)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, trainer: Any, step: int | None = None) -> int:
        """Load the latest valid (or the given) checkpoint into `trainer`; returns the step to continue from.
        A corrupt checkpoint is skipped with a warning for the next older one; none valid is an error."""
        steps = [step] if step is not None else self.all_steps()[::-1]
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        problems = []
        for s in steps:
            try:
                return self._restore(trainer, s)
            except CheckpointError as e:
                problems.append(f"step {s}: {e}")
                if step is None:
                    log.warning("checkpoint %s is unusable (%s); trying the previous one", s, e)
        raise CheckpointError(f"no valid checkpoint in {self.directory}: " + "; ".join(problems))

    def _restore(self, trainer: Any, step: int) -> int:
        root = self.directory / str(step)
        meta_path = root / "meta" / "metadata"
        try:
            meta = json.loads(meta_path.read_text())
            arrays = meta["arrays"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{meta_path} is missing or unreadable ({_first_line(e)})") from None
        if meta.get("format") != FORMAT:
            raise CheckpointMismatch(f"checkpoint {root} has format {meta.get('format')}, expected {FORMAT}")
        expected = _expected_arrays(trainer)
        if {k: tuple(v["shape"]) for k, v in arrays.items()} != {k: s for k, s in expected.items()}:
            diff = sorted(set(arrays) ^ set(expected)) or [
                k for k in expected if tuple(arrays[k]["shape"]) != expected[k]]
            raise CheckpointMismatch(f"checkpoint {root} does not match this model and plan (arrays differ: "
                                     f"{', '.join(diff[:4])})")
        folder = root / "arrays"
        if _is_engine(trainer):
            for u in trainer.units:  # a write still in flight would land after the restored state
                if u.write is not None:
                    try:
                        u.write.result()
                    except Exception:  # noqa: BLE001 (its generation is replaced below)
                        pass
            trainer.load_state_dict({"units": [_LazyUnit(folder / u.name) for u in trainer.units],
                                     "step": np.asarray([meta["adam_step"]], np.int64)})
        else:
            import jax
            import jax.numpy as jnp
            template = trainer.state_dict()
            leaves, treedef = jax.tree.flatten(template)
            loaded = []
            for i, like in enumerate(leaves):
                a = read_array(folder / f"leaf{i}").reshape(np.shape(like))
                loaded.append(a if isinstance(like, np.ndarray) else jnp.asarray(a))
            trainer.load_state_dict(jax.tree.unflatten(treedef, loaded))
        return int(meta["step"])

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()


def _expected_arrays(trainer: Any) -> dict[str, tuple]:
    if _is_engine(trainer):
        return {u.name: (3, u.layout.size) for u in trainer.units}
    return {f"leaf{i}": tuple(np.shape(x)) or (1,) for i, x in enumerate(_leaves(trainer.state_dict()))}


class _LazyUnit:
    """One unit of a checkpoint as `load_state_dict` reads it (master, mu, nu in turn): read, digests checked,
    on first access and dropped after the last, so a restore holds about one unit's state in RAM."""

    def __init__(self, path: Path):
        self.path, self._state = path, None

    def __getitem__(self, key: str) -> np.ndarray:
        if self._state is None:
            self._state = read_array(self.path)
        row = self._state[("master", "mu", "nu").index(key)]
        if key == "nu":
            self._state = None
        return row
