"""Shared pieces of the benchmarks: timing, the machine's matmul peak, goals, shapes and result files."""
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from typing import Any, Callable

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections

from ddlm_jax import config as config_lib
from ddlm_jax import evaluate
from ddlm_jax import experiment as experiment_lib
from ddlm_jax import sharding
from ddlm_jax import train
from ddlm_jax.data import corpus
from ddlm_jax.data import tokenizers
from ddlm_jax.networks import layers

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def best_seconds(fn, *args, repeats: int = 5, warmup: int = 2) -> float:
  """Best wall time of fn(*args) over `repeats` calls, after `warmup` calls (blocks on the result)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


@dataclasses.dataclass(frozen=True)
class Timing:
  """One timed run: wall seconds and this process's CPU seconds (all its threads) over it."""
  wall_s: float
  cpu_s: float


def timed(fn: Callable[[], Any]) -> Timing:
  """Times fn() (which must block on its own result)."""
  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  return Timing(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu)


@dataclasses.dataclass(frozen=True)
class Measured:
  """Best wall seconds of one timed unit over the rounds, and the cores its runs kept busy
  (CPU seconds / wall seconds summed over every round)."""
  best_s: float
  cores_busy: float


def best_of_rounds(measures: dict[Any, Callable[[], Timing]], rounds: int) -> dict[Any, Measured]:
  """Runs every measure once per round, in turn, for `rounds` rounds (so that the machine's noise
  hits all of them alike), and keeps each one's best time. Warm-up (compilation) is the caller's."""
  timings = {name: [] for name in measures}
  for _ in range(rounds):
    for name, measure in measures.items():
      timings[name].append(measure())
  return {name: Measured(best_s=min(t.wall_s for t in runs),
                         cores_busy=sum(t.cpu_s for t in runs) / sum(t.wall_s for t in runs))
          for name, runs in timings.items()}


def matmul_peak_gflops(size: int = 2048, dtype=jnp.float32) -> float:
  """Achieved GFLOP/s of a jitted size x size matmul: the machine's practical peak, measured now."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  seconds = best_seconds(jax.jit(jnp.matmul), a, b, repeats=10)
  return 2 * size ** 3 / seconds / 1e9


def device_description() -> str:
  device = jax.devices()[0]
  return f"{device.platform}:{device.device_kind} x{jax.device_count()} ({platform.machine()}, {os.cpu_count()} cpus)"


def command_line() -> str:
  """The command that started this run, as `python -m module args` when run as a module."""
  spec = getattr(sys.modules["__main__"], "__spec__", None)
  program = ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]
  return shlex.join(program + sys.argv[1:])


def write_json(name: str, payload: dict) -> str:
  return write_json_to(os.path.join(RESULTS_DIR, f"{name}.json"), payload)


def write_json_to(path: str, payload: dict) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=2)
  return path


def define_output_flag(name: str) -> flags.FlagHolder:
  """--output: where the benchmark writes its results (default benchmarks/results/<name>.json); point
  trial runs at small shapes elsewhere, so that they do not replace the recorded results."""
  return flags.DEFINE_string("output", os.path.join(RESULTS_DIR, f"{name}.json"), "Path of the results JSON.")


def print_table(rows: list[dict], columns: list[str]) -> None:
  widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
  print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
  print("-|-".join("-" * w for w in widths))
  for row in rows:
    print(" | ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths)))


def goal(name: str, value: float, bound: float, at_least: bool) -> dict:
  """A goal of issue 12 checked against a measured value: PASS or MISS, and by how much it is
  missed (a share of the bound)."""
  met = value >= bound if at_least else value <= bound
  return dict(goal=f"{name} {'>=' if at_least else '<='} {bound}", value=round(value, 3),
              status="PASS" if met else "MISS",
              missed_by=0.0 if met else round(abs(value - bound) / bound, 3))


def print_goals(goals: list[dict], note: str) -> None:
  """One line per goal; `note` (e.g. `ShapeFlags.note()`) follows when it is not empty."""
  for g in goals:
    missed = "" if g["status"] == "PASS" else f" (missed by {g['missed_by']:.0%})"
    print(f"goal {g['goal']}: {g['value']} {g['status']}{missed}")
  if note:
    print(note)


@dataclasses.dataclass(frozen=True)
class ShapeFlags:
  """The model and batch shape flags every speed benchmark shares (defaults: issue 12's shapes);
  batch_size is None in a benchmark that sets its batch sizes otherwise."""
  num_layers: flags.FlagHolder
  num_heads: flags.FlagHolder
  embed_dim: flags.FlagHolder
  mlp_dim: flags.FlagHolder
  vocab_size: flags.FlagHolder
  seq_len: flags.FlagHolder
  batch_size: flags.FlagHolder | None
  dtype: flags.FlagHolder
  attention: flags.FlagHolder

  def values(self) -> dict:
    return {name: holder.value for name, holder in self._holders().items()}

  def note(self) -> str:
    """Empty at the default shapes; else a reminder that the goals are set at the default shapes."""
    changed = [f"--{name}" for name, holder in self._holders().items() if holder.value != holder.default]
    return (f"(shapes changed by {', '.join(changed)}: issue 12's goals are set at the default shapes)"
            if changed else "")

  def _holders(self) -> dict[str, flags.FlagHolder]:
    return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
            if getattr(self, field.name) is not None}


def define_shape_flags(batch_size: bool = True) -> ShapeFlags:
  """Defines the shape flags (--batch_size only with `batch_size`); call once, at the benchmark's
  module level."""
  return ShapeFlags(
      num_layers=flags.DEFINE_integer("num_layers", 6, "Transformer blocks."),
      num_heads=flags.DEFINE_integer("num_heads", 4, "Attention heads."),
      embed_dim=flags.DEFINE_integer("embed_dim", 256, "Residual width D."),
      mlp_dim=flags.DEFINE_integer("mlp_dim", 1024, "MLP hidden width."),
      vocab_size=flags.DEFINE_integer("vocab_size", 8192, "Real vocabulary size (the network's is padded "
                                      "to config.model.vocab_multiple)."),
      seq_len=flags.DEFINE_integer("seq_len", 256, "Sequence length L."),
      batch_size=flags.DEFINE_integer("batch_size", 16, "Rows per batch.") if batch_size else None,
      dtype=flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the model "
                              "(and of the matmul peak)."),
      attention=flags.DEFINE_enum("attention", config_lib.base_config().model.attention,
                                  list(layers.ATTENTION_IMPLEMENTATIONS), "config.model.attention."),
  )


def experiment_config(shapes: ShapeFlags, process: str) -> ml_collections.ConfigDict:
  """`config.base_config()` with the shape flags and the process set, validated, as a user's
  experiment file would make it."""
  config = config_lib.base_config()
  config.model.update(dict(num_layers=shapes.num_layers.value, num_heads=shapes.num_heads.value,
                           embed_dim=shapes.embed_dim.value, mlp_dim=shapes.mlp_dim.value,
                           dtype=shapes.dtype.value, attention=shapes.attention.value))
  config.process.name = process
  config.data.seq_len = shapes.seq_len.value
  if shapes.batch_size is not None:
    config.train.batch_size = shapes.batch_size.value
  config_lib.validate(config)
  return config


def train_step_setup(shapes: ShapeFlags, process: str):
  """The train step of `process` at the shape flags, as users train it: (experiment, the jitted,
  sharded, donated step from `train.make_train_step`, its initial state, a random batch, a key)."""
  config = experiment_config(shapes, process)
  experiment = experiment_lib.make_experiment(config, shapes.vocab_size.value)
  mesh = sharding.make_mesh(sharding.MeshConfig(**config.mesh.to_dict()))
  train.check_batch_sizes(config, mesh)
  optimizer = experiment_lib.make_optimizer(config.train)
  graphdef, state, shardings = train.init_state(experiment, config, mesh, optimizer)
  step_fn = train.make_train_step(experiment, graphdef, optimizer, mesh, shardings)
  batch_BL = jax.device_put(
      jax.random.randint(jax.random.key(0), (config.train.batch_size, config.data.seq_len), 4,
                         shapes.vocab_size.value), sharding.batch_sharding(mesh))
  return experiment, step_fn, state, batch_BL, jax.random.key(1)


def causal_model_setup(shapes: ShapeFlags):
  """The randomly initialised causal network of the autoregressive process at the shape flags, on
  one device: (experiment, graphdef, params, the config's sampler settings)."""
  config = experiment_config(shapes, "autoregressive")
  experiment = experiment_lib.make_experiment(config, shapes.vocab_size.value)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
  graphdef, params = sharding.create_sharded_model(experiment.model, mesh, sharding.DEFAULT_RULES, config.seed)
  return experiment, graphdef, params, config_lib.sampler_config(config)


def make_generate(graphdef, process, sampler_config) -> Callable:
  """Jitted (params, fixed_tokens_BL, fixed_BL, key) -> tokens_BL: `experiment.generate_tokens`
  with [EOS] and [PAD] ids, as `Pipeline.generate` runs it (KV-cache decoding for the
  autoregressive baseline, the scan sampler for a diffusion process)."""
  def generate(params, fixed_tokens_BL, fixed_BL, key):
    return experiment_lib.generate_tokens(graphdef, params, process, sampler_config, fixed_tokens_BL, fixed_BL, key,
                                          eos_id=tokenizers.EOS_ID, pad_id=tokenizers.PAD_ID)

  return jax.jit(generate)


def pair_scores(task: str, outputs, sources, targets, records, reference: corpus.RestaurantCorpus) -> dict:
  """How well outputs answer their sources: for 'data_to_text' corpus BLEU against the references and
  the share the generator parses with exactly the source's record; for 'text_to_data' exact-match
  and per-attribute accuracy of the parsed records."""
  if task == "data_to_text":
    parsed = [reference.parse(text) for text in outputs]
    faithful = sum(record == corpus.parse_record(source) for record, source in zip(parsed, sources))
    return {"bleu": round(evaluate.bleu(outputs, targets), 2), "parsed_with_source_record": faithful / len(outputs)}
  accuracy = evaluate.attribute_accuracy([corpus.parse_record(text) for text in outputs], records)
  return {name: round(value, 4) for name, value in accuracy.items()}
