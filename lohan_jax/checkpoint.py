"""Checkpoints with orbax: the trainer's full state (fp32 master weights and Adam moments wherever they live,
optimizer step) plus the step, config and plan. Orbax writes each checkpoint into a temporary directory and
commits it by rename, so a checkpoint is complete or absent; keep-last-N; the data position is the step
(batches are a function of (seed, step, micro)), so a resumed run continues as if it had not stopped."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from lohan_jax.config import config_to_dict


class Checkpointer:
    def __init__(self, directory: str | Path, max_to_keep: int = 3):
        self.directory = Path(directory).resolve()
        self._manager = ocp.CheckpointManager(self.directory,
                                              options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep))

    def save(self, step: int, trainer: Any, cfg: Any = None) -> None:
        """Save after `step` optimizer steps (synchronously: host state is updated in place by training)."""
        meta = {"step": step, "config": config_to_dict(cfg) if cfg is not None else None}
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(trainer.state_dict()),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, trainer: Any, step: int | None = None) -> int:
        """Load the latest (or given) checkpoint into `trainer`; returns the step to continue from."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(trainer.state_dict()), meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise ValueError(f"checkpoint {self.directory / str(step)} is unreadable or does not match this "
                             f"model and plan: {e}") from e
        trainer.load_state_dict(restored.state)
        return int(restored.meta["step"])

    def close(self) -> None:
        self._manager.close()
