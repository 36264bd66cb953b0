"""D3PM: structured discrete diffusion in discrete time (Austin et al. 2021, arXiv:2107.03006).

Each token follows a Markov chain over the V ids with transition matrices Q_1, ..., Q_T (rows are
"from", columns "to"), so that

  q(x_t | x_0) = Cat(x_0 Qbar_t),                                    Qbar_t = Q_1 ... Q_t,
  q(x_s | x_t, x_0) ∝ (x_t Qbar_{t|s}^T) ⊙ (x_0 Qbar_s)   (s < t),   Qbar_{t|s} = Q_{s+1} ... Q_t,

and every Qbar here has a closed form, so any step grid can skip steps. With
alphabar_i = schedule.alpha(i / T), i = 0..T, the transitions are

  'uniform'           Qbar_{t|s} = r I + (1 - r) 11^T / V,       r = alphabar_t / alphabar_s;
  'absorbing'         Qbar_{t|s} = r I + (1 - r) 1 e_mask^T   (Q_i: D3PM's beta_i = 1 - alphabar_i /
                      alphabar_{i-1}; the linear schedule gives beta_i = 1 / (T - i + 1));
  'nearest_neighbor'  Qbar_{t|s} = expm((c_t - c_s) R), R = A - diag(deg) the Laplacian rate matrix of a
                      symmetric token graph scaled to maximum degree 1 (`NeighborGraph`), and
                      c_i = min(-log alphabar_i, max_graph_time) the expected number of jump attempts.
                      All Q commute and the stationary distribution is uniform. x Qbar is applied by
                      uniformization, expm(cR) = e^{-c} sum_n c^n / n! (I + R)^n, truncated after a static
                      number of terms N such that the Poisson(max_graph_time) tail beyond N is below
                      `UNIFORMIZATION_TOL` = 1e-6 (so every row of every Qbar loses < 1e-6 of its mass);
                      each (I + R) is a gather over the K neighbours, never a V x V matrix.

The reverse model is x_0-parameterised (D3PM eq. 4): with p~(x_0 | x_t) the network's prediction,

  p(x_s | x_t) ∝ sum_{x_0} q(x_s, x_t | x_0) p~(x_0 | x_t) = (x_t Qbar_{t|s}^T) ⊙ (p~ Qbar_s),

O(V) per position because p~ Qbar_s is closed form again. It equals q(x_s | x_t, x_0) when p~ is
one-hot at x_0, and equals sum_{x_0} q(x_s | x_t, x_0) p(x_0 | x_t) with the denoiser

  p(x_0 | x_t) ∝ q(x_t | x_0) p~(x_0 | x_t)      (the same formula at s = 0),

which is what the model predicts about x_0: for 'absorbing' (p~ never predicts [MASK]) it is p~ at
masked positions and the token itself at clean ones, as in MDLM, and the reverse step reveals a
masked token with probability (alphabar_s - alphabar_t) / (1 - alphabar_t), the masked process's.
Sampling applies temperature / top-k / top-p to the denoiser before mixing.

The variational bound per sequence (nats), summed over scored positions:

  L_T = KL(q(x_T | x_0) || p(x_T)),  L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) (t >= 2),
  L_0 = -log p(x_0 | x_1),           NELBO = L_T + sum_{t=1}^T L_{t-1}.

L_0 uses the denoiser (so it vanishes as T grows and the bound tends to the continuous-time NELBO of
`masked.py` / `uniform.py` on the same network). The prior p(x_T) is uniform ('uniform',
'nearest_neighbor') or [MASK] ('absorbing'; under a schedule with alphabar_T > 0 a token stays clean
with probability alphabar_T, uniform over the other ids, as in `masked.py`). `nelbo` draws one t per
sequence: T L_{t-1} + L_T is unbiased. The training loss is D3PM's hybrid loss (eq. 5) as the paper
trains it: at one drawn t ~ U{1..T} and x_t ~ q(x_t | x_0) per sequence, the single term L_{t-1}
(L_0 at t = 1) plus hybrid_coeff times the cross-entropy -log p(x_0 | x_t); the factor T and the
prior L_T belong to the reported bound, not to the objective. Unlike the paper's auxiliary term on
the raw prediction p~, the cross-entropy (like L_0) is taken of the denoiser
p(x_0 | x_t) ∝ q(x_t | x_0) p~: for 'absorbing' it is zero at clean positions (MDLM's carry-over).

The process is a `base.TokenProcess` (an `AbsorbingProcess` for 'absorbing'). The network sees time
t_B = i / T.
"""
import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
import scipy.sparse.linalg

from ddlm_jax.processes import base
from ddlm_jax.schedules import Schedule

TRANSITIONS = ("uniform", "absorbing", "nearest_neighbor")
UNIFORMIZATION_TOL = 1e-6
_TINY = float(jnp.finfo(jnp.float32).tiny)


@flax.struct.dataclass
class NeighborGraph:
  """A symmetric token graph with at most K neighbours per token: the rate matrix R of
  'nearest_neighbor' transitions, R_ij = R_ji = weight of edge (i, j), R_ii = -sum_j R_ij.

  Equality and hashing are by identity (a D3PM holding a graph stays hashable without hashing
  arrays), so two graphs built separately never compare equal.

  Attributes:
    neighbors_VK: int32[V, K], the neighbours of each token; unused slots hold the token itself.
    weights_VK: float32[V, K], the rate to each neighbour (0 in unused slots); rows sum to <= 1.
  """
  neighbors_VK: jax.Array
  weights_VK: jax.Array

  def __eq__(self, other):
    return self is other

  def __hash__(self):
    return id(self)

  @classmethod
  def from_embeddings(cls, embeddings_VD: np.ndarray, num_neighbors: int,
                      chunk_size: int = 1024) -> "NeighborGraph":
    """The cosine-similarity kNN graph of token embeddings, symmetrised with degree <= K.

    Each token proposes its 2K most similar tokens (cosine similarity, computed chunk_size rows at a
    time, so V = 32k needs no V x V array); the undirected edges are kept greedily from the most
    similar down while both ends have fewer than K = num_neighbors edges; a token left without an edge
    is then joined to its most similar token that has room. Every edge gets the weight
    1 / (largest degree), so R's largest degree is 1. Deterministic.

    Args:
      embeddings_VD: float[V, D] token embeddings (e.g. `cooccurrence_embeddings`).
      num_neighbors: K, the degree bound.
      chunk_size: rows of the similarity matrix computed at once.
    """
    embeddings_VD = np.asarray(embeddings_VD, np.float32)
    vocab_size = len(embeddings_VD)
    if not 1 <= num_neighbors < vocab_size:
      raise ValueError(f"num_neighbors must lie in [1, {vocab_size - 1}] for a vocabulary of "
                       f"{vocab_size}, got {num_neighbors}")
    norms_V1 = np.linalg.norm(embeddings_VD, axis=1, keepdims=True)
    unit_VD = embeddings_VD / np.maximum(norms_V1, 1e-12)
    num_candidates = min(2 * num_neighbors, vocab_size - 1)
    candidates = []
    for start in range(0, vocab_size, chunk_size):
      sims_CV = unit_VD[start:start + chunk_size] @ unit_VD.T
      rows_C = np.arange(len(sims_CV))
      sims_CV[rows_C, start + rows_C] = -np.inf
      candidates.append(np.argpartition(-sims_CV, num_candidates - 1, axis=1)[:, :num_candidates])
    sources_E = np.repeat(np.arange(vocab_size), num_candidates)
    targets_E = np.concatenate(candidates).ravel()
    edges_E = np.unique(np.minimum(sources_E, targets_E) * vocab_size
                        + np.maximum(sources_E, targets_E))
    low_E, high_E = edges_E // vocab_size, edges_E % vocab_size
    sims_E = np.einsum("ed,ed->e", unit_VD[low_E], unit_VD[high_E])
    order_E = np.lexsort((high_E, low_E, -sims_E))
    neighbors_VK = np.tile(np.arange(vocab_size)[:, None], (1, num_neighbors))
    degree_V = np.zeros(vocab_size, np.int64)

    def connect(a, b):
      neighbors_VK[a, degree_V[a]], neighbors_VK[b, degree_V[b]] = b, a
      degree_V[a] += 1
      degree_V[b] += 1

    for low, high in zip(low_E[order_E].tolist(), high_E[order_E].tolist()):
      if degree_V[low] < num_neighbors and degree_V[high] < num_neighbors:
        connect(low, high)
    for token in np.flatnonzero(degree_V == 0).tolist():
      sims_V = np.where(degree_V < num_neighbors, unit_VD @ unit_VD[token], -np.inf)
      sims_V[token] = -np.inf
      if degree_V[token] == 0 and np.isfinite(sims_V.max()):
        connect(token, int(sims_V.argmax()))
    used_VK = np.arange(num_neighbors)[None, :] < degree_V[:, None]
    weights_VK = used_VK / max(int(degree_V.max()), 1)
    return cls(neighbors_VK=jnp.asarray(neighbors_VK, jnp.int32),
               weights_VK=jnp.asarray(weights_VK, jnp.float32))

  def check(self, vocab_size: int) -> None:
    """Raises ValueError unless this is a rate matrix over vocab_size tokens: weights >= 0, rows
    summing to <= 1 (so I + R is stochastic), and symmetric (so uniform is stationary)."""
    neighbors_VK, weights_VK = np.asarray(self.neighbors_VK), np.asarray(self.weights_VK, np.float64)
    if neighbors_VK.shape != weights_VK.shape or neighbors_VK.shape[0] != vocab_size:
      raise ValueError(f"NeighborGraph arrays {neighbors_VK.shape} and {weights_VK.shape} do not "
                       f"describe {vocab_size} tokens")
    if (weights_VK < 0).any() or (weights_VK.sum(axis=1) > 1 + 1e-6).any():
      raise ValueError("NeighborGraph weights must be >= 0 with rows summing to <= 1")
    rows_VK = np.broadcast_to(np.arange(vocab_size)[:, None], neighbors_VK.shape)
    rates_VV = scipy.sparse.csr_matrix((weights_VK.ravel(), (rows_VK.ravel(), neighbors_VK.ravel())),
                                       shape=(vocab_size, vocab_size))
    if abs(rates_VV - rates_VV.T).max() > 1e-6:
      raise ValueError("NeighborGraph is not symmetric")

  def step(self, probs_BLV: jax.Array) -> jax.Array:
    """probs (I + R) for row vectors (R is symmetric): K gathers over the vocabulary axis."""
    out_BLV = probs_BLV * (1.0 - self.weights_VK.sum(axis=1))
    for k in range(self.neighbors_VK.shape[1]):
      out_BLV += self.weights_VK[:, k] * jnp.take(probs_BLV, self.neighbors_VK[:, k], axis=-1)
    return out_BLV


def cooccurrence_embeddings(rows_NL: np.ndarray, vocab_size: int, dim: int, window: int = 2,
                            seed: int = 0) -> np.ndarray:
  """Token embeddings from training rows: truncated SVD of the PPMI of windowed co-occurrences.

  Counts C_ij = how often j occurs within `window` positions of i (symmetric, scipy.sparse);
  PPMI_ij = max(0, log(C_ij C_total / (C_i C_j))); the embedding is U sqrt(S) of its top-`dim`
  singular triplets (scipy.sparse.linalg.svds with a fixed start vector; dense SVD when dim >= V - 1),
  each column's sign fixed so its largest entry is positive. Tokens with no co-occurrence (never
  seen) get distinct small random vectors (seeded), so they still have neighbours. Deterministic.

  Args:
    rows_NL: int[N, L] token rows.
    vocab_size: V.
    dim: D, the embedding size.
    window: co-occurrence window radius.
    seed: seed of the vectors of unseen tokens.

  Returns:
    float32[V, D].
  """
  if dim < 1 or window < 1:
    raise ValueError(f"dim and window must be >= 1, got dim={dim}, window={window}")
  rows_NL = np.asarray(rows_NL, np.int64)
  forward_VV = scipy.sparse.csr_matrix((vocab_size, vocab_size))
  for offset in range(1, min(window, rows_NL.shape[1] - 1) + 1):  # j follows i at distance offset
    first_P, second_P = rows_NL[:, :-offset].ravel(), rows_NL[:, offset:].ravel()
    forward_VV += scipy.sparse.csr_matrix((np.ones(len(first_P)), (first_P, second_P)),
                                          shape=(vocab_size, vocab_size))
  counts_VV = (forward_VV + forward_VV.T).tocoo()
  totals_V = np.asarray(counts_VV.sum(axis=1)).ravel()
  pmi_P = np.log(counts_VV.data * totals_V.sum() / (totals_V[counts_VV.row] * totals_V[counts_VV.col]))
  positive_P = pmi_P > 0
  ppmi_VV = scipy.sparse.csr_matrix(
      (pmi_P[positive_P], (counts_VV.row[positive_P], counts_VV.col[positive_P])),
      shape=(vocab_size, vocab_size))
  if dim < vocab_size - 1:
    start_V = np.ones(vocab_size) / np.sqrt(vocab_size)
    u_VD, s_D, _ = scipy.sparse.linalg.svds(ppmi_VV, k=dim, v0=start_V)
  else:
    u_VD, s_D, _ = np.linalg.svd(ppmi_VV.toarray())
  order_D = np.argsort(-s_D, kind="stable")[:dim]
  embeddings_VD = np.zeros((vocab_size, dim))
  embeddings_VD[:, :len(order_D)] = u_VD[:, order_D] * np.sqrt(s_D[order_D])
  largest_D = embeddings_VD[np.abs(embeddings_VD).argmax(axis=0), np.arange(dim)]
  embeddings_VD *= np.where(largest_D < 0, -1.0, 1.0)
  unseen_V = totals_V == 0
  seen_norm = np.linalg.norm(embeddings_VD[~unseen_V], axis=1).mean() if (~unseen_V).any() else 1.0
  random_UD = np.random.default_rng(seed).normal(size=(int(unseen_V.sum()), dim))
  embeddings_VD[unseen_V] = 1e-3 * seen_norm * random_UD / np.sqrt(dim)
  return embeddings_VD.astype(np.float32)


def log_one_hot(x_BL: jax.Array, vocab_size: int) -> jax.Array:
  """log of one_hot(x): 0 at x, -inf elsewhere (float32[B, L, V])."""
  return jnp.where(jax.nn.one_hot(x_BL, vocab_size, dtype=bool), 0.0, -jnp.inf)


def kl_divergence(log_q_BLV: jax.Array, log_p_BLV: jax.Array) -> jax.Array:
  """KL(q || p) over the last axis, float32[B, L]; zero-probability ids of q contribute 0 (and no
  NaN gradient)."""
  support_BLV = log_q_BLV > -jnp.inf
  log_q_BLV = jnp.where(support_BLV, log_q_BLV, 0.0)
  log_p_BLV = jnp.where(support_BLV, log_p_BLV, 0.0)
  return jnp.where(support_BLV, jnp.exp(log_q_BLV) * (log_q_BLV - log_p_BLV), 0.0).sum(axis=-1)


@dataclasses.dataclass(frozen=True)
class D3PM(base.CanvasReadout):
  """The discrete-time process with a uniform, absorbing or nearest-neighbour transition.

  Steps are integers i = 0..T (arrays of steps broadcast against the batch); the sampler's float
  times t in [0, 1] map to round(t T).

  Attributes:
    vocab_size: V, the model's output vocabulary (including [MASK] for 'absorbing').
    transition: one of TRANSITIONS.
    num_steps: T.
    schedule: alphabar_i = schedule.alpha(i / T).
    hybrid_coeff: lambda of the hybrid loss (L_{t-1} + lambda * cross-entropy, see `loss`).
    mask_id: id of [MASK]; required for and only for 'absorbing'.
    graph: the token graph; required for and only for 'nearest_neighbor'.
    antithetic_time: draw a batch's steps stratified (see `base.sample_times`).
    max_graph_time: 'nearest_neighbor' only: c_T, the clip of c_i = -log alphabar_i; it sets the
      number of uniformization terms (28 for the default 10).
  """
  vocab_size: int
  transition: str
  num_steps: int = 1000
  schedule: Schedule = Schedule("cosine")
  hybrid_coeff: float = 0.01
  mask_id: int | None = None
  graph: NeighborGraph | None = None
  antithetic_time: bool = True
  max_graph_time: float = 10.0
  causal_network = False
  exact_likelihood = False
  continuous = False

  def __post_init__(self):
    if self.transition not in TRANSITIONS:
      raise ValueError(f"D3PM transition {self.transition!r} is not one of {TRANSITIONS}")
    if self.num_steps < 1:
      raise ValueError(f"D3PM num_steps (T) must be >= 1, got {self.num_steps}")
    if self.vocab_size < 2:
      raise ValueError(f"D3PM vocab_size must be >= 2, got {self.vocab_size}")
    if not (math.isfinite(self.hybrid_coeff) and self.hybrid_coeff >= 0):
      raise ValueError(f"D3PM hybrid_coeff must be a finite number >= 0, got {self.hybrid_coeff}")
    absorbing = self.transition == "absorbing"
    if absorbing != (self.mask_id is not None):
      raise ValueError(f"D3PM mask_id is required for and only for the 'absorbing' transition "
                       f"(transition={self.transition!r}, mask_id={self.mask_id})")
    if absorbing and not 0 <= self.mask_id < self.vocab_size:
      raise ValueError(f"mask_id {self.mask_id} is outside the vocabulary of size {self.vocab_size}")
    neighbors = self.transition == "nearest_neighbor"
    if neighbors != (self.graph is not None):
      raise ValueError(f"D3PM graph is required for and only for the 'nearest_neighbor' transition "
                       f"(transition={self.transition!r}, graph given: {self.graph is not None})")
    if neighbors:
      self.graph.check(self.vocab_size)
    if not self.max_graph_time > 0:
      raise ValueError(f"D3PM max_graph_time must be > 0, got {self.max_graph_time}")

  @property
  def absorbing(self) -> bool:
    """Has a [MASK] state (the 'absorbing' transition)."""
    return self.transition == "absorbing"

  # Transitions.

  @property
  def num_uniformization_terms(self) -> int:
    """N: the smallest n with P(Poisson(max_graph_time) > n) <= UNIFORMIZATION_TOL."""
    rate, n = self.max_graph_time, 0
    pmf = cdf = math.exp(-rate)
    while 1.0 - cdf > UNIFORMIZATION_TOL:
      n += 1
      pmf *= rate / n
      cdf += pmf
    return n

  def _alpha_bar(self, step):
    """alphabar_i, clipped to [0, 1] (cos(pi / 2) is -4e-8 in float32)."""
    return jnp.clip(self.schedule.alpha(step / self.num_steps), 0.0, 1.0)

  def _mask_prob(self, step):
    """1 - alphabar_i without cancellation, clipped to [0, 1]."""
    return jnp.clip(self.schedule.mask_prob(step / self.num_steps), 0.0, 1.0)

  def _graph_time(self, step):
    """c_i = min(-log alphabar_i, max_graph_time)."""
    return jnp.minimum(-jnp.log1p(-self._mask_prob(step)), self.max_graph_time)

  def _log_keep(self, to_step, from_step):
    """(log r, log(1 - r)) of Qbar_{to|from} = r I + (1 - r) K, r = alphabar_to / alphabar_from.

    1 - r is computed as (mask_prob_to - mask_prob_from) / alphabar_from, without cancellation;
    to == from gives r = 1 (also at alphabar = 0).
    """
    moved = to_step > from_step
    alpha_from = jnp.where(moved, self._alpha_bar(from_step), 1.0)
    keep = jnp.where(moved, self._alpha_bar(to_step) / alpha_from, 1.0)
    leave = jnp.where(moved, jnp.maximum(self._mask_prob(to_step) - self._mask_prob(from_step), 0.0)
                      / alpha_from, 0.0)
    return jnp.log(keep), jnp.log(leave)

  def _uniformized(self, probs_BLV: jax.Array, time_B11: jax.Array) -> jax.Array:
    """probs expm(c R), by Horner's rule on the truncated uniformization series."""
    def horner(i, acc_BLV):
      n = self.num_uniformization_terms - i
      return probs_BLV + (time_B11 / n) * self.graph.step(acc_BLV)
    series_BLV = jax.lax.fori_loop(0, self.num_uniformization_terms, horner, probs_BLV)
    return jnp.exp(-time_B11) * series_BLV

  def _graph_expm(self, probs_BLV: jax.Array, time_B11: jax.Array) -> jax.Array:
    """probs expm(c R); its gradient is the same product (expm(c R) is symmetric), gathers instead
    of the scatters autodiff would make. Not differentiable in c."""
    @jax.custom_vjp
    def expm(probs_BLV, time_B11):
      return self._uniformized(probs_BLV, time_B11)

    def forward(probs_BLV, time_B11):
      return expm(probs_BLV, time_B11), time_B11

    def backward(time_B11, cotangent_BLV):
      return self._uniformized(cotangent_BLV, time_B11), jnp.zeros_like(time_B11)

    expm.defvjp(forward, backward)
    return expm(probs_BLV, time_B11)

  def propagate(self, log_probs_BLV: jax.Array, from_B: jax.Array, to_B: jax.Array) -> jax.Array:
    """log(p Qbar_{to|from}): the distribution at step `to` of a chain at `from` distributed as p
    ('nearest_neighbor': floored at the smallest normal float32, so never -inf).

    Args:
      log_probs_BLV: log p, float32[..., B, L, V] (any normalisation).
      from_B, to_B: int steps (from <= to), broadcastable to [B].
    """
    from_B11, to_B11 = jnp.asarray(from_B)[..., None, None], jnp.asarray(to_B)[..., None, None]
    if self.transition == "nearest_neighbor":
      time_B11 = self._graph_time(to_B11) - self._graph_time(from_B11)
      return jnp.log(jnp.maximum(self._graph_expm(jnp.exp(log_probs_BLV), time_B11), _TINY))
    log_keep_B11, log_leave_B11 = self._log_keep(to_B11, from_B11)
    log_total_BL1 = jax.nn.logsumexp(log_probs_BLV, axis=-1, keepdims=True)
    if self.transition == "uniform":
      log_mixed_BLV = log_total_BL1 - jnp.log(self.vocab_size)
    else:
      log_mixed_BLV = jnp.where(jnp.arange(self.vocab_size) == self.mask_id, log_total_BL1, -jnp.inf)
    return jnp.logaddexp(log_keep_B11 + log_probs_BLV, log_leave_B11 + log_mixed_BLV)

  def log_likelihood(self, xt_BL: jax.Array, from_B: jax.Array, to_B: jax.Array) -> jax.Array:
    """log q(x_to | x_from = j) over j, i.e. log of column x_to of Qbar_{to|from} (float32[B, L, V])."""
    if self.transition != "absorbing":  # symmetric Qbar: the column is the row
      return self.propagate(log_one_hot(xt_BL, self.vocab_size), from_B, to_B)
    log_keep_B11, log_leave_B11 = self._log_keep(jnp.asarray(to_B)[..., None, None],
                                                 jnp.asarray(from_B)[..., None, None])
    # r >= the smallest float32: a clean token q never makes (a prompt at alphabar_T = 0) stays itself.
    log_keep_B11 = jnp.maximum(log_keep_B11, jnp.log(_TINY))
    from_mask_BL1 = jnp.where(xt_BL == self.mask_id, 0.0, -jnp.inf)[..., None]
    return jnp.logaddexp(log_keep_B11 + log_one_hot(xt_BL, self.vocab_size), log_leave_B11 + from_mask_BL1)

  def transition_matrix(self, to_step: int, from_step: int) -> jax.Array:
    """Dense Qbar_{to|from}, float32[V, V] (small V only): Q_i is (i, i - 1), Qbar_i is (i, 0)."""
    log_rows_1VV = log_one_hot(jnp.arange(self.vocab_size)[None], self.vocab_size)
    return jnp.exp(self.propagate(log_rows_1VV, jnp.array([from_step]), jnp.array([to_step]))[0])

  def marginal_log_probs(self, x0_BL: jax.Array, t_B: jax.Array) -> jax.Array:
    """log q(x_t | x_0) = log(x_0 Qbar_t), float32[B, L, V]."""
    return self.propagate(log_one_hot(x0_BL, self.vocab_size), jnp.zeros_like(t_B), t_B)

  def posterior_log_probs(self, xt_BL: jax.Array, x0_BL: jax.Array, t_B: jax.Array,
                          s_B: jax.Array) -> jax.Array:
    """log q(x_s | x_t, x_0) for steps s < t, float32[B, L, V]."""
    return self.reverse_log_probs(xt_BL, log_one_hot(x0_BL, self.vocab_size), t_B, s_B)

  def reverse_log_probs(self, xt_BL: jax.Array, x_theta_BLV: jax.Array, t_B: jax.Array,
                        s_B: jax.Array) -> jax.Array:
    """log p(x_s | x_t) ∝ log(x_t Qbar_{t|s}^T) + log(p~ Qbar_s), normalised (float32[B, L, V]).

    Args:
      xt_BL: int32[B, L] tokens at step t.
      x_theta_BLV: log p~(x_0 | x_t), the network's prediction (any normalisation).
      t_B, s_B: int steps, s < t, broadcastable to [B].
    """
    logits_BLV = (self.log_likelihood(xt_BL, s_B, t_B)
                  + self.propagate(x_theta_BLV, jnp.zeros_like(s_B), s_B))
    return jax.nn.log_softmax(logits_BLV, axis=-1)

  def prior_log_probs(self) -> jax.Array:
    """log p(x_T), float32[V]: uniform, or [MASK] (clean with probability alphabar_T, uniform
    over the other ids) for 'absorbing'."""
    if self.transition != "absorbing":
      return jnp.full((self.vocab_size,), -jnp.log(self.vocab_size))
    final_alpha = self.schedule.final_alpha
    return jnp.where(jnp.arange(self.vocab_size) == self.mask_id, jnp.log1p(-final_alpha),
                     jnp.log(final_alpha / (self.vocab_size - 1)))

  # Sampling from q.

  def _random_walk(self, x_BL: jax.Array, time_B: jax.Array, key: jax.Array) -> jax.Array:
    """x_BL after Poisson(time) jump attempts of the chain I + R, capped at N (uniformization).

    The number of attempts is an inverse-CDF draw of Poisson(time), its tail beyond N lumped at N.
    The neighbour slots' cumulative rates are computed on the host (XLA would constant-fold them).
    """
    count_key, walk_key = jax.random.split(key)
    terms_N1 = jnp.arange(self.num_uniformization_terms)[:, None]
    log_pmf_NB = (jax.scipy.special.xlogy(terms_N1, time_B) - time_B
                  - jax.scipy.special.gammaln(terms_N1 + 1.0))
    cdf_NB = jnp.cumsum(jnp.exp(log_pmf_NB), axis=0)
    attempts_BL = (cdf_NB[:, :, None] <= jax.random.uniform(count_key, x_BL.shape)).sum(axis=0)
    uniforms_NBL = jax.random.uniform(walk_key, (self.num_uniformization_terms,) + x_BL.shape)
    cumulative_VK = jnp.asarray(np.asarray(self.graph.weights_VK).cumsum(axis=1))
    num_neighbors = cumulative_VK.shape[1]

    def jump(x_BL, n_and_uniforms):
      n, uniforms_BL = n_and_uniforms
      slot_BL = (cumulative_VK[x_BL] <= uniforms_BL[..., None]).sum(-1)  # K: stay
      target_BL = jnp.take_along_axis(self.graph.neighbors_VK[x_BL],
                                      jnp.minimum(slot_BL, num_neighbors - 1)[..., None], axis=-1)[..., 0]
      return jnp.where((slot_BL < num_neighbors) & (n < attempts_BL), target_BL, x_BL), None

    steps_N = jnp.arange(self.num_uniformization_terms)
    return jax.lax.scan(jump, x_BL, (steps_N, uniforms_NBL))[0]

  def corrupt(self, x0_BL: jax.Array, t_B: jax.Array, key: jax.Array,
              keep_BL: jax.Array | None = None) -> jax.Array:
    """Samples x_t ~ Cat(x_0 Qbar_t) in O(1) per position ('nearest_neighbor': O(N)).

    Args:
      x0_BL: clean tokens, int32[B, L].
      t_B: int steps in 0..T, [B].
      key: PRNG key.
      keep_BL: optional bool[B, L]; True positions (e.g. a prompt) are never corrupted.
    """
    if self.transition == "nearest_neighbor":
      xt_BL = self._random_walk(x0_BL, self._graph_time(t_B), key)
    else:
      uniforms_2BL = jax.random.uniform(key, (2,) + x0_BL.shape)
      corrupted_BL = uniforms_2BL[0] < self._mask_prob(t_B)[:, None]
      if self.transition == "uniform":
        noise_BL = jnp.minimum(uniforms_2BL[1] * self.vocab_size, self.vocab_size - 1).astype(x0_BL.dtype)
      else:
        noise_BL = jnp.full_like(x0_BL, self.mask_id)
      xt_BL = jnp.where(corrupted_BL, noise_BL, x0_BL)
    return xt_BL if keep_BL is None else jnp.where(keep_BL, x0_BL, xt_BL)

  # The network's x_0 prediction.

  def x_theta_log_probs(self, logits_BLW: jax.Array) -> jax.Array:
    """log p~(x_0 | x_t), the network's prediction over the V ids (ids >= V dropped; [MASK] excluded
    for 'absorbing'); the denoiser is `denoiser_log_probs`."""
    logits_BLV = logits_BLW[..., :self.vocab_size].astype(jnp.float32)
    if self.transition == "absorbing":
      logits_BLV = logits_BLV.at[..., self.mask_id].set(-jnp.inf)
    return jax.nn.log_softmax(logits_BLV, axis=-1)

  def _denoiser(self, xt_BL: jax.Array, x_theta_BLV: jax.Array, steps_B: jax.Array) -> jax.Array:
    """log p(x_0 | x_t) ∝ log q(x_t | x_0) + log p~(x_0 | x_t) at int steps, float32[B, L, V]."""
    likelihood_BLV = self.log_likelihood(xt_BL, jnp.zeros_like(steps_B), steps_B)
    return jax.nn.log_softmax(likelihood_BLV + x_theta_BLV, axis=-1)

  def denoiser_log_probs(self, logits_BLW: jax.Array, xt_BL: jax.Array, t: jax.Array) -> jax.Array:
    """log p(x_0 | x_t) ∝ q(x_t | x_0) p~(x_0 | x_t), float32[B, L, V] ('absorbing': p~ at [MASK],
    the token itself elsewhere), at time t (float32[] or [B], the step round(t T))."""
    steps_B = jnp.broadcast_to(jnp.round(t * self.num_steps).astype(jnp.int32), xt_BL.shape[:1])
    return self._denoiser(xt_BL, self.x_theta_log_probs(logits_BLW), steps_B)

  # The bound.

  def _step_terms(self, model_fn: base.ModelFn, x0_BL: jax.Array, t_B: jax.Array, key: jax.Array,
                  prompt_mask_BL: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(L_{t-1} (L_0 where t = 1), cross-entropy -log p(x_0 | x_t)) per position, float32[B, L]."""
    xt_BL = self.corrupt(x0_BL, t_B, key, keep_BL=prompt_mask_BL)
    x_theta_BLV = self.x_theta_log_probs(model_fn(xt_BL, (t_B / self.num_steps).astype(jnp.float32)))
    nll_BL = -base.token_log_likelihood(self._denoiser(xt_BL, x_theta_BLV, t_B), x0_BL)
    if self.num_steps == 1:
      return nll_BL, nll_BL
    # L_0 is the KL below at s = 0, but there its gradient is NaN ([MASK] is -inf on both sides of a
    # logaddexp): rows at t = 1 take nll, their KL slot is evaluated at t = 2 and dropped.
    kl_t_B = jnp.maximum(t_B, 2)
    # posterior_log_probs and reverse_log_probs, sharing x_t's likelihood and one propagation.
    likelihood_BLV = self.log_likelihood(xt_BL, kl_t_B - 1, kl_t_B)
    x0s_2BLV = jnp.stack([log_one_hot(x0_BL, self.vocab_size), x_theta_BLV])
    marginals_2BLV = self.propagate(x0s_2BLV, jnp.zeros_like(t_B), kl_t_B - 1)
    posterior_BLV, reverse_BLV = jax.nn.log_softmax(likelihood_BLV + marginals_2BLV, axis=-1)
    kl_BL = kl_divergence(posterior_BLV, reverse_BLV)
    return jnp.where((t_B == 1)[:, None], nll_BL, kl_BL), nll_BL

  def prior_nats(self, x0_BL: jax.Array) -> jax.Array:
    """L_T = KL(q(x_T | x_0) || p(x_T)) per position, float32[B, L] (no network)."""
    final_B = jnp.full(x0_BL.shape[:1], self.num_steps)
    marginal_BLV = self.marginal_log_probs(x0_BL, final_B)
    return kl_divergence(marginal_BLV, jnp.broadcast_to(self.prior_log_probs(), marginal_BLV.shape))

  def sample_steps(self, key: jax.Array, batch_size: int) -> jax.Array:
    """Steps t in {1..T}, int32[B], uniform marginally; stratified over the batch if antithetic."""
    times_B = base.sample_times(key, batch_size, self.antithetic_time)
    return jnp.clip(jnp.ceil(times_B * self.num_steps), 1, self.num_steps).astype(jnp.int32)

  def _drawn_step_terms(self, model_fn: base.ModelFn, x0_BL: jax.Array, key: jax.Array,
                        prompt_mask_BL: jax.Array | None, t_B: jax.Array | None):
    """(L_{t-1} (L_0 where t = 1), cross-entropy, scored) per position, float32[B, L] twice and
    bool[B, L], at one drawn step per sequence."""
    step_key, corrupt_key = jax.random.split(key)
    if t_B is None:
      steps_B = self.sample_steps(step_key, x0_BL.shape[0])
    else:
      steps_B = jnp.clip(jnp.round(t_B * self.num_steps), 1, self.num_steps).astype(jnp.int32)
    step_nats_BL, nll_BL = self._step_terms(model_fn, x0_BL, steps_B, corrupt_key, prompt_mask_BL)
    return step_nats_BL, nll_BL, base.scored_mask(x0_BL, prompt_mask_BL)

  def nelbo(self, model_fn: base.ModelFn, x0_BL: jax.Array, key: jax.Array,
            prompt_mask_BL: jax.Array | None = None, t_B: jax.Array | None = None) -> base.Nelbo:
    """One-sample unbiased estimate T L_{t-1} + L_T of the NELBO of each sequence, t ~ U{1..T}.

    Args:
      model_fn: (x_t int32[B, L], t float32[B] = step / T) -> logits float32[B, L, W].
      x0_BL: clean tokens, int32[B, L].
      key: PRNG key.
      prompt_mask_BL: optional bool[B, L]; True marks a prompt position: never noised, never scored.
      t_B: optional fixed times in (0, 1], float32[B], taken to the step round(t T) (>= 1); drawn
        with `sample_steps` if None.
    """
    step_nats_BL, _, scored_BL = self._drawn_step_terms(model_fn, x0_BL, key, prompt_mask_BL, t_B)
    nats_BL = self.num_steps * step_nats_BL + self.prior_nats(x0_BL)
    return base.Nelbo(nats_B=jnp.where(scored_BL, nats_BL, 0.0).sum(-1),
                      num_tokens_B=scored_BL.sum(-1).astype(jnp.float32))

  def nelbo_exact_time(self, model_fn: base.ModelFn, x0_BL: jax.Array, key: jax.Array,
                       prompt_mask_BL: jax.Array | None = None) -> base.Nelbo:
    """The NELBO with every term t = 1..T summed (one x_t draw per t; T network calls)."""
    scored_BL = base.scored_mask(x0_BL, prompt_mask_BL)

    def add_step(total_B, t):
      t_B = jnp.full(x0_BL.shape[:1], t, jnp.int32)
      step_nats_BL, _ = self._step_terms(model_fn, x0_BL, t_B, jax.random.fold_in(key, t),
                                         prompt_mask_BL)
      return total_B + jnp.where(scored_BL, step_nats_BL, 0.0).sum(-1), None

    prior_B = jnp.where(scored_BL, self.prior_nats(x0_BL), 0.0).sum(-1)
    nats_B = jax.lax.scan(add_step, prior_B, jnp.arange(1, self.num_steps + 1))[0]
    return base.Nelbo(nats_B=nats_B, num_tokens_B=scored_BL.sum(-1).astype(jnp.float32))

  def loss(self, model_fn: base.ModelFn, x0_BL: jax.Array, key: jax.Array,
           prompt_mask_BL: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """D3PM's hybrid loss (eq. 5): L_{t-1} + hybrid_coeff * CE at the drawn (t, x_t) of each
    sequence (the draw of `nelbo` with the same key), summed over scored positions and divided by
    their number in the batch; and metrics: loss, step_kl (L_{t-1}), ce, and vlb, the bound
    estimate T L_{t-1} + L_T of `nelbo` per position (reported, not trained on)."""
    step_nats_BL, nll_BL, scored_BL = self._drawn_step_terms(model_fn, x0_BL, key, prompt_mask_BL, None)
    num_tokens = jnp.maximum(scored_BL.sum(), 1.0)
    per_position = lambda nats_BL: jnp.where(scored_BL, nats_BL, 0.0).sum() / num_tokens
    step_kl, ce = per_position(step_nats_BL), per_position(nll_BL)
    total = step_kl + self.hybrid_coeff * ce
    vlb = self.num_steps * step_kl + per_position(self.prior_nats(x0_BL))
    return total, {"loss": total, "step_kl": step_kl, "ce": ce, "vlb": vlb}

  # Sampling from p.

  def reverse_step(self, state: base.Canvas, logits_BLW: jax.Array, t: jax.Array, s: jax.Array,
                   step_keys_B: jax.Array, settings: base.StepSettings) -> base.Canvas:
    """The ancestral step x_t -> x_s (steps round(t T) -> round(s T); none if they are equal).

    x_s ~ sum_{x_0} q(x_s | x_t, x_0) d(x_0) with d the denoiser p(x_0 | x_t) after settings.draw's
    temperature / top-k / top-p, i.e. p(x_s | x_t) with p~ ∝ d / q(x_t | .); at s = 0, x_0 ~ d
    itself (the distribution `settings.draw(log p(x_0 | x_t), token_u_BL)` samples, by the same
    inverse CDF). One uniform per position.
    """
    canvas_BL = state.tokens_BL
    batch_size, length = canvas_BL.shape
    token_u_BL, _ = base.step_uniforms(step_keys_B, length)
    t_B = jnp.full((batch_size,), jnp.round(t * self.num_steps), jnp.int32)
    s_B = jnp.full((batch_size,), jnp.round(s * self.num_steps), jnp.int32)
    likelihood_BLV = self.log_likelihood(canvas_BL, jnp.zeros_like(t_B), t_B)  # used twice
    denoiser_BLV = jax.nn.log_softmax(likelihood_BLV + self.x_theta_log_probs(logits_BLW), axis=-1)
    tempered_BLV = settings.draw.log_probs(denoiser_BLV)
    weights_BLV = jnp.where(tempered_BLV > -jnp.inf, tempered_BLV - likelihood_BLV, -jnp.inf)
    reverse_BLV = self.reverse_log_probs(canvas_BL, weights_BLV, t_B, s_B)
    log_probs_BLV = jnp.where((s_B == 0)[:, None, None], tempered_BLV, reverse_BLV)
    xs_BL = base.inverse_cdf_draw(jnp.exp(log_probs_BLV), token_u_BL)
    return state.moved_to(jnp.where((s_B >= t_B)[:, None], canvas_BL, xs_BL))

  def initial_state(self, model: base.ModelFn, fixed_tokens_BL: jax.Array, fixed_BL: jax.Array,
                    row_keys_B: jax.Array) -> base.Canvas:
    """A draw from the prior p(x_T) (`prior_log_probs`), fixed positions in place; row b draws with
    row_keys_B[b] only, and the model is not read."""
    del model
    length = fixed_BL.shape[1]

    def prior_row(row_key):
      clean_key, token_key = jax.random.split(row_key)
      if self.transition != "absorbing":
        return jax.random.randint(token_key, (length,), 0, self.vocab_size)
      clean_L = jax.random.uniform(clean_key, (length,)) < self.schedule.final_alpha
      tokens_L = jax.random.randint(token_key, (length,), 0, self.vocab_size - 1)
      return jnp.where(clean_L, jnp.where(tokens_L >= self.mask_id, tokens_L + 1, tokens_L), self.mask_id)

    prior_BL = jax.vmap(prior_row)(row_keys_B)
    return base.Canvas(jnp.where(fixed_BL, fixed_tokens_BL, prior_BL).astype(jnp.int32), fixed_BL)
