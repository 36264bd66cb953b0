"""Gaussian diffusion on token embeddings: Diffusion-LM (Li et al. 2022), DiffuSeq (Gong et al. 2023).

Tokens w_l are embedded as E(w_l) in R^D (a row of `embeddings_VD`, normalised by
`normalize_embeddings`), and a variance-preserving Gaussian process runs on the embeddings:

  q(z_t | w) = N(sqrt(abar(t)) E(w), (1 - abar(t)) I),   t in [0, 1],

with abar(1) = 0 (pure noise) and abar(0) < 1: z_0 is Diffusion-LM's noisy embedding
q(z_0 | w) = N(sqrt(abar(0)) E(w), (1 - abar(0)) I), and text is read off z_0 by rounding. The
denoiser predicts the clean embedding, z0_hat = f(z_t, t) (x_0-parameterisation, Diffusion-LM
Sec. 4.2). For s < t the posterior (DDPM, Ho et al. 2020, eq. 6-7, with alpha_ts = abar_t / abar_s) is

  q(z_s | z_t, E) = N(c_x(t, s) E + c_z(t, s) z_t, v(t, s) I),
  c_x = sqrt(abar_s) (1 - alpha_ts) / (1 - abar_t),  c_z = sqrt(alpha_ts) (1 - abar_s) / (1 - abar_t),
  v = (1 - alpha_ts) (1 - abar_s) / (1 - abar_t),

and the model's reverse step p(z_s | z_t) is the same Gaussian with E replaced by z0_hat.

Negative ELBO (discrete time, grid t_i = i / T, i = 0..T; Diffusion-LM eq. 2 / DDPM eq. 5):

  -log p(w) <= KL(q(z_1 | w) || N(0, I))                                        prior L_T
               + sum_{i=1}^T E_q KL(q(z_{t_{i-1}} | z_{t_i}, E) || p(z_{t_{i-1}} | z_{t_i}))
               + E_{q(z_0 | w)} [-log p(w | z_0)]                                  rounding,

where each KL is c_x^2 ||E(w) - z0_hat||^2 / (2 v) in closed form (equal variances), and the
rounding distribution is the exact Bayes posterior of w given z_0 under q(z_0 | w) with a uniform
prior over words:

  p(w | z) = softmax_w(-||z - sqrt(abar(0)) E(w)||^2 / (2 (1 - abar(0)))).

Because every row has the same norm, this softmax equals dot-product logits
z . E(w) sqrt(abar(0)) / (1 - abar(0)), and its argmax is the nearest embedding (`round_to_tokens`).

Training loss (Diffusion-LM's end-to-end L_simple, eq. 3, per scored position):
  mse      = mean_D ||z0_hat(z_t, t) - E(w)||^2 at t ~ U[0, 1] (gradient into E through both the
             noisy input and the target: the embedding is learned end to end),
  prior    = KL(q(z_1 | w) || N(0, I)) / D, which contains Diffusion-LM's ||sqrt(abar_T) E(w)||^2
             term; it is ~0 here since abar(1) = 0 and the norms are fixed, and kept so the loss
             stays exact for any schedule,
  rounding = -log p(w | z_0), z_0 ~ q(z_0 | w).

Embedding collapse: with learned E the MSE alone is minimised by shrinking all embeddings to a
point. Every function here reads the table through `normalize_embeddings`, which rescales each row
to norm sqrt(D) (unit per-coordinate scale, matching the unit-variance noise), so the norms cannot
shrink and the rounding term pushes distinct words apart.

Partial noising (DiffuSeq): positions marked `keep_BL` / `prompt_mask_BL` stay at their clean
embedding E(w) at every t and are never scored. Reverse steps (`step_mean_var`): ancestral DDPM
and DDIM (Song et al. 2021, eta = 0 deterministic); `reverse_step` takes one on the sampler's state
(`Points`), with Diffusion-LM's clamping trick and classifier guidance as options, and `tokens`
rounds the state to the nearest embeddings.

The process is an `EmbeddingProcess` of `processes/base.py`: where the token families take
`model_fn(x_t_BL, t_B) -> logits`, it takes an `EmbeddingModel`, the network's denoiser
z_t -> z0_hat together with its (learned) embedding table.
"""
import dataclasses
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from ddlm_jax.processes import base

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
NOISE_KINDS = ("sqrt", "cosine")
METHODS = ("ddpm", "ddim")


@dataclasses.dataclass(frozen=True)
class EmbeddingModel:
  """What the process needs from a network.

  Attributes:
    denoise_fn: (z_t float32[B, L, E], t float32[B]) -> z0_hat float32[B, L, E].
    embeddings_VD: the learned table float[W, E], W >= V rows (padded rows are ignored); the
      process reads it through `normalize_embeddings`.
  """
  denoise_fn: DenoiseFn
  embeddings_VD: jax.Array

  def __call__(self, z_BLD: jax.Array, t_B: jax.Array) -> jax.Array:
    """z0_hat: the network as the sampler runs it on a state's `network_input`."""
    return self.denoise_fn(z_BLD, t_B)


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """abar(t) of the Gaussian process, t in [0, 1].

  Attributes:
    kind: 'sqrt' (Diffusion-LM): 1 - abar(t) = sqrt((t + s) / (1 + s)); 'cosine' (Nichol & Dhariwal
      2021): abar(t) = cos^2(pi/2 (t + s) / (1 + s)). Both reach abar(1) = 0 exactly; Diffusion-LM's
      1 - sqrt(t + s) is rescaled by sqrt(1 + s) (a 5e-5 relative change) instead of clipping beta.
      The cosine is not divided by its value at 0, so abar(0) < 1 for both.
    offset: s; default 1e-4 for 'sqrt' (1 - abar(0) = 0.01) and 0.008 for 'cosine'.
  """
  kind: str = "sqrt"
  offset: float | None = None

  def __post_init__(self):
    if self.kind not in NOISE_KINDS:
      raise ValueError(f"noise schedule kind {self.kind!r} is not one of {NOISE_KINDS}")
    if self.offset is not None and not 0.0 < self.offset < 1.0:
      raise ValueError(f"noise schedule offset must lie in (0, 1), got {self.offset}")

  @property
  def s(self) -> float:
    if self.offset is not None:
      return self.offset
    return 1e-4 if self.kind == "sqrt" else 0.008

  def _angle(self, t):
    return 0.5 * jnp.pi * (t + self.s) / (1.0 + self.s)

  def alpha_bar(self, t):
    """abar(t): the signal variance at time t (array, any shape)."""
    if self.kind == "sqrt":
      return 1.0 - jnp.sqrt((t + self.s) / (1.0 + self.s))
    return jnp.cos(self._angle(t)) ** 2

  def noise_var(self, t):
    """1 - abar(t), without cancellation near t = 0."""
    if self.kind == "sqrt":
      return jnp.sqrt((t + self.s) / (1.0 + self.s))
    return jnp.sin(self._angle(t)) ** 2

  def log_snr(self, t):
    """log(abar(t) / (1 - abar(t))); -inf at t = 1."""
    return jnp.log(self.alpha_bar(t)) - jnp.log(self.noise_var(t))


def normalize_embeddings(embeddings_VD: jax.Array) -> jax.Array:
  """The collapse guard: each row rescaled to norm sqrt(D) (rows must be non-zero)."""
  embeddings_VD = embeddings_VD.astype(jnp.float32)
  sq_norm_V1 = jnp.sum(embeddings_VD ** 2, axis=-1, keepdims=True)
  return embeddings_VD * jnp.sqrt(embeddings_VD.shape[-1] / jnp.maximum(sq_norm_V1, 1e-12))


def sq_distances(z_BLD: jax.Array, embeddings_VD: jax.Array, scale=1.0) -> jax.Array:
  """||z - scale E(v)||^2 for every position and word, float32[B, L, V]; scale is a scalar or
  broadcasts against [B, L, V] (one per row: float32[B, 1, 1])."""
  cross_BLV = jnp.einsum("bld,vd->blv", z_BLD, embeddings_VD)
  return (jnp.sum(z_BLD ** 2, -1, keepdims=True) - 2.0 * scale * cross_BLV
          + scale ** 2 * jnp.sum(embeddings_VD ** 2, -1))


def round_to_tokens(z_BLD: jax.Array, embeddings_VD: jax.Array) -> jax.Array:
  """The nearest embedding row of each position (argmin Euclidean distance), int32[B, L]."""
  return jnp.argmin(sq_distances(z_BLD, embeddings_VD), axis=-1).astype(jnp.int32)


def clamp_to_embeddings(z_BLD: jax.Array, embeddings_VD: jax.Array) -> jax.Array:
  """The clamping trick: each position snapped to its nearest embedding row, float32[B, L, D]."""
  return embeddings_VD[round_to_tokens(z_BLD, embeddings_VD)]


def _per_row(x) -> jax.Array:
  """A time (scalar or float32[B]) shaped to broadcast against [B, L, D]."""
  return jnp.reshape(jnp.asarray(x, jnp.float32), (-1, 1, 1))


def hold(z_BLD: jax.Array, clean_BLD: jax.Array, keep_BL: jax.Array | None) -> jax.Array:
  """z with the kept positions (partial noising, fixed tokens) at their clean embedding."""
  return z_BLD if keep_BL is None else jnp.where(keep_BL[..., None], clean_BLD, z_BLD)


@flax.struct.dataclass
class Points:
  """The reverse-process state of the Gaussian family.

  Attributes:
    z_BLD: z_t, float32[B, L, D]; fixed positions hold their clean embedding.
    fixed_tokens_BL: int32[B, L], the tokens of the fixed positions.
    fixed_BL: bool[B, L], the positions no step changes.
    table_VD: the normalised embedding table float32[V, D] (clamping, rounding, null condition).
  """
  z_BLD: jax.Array
  fixed_tokens_BL: jax.Array
  fixed_BL: jax.Array
  table_VD: jax.Array

  @property
  def network_input(self) -> jax.Array:
    return self.z_BLD

  def moved_to(self, z_BLD: jax.Array) -> "Points":
    """These points with their free positions at z_BLD (fixed ones keep their clean embedding)."""
    return self.replace(z_BLD=hold(z_BLD, self.table_VD[self.fixed_tokens_BL], self.fixed_BL))


@dataclasses.dataclass(frozen=True)
class GaussianDiffusion:
  """Gaussian diffusion on (normalised) token embeddings.

  Attributes:
    vocab_size: V, rows of the embedding table.
    latent_dim: D, the embedding size (the network's latent_dim).
    schedule: abar(t).
    num_steps: T, the grid of the discrete-time bound (and the default sampler grid).
    antithetic_time: draw a batch's times stratified (see `base.sample_times`).
  """
  vocab_size: int
  latent_dim: int
  schedule: NoiseSchedule = NoiseSchedule()
  num_steps: int = 1000
  antithetic_time: bool = True
  causal_network = False
  exact_likelihood = False
  absorbing = False
  continuous = True

  def __post_init__(self):
    if self.vocab_size < 2:
      raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
    if self.latent_dim < 1:
      raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}")
    if self.num_steps < 1:
      raise ValueError(f"num_steps (T) must be >= 1, got {self.num_steps}")

  def table(self, embeddings_VD: jax.Array) -> jax.Array:
    """The normalised table of the V words, float32[V, D] (padded rows dropped)."""
    return normalize_embeddings(embeddings_VD[:self.vocab_size])

  def embed(self, tokens_BL: jax.Array, embeddings_VD: jax.Array) -> jax.Array:
    """E(w): rows of the normalised table, float32[B, L, D]."""
    return self.table(embeddings_VD)[tokens_BL]

  def corrupt(self, z0_BLD: jax.Array, t_B: jax.Array, key: jax.Array,
              keep_BL: jax.Array | None = None) -> jax.Array:
    """Samples z_t = sqrt(abar(t)) z_0 + sqrt(1 - abar(t)) eps; kept positions stay exactly z_0.

    Args:
      z0_BLD: clean embeddings, float32[B, L, D].
      t_B: times, float32[B].
      key: PRNG key.
      keep_BL: optional bool[B, L]; True positions (DiffuSeq source) are not noised.
    """
    eps_BLD = jax.random.normal(key, z0_BLD.shape)
    zt_BLD = (jnp.sqrt(self.schedule.alpha_bar(_per_row(t_B))) * z0_BLD
              + jnp.sqrt(self.schedule.noise_var(_per_row(t_B))) * eps_BLD)
    return hold(zt_BLD, z0_BLD, keep_BL)

  def posterior_coefficients(self, t, s) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(c_x, c_z, v) of q(z_s | z_t, z_0) = N(c_x z_0 + c_z z_t, v I) for s < t (any shapes)."""
    abar_s, abar_t = self.schedule.alpha_bar(s), self.schedule.alpha_bar(t)
    noise_s, noise_t = self.schedule.noise_var(s), self.schedule.noise_var(t)
    # 1 - abar_t / abar_s from the difference of the smaller pair, to avoid cancellation.
    one_minus_alpha_ts = jnp.where(abar_s < 0.5, abar_s - abar_t, noise_t - noise_s) / abar_s
    c_x = jnp.sqrt(abar_s) * one_minus_alpha_ts / noise_t
    c_z = jnp.sqrt(abar_t / abar_s) * noise_s / noise_t
    return c_x, c_z, one_minus_alpha_ts * noise_s / noise_t

  def posterior(self, zt_BLD: jax.Array, z0_BLD: jax.Array, t, s) -> tuple[jax.Array, jax.Array]:
    """Mean float32[B, L, D] and variance (broadcastable [B, 1, 1]) of q(z_s | z_t, z_0), s < t."""
    c_x, c_z, var = self.posterior_coefficients(_per_row(t), _per_row(s))
    return c_x * z0_BLD + c_z * zt_BLD, var

  def step_kl(self, z0_BLD: jax.Array, z0_hat_BLD: jax.Array, t, s) -> jax.Array:
    """KL(q(z_s | z_t, z_0) || p(z_s | z_t)) per position, nats float32[B, L]: c_x^2 ||z_0 - z0_hat||^2 / 2v."""
    c_x, _, var = self.posterior_coefficients(_per_row(t), _per_row(s))
    return (c_x ** 2 / (2.0 * var) * (z0_BLD - z0_hat_BLD) ** 2).sum(-1)

  def prior_kl(self, z0_BLD: jax.Array) -> jax.Array:
    """KL(q(z_1 | z_0) || N(0, I)) per position, nats float32[B, L]."""
    abar = self.schedule.alpha_bar(1.0)
    per_dim_BLD = abar * z0_BLD ** 2 - abar - jnp.log1p(-abar)
    return 0.5 * per_dim_BLD.sum(-1)

  def word_log_posterior(self, z_BLD: jax.Array, t, embeddings_VD: jax.Array) -> jax.Array:
    """log p(w | z_t) of each position's word from its own noisy embedding, under a uniform prior
    over the V words: log softmax_w(-||z_t - sqrt(abar(t)) E(w)||^2 / (2 (1 - abar(t)))).

    Args:
      z_BLD: noisy embeddings, float32[B, L, D].
      t: time, a scalar or float32[B]. At t = 0 this is the rounding distribution p(w | z_0).
      embeddings_VD: the embedding table.

    Returns:
      float32[B, L, V].
    """
    t = _per_row(t)
    sq_distances_BLV = sq_distances(z_BLD, self.table(embeddings_VD), jnp.sqrt(self.schedule.alpha_bar(t)))
    return jax.nn.log_softmax(-sq_distances_BLV / (2.0 * self.schedule.noise_var(t)), -1)

  def _rounding_nll(self, x0_BL, e0_BLD, embeddings_VD, key) -> jax.Array:
    """-log p(w | z_0) at z_0 ~ q(z_0 | w), float32[B, L]."""
    z0_BLD = self.corrupt(e0_BLD, jnp.zeros(x0_BL.shape[:1]), key)
    return -base.token_log_likelihood(self.word_log_posterior(z0_BLD, 0.0, embeddings_VD), x0_BL)

  def nelbo(self, model: EmbeddingModel, x0_BL: jax.Array, key: jax.Array,
            prompt_mask_BL: jax.Array | None = None, t_B: jax.Array | None = None) -> base.Nelbo:
    """One-sample unbiased estimate of the discrete-time NELBO of each sequence, in nats.

    L_T + T * KL_i + rounding, with one step i ~ U{1..T} per sequence (i = ceil(t T)).

    Args:
      model: the denoiser and its embedding table.
      x0_BL: clean tokens, int32[B, L].
      key: PRNG key.
      prompt_mask_BL: optional bool[B, L]; prompt/source positions: kept clean, never scored.
      t_B: optional times in (0, 1] (mapped to the grid step ceil(t T)); drawn if None.
    """
    t_key, noise_key, round_key = jax.random.split(key, 3)
    if t_B is None:
      t_B = base.sample_times(t_key, x0_BL.shape[0], self.antithetic_time)
    step_B = jnp.clip(jnp.ceil(t_B * self.num_steps), 1, self.num_steps)
    t_B, s_B = step_B / self.num_steps, (step_B - 1) / self.num_steps
    e0_BLD = self.embed(x0_BL, model.embeddings_VD)
    zt_BLD = self.corrupt(e0_BLD, t_B, noise_key, keep_BL=prompt_mask_BL)
    kl_BL = self.num_steps * self.step_kl(e0_BLD, model.denoise_fn(zt_BLD, t_B), t_B, s_B)
    nats_BL = (kl_BL + self.prior_kl(e0_BLD)
               + self._rounding_nll(x0_BL, e0_BLD, model.embeddings_VD, round_key))
    scored_BL = base.scored_mask(x0_BL, prompt_mask_BL)
    return base.Nelbo(nats_B=jnp.where(scored_BL, nats_BL, 0.0).sum(-1),
                      num_tokens_B=scored_BL.sum(-1).astype(jnp.float32))

  def loss(self, model: EmbeddingModel, x0_BL: jax.Array, key: jax.Array,
           prompt_mask_BL: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Diffusion-LM's end-to-end objective, mse + prior + rounding (see the module docstring),
    averaged over scored positions; returns (loss, metrics)."""
    t_key, noise_key, round_key = jax.random.split(key, 3)
    t_B = base.sample_times(t_key, x0_BL.shape[0], self.antithetic_time)
    e0_BLD = self.embed(x0_BL, model.embeddings_VD)
    zt_BLD = self.corrupt(e0_BLD, t_B, noise_key, keep_BL=prompt_mask_BL)
    terms = {"mse": jnp.mean((model.denoise_fn(zt_BLD, t_B) - e0_BLD) ** 2, axis=-1),
             "prior": self.prior_kl(e0_BLD) / self.latent_dim,
             "rounding": self._rounding_nll(x0_BL, e0_BLD, model.embeddings_VD, round_key)}
    scored_BL = base.scored_mask(x0_BL, prompt_mask_BL)
    count = jnp.maximum(scored_BL.sum(), 1)
    metrics = {name: jnp.where(scored_BL, term_BL, 0.0).sum() / count for name, term_BL in terms.items()}
    metrics["loss"] = sum(metrics.values())
    return metrics["loss"], metrics

  def step_mean_var(self, zt_BLD: jax.Array, z0_hat_BLD: jax.Array, t, s, method: str = "ddpm",
                    eta: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The reverse step z_t -> z_s (s < t) as z_s = mean + sqrt(noise_var) noise.

    'ddpm' (ancestral): p(z_s | z_t) = q(z_s | z_t, z0_hat). 'ddim' (Song et al. 2021, eq. 12):
    mean = sqrt(abar_s) z0_hat + sqrt(1 - abar_s - sigma^2) eps_hat with sigma^2 = eta^2 v(t, s):
    eta = 0 is deterministic, eta = 1 is the DDPM step.

    Returns:
      (mean float32[B, L, D], noise_var, posterior_var), variances broadcastable to [B, 1, 1];
      posterior_var is q's v(t, s) whatever the method (the scale of guidance's fluency term).
    """
    if method not in METHODS:
      raise ValueError(f"reverse step method {method!r} is not one of {METHODS}")
    t, s = _per_row(t), _per_row(s)
    posterior_mean_BLD, posterior_var = self.posterior(zt_BLD, z0_hat_BLD, t, s)
    if method == "ddpm":
      return posterior_mean_BLD, posterior_var, posterior_var
    eps_hat_BLD = ((zt_BLD - jnp.sqrt(self.schedule.alpha_bar(t)) * z0_hat_BLD)
                   / jnp.sqrt(self.schedule.noise_var(t)))
    sigma_sq = eta ** 2 * posterior_var
    direction = jnp.sqrt(jnp.maximum(self.schedule.noise_var(s) - sigma_sq, 0.0))
    mean_BLD = jnp.sqrt(self.schedule.alpha_bar(s)) * z0_hat_BLD + direction * eps_hat_BLD
    return mean_BLD, sigma_sq, posterior_var

  def initial_state(self, model: EmbeddingModel, fixed_tokens_BL: jax.Array, fixed_BL: jax.Array,
                    row_keys_B: jax.Array) -> Points:
    """z_1 ~ N(0, I) at free positions (row b's from row_keys_B[b] only), the clean embedding of
    the fixed token at fixed ones."""
    table_VD = self.table(model.embeddings_VD)
    clean_BLD = table_VD[fixed_tokens_BL]
    noise_BLD = jax.vmap(lambda row_key: jax.random.normal(row_key, clean_BLD.shape[1:]))(row_keys_B)
    return Points(z_BLD=hold(noise_BLD, clean_BLD, fixed_BL), fixed_tokens_BL=fixed_tokens_BL, fixed_BL=fixed_BL,
                  table_VD=table_VD)

  def reverse_step(self, state: Points, z0_hat_BLD: jax.Array, t: jax.Array, s: jax.Array,
                   step_keys_B: jax.Array, settings: base.StepSettings,
                   guide_fn: Callable | None = None) -> Points:
    """One reverse step z_t -> z_s (`step_mean_var` with settings.method and eta), with z0_hat first
    snapped to the nearest embedding if settings.clamp, and the mean moved by classifier guidance
    guide_fn(mean, posterior_var, s_B, free_BL) if given; row b's noise from step_keys_B[b] only."""
    batch_size = state.z_BLD.shape[0]
    if settings.clamp:
      z0_hat_BLD = clamp_to_embeddings(z0_hat_BLD, state.table_VD)
    mean_BLD, noise_var, posterior_var = self.step_mean_var(state.z_BLD, z0_hat_BLD, t, s, settings.method,
                                                            settings.eta)
    if guide_fn is not None:
      mean_BLD = guide_fn(mean_BLD, posterior_var, jnp.full((batch_size,), s), ~state.fixed_BL)
    noise_BLD = jax.vmap(lambda step_key: jax.random.normal(step_key, state.z_BLD.shape[1:]))(step_keys_B)
    return state.moved_to(mean_BLD + jnp.sqrt(noise_var) * noise_BLD)

  def clean_input(self, state: Points, token_id: int) -> jax.Array:
    """The network reads a clean token as its normalised embedding, float32[D]."""
    return state.table_VD[token_id]

  def tokens(self, state: Points) -> jax.Array:
    """The fixed tokens at fixed positions, z rounded to the nearest embedding elsewhere, int32[B, L]."""
    return jnp.where(state.fixed_BL, state.fixed_tokens_BL, round_to_tokens(state.z_BLD, state.table_VD))
