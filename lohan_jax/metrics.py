"""Throughput, FLOP and MFU accounting, the JSONL metrics writer, and stamped experiment-result rows.

Pure Python + numpy: this module never imports jax (it reads `jax.__version__` from package metadata and asks
jax for the device only when the caller has already imported it).
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self, TextIO

import numpy as np

# ----------------------------------------------------------------------------------------------- FLOP counts


def model_flops_per_token(
    n_params_nonembed: int,
    n_layers: int,
    d_model: int,
    seq_len: int,
    vocab_size: int,
    include_head: bool = True,
) -> float:
    """Model FLOPs per trained token, forward + backward, in the PaLM / Chinchilla convention ("6N").

    flops/token = 6*N  +  6*d*V (if `include_head`)  +  12*L*d*S

    - N = `n_params_nonembed`: parameters of the transformer blocks (embedding and lm head excluded), each
      used in one multiply-add (2 FLOPs) forward and two backward (activation grad + weight grad): 6 FLOPs.
    - 6*d*V: the lm-head matmul (d_model x vocab), counted like any other weight. The input embedding is a
      gather, not a matmul, so it is never counted.
    - 12*L*d*S: attention scores QK^T and the weighted sum AV, 2*S*d FLOPs each per token per layer forward,
      times 3 for forward + backward (PaLM appendix B). The causal mask is ignored (no halving), as in PaLM.

    Recompute is *not* counted: this is model FLOPs, the numerator of MFU. `paper_flops_per_token` is the
    paper's hardware-FLOPs convention.
    """
    for name, value in (("n_params_nonembed", n_params_nonembed), ("n_layers", n_layers),
                        ("d_model", d_model), ("seq_len", seq_len), ("vocab_size", vocab_size)):
        if value < 0:
            raise ValueError(f"model_flops_per_token: {name}={value} must be >= 0")
    flops = 6.0 * n_params_nonembed + 12.0 * n_layers * d_model * seq_len
    if include_head:
        flops += 6.0 * d_model * vocab_size
    return flops


def paper_flops_per_token(n_layers: int, d_model: int, seq_len: int) -> float:
    """FLOPs per token in the convention of LoHan/Fuyou/Ratel (PAPER.md "How they count throughput").

    flops/token = 96 * L * h^2 * (1 + S/(6h)),   so TFLOPS = tokens/s * that / 1e12.

    This is Megatron-LM's hardware-FLOPs formula (Narayanan et al. 2021), which per *sequence* of a batch of B
    is 96*B*S*L*h^2*(1 + S/(6h) + V/(16*L*h)); per token and without the vocabulary (lm head) term it is the
    expression above. The factor 96 = 4 passes (forward, recomputed forward, backward as two) x 24*h^2 per
    layer-token: it counts *full activation recompute*, hence 8x rather than 6x the block parameters
    (12*L*h^2). For 13B (L=40, h=5120, S=1024), 1500 tokens/s gives ~156 TFLOPS (the paper prints 155.8).
    """
    for name, value in (("n_layers", n_layers), ("d_model", d_model), ("seq_len", seq_len)):
        if value <= 0:
            raise ValueError(f"paper_flops_per_token: {name}={value} must be > 0")
    return 96.0 * n_layers * d_model**2 * (1.0 + seq_len / (6.0 * d_model))


# ------------------------------------------------------------------------------------------------ peak / MFU

# Dense (no structured sparsity) bf16 tensor-core peak with fp32 accumulate, TFLOP/s, from the vendor
# datasheets / architecture whitepapers: H100 SXM5 989.4 and H100 PCIe 756.4 (NVIDIA H100 Tensor Core GPU
# Architecture whitepaper, half of the 1978.9 / 1512.8 "with sparsity" figures); H200 SXM uses the same
# Hopper die and clocks (H200 datasheet: 1,979 with sparsity); A100 312 (A100 datasheet); RTX 4090 165.2
# (Ada Lovelace architecture whitepaper, bf16 with fp32 accumulate; 330.3 is fp16 accumulate).
PEAK_TFLOPS: dict[str, float] = {
    "H100 SXM": 989.4,
    "H100 PCIe": 756.4,
    "H200": 989.4,
    "A100": 312.0,
    "RTX 4090": 165.2,
}

# jax `device_kind` strings -> PEAK_TFLOPS key; first match wins, so specific variants come first. NVL
# variants (lower clocks, other peaks) are deliberately left unmatched: a wrong peak is worse than none.
_DEVICE_KIND_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"h100.*pcie"), "H100 PCIe"),
    (re.compile(r"h100(?!.*nvl)"), "H100 SXM"),  # "NVIDIA H100 80GB HBM3"
    (re.compile(r"h200(?!.*nvl)"), "H200"),  # "NVIDIA H200"
    (re.compile(r"a100"), "A100"),  # "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"
    (re.compile(r"rtx 4090"), "RTX 4090"),  # "NVIDIA GeForce RTX 4090"
)


def peak_tflops(device_kind: str) -> float | None:
    """Dense bf16 peak TFLOP/s for a jax `device.device_kind` string, or None when unknown (e.g. "cpu")."""
    kind = device_kind.lower()
    for pattern, key in _DEVICE_KIND_PATTERNS:
        if pattern.search(kind):
            return PEAK_TFLOPS[key]
    return None


@dataclasses.dataclass(frozen=True)
class StepMetrics:
    """Throughput of one optimizer step from its token count, its wall time and the per-token FLOP counts.

    `tflops_6n` uses `model_flops_per_token` (the MFU numerator), `tflops_paper` uses
    `paper_flops_per_token`; `mfu` = tflops_6n / peak_tflops, None when the peak is unknown.
    """

    tokens: int  # tokens per optimizer step (batch x seq_len, all micro-batches)
    step_s: float  # wall seconds of the step
    flops_per_token_6n: float
    flops_per_token_paper: float
    peak_tflops: float | None = None  # the device's dense bf16 peak (see `peak_tflops()`)

    def __post_init__(self):
        if self.tokens < 0:
            raise ValueError(f"StepMetrics: tokens={self.tokens} must be >= 0")
        if not self.step_s > 0:
            raise ValueError(f"StepMetrics: step_s={self.step_s} must be > 0")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"StepMetrics: peak_tflops={self.peak_tflops} must be > 0 or None")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s

    @property
    def tflops_6n(self) -> float:
        return self.tokens_per_s * self.flops_per_token_6n / 1e12

    @property
    def tflops_paper(self) -> float:
        return self.tokens_per_s * self.flops_per_token_paper / 1e12

    @property
    def mfu(self) -> float | None:
        return None if self.peak_tflops is None else self.tflops_6n / self.peak_tflops

    def to_dict(self) -> dict[str, float | None]:
        """The `perf/*` keys of `MetricsWriter.write` (`perf/tflops` is the 6N convention)."""
        return {
            "perf/step_s": self.step_s,
            "perf/tokens_per_s": self.tokens_per_s,
            "perf/tflops": self.tflops_6n,
            "perf/tflops_paper": self.tflops_paper,
            "perf/mfu": self.mfu,
        }


# ------------------------------------------------------------------------------------------ JSON-safe values

_NONFINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def to_jsonable(value: Any) -> Any:
    """Convert metric values to JSON-safe Python: numpy/jax scalars -> int/float/bool, arrays -> (nested)
    lists, dataclasses and mappings -> dicts, Paths and unknown objects -> str.

    Non-finite floats become the *strings* "NaN", "Infinity", "-Infinity" (the spellings `float()` parses
    back), so every line is strict JSON yet a diverging loss stays visible rather than turning into null.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        return _NONFINITE.get(value, float(value))
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.ndarray) or hasattr(value, "__array__"):  # jax.Array without importing jax
        array = np.asarray(value)
        return to_jsonable(array.item() if array.ndim == 0 else array.tolist())
    try:
        return to_jsonable(float(value))
    except (TypeError, ValueError):
        return str(value)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# --------------------------------------------------------------------------------------------- the writer


class MetricsWriter:
    """The one metrics sink of a run: JSONL file and/or stdout, keys namespaced as `area/name`.

    `write(step, {"train/loss": ..., "perf/tokens_per_s": ...})` appends one line
    `{"step": step, "time": <unix s>, **metrics}` and flushes it, so a killed run loses nothing written.
    Values go through `to_jsonable` (non-finite floats become "NaN"/"Infinity"/"-Infinity" strings). Reading a
    jax array here blocks on it: pass step t's metrics only after step t+1 is dispatched.

    Namespaces in use: train/ (loss, lr, grad_norm), perf/ (step_s, tokens_per_s, tflops, tflops_paper, mfu),
    traffic/ (h2d_gb, d2h_gb, disk_read_gb, disk_write_gb), mem/ (host_pinned_gib, hbm_peak_gib),
    plan/ (step_s_predicted), time/ (per-phase seconds).
    """

    def __init__(self, path_jsonl: str | os.PathLike | None, stdout: bool = True, *,
                 stream: TextIO | None = None):
        self.path = None if path_jsonl is None else Path(path_jsonl)
        self.stdout = stdout
        self._stream = stream  # None: sys.stdout at write time (so pytest's capsys sees it)
        self._file: TextIO | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Record `metrics` for `step`; returns the JSON-safe row that was written."""
        row: dict[str, Any] = {"step": int(step), "time": time.time()}
        for key, value in metrics.items():
            if not isinstance(key, str) or "/" not in key:
                raise ValueError(f"MetricsWriter.write: key {key!r} must be namespaced as 'area/name', "
                                 f"e.g. 'train/loss' or 'perf/tokens_per_s'")
            row[key] = to_jsonable(value)
        if self._file is not None:
            self._file.write(json.dumps(row, allow_nan=False) + "\n")
            self._file.flush()
        if self.stdout:
            fields = " | ".join(f"{k} {_format_value(v)}" for k, v in row.items() if k not in ("step", "time"))
            print(f"step {row['step']} | {fields}", file=self._stream or sys.stdout, flush=True)
        return row

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a JSONL file written by `MetricsWriter` or `append_result` (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------ experiment result rows

# RESULTS.md key order: what was run first, then the measured values in the row's own order, then the
# outcome and provenance, so that a row reads left to right.
_HEAD_KEYS = ("experiment", "system", "model", "params", "seq_len", "batch_tokens", "gpu_budget_gib",
              "n_gpus", "steps")
_TAIL_KEYS = ("status", "error", "device", "date", "git_sha", "jax_version", "command")


def git_sha() -> str:
    """HEAD of the repository holding this package, or "unknown" (no git, not a checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def jax_version() -> str:
    """The installed jax version from package metadata (jax itself is not imported), or "unknown"."""
    try:
        return importlib.metadata.version("jax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def device_name() -> str:
    """`device_kind` of jax's first device when the caller has imported jax, else "unknown"."""
    jax = sys.modules.get("jax")
    if jax is None:
        return "unknown"
    try:
        return str(jax.devices()[0].device_kind)
    except Exception:  # noqa: BLE001 (no backend initialisable: the row is still worth writing)
        return "unknown"


def append_result(path: str | os.PathLike, row: Mapping[str, Any]) -> dict[str, Any]:
    """Append one RESULTS.md row to `path` (creating parent dirs) and return it as written.

    Fills `date` (ISO 8601, UTC), `git_sha`, `jax_version`, `command` (" ".join(sys.argv)) and `device` unless
    `row` gives them; keys are ordered: run description, measured values, status, provenance.
    """
    filled = dict(row)
    filled.setdefault("device", device_name())
    filled.setdefault("date", datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    filled.setdefault("git_sha", git_sha())
    filled.setdefault("jax_version", jax_version())
    filled.setdefault("command", " ".join(sys.argv))
    ordered = {k: filled[k] for k in _HEAD_KEYS if k in filled}
    ordered.update((k, v) for k, v in filled.items() if k not in _HEAD_KEYS and k not in _TAIL_KEYS)
    ordered.update((k, filled[k]) for k in _TAIL_KEYS if k in filled)
    ordered = to_jsonable(ordered)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(ordered, allow_nan=False) + "\n")
    return ordered
