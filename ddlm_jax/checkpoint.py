"""Orbax checkpoints of a run: train state, data position, model settings and config.

Each step directory holds five items: 'state' (step, params, optimizer, EMA), 'data' (the
batch iterator's position), 'identity' (the settings a resumed run must share, see
`config.run_identity`; checked before any restore so that a checkpoint of another model or data
order is refused with a clear message), 'config' (the full experiment config, for
`ddlm_jax.load`) and 'provenance' (the run whose parameters this one started from, `config.init_from`,
and that run's provenance in turn; empty for a run trained from scratch; absent in older checkpoints). Orbax writes each step to a temporary directory and renames it
when complete, so a run killed mid-save leaves the previous checkpoint intact.
"""
import logging
import os
from typing import Any

from absl import logging as absl_logging
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "identity", "config", "provenance")


class CheckpointError(ValueError):
  """A checkpoint that cannot be used: unreadable, or written by a different model."""


def checkpoint_dir(workdir: str) -> str:
  """Where a run keeps its step directories."""
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class _ReadOnlyNotice(logging.Filter):
  """Drops orbax's warning that a manager opened to read is read-only: it is, on purpose."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Given directory is read only")


def make_manager(workdir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  """A synchronous orbax manager over the workdir's checkpoints, keeping the last `keep` steps
  (`keep` is ignored by a read-only manager, which deletes nothing)."""
  if read_only:  # the settings orbax would otherwise override with a warning each
    options = ocp.CheckpointManagerOptions(max_to_keep=None, save_interval_steps=0, create=False,
                                           read_only=True, enable_async_checkpointing=False)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False)
  notice_filter = _ReadOnlyNotice()
  absl_logger = absl_logging.get_absl_logger()
  absl_logger.addFilter(notice_filter)
  try:
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)
  finally:
    absl_logger.removeFilter(notice_filter)


def latest_step(workdir: str) -> int | None:
  """The workdir's latest complete checkpoint step; None if it has none (nothing is created)."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  return make_manager(workdir, read_only=True).latest_step()


def all_finite(tree: Any) -> bool:
  """True if every floating-point leaf of `tree` is finite (one jitted reduction, one sync)."""
  return bool(_all_finite(tree))


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  leaves = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)]
  return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in leaves])) if leaves else jnp.array(True)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_position: dict,
         identity: dict, config: dict, provenance: dict) -> None:
  """Saves one step; refuses a state with NaN/Inf so a good checkpoint is never replaced by a bad one."""
  if not all_finite(state):
    latest = manager.latest_step()
    raise FloatingPointError(f"the train state at step {step} holds NaN or Inf values; not saving it. "
                             f"The last good checkpoint (step {latest}) is kept in {manager.directory}")
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position),
      identity=ocp.args.JsonSave(identity), config=ocp.args.JsonSave(config),
      provenance=ocp.args.JsonSave(provenance)), force=True)
  manager.wait_until_finished()


def read_json_items(manager: ocp.CheckpointManager, step: int) -> dict:
  """The 'data', 'identity' and 'config' items of a step (no arrays are read)."""
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        data=ocp.args.JsonRestore(), identity=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
  except Exception as error:  # orbax raises many types for missing or damaged files
    raise CheckpointError(f"checkpoint step {step} in {manager.directory} cannot be read ({_summary(error)}). "
                          "Nothing was changed; move that step directory away to resume from an "
                          "earlier step.") from error
  return {name: restored[name] for name in ("data", "identity", "config")}


def read_provenance(manager: ocp.CheckpointManager, step: int) -> dict:
  """The 'provenance' item of a step: {} for a run trained from scratch or a checkpoint older than the item."""
  if not os.path.isdir(os.path.join(manager.directory, str(step), "provenance")):
    return {}
  try:
    return manager.restore(step, args=ocp.args.Composite(provenance=ocp.args.JsonRestore()))["provenance"]
  except Exception as error:  # orbax raises many types for damaged files
    raise CheckpointError(f"the provenance of checkpoint step {step} in {manager.directory} cannot be read "
                          f"({_summary(error)})") from error


def check_identity(saved: dict, current: dict, where: str) -> None:
  """Raises CheckpointError listing every run-identity setting that differs from the checkpoint's."""
  flat_saved, flat_current = _flatten(saved), _flatten(current)
  differences = [f"{key}: checkpoint {flat_saved.get(key)!r} vs now {flat_current.get(key)!r}"
                 for key in sorted(set(flat_saved) | set(flat_current))
                 if flat_saved.get(key) != flat_current.get(key)]
  if differences:
    raise CheckpointError(f"the checkpoint in {where} was written by a run with other settings ("
                          + "; ".join(differences) + "). Use a new --workdir or the same settings; "
                          "the workdir was left as it is.")


def _summary(error: Exception) -> str:
  """The first line of an orbax error (the rest is often a long dump of the file's contents)."""
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return flat


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
  """Restores the train state onto the shardings of `abstract_state` (ShapeDtypeStructs)."""
  return _restore(manager, step, ocp.args.StandardRestore(abstract_state))


def restore_params(manager: ocp.CheckpointManager, step: int, name: str, abstract_params: Any) -> Any:
  """Restores only the `name` subtree ('params' or 'ema_params') of a step's train state onto the
  shardings of `abstract_params` (ShapeDtypeStructs); the optimizer state is not read."""
  item = {name: abstract_params}
  return _restore(manager, step, ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))[name]


def _restore(manager: ocp.CheckpointManager, step: int, state_args: Any) -> Any:
  """The 'state' item of a step, restored with `state_args`; a CheckpointError if it cannot be."""
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=state_args))
  except Exception as error:  # orbax raises many types for missing or damaged files
    raise CheckpointError(f"checkpoint step {step} in {manager.directory} cannot be restored ({_summary(error)}). "
                          "Nothing was changed; move that step directory away to resume from an "
                          "earlier step.") from error
  return restored["state"]
