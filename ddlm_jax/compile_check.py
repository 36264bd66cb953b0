"""Compile-only check of a config at its real size: what one device needs, without training.

  report = compile_check.check(config, memory_budget_gib=16.0)   # on jax.devices()
  print(report.describe())

The train step and the sampler are built as the trainer builds them (`train.abstract_state`,
`train.make_train_step`, `experiment.generate_tokens`) over abstract inputs only: parameters and
optimizer state are ShapeDtypeStructs carrying the trainer's shardings, so nothing is initialised.
Both are lowered and compiled for the mesh of `config.mesh` over the given devices (on a CPU, fake
ones: XLA_FLAGS=--xla_force_host_platform_device_count=8), and XLA's memory and cost analyses of the
compiled programs say, per device, what the arguments, outputs and temporaries take and how many
FLOPs a step does. A config whose train step or sampler needs more than its budget fails with
`MemoryBudgetError`. This is how a config meant for an accelerator is planned on a small machine
(MaxText's train_compile does the same).

The numbers are those of the compiler of the devices given. Compiled for a GPU, the train step's
peak is what the allocator then holds (an H200 ran the base configs' per-device share of a step
within 3 KB of it); a CPU compiler schedules otherwise and reported about twice the temporaries (a
peak 1.7x to 1.9x higher) for the same steps, so on fake CPU devices the peak is a cautious estimate. Parameter, optimizer
and input bytes are the same everywhere. FLOPs: on a CPU XLA counts the matmuls (the train step
comes within 3% of 6 per parameter per token); on a GPU they are library calls it leaves out.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections

from ddlm_jax import config as config_lib
from ddlm_jax import experiment as experiment_lib
from ddlm_jax import sharding
from ddlm_jax import train
from ddlm_jax.data import tokenizers
from ddlm_jax.decoding import blockwise
from ddlm_jax.networks import transformer

GIB = 2 ** 30


def _size(num_bytes: float) -> str:
  """Bytes in GiB, or in MiB below a hundredth of one."""
  return f"{num_bytes / GIB:.2f} GiB" if num_bytes >= GIB / 100 else f"{num_bytes / 2 ** 20:.2f} MiB"


class MemoryBudgetError(ValueError):
  """A config needs more memory per device than its stated budget."""


@dataclasses.dataclass(frozen=True)
class CompiledCost:
  """XLA's analysis of one compiled program, per device.

  argument_bytes, output_bytes: its inputs and results; alias_bytes: results written over donated
  inputs (counted once in the peak); temp_bytes: activations and other temporaries; flops: XLA's
  count, in which a loop's body counts once (a sampler's figure is one step of its loop).
  """
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  flops: float

  @property
  def peak_bytes(self) -> int:
    """Bytes held at once while it runs: inputs, results not aliased to them, and temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """Per-device needs of a config's train step and sampler on its mesh.

  num_params: parameters of the network (all of them, not per device); param_bytes, optimizer_bytes,
  ema_bytes: this device's share of the parameters, the optimizer state and the parameters' EMA (0
  without one); train_tokens: tokens of one device's share of a training batch; train_model_flops:
  the network's training FLOPs over them by the closed form (`transformer.flops_per_token`: 6 per
  parameter per token, and attention; block diffusion runs the network over twice the tokens);
  sampler_steps: the sampler's loop length at most (scan steps; positions for autoregressive
  decoding; windows x steps per window for block-by-block decoding).
  """
  num_devices: int
  mesh_shape: dict[str, int]
  num_params: int
  param_bytes: int
  optimizer_bytes: int
  ema_bytes: int
  train_tokens: int
  train_model_flops: float
  train_step: CompiledCost
  sampler: CompiledCost
  sampler_steps: int

  def describe(self) -> str:
    return (f"{self.num_params:,} parameters on {self.num_devices} devices (mesh {self.mesh_shape}); per device: "
            f"parameters {_size(self.param_bytes)}, optimizer {_size(self.optimizer_bytes)}, EMA "
            f"{_size(self.ema_bytes)}; train step: temporaries {_size(self.train_step.temp_bytes)}, peak "
            f"{_size(self.train_step.peak_bytes)}, {self.train_step.flops:.3g} FLOPs; sampler: temporaries "
            f"{_size(self.sampler.temp_bytes)}, peak {_size(self.sampler.peak_bytes)}, {self.sampler.flops:.3g} FLOPs "
            f"per step of {self.sampler_steps}")


def compiled_cost(compiled: jax.stages.Compiled) -> CompiledCost:
  """The memory and cost analyses of a compiled program."""
  memory = compiled.memory_analysis()
  return CompiledCost(argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
                      alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
                      flops=float(compiled.cost_analysis().get("flops", 0.0)))


def device_bytes(abstract_tree) -> int:
  """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs (the largest device's)."""
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(abstract_tree))


def config_vocab_size(config: ml_collections.ConfigDict) -> int:
  """The vocabulary a config's tokenizer will have at most: config.data.vocab_size for sentencepiece."""
  if config.data.tokenizer != "sentencepiece":
    raise ValueError(f"the {config.data.tokenizer!r} tokenizer's vocabulary is known only once it has read the "
                     "texts: pass vocab_size (e.g. the vocab_size of a tokenizer saved in a workdir)")
  return config.data.vocab_size


def sampler_steps(process, sampler_config, seq_len: int) -> int:
  """The most steps of the sampler's loop over a canvas of `seq_len` (see `CompileReport`)."""
  if process.causal_network:
    return seq_len
  if isinstance(sampler_config, blockwise.BlockwiseConfig):
    return seq_len // sampler_config.block_size * sampler_config.max_steps
  return sampler_config.steps


def compile_report(config: ml_collections.ConfigDict, vocab_size: int | None = None,
                   devices=None) -> CompileReport:
  """Compiles `config`'s train step and sampler on the mesh of config.mesh over `devices` (default:
  all) from abstract inputs, and reports what one device needs. vocab_size: the tokenizer's (default
  `config_vocab_size`)."""
  config_lib.validate(config)
  vocab_size = config_vocab_size(config) if vocab_size is None else vocab_size
  graph_settings = experiment_lib.neighbor_graph_settings(config.process)
  graph = None if graph_settings is None else graph_settings.edgeless(vocab_size)  # the real graph's shapes
  experiment = experiment_lib.make_experiment(config, vocab_size, graph)
  mesh = sharding.make_mesh(sharding.MeshConfig(**config.mesh.to_dict()), devices)
  train.check_batch_sizes(config, mesh)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.sample.num_samples % shards:
    raise ValueError(f"config.sample.num_samples={config.sample.num_samples} does not split over the mesh's "
                     f"{shards} data x fsdp shards")
  optimizer = experiment_lib.make_optimizer(config.train)
  graphdef, state, shardings = train.abstract_state(experiment, config, mesh, optimizer)
  key = jax.ShapeDtypeStruct((), jax.eval_shape(jax.random.key, 0).dtype, sharding=sharding.replicated(mesh))
  step_fn = train.make_train_step(experiment, graphdef, optimizer, mesh, shardings, ema_decay=config.train.ema_decay,
                                  condition_dropout=config.train.condition_dropout,
                                  attention_anneal_steps=config.train.attention_anneal_steps)
  seq_len = experiment.data.seq_len
  train_tokens = config.train.batch_size // shards * seq_len
  train_step = step_fn.lower(state, rows(config.train.batch_size, seq_len, jnp.int32, mesh), key).compile()
  sampler_config = config_lib.sampler_config(config)
  sampler = jax.jit(functools.partial(
      experiment_lib.generate_tokens, graphdef, process=experiment.process, sampler_config=sampler_config,
      eos_id=tokenizers.EOS_ID, pad_id=tokenizers.PAD_ID)).lower(
          state.params, fixed_tokens_BL=rows(config.sample.num_samples, seq_len, jnp.int32, mesh),
          fixed_BL=rows(config.sample.num_samples, seq_len, jnp.bool_, mesh), key=key).compile()
  return CompileReport(
      num_devices=mesh.size, mesh_shape=dict(mesh.shape),
      num_params=sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state.params)),
      param_bytes=device_bytes(state.params), optimizer_bytes=device_bytes(state.opt_state),
      ema_bytes=0 if state.ema_params is None else device_bytes(state.ema_params),
      train_tokens=train_tokens, train_step=compiled_cost(train_step),
      train_model_flops=transformer.flops_per_token(experiment.model, seq_len, vocab_size) * train_tokens,
      sampler=compiled_cost(sampler), sampler_steps=sampler_steps(experiment.process, sampler_config, seq_len))


def rows(batch_size: int, seq_len: int, dtype, mesh: jax.sharding.Mesh) -> jax.ShapeDtypeStruct:
  """An abstract batch dtype[B, L], split over the mesh's data axes as the trainer splits it."""
  return jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=sharding.batch_sharding(mesh))


def check_budget(report: CompileReport, memory_budget_gib: float) -> None:
  """Raises MemoryBudgetError if the train step or the sampler needs more than the budget per device
  (each on its own: they do not run at once)."""
  if not memory_budget_gib > 0:
    raise ValueError(f"the memory budget must be a positive number of GiB, got {memory_budget_gib}")
  budget = memory_budget_gib * GIB
  for name, cost in (("train step", report.train_step), ("sampler", report.sampler)):
    if cost.peak_bytes > budget:
      raise MemoryBudgetError(
          f"the {name} needs {_size(cost.peak_bytes)} per device, over the budget of {memory_budget_gib} GiB "
          f"(parameters {_size(report.param_bytes)}, optimizer {_size(report.optimizer_bytes)}, EMA "
          f"{_size(report.ema_bytes)}, temporaries {_size(cost.temp_bytes)}; mesh {report.mesh_shape}): "
          "shard the parameters over more devices (config.mesh.fsdp), lower config.train.batch_size or "
          "config.sample.num_samples, or recompute activations (config.model.remat=True)")


def check(config: ml_collections.ConfigDict, memory_budget_gib: float, vocab_size: int | None = None,
          devices=None) -> CompileReport:
  """`compile_report`, failing with MemoryBudgetError if a device needs more than `memory_budget_gib`."""
  report = compile_report(config, vocab_size, devices)
  check_budget(report, memory_budget_gib)
  return report
