"""The planner: machine and model profiles, the step-time model, the holistic search and its printing.

Pure decisions (no jax) except `measure`, which measures a machine and a model on the device:
  profile   MachineProfile, ModelProfile, JSON/YAML io, jax-free measurements (RAM, disk, host AdamW)
  workload  a model profile at a batch geometry: per-unit times and bytes
  cost      the step-time model (the engine's schedule replayed) and the traffic a plan implies
  capacity  bytes per tier of a plan, and the machine's budgets
  search    the holistic search and the smallest changes that make a workload fit
  paper     the paper's own formula (Ratel IV-D), for comparison
  machines  hand-described machines (our H100, the paper's RTX 4090 testbed)
  explain   printing; cli: `lohan-jax plan` and `lohan-jax profile`
"""
from lohan_jax.planner.cost import Prediction, predict, traffic
from lohan_jax.planner.machines import BUILTIN, machine
from lohan_jax.planner.profile import MachineProfile, ModelProfile, load_profile, model_profile_from_spec, save_profile
from lohan_jax.planner.search import PlanResult, SearchOptions, search, suggestions
from lohan_jax.planner.workload import Workload

__all__ = ["BUILTIN", "MachineProfile", "ModelProfile", "PlanResult", "Prediction", "SearchOptions", "Workload",
           "load_profile", "machine", "model_profile_from_spec", "predict", "save_profile", "search", "suggestions",
           "traffic"]
