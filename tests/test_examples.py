"""The examples run, and do what they claim."""
import importlib.util
import sys
from pathlib import Path

import numpy as np


def _load(name):
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Flax modules are dataclasses, which look their module up
    spec.loader.exec_module(module)
    return module


def test_custom_block_example_matches_reference_and_learns():
    losses, ref_losses = _load("custom_block").main(steps=8, n_layers=2)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0] - 0.3
