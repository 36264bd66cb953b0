"""Diffusion-LM and DiffuSeq through the launcher path and API: train, load, sample, infill, translate, score."""
import itertools
import os
import sys

import numpy as np
import pytest

import ddlm_jax
from ddlm_jax import config as config_lib
from ddlm_jax import control
from ddlm_jax import experiment as experiment_lib
from ddlm_jax import guidance
from ddlm_jax import train
from ddlm_jax.data import batching
from ddlm_jax.data import corpus
from ddlm_jax.networks import classifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from experiments import compare  # pylint: disable=g-import-not-at-top
from experiments import diffuseq_tiny  # pylint: disable=g-import-not-at-top
from experiments import diffusion_lm  # pylint: disable=g-import-not-at-top
from experiments import diffusion_lm_tiny  # pylint: disable=g-import-not-at-top
from experiments import seq2seq  # pylint: disable=g-import-not-at-top
from families_test import short  # pylint: disable=g-import-not-at-top


def test_diffusion_lm_trains_samples_infills_and_scores(tmp_path):
  summary = train.train_and_evaluate(short(diffusion_lm_tiny.get_config()), str(tmp_path))
  assert summary["step"] == 12 and summary["bits_per_token"] > summary["generator_bits_per_token"]
  model = ddlm_jax.load(str(tmp_path))
  assert model.process.continuous and model.process.latent_dim == 8
  for settings in (dict(strategy="ancestral", clamp=True), dict(strategy="ddim", eta=0.0, clamp=False)):
    assert len(model.generate(num_samples=2, steps=4, **settings)) == 2
  # Infilling: a constraint placed right after the prompt survives sampling unchanged.
  position = len(model.tokenizer.encode("The"))
  texts = model.generate(["The"], constraints=[{position: " Italian"}], steps=4, seed=3)
  assert texts[0].startswith("The Italian")
  scores = model.score(["The Golden Lantern is a pub."], num_samples=2)
  assert np.isfinite(scores.bits_per_sequence).all()
  with pytest.raises(ValueError, match="does not fit"):
    model.generate(constraints=[{10_000: "x"}])
  with pytest.raises(ValueError, match="pair task"):
    model.translate(["food: Italian"])
  with pytest.raises(ValueError, match="pair task"):
    model.score(["The Golden Lantern is a pub."], sources=["food: Italian"])


def test_classifier_guidance_steers_a_tiny_diffusion_lm_toward_a_target_area(tmp_path):
  """Control end to end on the embedded corpus: a tiny Diffusion-LM (300 steps), a classifier of
  'area' on its noisy embeddings, and samples with and without guidance toward area=riverside.
  Success is the word 'riverside' in the sample. Measured here (jax 0.10, CPU): 0 of 32 unguided,
  7 of 32 guided at scale 10."""
  config = diffusion_lm_tiny.get_config()
  config.train.update(num_steps=300, checkpoint_every=300, log_every=100)
  config.eval.update(max_docs=16)
  train.train_and_evaluate(config, str(tmp_path))
  model = ddlm_jax.load(str(tmp_path))
  reference = corpus.default_corpus()
  documents = reference.sample(2_000, corpus.split_seed("train"))
  rows_NL = batching.pad_documents([model.tokenizer.encode(doc.text) for doc in documents], model.seq_len,
                                   eos_id=model.tokenizer.eos_id, pad_id=model.tokenizer.pad_id)
  labels_NA = reference.attribute_labels([doc.record for doc in documents], ["area"])
  embeddings_VD = experiment_lib.bind(model.graphdef, model.params).embeddings_VD
  areas = reference.attribute_values()["area"]
  config = classifier.ClassifierConfig(vocab_size=model.process.vocab_size, num_classes=(len(areas),),
                                       max_len=model.seq_len, num_layers=1, embed_dim=32, mlp_dim=64)
  graphdef, params = control.train_classifier(model.process, embeddings_VD, rows_NL, labels_NA, config,
                                              num_steps=300, batch_size=32, learning_rate=3e-3)
  log_prob_fn = control.attribute_log_prob_fn(graphdef, params, model.process, embeddings_VD,
                                              {0: areas.index("riverside")})
  guide_fn = guidance.classifier_guidance(log_prob_fn, guidance.ClassifierGuidance(scale=10.0))
  hits = {name: sum("riverside" in text for text in model.generate(num_samples=32, steps=50, seed=1, guide_fn=fn))
          for name, fn in (("unguided", None), ("guided", guide_fn))}
  print(f"samples with 'riverside' (of 32): {hits}")
  assert hits["guided"] >= hits["unguided"] + 4


@pytest.mark.parametrize("family", ["diffuseq", "ar"])
def test_seq2seq_trains_and_translates(tmp_path, family):
  config = short(diffuseq_tiny.get_config("control"))
  if family == "ar":
    config.process.update(**seq2seq.FAMILIES["ar"])
    config.model.time_conditioning = False
    config.sample.update(clamp=False, temperature=0.0)
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(summary["bits_per_token"])
  model = ddlm_jax.load(str(tmp_path))
  source = corpus.format_record({"food": "Italian", "area": "riverside"})
  guided = {} if family == "ar" else dict(guidance_scale=2.0, num_candidates=2)
  outputs = model.translate([source, source], steps=4, seed=0, **guided)
  assert len(outputs) == 2 and all(isinstance(text, str) for text in outputs)
  # Targets are scored given their sources; the source is read, never scored.
  target = "The Golden Lantern is an Italian restaurant by the riverside."
  other_source = corpus.format_record({"food": "Thai", "area": "seafront"})
  scores = model.score([target, target], sources=[source, other_source], num_samples=2)
  assert np.isfinite(scores.bits_per_sequence).all() and scores.num_tokens == 2 * len(model.tokenizer.encode(target))
  if family == "ar":  # exact: the same target costs a different number of bits after another source
    assert scores.bits_per_sequence[0] != scores.bits_per_sequence[1]
  with pytest.raises(ValueError, match="sources"):
    model.score([target])
  with pytest.raises(ValueError, match="no room"):
    model.translate([source + " word" * 200])


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.model.update(time_conditioning=False), "time_conditioning"),
    (lambda c: c.sample.update(strategy="low_confidence"), "reveals tokens"),
    (lambda c: c.process.update(schedule="linear"), "noise schedule"),
    (lambda c: c.train.update(condition_dropout=0.1), "pair task"),
    (lambda c: c.sample.update(guidance_scale=2.0), "pair task"),
])
def test_bad_continuous_settings_fail_at_start_up(edit, message):
  config = diffusion_lm.get_config()
  edit(config)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_ddim_and_clamp_need_the_gaussian_family():
  config = compare.get_config("mdlm")
  config.sample.strategy = "ddim"
  with pytest.raises(ValueError, match="config.sample: 'ddim'.* work on embeddings"):
    config_lib.validate(config)


def test_every_variant_is_a_valid_config():
  for variant in diffusion_lm.VARIANTS:
    config_lib.validate(diffusion_lm.get_config(variant))
  for family, task, size in itertools.product(seq2seq.FAMILIES, seq2seq.TASKS, seq2seq.SIZES):
    config_lib.validate(seq2seq.get_config(f"{family},{task},{size}"))
  assert seq2seq.get_config("mdlm,text_to_data").data.task == "text_to_data"
  assert compare.get_config("ar,shakespeare").data.source == "text_files"  # shorter variants take defaults
  for bad in ("gpt", "diffuseq,poetry", "a,b,c,d"):
    with pytest.raises(ValueError, match="unknown variant"):
      seq2seq.get_config(bad)
