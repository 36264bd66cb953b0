"""Train-step throughput: tokens/s and achieved GFLOP/s as a fraction of the matmul peak measured in the same run.

  python -m benchmarks.train_throughput [--sizes=tiny,demo] [--batch_size=32] [--seq_len=128]

FLOPs per token follow `networks.transformer.flops_per_token` (6N + attention). Writes
benchmarks/results/train_throughput.json.
"""
import time

from absl import app
from absl import flags
import jax

from benchmarks import common
from ddlm_jax import config as config_lib
from ddlm_jax import experiment as experiment_lib
from ddlm_jax import sharding
from ddlm_jax import train
from ddlm_jax.networks import transformer

SIZES = {
    "tiny": dict(num_layers=2, num_heads=2, embed_dim=64, mlp_dim=256),
    "demo": dict(num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512),
    "small": dict(num_layers=6, num_heads=8, embed_dim=256, mlp_dim=1024),
}
_SIZES = flags.DEFINE_list("sizes", ["tiny", "demo", "small"], f"Model sizes, from {list(SIZES)}.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Global batch size.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Sequence length.")
_VOCAB = flags.DEFINE_integer("vocab_size", 1024, "Vocabulary size.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per size (best of 3 runs of this many).")


def measure(size: str, batch_size: int, seq_len: int, vocab_size: int, steps: int) -> dict:
  config = config_lib.base_config()
  config.model.update(SIZES[size])
  config.data.seq_len = seq_len
  config.train.batch_size = batch_size
  experiment = experiment_lib.make_experiment(config, vocab_size)
  mesh = sharding.make_mesh(sharding.MeshConfig(**config.mesh.to_dict()))
  optimizer = experiment_lib.make_optimizer(config.train)
  graphdef, state, shardings = train.init_state(experiment, config, mesh, optimizer)
  step_fn = jax.jit(
      lambda s, b, k: train.train_step(s, b, k, graphdef=graphdef, optimizer=optimizer,
                                       process=experiment.process, ema_decay=0.0),
      in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  batch = jax.device_put(jax.random.randint(jax.random.key(0), (batch_size, seq_len), 4, vocab_size),
                         sharding.batch_sharding(mesh))
  key = jax.random.key(1)
  state, metrics = step_fn(state, batch, key)  # compile
  jax.block_until_ready(metrics)
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = step_fn(state, batch, key)
    jax.block_until_ready(metrics)
    best = min(best, (time.perf_counter() - start) / steps)
  tokens_per_second = batch_size * seq_len / best
  gflops = tokens_per_second * transformer.flops_per_token(experiment.model, seq_len) / 1e9
  return dict(size=size, params=transformer.num_params(experiment.model), batch=batch_size, seq_len=seq_len,
              step_ms=round(best * 1e3, 2), tokens_per_s=round(tokens_per_second),
              gflops=round(gflops, 2))


def main(argv):
  del argv
  peak = common.matmul_peak_gflops()
  rows = [measure(size, _BATCH.value, _SEQ_LEN.value, _VOCAB.value, _STEPS.value) for size in _SIZES.value]
  peak_after = common.matmul_peak_gflops()
  peak = max(peak, peak_after)
  for row in rows:
    row["fraction_of_peak"] = round(row["gflops"] / peak, 3)
  print(f"device: {common.device_description()}; matmul peak (2048^2 float32, best of before/after): "
        f"{peak:.1f} GFLOP/s")
  common.print_table(rows, ["size", "params", "batch", "seq_len", "step_ms", "tokens_per_s", "gflops",
                            "fraction_of_peak"])
  path = common.write_json("train_throughput", dict(device=common.device_description(),
                                                    matmul_peak_gflops=round(peak, 1), rows=rows))
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
