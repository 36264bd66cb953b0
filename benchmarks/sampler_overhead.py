"""Sampler cost per step as a ratio to one bare forward pass of the same batch, measured in one run,
with issue 12's goal.

  python -m benchmarks.sampler_overhead [--steps=64] [--prompt_len=16]

The masked process and its bidirectional network come from `config.base_config()` with the shape
flags (defaults: issue 12's shapes), randomly initialised; the sampler is
`experiment.generate_tokens` (`samplers.sample`) under one `jax.jit` per setting, as
`Pipeline.generate` runs it. The forward pass and the samplers are timed in turn, round after
round (best of --rounds), so that the machine's noise hits them alike. A ratio of 1.0 means the
sampler adds nothing to the network's own cost. Writes benchmarks/results/sampler_overhead.json
(or --output).
"""
from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from benchmarks import common
from ddlm_jax import experiment as experiment_lib
from ddlm_jax import samplers
from ddlm_jax import sharding

SHAPES = common.define_shape_flags()
_OUTPUT = common.define_output_flag("sampler_overhead")
_STEPS = flags.DEFINE_integer("steps", 64, "Sampler steps.")
_PROMPT = flags.DEFINE_integer("prompt_len", 16, "Fixed prompt tokens per row.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds; each times the forward pass and every sampler once.")
_PEAK_SIZE = flags.DEFINE_integer("peak_size", 2048, "Side of the square matmul that measures the peak.")

# (strategy, temperature, block_length) of the timed samplers.
SETTINGS = [("ancestral", 1.0, 0), ("random", 1.0, 0), ("low_confidence", 0.0, 0),
            ("low_confidence", 1.0, 0), ("low_confidence", 1.0, 32)]
# Issue 12's goal: a sampler step costs at most this many bare forward passes.
GOAL_STEP_OVER_FORWARD = 1.05
# Forward calls per round, so that the timed unit lasts long enough to time.
FORWARD_CALLS = 3


def main(argv):
  del argv
  batch, length, steps = SHAPES.batch_size.value, SHAPES.seq_len.value, _STEPS.value
  config = common.experiment_config(SHAPES, "masked")
  experiment = experiment_lib.make_experiment(config, SHAPES.vocab_size.value)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
  graphdef, params = sharding.create_sharded_model(experiment.model, mesh, sharding.DEFAULT_RULES, config.seed)
  tokens_BL = jax.random.randint(jax.random.key(0), (batch, length), 4, SHAPES.vocab_size.value)
  fixed_BL = jnp.broadcast_to(jnp.arange(length) < _PROMPT.value, (batch, length))
  key = jax.random.key(1)
  forward = jax.jit(lambda p, x: experiment_lib.bind(graphdef, p)(x, jnp.ones((batch,))))
  units = {"forward": lambda: [forward(params, tokens_BL) for _ in range(FORWARD_CALLS)]}
  for setting in SETTINGS:
    strategy, temperature, block_length = setting
    sampler_config = samplers.SamplerConfig(steps=steps, strategy=strategy, temperature=temperature,
                                            block_length=block_length)
    sample = common.make_generate(graphdef, experiment.process, sampler_config)
    units[setting] = lambda sample=sample: sample(params, tokens_BL, fixed_BL, key)

  peak = common.matmul_peak_gflops(_PEAK_SIZE.value, SHAPES.dtype.value)
  for unit in units.values():
    jax.block_until_ready(unit())  # compiles
  measured = common.best_of_rounds(
      {name: lambda unit=unit: common.timed(lambda: jax.block_until_ready(unit())) for name, unit in units.items()},
      _ROUNDS.value)
  peak = max(peak, common.matmul_peak_gflops(_PEAK_SIZE.value, SHAPES.dtype.value))

  forward_s = measured["forward"].best_s / FORWARD_CALLS
  rows = []
  for setting in SETTINGS:
    step_s = measured[setting].best_s / steps
    rows.append(dict(strategy=setting[0], temperature=setting[1], block_length=setting[2],
                     forward_ms=round(forward_s * 1e3, 2), step_ms=round(step_s * 1e3, 2),
                     step_over_forward=round(step_s / forward_s, 3)))
  goals = [common.goal(f"{row['strategy']} (temperature {row['temperature']}, block {row['block_length']}) "
                       "step / forward", row["step_over_forward"], GOAL_STEP_OVER_FORWARD, False) for row in rows]

  print(f"device: {common.device_description()}; matmul peak ({_PEAK_SIZE.value}^2 {SHAPES.dtype.value}, best of "
        f"before/after): {peak:.1f} GFLOP/s")
  print(f"shapes: {SHAPES.values()}; {steps} steps, {_PROMPT.value}-token prompts; best of {_ROUNDS.value} rounds")
  common.print_table(rows, ["strategy", "temperature", "block_length", "forward_ms", "step_ms", "step_over_forward"])
  common.print_goals(goals, SHAPES.note())
  path = common.write_json_to(_OUTPUT.value, dict(
      command=common.command_line(), device=common.device_description(), shapes=SHAPES.values(), steps=steps,
      prompt_len=_PROMPT.value, rounds=_ROUNDS.value, matmul_peak_gflops=round(peak, 1), rows=rows, goals=goals))
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
