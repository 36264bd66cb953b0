"""AR -> diffusion adaptation (Gong et al. 2024, DiffuLLaMA): the shifted outputs that keep an AR
network's next-token convention, the attention annealed from causal to bidirectional inside the
jitted train step, and an adapted run end to end from an AR run's checkpoint."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddlm_jax import config as config_lib
from ddlm_jax import experiment as experiment_lib
from ddlm_jax import pipeline
from ddlm_jax import samplers
from ddlm_jax import schedules
from ddlm_jax import sharding
from ddlm_jax import testing
from ddlm_jax import train
from ddlm_jax.data import tokenizers
from ddlm_jax.networks import layers
from ddlm_jax.networks import transformer
from ddlm_jax.processes import autoregressive
from ddlm_jax.processes import masked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import ar_tiny  # pylint: disable=g-import-not-at-top
from experiments import bd3lm_tiny  # pylint: disable=g-import-not-at-top
from experiments import mdlm_tiny  # pylint: disable=g-import-not-at-top

VOCAB_SIZE = 16


def test_the_annealed_mask_goes_from_causal_to_bidirectional():
  key, causal_LL = jax.random.key(0), np.tril(np.ones((64, 64), bool))
  np.testing.assert_array_equal(layers.annealed_causal_mask(key, 64, 0.0)[0], causal_LL)
  np.testing.assert_array_equal(layers.annealed_causal_mask(key, 64, 1.0)[0], np.ones((64, 64), bool))
  halfway_LL = np.asarray(layers.annealed_causal_mask(key, 64, 0.3)[0])
  assert halfway_LL[causal_LL].all()
  assert abs(halfway_LL[~causal_LL].mean() - 0.3) < 0.03  # 2,016 draws: 3 standard errors is 0.031


def networks(seed=0):
  """An AR network and the shifted bidirectional network over the same parameters."""
  ar = transformer.TransformerConfig(vocab_size=VOCAB_SIZE, max_len=12, num_layers=2, num_heads=2, embed_dim=16,
                                     mlp_dim=32, causal=True)
  shifted = transformer.TransformerConfig(vocab_size=VOCAB_SIZE, max_len=13, num_layers=2, num_heads=2,
                                          embed_dim=16, mlp_dim=32, shift_start_id=tokenizers.BOS_ID)
  model = transformer.Transformer(ar, rngs=nnx.Rngs(seed))
  _, params = nnx.split(model, nnx.Param)
  _, shifted_params = nnx.split(transformer.Transformer(shifted, rngs=nnx.Rngs(seed + 1)), nnx.Param)
  assert jax.tree.structure(params) == jax.tree.structure(shifted_params)  # the same parameters
  return model, nnx.merge(nnx.graphdef(transformer.Transformer(shifted, rngs=nnx.Rngs(0))), params)


def test_at_ratio_0_the_shifted_network_is_the_autoregressive_one():
  ar_model, adapted = networks()
  x_BL = jax.random.randint(jax.random.key(1), (3, 12), 4, VOCAB_SIZE)
  process = autoregressive.Autoregressive(vocab_size=VOCAB_SIZE, bos_id=tokenizers.BOS_ID)
  expected_BLV = ar_model(process.inputs(x_BL))  # teacher forcing: position i predicted from x^{<i}
  at_zero_BLV = adapted(x_BL, anneal=(jnp.float32(0.0), jax.random.key(2)))
  np.testing.assert_allclose(at_zero_BLV, expected_BLV, atol=1e-5)
  at_one_BLV = adapted(x_BL, anneal=(jnp.float32(1.0), jax.random.key(2)))
  np.testing.assert_allclose(at_one_BLV, adapted(x_BL), atol=1e-6)  # bidirectional: the model's own
  assert not np.allclose(at_one_BLV, expected_BLV, atol=1e-3)


def test_the_shift_carries_a_perfect_denoiser_through_the_bound_and_the_sampler():
  dist = testing.TinyDistribution.random((4, 5, 6), length=4, seed=3)
  exact_fn = testing.exact_masked_denoiser(dist, VOCAB_SIZE, tokenizers.MASK_ID)

  def next_token_convention(tokens_BS, t_B, visible_BL=None):
    """The exact denoiser written as an AR network: slot s predicts the token in slot s + 1."""
    assert visible_BL is None
    logits_BLV = exact_fn(tokens_BS[:, 1:], t_B)
    return jnp.concatenate([logits_BLV, jnp.zeros_like(logits_BLV[:, :1])], axis=1)

  shifted_fn = transformer.next_token_shift(next_token_convention, tokenizers.BOS_ID)
  process = masked.MaskedDiffusion(vocab_size=VOCAB_SIZE, mask_id=tokenizers.MASK_ID,
                                   schedule=schedules.Schedule("linear"), antithetic_time=False)
  x0_BL = jnp.asarray(dist.sample(64, seed=4))
  bound = lambda fn: jax.jit(lambda x, key: process.nelbo(fn, x, key).nats_B)(x0_BL, jax.random.key(5))
  np.testing.assert_allclose(bound(shifted_fn), bound(exact_fn), rtol=1e-6)
  config = samplers.SamplerConfig(steps=4)
  fixed_BL = jnp.zeros((64, 4), bool)
  draw = lambda fn: jax.jit(lambda key: samplers.sample(fn, process, config, jnp.zeros((64, 4), jnp.int32),
                                                         fixed_BL, key))(jax.random.key(6))
  np.testing.assert_array_equal(draw(shifted_fn), draw(exact_fn))


def test_the_jitted_step_anneals_inside_without_recompiling():
  config = config_lib.base_config()
  config.data.seq_len = 16
  config.model.update(num_layers=1, num_heads=1, embed_dim=16, mlp_dim=16, shift_logits=True)
  config.train.update(warmup_steps=0, attention_anneal_steps=4)
  config_lib.validate(config)
  experiment = experiment_lib.make_experiment(config, VOCAB_SIZE)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
  optimizer = experiment_lib.make_optimizer(config.train)
  graphdef, state, shardings = train.init_state(experiment, config, mesh, optimizer)
  step_fn = train.make_train_step(experiment, graphdef, optimizer, mesh, shardings, attention_anneal_steps=4)
  rows_BL = jax.random.randint(jax.random.key(0), (4, 16), 4, VOCAB_SIZE)
  initial_params = jax.device_get(state.params)
  ratios, losses = [], []
  for _ in range(6):
    state, metrics = step_fn(state, rows_BL, jax.random.key(1))
    ratios.append(float(metrics["attention_anneal_ratio"]))
    losses.append(float(metrics["loss"]))
  assert ratios == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
  # The first step's loss is that of the causal network: the mask reaches the network inside the step.
  loss_key, _, _, anneal_key = jax.random.split(jax.random.fold_in(jax.random.key(1), 0), 4)
  first_loss = lambda anneal: float(experiment.process.loss(
      experiment_lib.bind(graphdef, initial_params, anneal=anneal), rows_BL, loss_key)[0])
  assert losses[0] == pytest.approx(first_loss((jnp.float32(0.0), anneal_key)), rel=1e-5)
  assert losses[0] != pytest.approx(first_loss(None), rel=1e-3)
  assert step_fn._cache_size() == 1  # one compilation: the ratio and the mask are computed inside


@pytest.mark.parametrize("change,message", [
    (dict(process=dict(name="autoregressive"), model=dict(shift_logits=True)), "shift_logits"),
    (dict(process=dict(name="gaussian", latent_dim=8, schedule="sqrt"), model=dict(shift_logits=True, time_conditioning=True)),
     "shift_logits"),
    (dict(process=dict(name="autoregressive"), train=dict(attention_anneal_steps=10)), "attention_anneal_steps"),
    (dict(model=dict(shift_logits=True), sample=dict(method="blockwise", block_length=16, cache="dual")), "cache"),
    (dict(process=dict(name="block", block_size=8), model=dict(shift_logits=True)), "cache 'none'"),
])
def test_settings_adaptation_cannot_use_are_refused(change, message):
  config = config_lib.base_config()
  for group, values in change.items():
    config[group].update(values)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_an_autoregressive_run_adapts_to_masked_diffusion_and_samples(tmp_path):
  ar = ar_tiny.get_config()
  ar.data.update(num_train_docs=200, seq_len=64)
  ar.train.update(num_steps=2, checkpoint_every=2)
  ar.eval.update(max_docs=16)
  train.train_and_evaluate(ar, str(tmp_path / "ar"))
  adapted = mdlm_tiny.get_config()
  adapted.data.update(num_train_docs=200, seq_len=64)
  adapted.model.shift_logits = True
  adapted.train.update(num_steps=4, checkpoint_every=4, attention_anneal_steps=2)
  adapted.eval.update(max_docs=16)
  adapted.init_from = str(tmp_path / "ar")
  summary = train.train_and_evaluate(adapted, str(tmp_path / "adapted"))
  assert summary["init_from"]["process"] == "autoregressive" and np.isfinite(summary["bits_per_token"])
  model = pipeline.load(str(tmp_path / "adapted"))
  assert model.graphdef is not None and len(model.generate(["The Golden"], steps=8)) == 1
  assert np.isfinite(model.score("The Golden Lantern is a pub.").bits_per_token)


BLOCK = 4


def test_the_annealed_block_mask_goes_from_causal_to_block_diffusion():
  key, length = jax.random.key(0), 16
  causal_LL = np.tril(np.ones((length, length), bool))
  earlier_LL = np.greater.outer(np.arange(length) // BLOCK, np.arange(length) // BLOCK)
  same_LL = np.equal.outer(np.arange(length) // BLOCK, np.arange(length) // BLOCK)
  at_zero = np.asarray(layers.annealed_block_diffusion_mask(key, length, BLOCK, 0.0)[0])
  # Each copy attends as an AR network: the clean blocks before it and its own block up to itself.
  np.testing.assert_array_equal(at_zero[:length], np.concatenate([same_LL & causal_LL, earlier_LL], axis=1))
  np.testing.assert_array_equal(at_zero[length:], np.concatenate([0 * same_LL, causal_LL], axis=1).astype(bool))
  np.testing.assert_array_equal(layers.annealed_block_diffusion_mask(key, length, BLOCK, 1.0),
                                layers.block_diffusion_mask(length, BLOCK))
  halfway = np.asarray(layers.annealed_block_diffusion_mask(key, length, BLOCK, 0.5)[0])
  later_in_block_LL = same_LL & ~causal_LL
  assert 0.3 < halfway[:length, :length][later_in_block_LL].mean() < 0.7 and not halfway[:length, length:][same_LL].any()


def block_networks(seed=0):
  """An AR network and the shifted block network over the same parameters."""
  ar = transformer.TransformerConfig(vocab_size=VOCAB_SIZE, max_len=12, num_layers=2, num_heads=2, embed_dim=16,
                                     mlp_dim=32, causal=True)
  shifted = transformer.TransformerConfig(vocab_size=VOCAB_SIZE, max_len=12, num_layers=2, num_heads=2,
                                          embed_dim=16, mlp_dim=32, block_size=BLOCK, shift_start_id=tokenizers.BOS_ID)
  model = transformer.Transformer(ar, rngs=nnx.Rngs(seed))
  _, params = nnx.split(model, nnx.Param)
  return model, nnx.merge(nnx.graphdef(transformer.Transformer(shifted, rngs=nnx.Rngs(0))), params)


def test_at_ratio_0_the_shifted_block_network_is_the_autoregressive_one():
  ar_model, adapted = block_networks()
  x_BL = jax.random.randint(jax.random.key(1), (3, 12), 4, VOCAB_SIZE)
  process = autoregressive.Autoregressive(vocab_size=VOCAB_SIZE, bos_id=tokenizers.BOS_ID)
  expected_BLV = ar_model(process.inputs(x_BL))
  at_zero_BLV = adapted(x_BL, clean_tokens_BL=x_BL, anneal=(jnp.float32(0.0), jax.random.key(2)))
  np.testing.assert_allclose(at_zero_BLV, expected_BLV, atol=1e-5)
  at_one_BLV = adapted(x_BL, clean_tokens_BL=x_BL, anneal=(jnp.float32(1.0), jax.random.key(2)))
  np.testing.assert_allclose(at_one_BLV, adapted(x_BL, clean_tokens_BL=x_BL), atol=1e-6)
  assert not np.allclose(at_one_BLV, expected_BLV, atol=1e-3)


def test_the_shifted_block_network_samples_with_the_logits_it_was_trained_with():
  _, adapted = block_networks(seed=3)
  x0_BL = jax.random.randint(jax.random.key(4), (2, 12), 4, VOCAB_SIZE)
  noised_BL = jnp.where(jax.random.bernoulli(jax.random.key(5), 0.5, x0_BL.shape), tokenizers.MASK_ID, x0_BL)
  trained_BLV = adapted(noised_BL, clean_tokens_BL=x0_BL)  # the training pass: every block at once
  for block in range(12 // BLOCK):
    # Sampling block `block`: the blocks before it finished (clean), it noised, the later ones masked.
    canvas_BL = jnp.concatenate([x0_BL[:, :block * BLOCK], noised_BL[:, block * BLOCK:(block + 1) * BLOCK],
                                 jnp.full((2, 12 - (block + 1) * BLOCK), tokenizers.MASK_ID)], axis=1)
    window = slice(block * BLOCK, (block + 1) * BLOCK)
    np.testing.assert_allclose(adapted(canvas_BL)[:, window], trained_BLV[:, window], atol=1e-5)


def test_an_autoregressive_run_adapts_to_block_diffusion_and_samples(tmp_path):
  ar = ar_tiny.get_config()
  ar.data.update(num_train_docs=200, seq_len=32)
  ar.train.update(num_steps=2, checkpoint_every=2)
  ar.eval.update(max_docs=16)
  train.train_and_evaluate(ar, str(tmp_path / "ar"))
  adapted = bd3lm_tiny.get_config()
  adapted.data.update(num_train_docs=200, seq_len=32)
  adapted.model.update({**ar.model.to_dict(), "shift_logits": True})
  adapted.sample.cache = "none"
  adapted.train.update(num_steps=4, checkpoint_every=4, attention_anneal_steps=2)
  adapted.eval.update(max_docs=16)
  adapted.init_from = str(tmp_path / "ar")
  summary = train.train_and_evaluate(adapted, str(tmp_path / "adapted"))
  assert summary["init_from"]["process"] == "autoregressive" and np.isfinite(summary["bits_per_token"])
  model = pipeline.load(str(tmp_path / "adapted"))
  prompt = "The Golden"
  assert model.generate([prompt])[0].startswith(prompt)
  assert np.isfinite(model.score("The Golden Lantern is a pub.").bits_per_token)
