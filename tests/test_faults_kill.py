"""Kill -9 at random points (forward, backward, host optimizer, disk write, checkpoint write, step boundary) and
SIGTERM/SIGINT sent from outside: every process of the chain resumes the last checkpoint, and the run ends
with the uninterrupted trajectory, bit for bit (bf16 compute, state in HBM, host RAM and on disk), having lost
no committed checkpoint (lohan_jax.drill does the runs and the checks; ~35 s on 2 cores)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from lohan_jax.plan import Plan, Tier, UnitPlan, UpdateOn

ROOT = Path(__file__).resolve().parent.parent
KILLS, STEPS, EVERY, KEEP = 20, 12, 2, 2
# embed: state in HBM (GPU AdamW); block0: host; block1: HBM; block2 and head: on disk (TensorStore)
MIXED = Plan(embed=UnitPlan(Tier.HBM, Tier.HBM, UpdateOn.GPU), head=UnitPlan(Tier.HOST, Tier.DISK),
             blocks=(UnitPlan(Tier.HOST, Tier.HOST), UnitPlan(Tier.HBM, Tier.HBM, UpdateOn.GPU),
                     UnitPlan(Tier.HOST, Tier.DISK)))


def drill_env(tmp: Path) -> dict:
    """Children import this checkout and share a compilation cache (the reference run fills it)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax-cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def test_kill_and_signal_battery_resumes_the_uninterrupted_trajectory(tmp_path):
    MIXED.save(tmp_path / "plan.json")
    train = ["model.name=gpt-tiny", "model.n_layers=3", f"train.steps={STEPS}", "train.seq_len=32",
             "train.batch_size=4", f"train.checkpoint_every={EVERY}", f"train.keep_checkpoints={KEEP}",
             "train.compute_dtype=bfloat16", "data.eval_fraction=0", "optim.lr=3e-3", "optim.warmup_steps=2",
             f"offload.plan_file={tmp_path / 'plan.json'}", f"offload.disk_path={tmp_path / 'disk'}"]
    seed = int(os.environ.get("LOHAN_JAX_DRILL_SEED", "0")) or int.from_bytes(os.urandom(2), "little")
    cmd = [sys.executable, "-m", "lohan_jax.drill", "--work", str(tmp_path / "drill"), "--kills", str(KILLS),
           "--seed", str(seed), "--steps", str(STEPS), "--every", str(EVERY), "--keep", str(KEEP), "--blocks", "3",
           "--host-units", "3", "--disk-units", "2", "--child-timeout", "120", "--",
           *[a for t in train for a in ("--set", t)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=drill_env(tmp_path), cwd=ROOT)
    report_path = tmp_path / "drill" / "report.json"
    assert report_path.exists(), proc.stdout + proc.stderr
    report = json.loads(report_path.read_text())
    context = f"seed {seed} (rerun with LOHAN_JAX_DRILL_SEED={seed}); logs in {tmp_path / 'drill' / 'logs'}"
    assert report["problems"] == [], context
    assert proc.returncode == 0, context
    assert len(report["kill_points"]) >= KILLS and report["steps_compared"] == STEPS
    points = {k.split(":")[1].split("@")[0] for k in report["kill_points"]}
    assert points == {"forward", "backward", "optimizer", "disk_write", "checkpoint_write", "step"}
    statuses = [c["status"] for c in report["children"]]
    assert statuses[:2] == ["exit 143", "exit 130"] and statuses[-1] == "exit 0"  # SIGTERM, SIGINT, the finish
