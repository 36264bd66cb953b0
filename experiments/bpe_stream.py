"""Subword language modelling of any local text file: `char_stream`'s protocol over sentencepiece tokens.

  python -m ddlm_jax.main --config=experiments/bpe_stream.py:mdlm --workdir=workdirs/bpe/mdlm \
      --config.data.paths=PATH/TO/input.txt

The file is one stream (first 95% trains, last 5% held out, cut at a character); a BPE sentencepiece
tokenizer is trained on the training part (unseen characters fall back to bytes); training draws
random windows of the token stream; evaluation scores windows spread over the held-out stream and
reports bits per token and per character of the text they hold (`char_stream` explains the rest).

Variant `FAMILY[,SIZE]` as in `char_stream`: 'cpu' uses 1,024 ids and 128-token windows, 'base'
32,768 ids and 1,024-token windows.
"""
from experiments import char_stream


def get_config(variant: str = "mdlm"):
  config = char_stream.get_config(variant)
  base = variant.endswith(",base")
  config.data.update(tokenizer="sentencepiece", vocab_size=32_768 if base else 1_024,
                     seq_len=1_024 if base else 128)
  return config
