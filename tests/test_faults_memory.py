"""Memory safety: before anything is allocated the run compares its plan with free HBM, RAM (cgroup limits
included), the pinned-memory limit and disk, and refuses with the numbers. RAM and disk are faked here."""
import shutil

import pytest

from lohan_jax.cli import main
from lohan_jax.engine import memory

GIB = 2**30
TINY = ["--set", "model.name=gpt-tiny", "--set", "train.steps=1", "--set", "train.seq_len=32", "--set",
        "train.batch_size=4", "--set", "data.eval_fraction=0", "--no-progress"]


def fake_machine(tmp_path, monkeypatch, *, avail_gib=64.0, v2=None, v1=None, own=None):
    """A /proc/meminfo and cgroup tree: v2/v1 = (limit, usage, inactive_file) in GiB at the root; own = the
    same for this process's cgroup (v2, path /job)."""
    (tmp_path / "meminfo").write_text(f"MemTotal: 1 kB\nMemAvailable: {int(avail_gib * GIB) // 1024} kB\n")
    cg = tmp_path / "cgroup"
    cg.mkdir()

    def write(d, limit_f, usage_f, key, spec):
        d.mkdir(parents=True, exist_ok=True)
        limit, usage, inactive = (int(x * GIB) for x in spec)
        (d / limit_f).write_text(f"{limit}\n")
        (d / usage_f).write_text(f"{usage}\n")
        (d / "memory.stat").write_text(f"anon 1\n{key} {inactive}\n")

    if v2:
        write(cg, "memory.max", "memory.current", "inactive_file", v2)
    else:
        (cg / "memory.max").write_text("max\n")
    if v1:
        write(cg / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file", v1)
    if own:
        write(cg / "job", "memory.max", "memory.current", "inactive_file", own)
    (tmp_path / "self_cgroup").write_text("0::/job\n" if own else "0::/\n")
    monkeypatch.setattr(memory, "PROC_MEMINFO", str(tmp_path / "meminfo"))
    monkeypatch.setattr(memory, "CGROUP_ROOT", str(cg))
    monkeypatch.setattr(memory, "PROC_SELF_CGROUP", str(tmp_path / "self_cgroup"))


@pytest.mark.parametrize("machine,expect_gib", [
    (dict(avail_gib=64), 64.0),
    (dict(avail_gib=64, v2=(8, 5, 1)), 4.0),  # limit 8, used 5 of which 1 reclaimable page cache
    (dict(avail_gib=64, v1=(6, 2, 0)), 4.0),
    (dict(avail_gib=3, v2=(8, 1, 0)), 3.0),  # MemAvailable is the tighter bound
    (dict(avail_gib=64, v2=(100, 1, 0), own=(2.5, 0.5, 0)), 2.0),  # the process's own (nested) cgroup
    (dict(avail_gib=64, v2=(8, 9, 0)), 0.0),  # over its limit already: nothing left
], ids=["meminfo", "cgroup-v2", "cgroup-v1", "meminfo-tighter", "nested-cgroup", "over-limit"])
def test_available_ram_is_cgroup_aware(machine, expect_gib, tmp_path, monkeypatch):
    fake_machine(tmp_path, monkeypatch, **machine)
    assert memory.available_ram_bytes() == pytest.approx(expect_gib * GIB, abs=1024)


def _refused(argv, capsys, tmp_path):
    code = main(["train", *TINY, *argv, "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith("lohan-jax train: error: the plan does not fit this machine")
    assert not (tmp_path / "run").exists()  # refused before anything was written or allocated
    return err


def test_a_small_ram_limit_refuses_the_run_with_numbers(tmp_path, monkeypatch, capsys):
    fake_machine(tmp_path, monkeypatch, v2=(2.0, 1.75, 0))  # a container with 2 GiB, 0.25 GiB of it left
    err = _refused(["--set", "model.name=gpt-small"], capsys, tmp_path)
    assert "host RAM: needs 1.0" in err and "0.24 GiB available" in err and "Fix:" in err


def test_enough_ram_runs(tmp_path, monkeypatch, capsys):
    fake_machine(tmp_path, monkeypatch, v2=(16.0, 1.0, 0))
    assert main(["train", *TINY, "--run-dir", str(tmp_path / "run")]) == 0


def test_hbm_budget_and_disk_are_checked_too(tmp_path, monkeypatch, capsys):
    err = _refused(["--set", "offload.hbm_budget_gib=0.00001", "--set", "offload.edges_on_gpu=true"], capsys,
                   tmp_path)
    assert "HBM: needs" in err
    real = shutil.disk_usage
    monkeypatch.setattr(memory.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    err = _refused(["--set", "offload.optim_state=disk", "--set", f"offload.disk_path={tmp_path / 'disk'}"], capsys,
                   tmp_path)
    assert f"disk at {tmp_path / 'disk'}: needs" in err
    err = _refused(["--set", "train.checkpoint_every=1", "--set", "train.steps=8"], capsys, tmp_path)
    assert "checkpoints: 4 of" in err and "train.keep_checkpoints" in err  # keep 3, and the 4th written first


@pytest.mark.parametrize("steps,every,at_end,keep,committed,gens", [
    (8, 1, True, 3, [], 4),  # eight saves, four alive at the peak
    (1, 1, True, 3, [], 1),  # one save
    (5, 2, True, 1, [], 2),  # saves 2, 4, 5: the newest beside the one kept
    (3, 2, False, 1, [], 1),  # saves 2 only: a disk for one generation suffices
    (5, 2, True, 1, [2], 1),  # resumed: saves 4, 5 beside the one on disk, one at a time
    (5, 2, True, 3, [2], 2),  # resumed with room for three: 4 and 5 both stay
    (3, 2, False, 1, [2], 0),  # resumed after the last save: nothing new
], ids=["eight", "one", "end-too", "not-at-end", "resumed-keep1", "resumed-keep3", "resumed-none"])
def test_checkpoint_disk_counts_the_saves_this_run_makes(steps, every, at_end, keep, committed, gens, tmp_path):
    from lohan_jax.config import TrainConfig
    from lohan_jax.preflight import new_checkpoint_generations
    for step in committed:
        (tmp_path / str(step)).mkdir()
    t = TrainConfig(steps=steps, checkpoint_every=every, checkpoint_at_end=at_end, keep_checkpoints=keep)
    assert new_checkpoint_generations(t, tmp_path) == gens
