"""The `make demo` run: a small masked diffusion LM on the embedded corpus, 2 CPU cores, < 10 minutes.

  python -m ddlm_jax.main --config=experiments/mdlm_demo.py --workdir=workdirs/demo

Trains for at most `train.time_limit_minutes`, saves an orbax checkpoint, prints the held-out
ELBO in bits per token beside the corpus generator's exact NLL of the same documents, and samples.
"""
from ddlm_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.data.update(num_train_docs=50_000, num_eval_docs=500, vocab_size=2048, seq_len=64)
  config.model.update(num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512)
  config.train.update(batch_size=64, num_steps=700, time_limit_minutes=7.0, learning_rate=3e-3,
                      warmup_steps=50, log_every=25, eval_every=10_000, checkpoint_every=200)
  config.eval.update(batch_size=100, elbo_samples=8, max_docs=500)
  config.sample.update(num_samples=6, steps=64, strategy="ancestral", temperature=1.0)
  return config
