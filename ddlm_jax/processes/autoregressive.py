"""The autoregressive baseline: a causal network trained by teacher forcing.

The model factorises a sequence left to right,

  log p(x) = sum_l log p(x^l | x^{<l}),

and the network reads the inputs [BOS, x^0, ..., x^{L-2}] (the targets shifted right by one), so
its causal logits at position l see exactly x^{<l}. The NLL is exact, not a bound, and is scored
like the diffusion bounds (`masked.py`): every non-prompt position of the row, [EOS] and padding
included. With a prompt x^{<k} (prompt_mask True on it) the sum runs over l >= k only, giving
-log p(x^{>=k} | x^{<k}).

The next-token distribution is a softmax over the V ids of the vocabulary with [BOS] (it is only
ever an input) and any `excluded_ids` (e.g. [MASK], which no data row holds) removed. Sampling is
incremental decoding with a KV cache, `ddlm_jax.samplers.decode`: the process is a `base.Process`
(nelbo, loss), not a `base.DiffusionProcess`.
"""
import dataclasses

import jax
import jax.numpy as jnp

from ddlm_jax.processes import base


@dataclasses.dataclass(frozen=True)
class Autoregressive:
  """Left-to-right factorisation, trained and scored by teacher forcing.

  Attributes:
    vocab_size: V, the ids the model predicts over (the network may emit W >= V logits).
    bos_id: id fed at position 0; never predicted.
    excluded_ids: further ids that are never targets, kept out of the softmax.
  """
  vocab_size: int
  bos_id: int
  excluded_ids: tuple[int, ...] = ()
  causal_network = True
  exact_likelihood = True

  def __post_init__(self):
    for token_id in (self.bos_id, *self.excluded_ids):
      if not 0 <= token_id < self.vocab_size:
        raise ValueError(f"token id {token_id} is outside the vocabulary of size {self.vocab_size}")

  def inputs(self, x0_BL: jax.Array) -> jax.Array:
    """Teacher-forcing inputs [BOS, x^0, ..., x^{L-2}], int32[B, L]."""
    bos_B1 = jnp.full((x0_BL.shape[0], 1), self.bos_id, x0_BL.dtype)
    return jnp.concatenate([bos_B1, x0_BL[:, :-1]], axis=1)

  def next_token_log_probs(self, logits_BLW: jax.Array) -> jax.Array:
    """log p(x^l | x^{<l}) over the first V ids, [BOS] and `excluded_ids` at -inf (float32[B, L, V])."""
    return base.restricted_log_softmax(logits_BLW, self.vocab_size, self.never_targets)

  @property
  def never_targets(self) -> tuple[int, ...]:
    """Ids outside the next-token softmax: [BOS] and `excluded_ids`."""
    return (self.bos_id, *self.excluded_ids)

  def nelbo(self, model_fn: base.ModelFn, x0_BL: jax.Array, key: jax.Array,
            prompt_mask_BL: jax.Array | None = None, t_B: jax.Array | None = None) -> base.Nelbo:
    """The exact NLL of each sequence in nats (deterministic).

    Args:
      model_fn: causal (inputs int32[B, L], t float32[B]) -> logits float32[B, L, W]; called
        with t = 0.
      x0_BL: clean tokens, int32[B, L].
      key: unused (the NLL is exact); kept for the process contract.
      prompt_mask_BL: optional bool[B, L]; True marks prompt positions, which are conditioned
        on but not scored, so the result is -log p(response | prompt).
      t_B: unused; kept for the process contract.
    """
    del key, t_B
    logits_BLW = model_fn(self.inputs(x0_BL), jnp.zeros((x0_BL.shape[0],), jnp.float32))
    nll_BL = base.cross_entropy(logits_BLW, x0_BL, self.vocab_size, self.never_targets)
    scored_BL = base.scored_mask(x0_BL, prompt_mask_BL)
    return base.Nelbo(nats_B=jnp.where(scored_BL, nll_BL, 0.0).sum(axis=-1),
                      num_tokens_B=scored_BL.sum(axis=-1).astype(jnp.float32))

  def loss(self, model_fn: base.ModelFn, x0_BL: jax.Array, key: jax.Array,
           prompt_mask_BL: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Training loss: NLL in nats per scored position (EOS and padding included), and metrics."""
    return base.per_position_loss(self.nelbo(model_fn, x0_BL, key, prompt_mask_BL))
