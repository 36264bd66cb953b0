"""Orbax checkpoints of a run: train state, data position, model settings and config.

Each step directory holds six items: 'state' (step, params, optimizer, EMA), 'data' (the
batch iterator's position), 'identity' (the settings a resumed run must share, see
`config.run_identity`; checked before any restore so that a checkpoint of another model or data
order is refused with a clear message), 'config' (the full experiment config, for
`ddlm_jax.load`), 'provenance' (the run whose parameters this one started from, `config.init_from`,
and that run's provenance in turn; empty for a run trained from scratch; absent in older checkpoints)
and 'fingerprint' (two checksums of each array of the state, `fingerprint`, checked at every restore:
orbax finds some damaged files itself but reads flipped bytes of array data as other numbers; absent
in older checkpoints). Orbax writes each step to a temporary directory and renames it when
complete, so a run killed mid-save leaves the previous checkpoint intact (and the next run's
manager removes the unfinished temporary directory).

A step that cannot be read (a file missing, truncated or damaged) raises `UnreadableCheckpoint`;
`newest_readable` walks back to the newest step that can be, and `set_aside` moves the damaged
ones out of the checkpoints directory (to `unreadable_checkpoints/`), never deleting them.
`workdir_lock` keeps a second run from writing into a workdir that a live run holds.
"""
import contextlib
import errno
import fcntl
import logging
import os
import socket
from typing import Any, Callable, Iterator, Sequence, TypeVar

from absl import logging as absl_logging
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "identity", "config", "provenance", "fingerprint")


class CheckpointError(ValueError):
  """A checkpoint that cannot be used: unreadable, or written by a different model."""


class UnreadableCheckpoint(CheckpointError):
  """A step whose files are missing or damaged (not a readable checkpoint of another run).

  Attributes:
    step: the step that cannot be read (None when no step of a workdir can be).
    reason: why, in one line.
  """

  def __init__(self, message: str, step: int | None = None, reason: str = ""):
    super().__init__(message)
    self.step, self.reason = step, reason


class WorkdirInUse(OSError):
  """Another live run holds the workdir's lock."""


LOCK_FILE = "run.lock"
UNREADABLE_DIR = "unreadable_checkpoints"
# Errors of a filesystem that has no locks (then a run goes on unlocked, with a warning).
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
T = TypeVar("T")


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
  else:  # only a run that holds the workdir's lock writes: an orbax temporary directory is a killed save
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
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


def fingerprint(tree: Any) -> dict[str, list[int]]:
  """{leaf path (e.g. 'params/blocks/0/mlp/wi/value'): [sum of its elements' bits, sum of its
  bits times odd weights 1, 3, 5, ...], both mod 2**32} of every array of `tree` (one jitted
  pass). A change of any one element changes both; moving elements changes the second."""
  paths = ["/".join(str(_key_name(key)) for key in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  return {path: [int(value) for value in sums] for path, sums in zip(paths, jax.device_get(_fingerprints(tree)))}


def _key_name(key: Any) -> Any:
  for field in ("name", "key", "idx"):  # GetAttrKey, DictKey/FlattenedIndexKey, SequenceKey
    if hasattr(key, field):
      return getattr(key, field)
  return key


@jax.jit
def _fingerprints(tree: Any) -> list[jax.Array]:
  def bits(leaf):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    if leaf.dtype == jnp.bool_:
      return leaf.astype(jnp.uint32).ravel()
    unsigned = {1: jnp.uint8, 2: jnp.uint16}.get(leaf.dtype.itemsize, jnp.uint32)
    return jax.lax.bitcast_convert_type(leaf, unsigned).astype(jnp.uint32).ravel()

  def sums(leaf):
    bits_N = bits(leaf)
    weights_N = 2 * jnp.arange(bits_N.size, dtype=jnp.uint32) + 1
    return jnp.stack([bits_N.sum(dtype=jnp.uint32), (bits_N * weights_N).sum(dtype=jnp.uint32)])

  return [sums(leaf) for leaf in jax.tree.leaves(tree)]


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
      provenance=ocp.args.JsonSave(provenance), fingerprint=ocp.args.JsonSave(fingerprint(state))), force=True)
  manager.wait_until_finished()


def read_json_items(manager: ocp.CheckpointManager, step: int) -> dict:
  """The 'data', 'identity' and 'config' items of a step (no arrays are read)."""
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        data=ocp.args.JsonRestore(), identity=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
  except Exception as error:  # orbax raises many types for missing or damaged files
    raise _unreadable(manager, step, error) from error
  return {name: restored[name] for name in ("data", "identity", "config")}


def read_provenance(manager: ocp.CheckpointManager, step: int) -> dict:
  """The 'provenance' item of a step: {} for a run trained from scratch or a checkpoint older than the item."""
  if not os.path.isdir(os.path.join(manager.directory, str(step), "provenance")):
    return {}
  try:
    return manager.restore(step, args=ocp.args.Composite(provenance=ocp.args.JsonRestore()))["provenance"]
  except Exception as error:  # orbax raises many types for damaged files
    raise _unreadable(manager, step, error, "the provenance of ") from error


def _unreadable(manager: ocp.CheckpointManager, step: int, error: Exception, what: str = "") -> UnreadableCheckpoint:
  return UnreadableCheckpoint(
      f"{what}checkpoint step {step} in {manager.directory} cannot be read ({_summary(error)}). Nothing was "
      "changed; training resumes from the newest step that can be read, and ddlm_jax.load(workdir, step=N) "
      "reads another step", step, _summary(error))


def newest_readable(steps: Sequence[int], read: Callable[[int], T], where: str) -> tuple[int, T, list[int]]:
  """Tries `read(step)` from the newest of `steps` down until one raises no UnreadableCheckpoint.

  Returns:
    (that step, what `read` returned, the newer steps that could not be read), each of those
    reported with a warning. Any other error of `read` (a checkpoint of another run) is raised at
    once; UnreadableCheckpoint naming every step and why, if none can be read.
  """
  unreadable, reasons = [], []
  for step in sorted(steps, reverse=True):
    try:
      return step, read(step), unreadable
    except UnreadableCheckpoint as error:
      absl_logging.warning("checkpoint step %d in %s cannot be read (%s); trying the step before it", step, where,
                           error.reason)
      unreadable.append(step)
      reasons.append(f"step {step}: {error.reason}")
  raise UnreadableCheckpoint(f"no checkpoint in {where} can be read ({'; '.join(reasons)}). Nothing was changed; "
                             "use a new --workdir, or move the damaged step directories away to start afresh")


def set_aside(workdir: str, steps: Sequence[int]) -> list[str]:
  """Moves the step directories of `steps` from the checkpoints directory to
  workdir/unreadable_checkpoints/ (a later save of the same step could not be written past them),
  with a warning each; returns where they went."""
  moved = []
  for step in steps:
    source = os.path.join(checkpoint_dir(workdir), str(step))
    target = os.path.join(os.path.abspath(workdir), UNREADABLE_DIR, str(step))
    suffix = 1
    while os.path.exists(target):
      target = os.path.join(os.path.abspath(workdir), UNREADABLE_DIR, f"{step}.{suffix}")
      suffix += 1
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(source, target)
    absl_logging.warning("moved the unreadable checkpoint step %d to %s (kept for inspection; delete it when done)",
                         step, target)
    moved.append(target)
  return moved


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Holds the workdir's lock (flock on workdir/run.lock, which names this process) while a run
  writes there; WorkdirInUse naming the holder if another live process holds it.

  The kernel releases the lock when its process ends, however it ends, so the file of a killed
  run never blocks the next. On release the file is removed, and the workdir too if the lock
  created it and nothing else was written there.
  """
  workdir = os.path.abspath(workdir)
  created = not os.path.isdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  try:
    with _flock(os.path.join(workdir, LOCK_FILE)):
      yield
  finally:
    if created:
      with contextlib.suppress(OSError):  # not empty: the run wrote there
        os.rmdir(workdir)


@contextlib.contextmanager
def _flock(path: str) -> Iterator[None]:
  """An exclusive flock on the file `path` (created, holding this process's pid and host, and
  removed on release); WorkdirInUse naming the holder if another process holds it."""
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 200).decode(errors="replace").strip() or "a process that is just starting"
      os.close(fd)
      raise WorkdirInUse(f"the workdir {os.path.dirname(path)} is in use by another run ({holder}, which holds "
                         f"{path}); wait for it to end or stop it, or use another --workdir. Nothing was changed.")
    except OSError as error:
      os.close(fd)
      if error.errno not in NO_LOCKS:
        raise
      absl_logging.warning("the filesystem of %s has no file locks: nothing stops a second run from writing there",
                           path)
      os.remove(path)
      yield
      return
    if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
      break
    os.close(fd)  # the previous holder removed the file while this one opened it: lock the new file
  os.ftruncate(fd, 0)
  os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
  try:
    yield
  finally:
    os.unlink(path)
    os.close(fd)


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


SUMMARY_CHARS = 400


def _summary(error: Exception) -> str:
  """The first line of an orbax error (the rest is often a long dump of the file's contents),
  without tensorstore's spec of the array it read, and cut to SUMMARY_CHARS."""
  lines = str(error).strip().splitlines()
  text = (lines[0] if lines else "").split(" [tensorstore_spec")[0]
  return f"{type(error).__name__}: {text if len(text) <= SUMMARY_CHARS else text[:SUMMARY_CHARS] + '...'}"


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
  """The 'state' item of a step, restored with `state_args` and checked against the step's
  fingerprint (if it has one); UnreadableCheckpoint if it cannot be read or differs."""
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=state_args))["state"]
  except Exception as error:  # orbax raises many types for missing or damaged files
    raise _unreadable(manager, step, error) from error
  saved = _read_fingerprint(manager, step)
  if saved is not None:
    differing = [path for path, sums in fingerprint(restored).items() if saved.get(path, sums) != sums]
    if differing:
      raise _unreadable(manager, step, ValueError(
          f"the arrays {', '.join(differing[:3])}{' and others' if len(differing) > 3 else ''} differ from those "
          "saved (their fingerprints do not match): damaged files"))
  return restored


def _read_fingerprint(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The 'fingerprint' item of a step; None for a checkpoint older than the item."""
  if not os.path.isdir(os.path.join(manager.directory, str(step), "fingerprint")):
    return None
  try:
    return manager.restore(step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore()))["fingerprint"]
  except Exception as error:  # orbax raises many types for damaged files
    raise _unreadable(manager, step, error, "the fingerprint of ") from error
