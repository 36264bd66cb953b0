"""Autoregressive KV-cache decoding speed, against the causal forward pass and the matmul peak
measured in the same run, with issue 12's goal.

  python -m benchmarks.decode_throughput      # 16 rows and 1 row, 256 new tokens each

Decoding runs as users get it (`Pipeline.generate` of an autoregressive run): the causal network of
`config.base_config()` with the shape flags and process 'autoregressive', randomly initialised
(speed does not depend on the weights), decoded by `experiment.generate_tokens`
(`networks.transformer.make_decoder` and `samplers.decode`: one `lax.while_loop` over the positions,
temperature 1) under one `jax.jit`, with every position free (no prompt): --seq_len new tokens per
row.

Per batch size: tokens/s and ms per token step of the whole decode; the token step's cost as a
ratio to one full causal forward pass of the batch at length L divided by L (what a step would cost
if decoding were as efficient as the forward pass), and to one jitted single-token decode call at
position L / 2 (a ratio above 1 is the scan's and the token draw's cost); achieved GFLOP/s of
decoding with forward FLOPs per token (`flops_per_token` / 3 over the real vocabulary) and its share
of the matmul peak. The measures are timed in turn, round after round (best of --rounds). Writes
benchmarks/results/decode_throughput.json (or --output).
"""
from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from benchmarks import common
from ddlm_jax import experiment as experiment_lib
from ddlm_jax.networks import transformer

SHAPES = common.define_shape_flags(batch_size=False)
_OUTPUT = common.define_output_flag("decode_throughput")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["16", "1"], "Rows decoded together; one row of results each.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds; each times every measure once; the best round counts.")
_PEAK_SIZE = flags.DEFINE_integer("peak_size", 2048, "Side of the square matmul that measures the peak.")

# Issue 12's goal: decoding 16 rows x 256 new tokens at least this fast (the PyTorch reference's 1,062).
GOAL_BATCH = 16
GOAL_TOKENS_PER_S = 1100
# Calls per round of the short measures, so that each timed unit lasts long enough to time.
FORWARD_CALLS = 3
SINGLE_CALLS = 20


def measures_for_batch(batch: int, graphdef, params, process, sampler_config, length: int) -> dict:
  """Compiled, warmed-up timed units of one batch size: the whole decode, the full causal forward
  (FORWARD_CALLS calls) and the single-token decode call at position length // 2 (SINGLE_CALLS calls)."""
  fixed_tokens_BL = jnp.zeros((batch, length), jnp.int32)
  fixed_BL = jnp.zeros((batch, length), bool)
  key = jax.random.key(0)

  def single_call(params, tokens_B1, start, cache):
    return transformer.make_decoder(graphdef, params, batch, length)[1](tokens_B1, start, cache)

  def prefill(params, tokens_BT):
    cache, step_fn = transformer.make_decoder(graphdef, params, batch, length)
    return step_fn(tokens_BT, 0, cache)[1]

  decode = common.make_generate(graphdef, process, sampler_config)
  single_call = jax.jit(single_call)
  forward = jax.jit(lambda params, tokens_BL: experiment_lib.bind(graphdef, params)(
      tokens_BL, jnp.zeros((batch,), jnp.float32)))
  tokens_BL = jax.random.randint(jax.random.key(1), (batch, length), 4, process.vocab_size)
  start = length // 2
  cache = jax.jit(prefill)(params, tokens_BL[:, :start])
  tokens_B1, start = tokens_BL[:, start:start + 1], jnp.int32(start)
  units = {
      "decode": lambda: decode(params, fixed_tokens_BL, fixed_BL, key),
      "forward": lambda: [forward(params, tokens_BL) for _ in range(FORWARD_CALLS)],
      "single_call": lambda: [single_call(params, tokens_B1, start, cache) for _ in range(SINGLE_CALLS)],
  }
  for unit in units.values():
    jax.block_until_ready(unit())  # compiles
  return {(batch, name): lambda unit=unit: common.timed(lambda: jax.block_until_ready(unit()))
          for name, unit in units.items()}


def main(argv):
  del argv
  length = SHAPES.seq_len.value
  experiment, graphdef, params, sampler_config = common.causal_model_setup(SHAPES)
  batch_sizes = [int(size) for size in _BATCH_SIZES.value]

  peak = common.matmul_peak_gflops(_PEAK_SIZE.value, SHAPES.dtype.value)
  measures = {}
  for batch in batch_sizes:
    measures.update(measures_for_batch(batch, graphdef, params, experiment.process, sampler_config, length))
  measured = common.best_of_rounds(measures, _ROUNDS.value)
  peak = max(peak, common.matmul_peak_gflops(_PEAK_SIZE.value, SHAPES.dtype.value))

  forward_flops = transformer.flops_per_token(experiment.model, length,
                                              vocab_size=experiment.process.vocab_size) / 3
  rows = []
  for batch in batch_sizes:
    decode_s = measured[(batch, "decode")].best_s
    step_s = decode_s / length
    forward_s = measured[(batch, "forward")].best_s / FORWARD_CALLS
    single_s = measured[(batch, "single_call")].best_s / SINGLE_CALLS
    tokens_per_s = batch * length / decode_s
    gflops = tokens_per_s * forward_flops / 1e9
    rows.append(dict(batch=batch, new_tokens=length, tokens_per_s=round(tokens_per_s),
                     step_ms=round(step_s * 1e3, 3), forward_ms=round(forward_s * 1e3, 1),
                     step_over_forward_per_token=round(step_s / (forward_s / length), 2),
                     single_call_ms=round(single_s * 1e3, 2), step_over_single_call=round(step_s / single_s, 3),
                     gflops=round(gflops, 2), fraction_of_peak=round(gflops / peak, 3),
                     cores_busy=round(measured[(batch, "decode")].cores_busy, 2)))
  goals = [common.goal(f"{GOAL_BATCH} x {length} decoding tokens/s", row["tokens_per_s"], GOAL_TOKENS_PER_S, True)
           for row in rows if row["batch"] == GOAL_BATCH]

  print(f"device: {common.device_description()}; matmul peak ({_PEAK_SIZE.value}^2 {SHAPES.dtype.value}, best of "
        f"before/after): {peak:.1f} GFLOP/s")
  print(f"shapes: {SHAPES.values()}; best of {_ROUNDS.value} rounds")
  common.print_table(rows, ["batch", "new_tokens", "tokens_per_s", "step_ms", "forward_ms",
                            "step_over_forward_per_token", "single_call_ms", "step_over_single_call", "gflops",
                            "fraction_of_peak", "cores_busy"])
  common.print_goals(goals, SHAPES.note())
  path = common.write_json_to(_OUTPUT.value, dict(
      command=common.command_line(), device=common.device_description(), shapes=SHAPES.values(),
      rounds=_ROUNDS.value, matmul_peak_gflops=round(peak, 1), rows=rows, goals=goals))
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
