"""The `lohan-jax` command line: train, models, prepare, report (more subcommands join as they land)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from lohan_jax.config import ConfigError, load_config


def _train(args: argparse.Namespace) -> int:
    """Exit status: 0 done; 2 a bad config, path or plan (one line saying which); 1 a failure during the run
    (a disk, a checkpoint, a non-finite step under train.on_nonfinite=stop); 130/143 stopped by SIGINT/SIGTERM
    after saving a checkpoint (`--resume RUN_DIR` continues it)."""
    if args.resume:  # continue an earlier run: its own resolved config, plus any --set overrides
        from pathlib import Path
        saved = Path(args.resume) / "config.yaml"
        if args.config or args.run_dir or not saved.is_file():
            raise ConfigError(f"--resume {args.resume}: expected a run directory holding config.yaml (and neither "
                              "CONFIG nor --run-dir)")
        cfg, run_dir, resume = load_config(saved, args.set), args.resume, True
    else:
        cfg, run_dir, resume = load_config(args.config, args.set), args.run_dir, False
    from lohan_jax import determinism
    from lohan_jax.pinned_pool import cap_pinned_pool
    from lohan_jax.preflight import check_paths
    check_paths(cfg, run_dir, resume)  # a bad plan file is a one-line error before the plan is resolved
    determinism.enable(cfg)  # before jax starts, as the pinned cap below
    if cap_pinned_pool(cfg) is None:  # no plan to cap XLA's pinned pool from (the CPU, the reference engine, ...)
        _raise_pinned_host_limit()
    from lohan_jax.train import run_training
    result = run_training(cfg, run_dir=run_dir, progress=not args.no_progress, resume=resume)
    return result.exit_status


def _models(args: argparse.Namespace) -> int:
    from lohan_jax.models import REGISTRY
    print(f"{'name':<12} {'arch':<6} {'layers':>6} {'hidden':>7} {'heads':>5} {'params':>10}")
    for name, s in REGISTRY.items():
        print(f"{name:<12} {s.arch.value:<6} {s.n_layers:>6} {s.d_model:>7} {s.n_heads:>5} {s.param_count() / 1e9:>9.3f}B")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lohan-jax", description=(
        "Fine-tune LLMs larger than GPU memory on one GPU (weights and Adam state in host memory and on NVMe)."))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command")
    train = sub.add_parser("train", help="train or fine-tune a model (no CONFIG: a small GPT on Python's docs, CPU)")
    train.add_argument("config", nargs="?", help="YAML config file (see configs/); defaults apply without one")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    train.add_argument("--run-dir", help="write the run here instead of train.run_dir/<model>-<time>/")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its latest checkpoint")
    train.set_defaults(func=_train)
    models = sub.add_parser("models", help="list the named model sizes")
    models.set_defaults(func=_models)
    from lohan_jax.planner.cli import add_plan_commands
    add_plan_commands(sub)
    from lohan_jax import prepare, report  # neither imports jax
    prepare.add_parser(sub)  # lohan-jax prepare: text/JSONL -> packed token files
    report.add_parser(sub)  # lohan-jax report: run directory -> report.md + plots
    return parser


def _raise_pinned_host_limit() -> None:
    """XLA caps pinned host memory at 64 GB unless told otherwise (MACHINE.md); a 6B model's state alone is
    ~70 GB. Must run before jax starts its GPU client, hence here and not in the engine. `train` on a GPU caps
    the pool from its plan instead (lohan_jax.pinned_pool: a pool far above the need can take twice the need)."""
    from lohan_jax.plan_memory import PINNED_LIMIT_ENV

    if PINNED_LIMIT_ENV not in os.environ:
        try:
            total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        except (ValueError, OSError):
            return
        os.environ[PINNED_LIMIT_ENV] = str(int(total_gib * 0.9))  # GiB, as XLA reads it


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "train":  # train sets it once its plan is known (_train)
        _raise_pinned_host_limit()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lohan_jax").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.command is None:  # the quick start: `lohan-jax train` is the main job; bare `lohan-jax` shows help
        build_parser().print_help()
        return 0
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError) as e:
        print(f"lohan-jax {args.command}: error: {e}", file=sys.stderr)  # the input: a config, path or plan
        return 2
    except KeyboardInterrupt:
        print(f"lohan-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a failure while running: one line naming it; -v shows the traceback
        if args.verbose:
            raise
        print(f"lohan-jax {args.command}: error: {_describe(e)}", file=sys.stderr)
        return 1


def _describe(e: BaseException) -> str:
    """The failure a user can act on: the innermost of our own errors (a worker's RuntimeError wraps the
    StoreError that says which unit and path), as one line."""
    from lohan_jax.checkpoint import CheckpointError
    from lohan_jax.faults import NonFiniteError
    from lohan_jax.tiers.store import StoreError

    ours = (CheckpointError, NonFiniteError, StoreError, OSError)
    inner = e
    while not isinstance(inner, ours) and (inner.__cause__ or inner.__context__) is not None:
        inner = inner.__cause__ or inner.__context__
    e = inner if isinstance(inner, ours) else e
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, ours) else f"{type(e).__name__}: {text} (run with -v for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
