"""Sampler cost per step as a ratio to one bare forward pass of the same batch, measured in one run.

  python -m benchmarks.sampler_overhead [--batch_size=32] [--seq_len=128] [--steps=64]

A ratio of 1.0 means the sampler adds nothing to the network's own cost. Writes
benchmarks/results/sampler_overhead.json.
"""
from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from benchmarks import common
from ddlm_jax import experiment
from ddlm_jax import samplers
from ddlm_jax import sharding
from ddlm_jax.networks import transformer
from ddlm_jax.processes import masked

_BATCH = flags.DEFINE_integer("batch_size", 32, "Rows sampled at once.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Canvas length.")
_VOCAB = flags.DEFINE_integer("vocab_size", 1024, "Vocabulary size.")
_STEPS = flags.DEFINE_integer("steps", 64, "Sampler steps.")
_PROMPT = flags.DEFINE_integer("prompt_len", 16, "Fixed prompt tokens per row.")

MODEL = dict(num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512)
SETTINGS = [("ancestral", 1.0, 0), ("random", 1.0, 0), ("low_confidence", 0.0, 0),
            ("low_confidence", 1.0, 0), ("low_confidence", 1.0, 32)]


def main(argv):
  del argv
  batch, length, steps = _BATCH.value, _SEQ_LEN.value, _STEPS.value
  model_config = transformer.TransformerConfig(vocab_size=_VOCAB.value, max_len=length, **MODEL)
  process = masked.MaskedDiffusion(vocab_size=_VOCAB.value, mask_id=1)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
  graphdef, params = sharding.create_sharded_model(model_config, mesh, sharding.DEFAULT_RULES, 0)
  tokens_BL = jax.random.randint(jax.random.key(0), (batch, length), 4, _VOCAB.value)
  fixed_BL = jnp.broadcast_to(jnp.arange(length) < _PROMPT.value, (batch, length))
  forward = jax.jit(lambda p, x: experiment.bind(graphdef, p)(x, jnp.ones((batch,))))
  key = jax.random.key(1)
  rows = []
  for strategy, temperature, block_length in SETTINGS:
    config = samplers.SamplerConfig(steps=steps, strategy=strategy, temperature=temperature,
                                    block_length=block_length)
    sample = jax.jit(lambda p, tokens, fixed, k, config=config: samplers.sample(
        experiment.bind(graphdef, p), process, config, tokens, fixed, k, eos_id=3, pad_id=0))
    forward_s = common.best_seconds(forward, params, tokens_BL)
    sample_s = common.best_seconds(sample, params, tokens_BL, fixed_BL, key, repeats=3, warmup=1)
    forward_s = min(forward_s, common.best_seconds(forward, params, tokens_BL))
    rows.append(dict(strategy=strategy, temperature=temperature, block_length=block_length,
                     forward_ms=round(forward_s * 1e3, 3), step_ms=round(sample_s / steps * 1e3, 3),
                     step_over_forward=round(sample_s / steps / forward_s, 3)))
  print(f"device: {common.device_description()}; batch {batch}, canvas {length}, vocab {_VOCAB.value}, "
        f"{steps} steps, model {MODEL}")
  common.print_table(rows, ["strategy", "temperature", "block_length", "forward_ms", "step_ms",
                            "step_over_forward"])
  path = common.write_json("sampler_overhead", dict(device=common.device_description(), batch=batch,
                                                    seq_len=length, steps=steps, model=MODEL, rows=rows))
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
