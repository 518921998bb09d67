"""Strict JAX settings for every test, and tiny configs shared by the tests."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")  # fp32 exactness tests: no TF32 on the GPU


@pytest.fixture(scope="session")
def gpu_device():
    """The GPU; tests marked `gpu` run on the GPU machine only."""
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        pytest.skip("needs a GPU")
    return gpus[0]
