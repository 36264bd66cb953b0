"""Block diffusion (BD3-LM, Arriola et al. 2025): autoregressive over blocks, masked diffusion within one.

The sequence is cut into blocks of `block_size` positions, x = (x^1, ..., x^N), and modelled as

  log p(x) = sum_b log p(x^b | x^{<b}),

each factor a masked-diffusion model (`masked.py`) of the block given the clean blocks before it.
The negative ELBO is the sum of the blocks' masked-diffusion bounds, each at its own time t_b:

  NELBO(x) = sum_b E_{t_b} E_{x_t^b ~ q(.|x^b)} [ -alpha'(t_b) / (1 - alpha(t_b))
                 * sum_{l in b: x_t^l = MASK} -log p(x^l | x_t^b, x^{<b}) ] + prior term.

One pass of a block network (`TransformerConfig.block_size`) scores every block: it reads the
noised and the clean sequence side by side, each noised block seeing itself and the clean blocks
before it (`layers.block_diffusion_mask`), so `model_fn` takes the clean sequence as the keyword
`clean_tokens_BL`. Block networks carry no time conditioning (the blocks of a row are at different
times; MDLM and BD3-LM train masked denoisers without it), so `model_fn` gets t = None.

block_size = L is MDLM (one block). block_size = 1 is an autoregressive model: each token is
masked or clean, and since the weight integrates to alpha(0) - alpha(1) = 1 (schedules with
alpha(1) = 0), the bound's expectation is the exact NLL sum_l -log p(x^l | x^{<l}).

Sampling runs block by block over an exact KV cache of the finished blocks
(`ddlm_jax.decoding.blockwise`); within a block the steps are those of the masked process
(`within_block`).
"""
import dataclasses

import jax
import jax.numpy as jnp

from ddlm_jax.processes import base
from ddlm_jax.processes import masked
from ddlm_jax.schedules import Schedule


@dataclasses.dataclass(frozen=True)
class BlockDiffusion:
  """Masked diffusion within blocks of `block_size` positions, left to right over blocks.

  Attributes:
    vocab_size: V, the model's output vocabulary including [MASK].
    mask_id: id of [MASK].
    block_size: positions per block.
    schedule: alpha(t) of every block.
    antithetic_time: draw the times of a batch's blocks stratified (see `base.sample_times`).
  """
  vocab_size: int
  mask_id: int
  block_size: int
  schedule: Schedule = Schedule()
  antithetic_time: bool = True
  causal_network = False
  exact_likelihood = False
  absorbing = True
  continuous = False

  def __post_init__(self):
    if self.block_size < 1:
      raise ValueError(f"block_size must be >= 1, got {self.block_size}")
    self.within_block  # validates mask_id

  @property
  def within_block(self) -> masked.MaskedDiffusion:
    """The masked process of one block given the blocks before it (its steps and log-probs)."""
    return masked.MaskedDiffusion(vocab_size=self.vocab_size, mask_id=self.mask_id, schedule=self.schedule,
                                  antithetic_time=self.antithetic_time)

  def block_times(self, key: jax.Array, batch_size: int, length: int) -> jax.Array:
    """float32[B, L]: one time per block, drawn for the B * N blocks of the batch together
    (stratified if antithetic, the N blocks of a row spread over [0, 1)), repeated over each
    block's positions."""
    num_blocks = -(-length // self.block_size)
    t_NB = base.sample_times(key, batch_size * num_blocks, self.antithetic_time).reshape(num_blocks, batch_size)
    t_BN = t_NB.T
    return jnp.repeat(t_BN, self.block_size, axis=1)[:, :length]

  def corrupt(self, x0_BL: jax.Array, t_BL: jax.Array, key: jax.Array,
              keep_BL: jax.Array | None = None) -> jax.Array:
    """x_t, int32[B, L]: each token becomes [MASK] with probability 1 - alpha(t) of its block's time
    t_BL; positions where keep_BL is True (a prompt) never do."""
    masked_BL = jax.random.uniform(key, x0_BL.shape) < self.schedule.mask_prob(t_BL)
    if keep_BL is not None:
      masked_BL &= ~keep_BL
    return jnp.where(masked_BL, self.mask_id, x0_BL)

  def nelbo(self, model_fn, x0_BL: jax.Array, key: jax.Array, prompt_mask_BL: jax.Array | None = None,
            t_B: jax.Array | None = None) -> base.Nelbo:
    """One-sample Monte Carlo estimate of the NELBO of each sequence: every block's bound from one
    network pass.

    Args:
      model_fn: (x_t int32[B, L], None, clean_tokens_BL=x_0 int32[B, L]) -> logits float32[B, L, W]
        of a block network.
      x0_BL: clean tokens, int32[B, L].
      key: PRNG key.
      prompt_mask_BL: optional bool[B, L]; True marks a prompt position: never masked, never scored.
      t_B: optional time of every block of a row; drawn per block (`block_times`) if None.
    """
    t_key, mask_key = jax.random.split(key)
    if t_B is None:
      t_BL = self.block_times(t_key, *x0_BL.shape)
    else:
      t_BL = jnp.broadcast_to(jnp.asarray(t_B, jnp.float32)[:, None], x0_BL.shape)
    xt_BL = self.corrupt(x0_BL, t_BL, mask_key, keep_BL=prompt_mask_BL)
    logits_BLW = model_fn(xt_BL, None, clean_tokens_BL=x0_BL)
    nll_BL = base.cross_entropy(logits_BLW, x0_BL, self.vocab_size, (self.mask_id,))
    weighted_BL = self.schedule.loss_weight(t_BL) * jnp.where(xt_BL == self.mask_id, nll_BL, 0.0)
    num_tokens_B = base.scored_mask(x0_BL, prompt_mask_BL).sum(axis=-1).astype(jnp.float32)
    return base.Nelbo(nats_B=weighted_BL.sum(axis=-1) + self.within_block.prior_nats_per_token() * num_tokens_B,
                      num_tokens_B=num_tokens_B)

  def loss(self, model_fn, x0_BL: jax.Array, key: jax.Array,
           prompt_mask_BL: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Training loss: NELBO in nats per scored position (EOS and padding included), and metrics."""
    return base.per_position_loss(self.nelbo(model_fn, x0_BL, key, prompt_mask_BL))
