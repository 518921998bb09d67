"""train.deterministic puts XLA's deterministic GPU ops in XLA_FLAGS before jax starts (lohan_jax.determinism)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import os, sys
from lohan_jax.config import load_config
from lohan_jax import determinism
determinism.enable(load_config(None, sys.argv[1:]))
import jax
jax.numpy.ones(2).block_until_ready()  # XLA accepts the flag (the CPU backend parses it too)
print(os.environ.get("XLA_FLAGS", ""))
"""


def _flags(*sets: str, env_flags: str = "") -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": env_flags, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", PROBE, *sets], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def test_deterministic_sets_the_flag_before_jax_starts_and_keeps_other_flags():
    from lohan_jax.determinism import FLAG
    assert _flags() == ""
    assert _flags("train.deterministic=true") == FLAG
    both = _flags("train.deterministic=true", env_flags="--xla_dump_to=/tmp/x")
    assert both.split() == ["--xla_dump_to=/tmp/x", FLAG]
    assert _flags("train.deterministic=true", env_flags=FLAG) == FLAG  # not twice


def test_a_started_cpu_backend_needs_no_flag(monkeypatch):
    import jax

    from lohan_jax import determinism
    from lohan_jax.config import load_config
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    jax.numpy.ones(1)  # jax started here without the flag: the CPU is deterministic anyway, nothing to refuse
    determinism.enable(load_config(None, ["train.deterministic=true"]))
    assert "XLA_FLAGS" not in os.environ  # too late to matter: not set
