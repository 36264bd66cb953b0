"""Sequence to sequence on the embedded corpus: DiffuSeq (Gong et al. 2023) beside masked and AR baselines.

  python -m ddlm_jax.main --config=experiments/seq2seq.py:diffuseq --workdir=workdirs/seq2seq/diffuseq
  python -m ddlm_jax.main --config=experiments/seq2seq.py:mdlm,text_to_data --workdir=workdirs/seq2seq/mdlm_t2d
  python -m ddlm_jax.main --config=experiments/seq2seq.py:diffuseq --workdir=workdirs/seq2seq/diffuseq --mode=sample

Variant `FAMILY[,TASK[,SIZE]]`:
  FAMILY  'diffuseq' (Gaussian diffusion on embeddings, partial noising: the source stays clean),
          'mdlm' (masked diffusion, the source as a fixed prompt) or 'ar' (the autoregressive
          baseline, the source as a prefix).
  TASK    'data_to_text' (the default: attribute record -> description), 'text_to_data'
          (description -> record), or 'control' (data-to-text from food and area alone, trained
          with 10% of the sources dropped, for classifier-free guidance; rows of 80 tokens).
  SIZE    'cpu' (the default, the README's tables: 4 layers of width 128) or 'base' (DiffuSeq's
          12 x 768 transformer with embeddings of size 128, T = 2000; for an accelerator).
Every family trains the same transformer on the same rows; only the target is scored.
"""
from ddlm_jax import config as config_lib

FAMILIES = {
    "diffuseq": dict(name="gaussian", schedule="sqrt", num_steps=2_000, latent_dim=32),
    "mdlm": dict(name="masked", schedule="linear"),
    "ar": dict(name="autoregressive"),
}
TASKS = ("data_to_text", "text_to_data", "control")
SIZES = ("cpu", "base")
CONTROL_ATTRIBUTES = ("food", "area")


def get_config(variant: str = "diffuseq"):
  parts = variant.split(",")
  family, task, size = (parts + ["data_to_text", "cpu"][len(parts) - 1:])[:3] if len(parts) <= 3 else (None,) * 3
  if family not in FAMILIES or task not in TASKS or size not in SIZES:
    raise ValueError(f"unknown variant {variant!r} of seq2seq; expected FAMILY[,TASK[,SIZE]] with FAMILY in "
                     f"{sorted(FAMILIES)}, TASK in {TASKS} and SIZE in {SIZES}")
  config = config_lib.base_config()
  config.process.update(**FAMILIES[family])
  config.data.update(num_train_docs=50_000, num_eval_docs=500, vocab_size=2048, seq_len=80 if task == "control" else 128,
                     task="text_to_data" if task == "text_to_data" else "data_to_text")
  config.model.update(num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512,
                      time_conditioning=family == "diffuseq")
  config.train.update(batch_size=64, num_steps=1_500, learning_rate=1e-3, warmup_steps=100, log_every=50,
                      eval_every=100_000, checkpoint_every=500)
  config.eval.update(batch_size=100, elbo_samples=4, max_docs=500)
  config.sample.update(num_samples=8, steps=100 if family == "diffuseq" else 64, strategy="ancestral",
                       clamp=family == "diffuseq", temperature=0.0 if family == "ar" else 1.0)
  if task == "control":
    config.data.record_attributes = CONTROL_ATTRIBUTES
    config.train.condition_dropout = 0.1
  if size == "base":
    config.process.latent_dim = 128
    config.model.update(num_layers=12, num_heads=12, embed_dim=768, mlp_dim=3072, dtype="bfloat16")
    config.train.update(batch_size=256, num_steps=100_000, learning_rate=1e-4, warmup_steps=2_000,
                        ema_decay=0.9999, eval_every=10_000, checkpoint_every=5_000)
    config.sample.steps = 2_000 if family == "diffuseq" else 256
  return config
