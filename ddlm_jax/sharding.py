"""Device mesh, logical-axis rules and the shardings derived from them.

Parameters name their dimensions logically (`out_sharding` metadata such as
('embed', 'mlp'), see `ddlm_jax.networks.layers.logical_param`). A rule table
maps each logical name to mesh axes; `state_shardings` turns the metadata of an
abstract state into `NamedSharding`s, and `create_sharded_model` initialises
the parameters directly in that layout.

Typical use:

  mesh = make_mesh(MeshConfig(data=-1, fsdp=2))
  graphdef, params = create_sharded_model(model_config, mesh, DEFAULT_RULES, 0)
  batch_BL = jax.device_put(tokens_BL, batch_sharding(mesh))
"""
import dataclasses
import math
import os
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import NamedSharding

from ddlm_jax.networks import transformer

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Logical axis -> mesh axes. The batch is split over data and fsdp; fsdp also
# splits the parameters' embed dimension; tensor splits heads, mlp and vocab.
DEFAULT_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("cond", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape over MESH_AXES; one size may be -1 (all remaining devices)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    sizes = dataclasses.asdict(self)
    for name, size in sizes.items():
      if size != -1 and size < 1:
        raise ValueError(f"mesh axis {name} must be positive or -1, got {size}")
    if list(sizes.values()).count(-1) > 1:
      raise ValueError(f"at most one mesh axis may be -1, got {self}")

  def axis_sizes(self, num_devices: int) -> tuple[int, int, int]:
    """Sizes with -1 resolved; ValueError unless they use every device."""
    sizes = (self.data, self.fsdp, self.tensor)
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes and num_devices % known == 0:
      sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
    if math.prod(sizes) != num_devices:
      raise ValueError(
          f"mesh data x fsdp x tensor = {self.data} x {self.fsdp} x "
          f"{self.tensor} does not match the {num_devices} devices")
    return sizes


def make_mesh(config: MeshConfig, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh of Auto axes over `devices` (default: all)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh(config.axis_sizes(len(devices)), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_mesh_spec(logical_axes: Sequence[str | None],
                         rules: Rules) -> jax.P:
  """PartitionSpec of an array whose dimensions have these logical names.

  Args:
    logical_axes: one logical name (or None: not sharded) per dimension.
    rules: (logical name, mesh axes) pairs; each logical name at most once.

  Returns:
    The spec with each logical name replaced by its mesh axes.

  Raises:
    ValueError: a logical name has no rule or two rules, or two dimensions
      would be split over the same mesh axis.
  """
  table = {}
  for name, mesh_axes in rules:
    if name in table:
      raise ValueError(f"logical axis {name!r} has more than one rule")
    table[name] = mesh_axes
  owner = {}  # mesh axis -> the logical name that uses it
  spec = []
  for name in logical_axes:
    if name is not None and name not in table:
      raise ValueError(f"logical axis {name!r} (in {tuple(logical_axes)}) has "
                       f"no rule; known: {sorted(table)}")
    mesh_axes = None if name is None else table[name]
    for axis in (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes or ():
      if axis in owner:
        raise ValueError(
            f"mesh axis {axis!r} would shard both {owner[axis]!r} and {name!r} "
            f"of logical axes {tuple(logical_axes)}")
      owner[axis] = name
    spec.append(mesh_axes)
  return jax.P(*spec)


def state_shardings(abstract_state, mesh: jax.sharding.Mesh, rules: Rules):
  """NamedShardings of a state, from the logical names in its variables.

  Args:
    abstract_state: pytree whose leaves are `nnx.Variable`s (e.g. from
      `nnx.split(nnx.eval_shape(...))`) or arrays / ShapeDtypeStructs.
    mesh: the device mesh.
    rules: logical axis rules, e.g. DEFAULT_RULES.

  Returns:
    The same tree with a NamedSharding in place of every value: from the
    variable's `out_sharding` names when present, replicated otherwise.
  """
  def sharding(path, leaf):
    names = None
    if isinstance(leaf, nnx.Variable):
      names = leaf.get_metadata().get("out_sharding")
    spec = jax.P()
    if names:
      where = f"{jax.tree_util.keystr(path)} {names} of shape {leaf.shape}"
      if len(names) != leaf.ndim:
        raise ValueError(f"{where}: one logical name per dimension needed")
      spec = logical_to_mesh_spec(names, rules)
      for size, mesh_axes in zip(leaf.shape, spec):
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
        shards = math.prod(mesh.shape[a] for a in mesh_axes or ())
        if size % shards:
          raise ValueError(f"{where}: size {size} does not split into "
                           f"{shards} shards over mesh axes {mesh_axes}")
    named = NamedSharding(mesh, spec)
    return leaf.replace(named) if isinstance(leaf, nnx.Variable) else named

  return jax.tree_util.tree_map_with_path(
      sharding, abstract_state,
      is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """int32[B, L] batches: B split over ('data', 'fsdp'), L whole."""
  return NamedSharding(mesh, jax.P(BATCH_AXES, None))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """A full copy on every device (scalars such as step counts)."""
  return NamedSharding(mesh, jax.P())


# Where a process finds its coordinator, process count and id when no flag gives them (JAX itself reads
# the first; on a TPU pod, Slurm or Open MPI, jax.distributed.initialize detects all three).
PROCESS_GROUP_ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
                     "process_id": "JAX_PROCESS_ID"}
LAUNCH_HINT = ("pass --coordinator_address=HOST:PORT (process 0's machine and a free port) --num_processes=N "
               "--process_id=I to every process (or set " + ", ".join(PROCESS_GROUP_ENV.values()) +
               "); on a TPU pod, Slurm or Open MPI all three are detected")


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
  """The processes of a multi-process run; None: taken from the environment or detected by JAX."""
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  @classmethod
  def from_environment(cls, environ: Mapping[str, str] = os.environ, **given) -> "ProcessGroup":
    """The `given` settings (None: unset), each unset one read from PROCESS_GROUP_ENV in `environ`."""
    values = {}
    for name, variable in PROCESS_GROUP_ENV.items():
      value = given.get(name)
      if value is None and environ.get(variable):
        value = environ[variable]
        if name != "coordinator_address":
          try:
            value = int(value)
          except ValueError:
            raise ValueError(f"{variable}={value!r} is not an integer") from None
      values[name] = value
    return cls(**values)

  @property
  def is_set(self) -> bool:
    return any(value is not None for value in dataclasses.astuple(self))


def init_distributed(multi_process: bool, group: ProcessGroup = ProcessGroup()) -> None:
  """Joins the multi-process JAX runtime when `multi_process` or `group` says so; a no-op for a
  single-process run and once joined. Call it before anything else uses JAX. CPU processes talk
  through gloo (loopback on one machine).

  Raises:
    ValueError: the processes cannot be found (no coordinator, count or id given nor detected).
  """
  if jax.distributed.is_initialized() or not (multi_process or group.is_set):
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(group.coordinator_address, group.num_processes, group.process_id)
  except (ValueError, TypeError) as error:  # JAX's own: "coordinator_address should be defined." and the like
    raise ValueError(f"a multi-process run cannot find its processes ({error}): {LAUNCH_HINT}") from None


def create_sharded_model(
    config: transformer.TransformerConfig,
    mesh: jax.sharding.Mesh,
    rules: Rules,
    seed: int,
) -> tuple[nnx.GraphDef, nnx.State]:
  """Initialises a Transformer with each parameter created already sharded.

  The model is traced abstractly (`nnx.eval_shape`), shardings are read from
  the parameters' logical names, and the initialiser is jitted with those
  `out_shardings`, so no device ever holds the full unsharded model.

  Args:
    config: network settings.
    mesh: the device mesh.
    rules: logical axis rules, e.g. DEFAULT_RULES.
    seed: seed of `nnx.Rngs` for the initialisers.

  Returns:
    (graphdef, params): `nnx.merge(graphdef, params)` rebuilds the model;
    params is an nnx.State holding only `nnx.Param`s (the model has no other
    variables).
  """
  graphdef, params = abstract_model(config)
  shardings = state_shardings(params, mesh, rules)
  init = lambda: nnx.split(transformer.Transformer(config, rngs=nnx.Rngs(seed)), nnx.Param)[1]
  return graphdef, jax.jit(init, out_shardings=shardings)()


def abstract_model(config: transformer.TransformerConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, params of ShapeDtypeStructs with their logical names), allocating nothing.

  Call it outside `jax.set_mesh`: under a mesh NNX would resolve the logical names as mesh axes.
  """
  return nnx.eval_shape(lambda: nnx.split(transformer.Transformer(config, rngs=nnx.Rngs(0)), nnx.Param))


def abstract(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree`'s leaves carrying `shardings` (an orbax restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
