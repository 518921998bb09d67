"""The NVMe tier: bit-exact round trips, integrity errors that name the unit, capacity refusal, and a failed
write that leaves the last good state readable."""
import glob
import os

import numpy as np
import pytest

from lohan_jax.tiers import store as store_mod
from lohan_jax.tiers.store import StateStore, StoreError


def _state(n, seed=0):
    return np.random.default_rng(seed).standard_normal((3, n), dtype=np.float32)


def test_round_trip_is_bit_exact_and_generations_replace(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "CHUNK_ELEMS", 1000)  # several chunks
    s = StateStore(tmp_path)
    a, b = _state(2500, 0), _state(2500, 1)
    s.write("block3", a).result()
    np.testing.assert_array_equal(s.read("block3").result(), a)
    s.write("block3", b).result()
    assert s.read("block3").result().tobytes() == b.tobytes()
    assert sorted(os.listdir(tmp_path / "block3")) == ["gen1"]  # the old generation is gone
    assert s.counters.bytes_written == 2 * a.nbytes and s.counters.bytes_read == 2 * a.nbytes


def test_corrupt_and_missing_chunks_are_errors_naming_the_unit(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "CHUNK_ELEMS", 1000)
    s = StateStore(tmp_path)
    s.write("block7", _state(3000)).result()
    chunks = sorted(p for p in glob.glob(str(tmp_path / "block7" / "**" / "c" / "**"), recursive=True)
                    if os.path.isfile(p))
    assert len(chunks) == 3
    data = bytearray(open(chunks[0], "rb").read())
    data[20] ^= 0xFF
    open(chunks[0], "wb").write(bytes(data))
    with pytest.raises(StoreError, match=r"block7.*(?i:digest)"):
        s.read("block7").result()
    os.remove(chunks[1])
    with pytest.raises(StoreError, match=r"block7"):
        s.read("block7").result()


def test_failed_write_leaves_the_last_good_state(tmp_path):
    s = StateStore(tmp_path)
    good = _state(1000)
    s.write("block0", good).result()

    bad = _state(1000, 5)
    real_open = store_mod.ts.open

    def failing_open(spec, **kw):
        if kw.get("create"):
            raise ValueError("RESOURCE_EXHAUSTED: No space left on device [OS error 28]")
        return real_open(spec, **kw)

    store_mod.ts.open = failing_open
    try:
        with pytest.raises(StoreError, match="block0.*No space left"):
            s.write("block0", bad)
    finally:
        store_mod.ts.open = real_open
    np.testing.assert_array_equal(s.read("block0").result(), good)


def test_capacity_is_checked_before_writing(tmp_path):
    with pytest.raises(StoreError, match=r"GiB free but the plan puts .* offload.disk_path"):
        StateStore.check_capacity(tmp_path, 1 << 62)
    StateStore.check_capacity(tmp_path, 1 << 20)


def test_writes_in_flight_are_bounded(tmp_path):
    s = StateStore(tmp_path, max_writes_in_flight=2)
    futures = [s.write(f"block{i}", _state(20000, i)) for i in range(6)]  # blocks until slots free up
    for f in futures:
        f.result()
    assert s._write_slots._value == 2  # every slot given back
    for i in range(6):
        np.testing.assert_array_equal(s.read(f"block{i}").result(), _state(20000, i))


def test_direct_io_round_trip_is_bit_exact_with_page_aligned_chunk_files(tmp_path, monkeypatch):
    """TensorStore reads a chunk file with O_DIRECT only when its size is a multiple of 4 KiB (else silently
    through the page cache): direct mode sizes its chunks so every file, the padded edge chunk too, is aligned."""
    from lohan_jax.tiers.disk_probe import direct_io_supported

    if not direct_io_supported(tmp_path):
        pytest.skip(f"O_DIRECT is not supported on the filesystem of {tmp_path}")
    monkeypatch.setattr(store_mod, "CHUNK_ELEMS", 1000)
    s = StateStore(tmp_path, io_mode="direct", io_concurrency=4)
    a, b = _state(2500, 0), _state(2500, 1)
    s.write("block1", a).result()
    np.testing.assert_array_equal(s.read("block1").result(), a)
    s.write("block1", b).result()
    assert s.read("block1").result().tobytes() == b.tobytes()
    chunks = sorted(glob.glob(str(tmp_path / "block1" / "gen1" / "c" / "0" / "*")))  # the keys the store drops
    assert len(chunks) == 2 and all(os.path.getsize(c) % 4096 == 0 for c in chunks)


def test_bad_io_mode_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"io_mode='o_direct' must be one of default, direct"):
        StateStore(tmp_path, io_mode="o_direct")
