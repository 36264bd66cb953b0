"""Orbax checkpoints of a run: train state, data position, model settings and config.

Each step directory holds four items: 'state' (step, params, optimizer, EMA), 'data' (the
batch iterator's position), 'model' (the network's settings, checked before any restore so a
checkpoint of another shape is refused with a clear message) and 'config' (the full experiment
config, for `ddlm_jax.load`). Orbax writes each step to a temporary directory and renames it
when complete, so a run killed mid-save leaves the previous checkpoint intact.
"""
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "model", "config")


class CheckpointError(ValueError):
  """A checkpoint that cannot be used: unreadable, or written by a different model."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def all_finite(tree: Any) -> bool:
  """True if every floating-point leaf of `tree` is finite."""
  leaves = [leaf for leaf in jax.tree.leaves(tree) if np.issubdtype(leaf.dtype, np.floating)]
  return all(bool(jax.numpy.isfinite(leaf).all()) for leaf in leaves)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_position: dict,
         model_settings: dict, config: dict) -> None:
  """Saves one step; refuses a state with NaN/Inf so a good checkpoint is never replaced by a bad one."""
  if not all_finite(state):
    latest = manager.latest_step()
    raise FloatingPointError(f"the train state at step {step} holds NaN or Inf values; not saving it. "
                             f"The last good checkpoint (step {latest}) is kept in {manager.directory}")
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position),
      model=ocp.args.JsonSave(model_settings), config=ocp.args.JsonSave(config)), force=True)
  manager.wait_until_finished()


def read_json_items(manager: ocp.CheckpointManager, step: int) -> dict:
  """The 'data', 'model' and 'config' items of a step (no arrays are read)."""
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        data=ocp.args.JsonRestore(), model=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
  except Exception as error:  # orbax raises many types for missing or damaged files
    raise CheckpointError(f"checkpoint step {step} in {manager.directory} cannot be read ({error}). "
                          "Nothing was changed; move that step directory away to resume from an "
                          "earlier step.") from error
  return {name: restored[name] for name in ("data", "model", "config")}


def check_model_settings(saved: dict, current: dict, where: str) -> None:
  """Raises CheckpointError listing every model setting that differs."""
  differences = [f"{key}: checkpoint {saved.get(key)!r} vs now {current.get(key)!r}"
                 for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
  if differences:
    raise CheckpointError(f"the checkpoint in {where} was written by a different model ("
                          + "; ".join(differences) + "). Use a new --workdir or the same model settings; "
                          "the workdir was left as it is.")


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
  """Restores the train state onto the shardings of `abstract_state` (ShapeDtypeStructs)."""
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  except Exception as error:  # orbax raises many types for missing or damaged files
    raise CheckpointError(f"checkpoint step {step} in {manager.directory} cannot be restored ({error}). "
                          "Nothing was changed; move that step directory away to resume from an "
                          "earlier step.") from error
  return restored["state"]
