"""Controllable generation on the embedded corpus: unguided vs classifier guidance vs classifier-free guidance.

  python -m ddlm_jax.main --config=experiments/diffusion_lm.py --workdir=workdirs/diffusion_lm
  python -m ddlm_jax.main --config=experiments/seq2seq.py:diffuseq,control --workdir=workdirs/seq2seq/diffuseq_control
  python -m ddlm_jax.main --config=experiments/seq2seq.py:mdlm,control --workdir=workdirs/seq2seq/mdlm_control
  python -m benchmarks.control

The target is a pair of attributes (default food=Italian, area=riverside).
- Unguided and classifier-guided rows sample the unconditional Diffusion-LM (--lm). The guided rows
  use a classifier of (food, area) trained here on noisy embeddings of the LM's own table, at each
  guidance scale.
- Classifier-free rows sample each conditional model (--cfg_models: DiffuSeq and masked), trained
  on "food: X | area: Y" -> text with 10% of the sources dropped, at each guidance scale.
Success is read off the text:
- strict: the generator parses it, with the target values;
- mentions: every target value occurs in it.
Fluency is the AR judge's generative perplexity (--ar), beside the samples' unigram entropy and
the share the generator parses. Writes benchmarks/results/control.json.
"""
from absl import app
from absl import flags
from absl import logging
import numpy as np

import ddlm_jax
from benchmarks import common
from ddlm_jax import control
from ddlm_jax import evaluate
from ddlm_jax import experiment
from ddlm_jax import guidance
from ddlm_jax.data import batching
from ddlm_jax.data import corpus
from ddlm_jax.networks import classifier

_LM = flags.DEFINE_string("lm", "workdirs/diffusion_lm", "Unconditional Diffusion-LM workdir.")
_CFG_MODELS = flags.DEFINE_list("cfg_models", ["workdirs/seq2seq/diffuseq_control", "workdirs/seq2seq/mdlm_control"],
                                "Conditional model workdirs.")
_AR = flags.DEFINE_string("ar", "workdirs/compare/ar_embedded", "AR judge workdir.")
_TARGET = flags.DEFINE_list("target", ["food=Italian", "area=riverside"], "attribute=value pairs.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 64, "Samples per row.")
_STEPS = flags.DEFINE_integer("steps", 100, "Sampling steps.")
_CLASSIFIER_SCALES = flags.DEFINE_list("classifier_scales", ["3", "10", "30"], "Classifier-guidance scales gamma.")
_SCALES = flags.DEFINE_list("scales", ["0", "1", "3"], "Classifier-free guidance scales.")
_CLASSIFIER_DOCS = flags.DEFINE_integer("classifier_docs", 20_000, "Training documents of the classifier.")
_CLASSIFIER_STEPS = flags.DEFINE_integer("classifier_steps", 600, "Classifier training steps.")
CFG_FAMILY_NAMES = {"gaussian": "DiffuSeq", "masked": "MDLM"}


def judge(texts, target, encode, ar_model, reference) -> dict:
  records = [reference.parse(text) for text in texts]
  strict = np.mean([record is not None and all(record.get(a) == v for a, v in target.items()) for record in records])
  mentions = np.mean([all(value in text for value in target.values()) for text in texts])
  quality = evaluate.sample_quality(texts, encode, ar_model=ar_model, corpus=reference).summary()
  return {"success_strict": float(strict), "success_mentions": float(mentions),
          **{key: round(value, 4) for key, value in quality.items()}, "example": texts[0]}


def classifier_data(model, reference, attributes, num_docs, split):
  """Token rows and (attribute class) labels of generated documents."""
  documents = reference.sample(num_docs, corpus.split_seed(split))
  rows_NL = batching.pad_documents([model.tokenizer.encode(doc.text) for doc in documents], model.seq_len,
                                   eos_id=model.tokenizer.eos_id, pad_id=model.tokenizer.pad_id)
  return rows_NL, reference.attribute_labels([doc.record for doc in documents], attributes)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  target = dict(pair.split("=", 1) for pair in _TARGET.value)
  reference = corpus.default_corpus()
  values = reference.attribute_values()
  attributes = tuple(target)
  lm, ar_model = ddlm_jax.load(_LM.value), ddlm_jax.load(_AR.value)
  embeddings_VD = experiment.bind(lm.graphdef, lm.params).embeddings_VD
  config = classifier.ClassifierConfig(vocab_size=lm.process.vocab_size, max_len=lm.seq_len,
                                       num_classes=tuple(len(values[a]) for a in attributes))
  rows_NL, labels_NA = classifier_data(lm, reference, attributes, _CLASSIFIER_DOCS.value, "train")
  graphdef, params = control.train_classifier(lm.process, embeddings_VD, rows_NL, labels_NA, config,
                                              num_steps=_CLASSIFIER_STEPS.value, learning_rate=1e-3)
  classes = {i: values[a].index(target[a]) for i, a in enumerate(attributes)}
  log_prob_fn = control.attribute_log_prob_fn(graphdef, params, lm.process, embeddings_VD, classes)
  eval_rows_NL, eval_labels_NA = classifier_data(lm, reference, attributes, 512, "validation")
  targeted = (eval_labels_NA == np.array([classes[i] for i in range(len(attributes))])).all(axis=1)
  classifier_accuracy = {}
  for t in (0.01, 0.1, 0.3):
    accuracy = control.classifier_accuracy(graphdef, params, lm.process, embeddings_VD, eval_rows_NL,
                                           eval_labels_NA, t)
    classifier_accuracy[str(t)] = [round(float(a), 3) for a in accuracy]
  print(f"classifier accuracy per attribute {attributes} at t: {classifier_accuracy}; "
        f"{targeted.mean():.3%} of held-out documents have the target")

  rows = []
  settings = dict(num_samples=_NUM_SAMPLES.value, steps=_STEPS.value, strategy="ancestral", seed=1)
  texts = lm.generate(**settings)
  rows.append({"method": "unguided (Diffusion-LM)", "strength": 0, **judge(texts, target, lm.tokenizer.encode,
                                                                          ar_model, reference)})
  for scale in map(float, _CLASSIFIER_SCALES.value):
    guide_fn = guidance.classifier_guidance(log_prob_fn, guidance.ClassifierGuidance(scale=scale))
    texts = lm.generate(guide_fn=guide_fn, **settings)
    rows.append({"method": "classifier guidance", "strength": scale,
                 **judge(texts, target, lm.tokenizer.encode, ar_model, reference)})
  source = corpus.format_record(target, attributes)
  for workdir in _CFG_MODELS.value:
    cfg_model = ddlm_jax.load(workdir)
    family = CFG_FAMILY_NAMES.get(cfg_model.config.process.name, cfg_model.config.process.name)
    for scale in map(float, _SCALES.value):
      texts = cfg_model.translate([source] * _NUM_SAMPLES.value, steps=_STEPS.value, guidance_scale=scale, seed=1)
      rows.append({"method": f"classifier-free guidance ({family})", "strength": scale,
                   **judge(texts, target, cfg_model.tokenizer.encode, ar_model, reference)})
  for row in rows:
    print(f"| {row['method']} | {row['strength']:g} | {row['success_strict']:.1%} | {row['success_mentions']:.1%} | "
          f"{row.get('generative_perplexity', float('nan')):.1f} | {row['unigram_entropy_bits']:.2f} | "
          f"{row.get('well_formed_fraction', 0):.1%} |")
  path = common.write_json("control", {"target": target, "classifier_accuracy": classifier_accuracy,
                                       "target_share_of_documents": float(targeted.mean()),
                                       "num_samples": _NUM_SAMPLES.value, "steps": _STEPS.value,
                                       "device": common.device_description(), "rows": rows})
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
