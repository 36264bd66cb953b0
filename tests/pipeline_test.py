"""The user-facing Pipeline: the README's examples, inputs a new user tries, guidance, trajectories,
the compile cache, and the held-out bound of a pair task."""
import ast
import os
import string
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import ddlm_jax
from ddlm_jax import config as config_lib
from ddlm_jax import control
from ddlm_jax import evaluate
from ddlm_jax import experiment
from ddlm_jax import guidance
from ddlm_jax import pipeline
from ddlm_jax import train
from ddlm_jax.data import datasets
from ddlm_jax.data import pairs
from ddlm_jax.data import tokenizers
from ddlm_jax.networks import classifier
from ddlm_jax.networks import transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import ar_tiny  # pylint: disable=g-import-not-at-top
from experiments import d3pm_absorbing_tiny  # pylint: disable=g-import-not-at-top
from experiments import diffusion_lm_tiny  # pylint: disable=g-import-not-at-top
from experiments import mdlm_tiny  # pylint: disable=g-import-not-at-top

CHAR_TOKENIZER = tokenizers.CharTokenizer(string.ascii_letters + " .,'")


def untrained(config, tokenizer: tokenizers.Tokenizer = CHAR_TOKENIZER, seed: int = 0) -> pipeline.Pipeline:
  """A Pipeline of a freshly initialised network of `config` (nothing trained or saved)."""
  built = experiment.make_experiment(config, tokenizer.vocab_size)
  graphdef, params = nnx.split(transformer.Transformer(built.model, rngs=nnx.Rngs(seed)), nnx.Param)
  return pipeline.Pipeline(graphdef=graphdef, params=params, tokenizer=tokenizer, process=built.process,
                           seq_len=built.data.seq_len, config=config)


def short_char_config(module):
  config = module.get_config()
  config.data.seq_len = 24
  return config


# The README's "Using it" Python block, run as written on two tiny trained models.

def readme_python_block() -> str:
  with open(os.path.join(ROOT, "README.md")) as file:
    after = file.read().split("## Using it", 1)[1]
  return after.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture(scope="module")
def trained_workdirs(tmp_path_factory):
  """Workdirs of a masked and an autoregressive tiny model, 100 steps each (about 10 s each here)."""
  workdirs = {}
  for name, module in (("masked", mdlm_tiny), ("ar", ar_tiny)):
    config = module.get_config()
    config.train.update(num_steps=100, checkpoint_every=100)
    workdirs[name] = str(tmp_path_factory.mktemp(name))
    train.train_and_evaluate(config, workdirs[name])
  return workdirs


def test_readme_python_examples_return_text(trained_workdirs):
  block = readme_python_block()
  assert '"/tmp/run"' in block and '"/tmp/ar"' in block
  block = block.replace('"/tmp/run"', repr(trained_workdirs["masked"])).replace('"/tmp/ar"', repr(trained_workdirs["ar"]))
  namespace, results = {}, []
  for statement in ast.parse(block).body:
    if isinstance(statement, ast.Expr):
      results.append(eval(compile(ast.Expression(statement.value), "README.md", "eval"), namespace))
    else:
      exec(compile(ast.Module([statement], type_ignores=[]), "README.md", "exec"), namespace)
  samples = [result for result in results if isinstance(result, list)]
  scores = [result for result in results if isinstance(result, float)]
  assert len(samples) == 6 and len(scores) == 1, results
  for texts in samples:
    assert texts and all(isinstance(text, str) and text.strip() for text in texts), samples
  assert all(samples[i][0].startswith("The Golden") for i in (0, 2, 3, 5))
  assert len(samples[1]) == 4 and len(samples[4]) == 2
  assert np.isfinite(scores[0]) and scores[0] > 0


def test_a_string_is_one_prompt_and_empty_requests_are_refused(trained_workdirs):
  model = ddlm_jax.load(trained_workdirs["masked"])
  texts = model.generate("The Golden", steps=4)
  assert len(texts) == 1 and texts[0].startswith("The Golden")
  assert model.score("The Golden Lantern is a pub.", num_samples=2).num_sequences == 1
  with pytest.raises(ValueError, match="non-empty"):
    model.generate([])
  with pytest.raises(ValueError, match="num_samples must be >= 1"):
    model.generate(None, num_samples=0)
  with pytest.raises(ValueError, match="texts is empty"):
    model.score([])
  with pytest.raises(ValueError, match=r"texts \[1\] have no tokens"):
    model.score(["A pub.", ""])


def test_an_empty_text_is_refused_by_a_char_model_instead_of_scoring_inf():
  model = untrained(short_char_config(mdlm_tiny))
  with pytest.raises(ValueError, match="no tokens"):
    model.score([""], num_samples=2)


# Guidance, trajectories and the compile cache, on untrained networks.

@pytest.mark.parametrize("module", [ar_tiny, mdlm_tiny], ids=["ar", "masked"])
def test_generate_samples_what_generate_tokens_samples_on_the_prompt_canvas(module):
  model = untrained(short_char_config(module))
  prompts, settings = ["ab", "c d"], dict(steps=3, strategy="random", temperature=1.0)
  texts = model.generate(prompts, seed=5, **settings)
  fixed_tokens_NL, fixed_NL = model._canvas(prompts, [{}, {}], model.seq_len)
  tokens_NL = experiment.generate_tokens(model.graphdef, model.params, model.process, model._sampler_config(settings),
                                         fixed_tokens_NL, fixed_NL, jax.random.key(5),
                                         eos_id=model.tokenizer.eos_id, pad_id=model.tokenizer.pad_id)
  assert texts == [model.tokenizer.decode(row) for row in np.asarray(tokens_NL).tolist()]


def test_guidance_scale_without_a_condition_is_refused():
  model = untrained(short_char_config(mdlm_tiny))
  with pytest.raises(ValueError, match="guidance_scale.*needs a condition.*translate"):
    model.generate(num_samples=2, steps=2, guidance_scale=3.0)
  assert len(model.generate(num_samples=2, steps=2, guidance_scale=1.0)) == 2


def test_record_trajectory_returns_every_step_of_every_row():
  model = untrained(short_char_config(mdlm_tiny))
  steps, mask_id = 6, model.tokenizer.mask_id
  texts, trajectory_SNL = model.generate(["ab", "c", "de"], steps=steps, strategy="random", batch_size=2,
                                         record_trajectory=True)
  assert trajectory_SNL.shape == (steps, 3, model.seq_len) and trajectory_SNL.dtype == np.int32
  masks_SN = (trajectory_SNL == mask_id).sum(-1)
  assert (np.diff(masks_SN, axis=0) <= 0).all() and (masks_SN[0] > 0).all() and (masks_SN[-1] == 0).all()
  assert [model.tokenizer.decode(row) for row in trajectory_SNL[-1]] == texts
  assert texts == model.generate(["ab", "c", "de"], steps=steps, strategy="random")
  with pytest.raises(ValueError, match="record_trajectory needs a diffusion process"):
    untrained(short_char_config(ar_tiny)).generate(num_samples=1, record_trajectory=True)


def random_guide(model: pipeline.Pipeline, seed: int) -> guidance.ClassifierGuide:
  """Classifier guidance by an untrained classifier (initialised with `seed`) toward class 1."""
  config = classifier.ClassifierConfig(vocab_size=model.process.vocab_size, num_classes=(2,), max_len=model.seq_len,
                                       num_layers=1, num_heads=2, embed_dim=16, mlp_dim=16)
  graphdef, params = nnx.split(classifier.NoisyClassifier(config, rngs=nnx.Rngs(seed)), nnx.Param)
  embeddings_VD = experiment.bind(model.graphdef, model.params).embeddings_VD
  log_prob_fn = control.attribute_log_prob_fn(graphdef, params, model.process, embeddings_VD, {0: 1})
  return guidance.classifier_guidance(log_prob_fn, guidance.ClassifierGuidance(scale=30.0))


def test_new_guides_of_one_structure_reuse_the_compiled_sampler():
  config = short_char_config(diffusion_lm_tiny)
  model = untrained(config)
  settings = dict(num_samples=4, steps=3, clamp=False, temperature=1.0)
  guided = [model.generate(guide_fn=random_guide(model, seed), **settings) for seed in (1, 2, 1)]
  assert len(model._samplers) == 1
  assert next(iter(model._samplers.values()))._cache_size() == 1
  assert guided[0] == guided[2] and guided[0] != guided[1]  # each guide's own parameters are used
  assert untrained(config).generate(guide_fn=random_guide(model, 2), **settings) == guided[1]


# A pair task's held-out bound.

@pytest.fixture(scope="module")
def pair_task(tmp_path_factory):
  """(untrained D3PM pipeline on the data-to-text task, its workdir holding the tokenizer)."""
  config = d3pm_absorbing_tiny.get_config()
  config.data.update(task="data_to_text", num_train_docs=200, num_eval_docs=8, seq_len=96)
  config.process.num_steps = 8
  config.eval.update(batch_size=8, elbo_samples=4, max_docs=8)
  workdir = str(tmp_path_factory.mktemp("pairs"))
  data = datasets.load_data(config_lib.data_config(config), workdir)
  return untrained(config, data.tokenizer), workdir, data


def test_exact_time_sum_scores_the_targets_of_a_pair_task_only(pair_task):
  """The exact-time-sum bound of each held-out row is D3PM's bound of its target with the source
  as the prompt (never noised, never scored), not of the whole row."""
  model, workdir, data = pair_task
  result = model.evaluate(workdir, exact_time_sum=True)
  model_fn = experiment.bind(model.graphdef, model.params)
  rows_NL = data.eval_rows
  bound = jax.jit(lambda key, prompt_NL: model.process.nelbo_exact_time(model_fn, rows_NL, key, prompt_NL).nats_B)
  reference_bits = lambda prompt_NL: np.mean([bound(jax.random.key(100 + i), prompt_NL) for i in range(4)],
                                             axis=0) / np.log(2)
  with_source_as_prompt = reference_bits(pairs.source_mask(rows_NL, model.tokenizer.eos_id))
  whole_row = reference_bits(None)
  assert (whole_row > 1.3 * with_source_as_prompt).all()  # the source costs many bits when it is scored
  np.testing.assert_allclose(result.bits_per_sequence, with_source_as_prompt, rtol=0.1)
  assert result.num_tokens == data.eval_num_tokens.sum() and result.exact_time_sum


def test_evaluate_scores_the_rows_that_config_eval_rows_picks(pair_task, monkeypatch):
  model, workdir, _ = pair_task
  picked = []
  monkeypatch.setattr(evaluate, "held_out_elbo", lambda *args, rows, **kwargs: picked.append(rows))
  model.evaluate(workdir)
  model.evaluate(workdir, rows="first")
  monkeypatch.setattr(model.config.eval, "rows", "first")
  model.evaluate(workdir)
  assert picked == ["spread", "first", "first"]


def test_translate_takes_one_source_string_and_refuses_an_empty_list(pair_task):
  model, _, data = pair_task
  targets = model.translate(data.eval_sources[0], steps=2)
  assert len(targets) == 1 and isinstance(targets[0], str)
  with pytest.raises(ValueError, match="sources is empty"):
    model.translate([])
  with pytest.raises(ValueError, match="record_trajectory applies to generate"):
    model.translate(data.eval_sources[0], record_trajectory=True)
  result = model.score(data.eval_targets[0], sources=data.eval_sources[0], num_samples=2)
  assert result.num_sequences == 1
