"""Pipeline.score scores exactly a text (and, by choice, its [EOS]), never padding: the same number
whatever the batch, the canvas length or what lies after the text. Untrained tiny networks with
randomised parameters, so that every position reaches every other."""
import dataclasses
import os
import string
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddlm_jax import experiment
from ddlm_jax import pipeline
from ddlm_jax.data import tokenizers
from ddlm_jax.networks import transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import ar_tiny  # pylint: disable=g-import-not-at-top
from experiments import bd3lm_tiny  # pylint: disable=g-import-not-at-top
from experiments import mdlm_tiny  # pylint: disable=g-import-not-at-top

TOKENIZER = tokenizers.CharTokenizer(string.ascii_letters + " .,'")
CANVAS = 32


def randomised_pipeline(module, packing: str) -> pipeline.Pipeline:
  """A Pipeline of `module`'s tiny network on a canvas of 32, its parameters N(0, 0.3^2)."""
  config = module.get_config()
  config.data.update(seq_len=CANVAS, packing=packing)
  built = experiment.make_experiment(config, TOKENIZER.vocab_size)
  graphdef, params = nnx.split(transformer.Transformer(built.model, rngs=nnx.Rngs(0)), nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [0.3 * jax.random.normal(key, leaf.shape) for key, leaf in zip(keys, leaves)])
  return pipeline.Pipeline(graphdef=graphdef, params=params, tokenizer=TOKENIZER, process=built.process,
                           seq_len=CANVAS, config=config)


def hand_nll_nats(model: pipeline.Pipeline, ids: list[int]) -> float:
  """-sum_l log p(ids[l] | ids[:l]) from the causal network's logits over [BOS, ids[:-1]] alone,
  the softmax over the vocabulary without [BOS] and [MASK]."""
  inputs_1N = jnp.array([[model.process.bos_id, *ids[:-1]]])
  logits_NW = nnx.merge(model.graphdef, model.params)(inputs_1N, jnp.zeros((1,)))[0]
  logits_NV = logits_NW[:, :model.process.vocab_size].at[:, list(model.process.never_targets)].set(-jnp.inf)
  log_probs_NV = jax.nn.log_softmax(logits_NV)
  return -float(log_probs_NV[jnp.arange(len(ids)), jnp.array(ids)].sum())


@pytest.mark.parametrize("packing, eos", [("pad", None), ("pad", False), ("pack", None), ("pack", True)])
def test_an_autoregressive_score_is_the_nll_of_exactly_the_text(packing, eos):
  """eos None means True for a model trained on padded documents, False on packed rows."""
  model = randomised_pipeline(ar_tiny, packing)
  text, others = "a cat sat", ["the dog ran off", "hi"]
  ids = TOKENIZER.encode(text) + ([TOKENIZER.eos_id] if (packing == "pad" if eos is None else eos) else [])
  settings = {} if eos is None else dict(eos=eos)
  alone = model.score(text, **settings)
  np.testing.assert_allclose(alone.bits_per_sequence[0] * np.log(2), hand_nll_nats(model, ids), rtol=1e-5)
  assert alone.num_tokens == len(text)  # the [EOS] is scored, not counted
  in_a_batch = model.score([others[0], text, others[1]], **settings)
  np.testing.assert_allclose(in_a_batch.bits_per_sequence[1], alone.bits_per_sequence[0], rtol=1e-6)


@pytest.mark.parametrize("module", [mdlm_tiny, bd3lm_tiny], ids=["masked", "block"])
def test_a_packed_diffusion_score_does_not_see_the_canvas_after_the_text(module):
  """The same draws give the same bound on a canvas of 32, of 24 and of the text's own length."""
  text = "a cat sat on it"  # 15 tokens: not a whole number of blocks of 4
  model = randomised_pipeline(module, "pack")
  bits = lambda seq_len: dataclasses.replace(model, seq_len=seq_len).score(text, num_samples=3, seed=4).bits_per_sequence
  on_canvas = bits(CANVAS)
  for seq_len in (24, len(text)):
    np.testing.assert_allclose(bits(seq_len), on_canvas, rtol=1e-5)
  # The positions after the text may hold anything; without the visibility mask they would count.
  nelbo_fn, ids = model._nelbo_fn(exact_time_sum=False), TOKENIZER.encode(text)
  text_BL = jnp.arange(CANVAS)[None] < len(ids)
  rows_BL = jnp.full((1, CANVAS), TOKENIZER.pad_id).at[0, :len(ids)].set(jnp.array(ids))
  others_BL = jnp.where(text_BL, rows_BL, jax.random.randint(jax.random.key(5), (1, CANVAS), 4, TOKENIZER.vocab_size))
  nats = lambda rows_BL, visible_BL: float(nelbo_fn(model.params, rows_BL, jax.random.key(6), ~text_BL, visible_BL)[0])
  np.testing.assert_allclose(nats(others_BL, text_BL), nats(rows_BL, text_BL), rtol=1e-5)
  assert abs(nats(others_BL, None) - nats(rows_BL, None)) > 1e-3 * abs(nats(rows_BL, None))


def test_a_text_as_long_as_the_canvas_fits_without_its_eos():
  model = randomised_pipeline(mdlm_tiny, "pack")
  text = ("the dog ran off and sat " * 2)[:CANVAS]
  assert model.score(text, num_samples=2).num_tokens == CANVAS
  with pytest.raises(ValueError, match=r"texts \[0\] \(with their \[EOS\]\) have more tokens.*truncate=True"):
    model.score(text, eos=True, num_samples=2)
  assert model.score(text, eos=True, num_samples=2, truncate=True).num_tokens == CANVAS - 1
