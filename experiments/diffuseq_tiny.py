"""DiffuSeq at the tiny size of `mdlm_tiny`: data-to-text on the embedded corpus, for tests and a first look.

  python -m ddlm_jax.main --config=experiments/diffuseq_tiny.py --workdir=/tmp/diffuseq_tiny
  python -m ddlm_jax.main --config=experiments/diffuseq_tiny.py:text_to_data --workdir=/tmp/diffuseq_tiny_t2d

Variants: a TASK of `experiments/seq2seq.py` ('data_to_text', the default, 'text_to_data' or
'control'); the real sizes and the masked and AR baselines are in `experiments/seq2seq.py`.
"""
from experiments import mdlm_tiny
from experiments import seq2seq


def get_config(variant: str = "data_to_text"):
  config = seq2seq.get_config(f"diffuseq,{variant}")
  tiny = mdlm_tiny.get_config()
  for group in ("model", "train", "eval"):
    config[group].update({key: value for key, value in tiny[group].items() if key != "time_conditioning"})
  config.data.update(num_train_docs=tiny.data.num_train_docs, num_eval_docs=tiny.data.num_eval_docs)
  config.process.update(num_steps=200, latent_dim=8)
  config.sample.update(num_samples=4, steps=16)
  return config
