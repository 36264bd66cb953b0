"""Test doubles: a tiny distribution with known probabilities and its exact denoiser."""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class TinyDistribution:
  """An explicit distribution over all sequences of `length` tokens drawn from `token_ids`.

  Attributes:
    sequences_SL: int32[S, L], every sequence (S = len(token_ids) ** length).
    log_probs_S: float64[S], their log-probabilities.
  """
  sequences_SL: np.ndarray
  log_probs_S: np.ndarray

  @classmethod
  def random(cls, token_ids: tuple[int, ...], length: int, seed: int, concentration: float = 0.5):
    """A Dirichlet(concentration) draw over all sequences: strongly dependent tokens."""
    sequences_SL = np.array(list(itertools.product(token_ids, repeat=length)), np.int32)
    probs_S = np.random.default_rng(seed).dirichlet(np.full(len(sequences_SL), concentration))
    return cls(sequences_SL, np.log(np.maximum(probs_S, 1e-300)))

  def sample(self, num: int, seed: int) -> np.ndarray:
    """int32[num, L] sequences drawn from the distribution."""
    rng = np.random.default_rng(seed)
    return self.sequences_SL[rng.choice(len(self.sequences_SL), size=num, p=np.exp(self.log_probs_S))]

  def log_prob(self, x_BL: np.ndarray) -> np.ndarray:
    """float64[B] exact log-probabilities of the rows of x_BL."""
    match_BS = (x_BL[:, None, :] == self.sequences_SL[None]).all(-1)
    return self.log_probs_S[match_BS.argmax(-1)]

  def entropy_nats(self) -> float:
    probs_S = np.exp(self.log_probs_S)
    return float(-(probs_S * self.log_probs_S).sum())


def exact_masked_denoiser(dist: TinyDistribution, vocab_size: int, mask_id: int):
  """model_fn(x_t, t) -> log p(x_0^l | x_t): the true posterior marginal at every position.

  Positions that are not masked get the same formula, which puts all mass on their token.
  """
  sequences_SL = jnp.asarray(dist.sequences_SL)
  log_probs_S = jnp.asarray(dist.log_probs_S, jnp.float32)
  one_hot_SLV = jax.nn.one_hot(sequences_SL, vocab_size, dtype=jnp.float32)

  def model_fn(xt_BL, t_B):
    del t_B
    consistent_BS = ((xt_BL[:, None, :] == mask_id) | (xt_BL[:, None, :] == sequences_SL[None])).all(-1)
    log_weights_BS = jnp.where(consistent_BS, log_probs_S[None], -jnp.inf)
    weights_BS = jax.nn.softmax(log_weights_BS, axis=-1)
    return jnp.log(jnp.einsum("bs,slv->blv", weights_BS, one_hot_SLV))

  return model_fn
