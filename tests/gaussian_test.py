"""Closed-form checks of the Gaussian embedding process, its bound and its samplers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from ddlm_jax import samplers
from ddlm_jax.processes import gaussian

V, D = 6, 16


def _table(seed=0, scale=1.0):
  return scale * jax.random.normal(jax.random.key(seed), (V, D))


def _process(kind="sqrt", num_steps=100):
  return gaussian.GaussianDiffusion(vocab_size=V, latent_dim=D, schedule=gaussian.NoiseSchedule(kind),
                                    num_steps=num_steps)


def exact_denoiser(process, embeddings_VD, word_probs_V=None):
  """E[E(w) | z_t] when every position is an independent word w ~ word_probs_V (uniform if None):
  the Bayes-optimal z0_hat."""
  table_VD = gaussian.normalize_embeddings(embeddings_VD)
  log_prior_V = 0.0 if word_probs_V is None else jnp.log(jnp.asarray(word_probs_V, jnp.float32))

  def denoise_fn(zt_BLD, t_B):
    t_B11 = t_B[:, None, None]
    # -||z - sqrt(abar) E(w)||^2 up to a per-position constant (all rows have norm sqrt(D)).
    logits_BLV = jnp.sqrt(process.schedule.alpha_bar(t_B11)) * jnp.einsum("bld,vd->blv", zt_BLD, table_VD)
    weights_BLV = jax.nn.softmax(logits_BLV / process.schedule.noise_var(t_B11) + log_prior_V, axis=-1)
    return weights_BLV @ table_VD

  return denoise_fn


@pytest.mark.parametrize("kind", gaussian.NOISE_KINDS)
def test_schedule_ends(kind):
  schedule = gaussian.NoiseSchedule(kind)
  t = jnp.linspace(0.0, 1.0, 101)
  np.testing.assert_allclose(schedule.alpha_bar(t) + schedule.noise_var(t), 1.0, atol=1e-6)
  assert 0.98 < float(schedule.alpha_bar(0.0)) < 1.0
  np.testing.assert_allclose(schedule.alpha_bar(1.0), 0.0, atol=1e-7)
  assert bool((jnp.diff(schedule.log_snr(t[:-1])) < 0).all())
  if kind == "sqrt":  # Diffusion-LM: 1 - abar(0) = sqrt(1e-4)
    np.testing.assert_allclose(schedule.noise_var(0.0), 0.01, rtol=1e-4)


@pytest.mark.parametrize("kind", gaussian.NOISE_KINDS)
@pytest.mark.parametrize("t", [0.05, 0.5, 0.95])
def test_forward_marginal_matches_closed_form(kind, t):
  process = _process(kind)
  z0_D = gaussian.normalize_embeddings(_table())[2]
  z0_BLD = jnp.broadcast_to(z0_D, (250, 40, D))
  zt_ND = process.corrupt(z0_BLD, jnp.full((250,), t), jax.random.key(1)).reshape(-1, D)
  n = zt_ND.shape[0]
  var = float(process.schedule.noise_var(t))
  # Per coordinate: standard error of the mean sqrt(var / n), of the variance var sqrt(2 / n).
  np.testing.assert_allclose(zt_ND.mean(0), jnp.sqrt(process.schedule.alpha_bar(t)) * z0_D,
                             atol=5 * np.sqrt(var / n))
  np.testing.assert_allclose(zt_ND.var(0), var, atol=5 * var * np.sqrt(2 / n))


@pytest.mark.parametrize("kind", gaussian.NOISE_KINDS)
def test_posterior_composes_to_the_marginal(kind):
  """z_t ~ q(z_t | z_0) then z_s ~ q(z_s | z_t, z_0) must give q(z_s | z_0): mean and variance."""
  process = _process(kind)
  t = jnp.array([0.01, 0.3, 0.8, 1.0])
  s = jnp.array([0.0, 0.29, 0.5, 0.99])
  c_x, c_z, var = process.posterior_coefficients(t, s)
  abar_s, abar_t = process.schedule.alpha_bar(s), process.schedule.alpha_bar(t)
  np.testing.assert_allclose(c_x + c_z * jnp.sqrt(abar_t), jnp.sqrt(abar_s), rtol=1e-5)
  noise_s, noise_t = process.schedule.noise_var(s), process.schedule.noise_var(t)
  np.testing.assert_allclose(c_z ** 2 * noise_t + var, noise_s, rtol=1e-5)
  assert bool((var > 0).all())


def test_posterior_mean_is_z0_at_s0_when_prediction_exact():
  process = gaussian.GaussianDiffusion(V, D, gaussian.NoiseSchedule("cosine", offset=1e-6))
  z0_BLD = gaussian.normalize_embeddings(_table())[None, :3]
  zt_BLD = process.corrupt(z0_BLD, jnp.array([0.02]), jax.random.key(0))
  mean_BLD, var = process.posterior(zt_BLD, z0_BLD, 0.02, 0.0)
  np.testing.assert_allclose(mean_BLD, z0_BLD, atol=1e-5)
  assert float(var.max()) < 1e-8


def test_exact_denoiser_reconstructs_at_small_t():
  process, table_VD = _process(), _table()
  x0_BL = jax.random.randint(jax.random.key(1), (8, 12), 0, V)
  e0_BLD = process.embed(x0_BL, table_VD)
  t_B = jnp.full((8,), 0.01)
  z0_hat_BLD = jax.jit(exact_denoiser(process, table_VD))(process.corrupt(e0_BLD, t_B, jax.random.key(2)), t_B)
  np.testing.assert_allclose(z0_hat_BLD, e0_BLD, atol=1e-4)
  np.testing.assert_array_equal(gaussian.round_to_tokens(z0_hat_BLD, gaussian.normalize_embeddings(table_VD)),
                                x0_BL)


def test_rounding_picks_the_nearest_embedding():
  table_VD = _table()
  z_BLD = 2.0 * jax.random.normal(jax.random.key(3), (4, 7, D))
  distances_BLV = ((np.asarray(z_BLD)[:, :, None] - np.asarray(table_VD)) ** 2).sum(-1)
  np.testing.assert_array_equal(gaussian.round_to_tokens(z_BLD, table_VD), distances_BLV.argmin(-1))


def test_rounding_distribution_is_most_likely_at_the_nearest_embedding():
  process, table_VD = _process(), _table()
  z_BLD = jax.random.normal(jax.random.key(4), (3, 5, D))
  log_probs_BLV = process.word_log_posterior(z_BLD, 0.0, table_VD)
  np.testing.assert_allclose(jnp.exp(log_probs_BLV).sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(log_probs_BLV.argmax(-1),
                                gaussian.round_to_tokens(z_BLD, gaussian.normalize_embeddings(table_VD)))


def test_word_posterior_is_bayes_rule_under_the_forward_marginal():
  """p(w | z_t) ∝ N(z_t; sqrt(abar_t) E(w), (1 - abar_t) I) per row's t; uniform over words at t = 1."""
  process, table_VD = _process(), _table()
  t_B = jnp.array([0.01, 0.3, 0.9])
  z_BLD = 2.0 * jax.random.normal(jax.random.key(8), (3, 5, D))
  mean_BVD = np.sqrt(process.schedule.alpha_bar(t_B))[:, None, None] * np.asarray(process.table(table_VD))
  var_B = np.asarray(process.schedule.noise_var(t_B))
  log_density_BLV = -((np.asarray(z_BLD)[:, :, None] - mean_BVD[:, None]) ** 2).sum(-1) / (2 * var_B[:, None, None])
  expected_BLV = log_density_BLV - scipy.special.logsumexp(log_density_BLV, axis=-1, keepdims=True)
  np.testing.assert_allclose(process.word_log_posterior(z_BLD, t_B, table_VD), expected_BLV, atol=1e-4)
  np.testing.assert_allclose(process.word_log_posterior(z_BLD, 1.0, table_VD), -np.log(V), atol=1e-5)


def test_clamping_returns_embedding_rows():
  table_VD = _table()
  clamped_ND = gaussian.clamp_to_embeddings(jax.random.normal(jax.random.key(5), (2, 9, D)), table_VD)
  matches_NV = (np.abs(np.asarray(clamped_ND).reshape(-1, 1, D) - np.asarray(table_VD)).max(-1) == 0)
  assert (matches_NV.sum(-1) == 1).all()


@pytest.mark.parametrize("scale", [1e-4, 1.0, 30.0])
def test_collapse_guard_fixes_the_norms(scale):
  table_VD = gaussian.normalize_embeddings(_table(scale=scale))
  np.testing.assert_allclose(jnp.linalg.norm(table_VD, axis=-1), np.sqrt(D), rtol=1e-5)


def test_collapse_guard_holds_through_training_gradients():
  """A gradient step on the raw table that shrinks it leaves the normalised norms at sqrt(D)."""
  process = _process()
  x0_BL = jax.random.randint(jax.random.key(6), (4, 5), 0, V)
  shrink_fn = lambda zt_BLD, t_B: 0.0 * zt_BLD  # the collapse-seeking predictor
  grad_VD = jax.jit(jax.grad(lambda table_VD: process.loss(
      gaussian.EmbeddingModel(shrink_fn, table_VD), x0_BL, jax.random.key(7))[0]))(
      _table())
  table_VD = gaussian.normalize_embeddings(_table() - 10.0 * grad_VD)
  np.testing.assert_allclose(jnp.linalg.norm(table_VD, axis=-1), np.sqrt(D), rtol=1e-5)


def test_partial_noising_never_changes_kept_positions():
  process = _process()
  e0_BLD = jax.random.normal(jax.random.key(8), (4, 6, D))
  keep_BL = jax.random.bernoulli(jax.random.key(9), 0.5, (4, 6))
  zt_BLD = process.corrupt(e0_BLD, jnp.array([0.1, 0.5, 0.9, 1.0]), jax.random.key(10), keep_BL)
  np.testing.assert_array_equal(np.asarray(zt_BLD)[np.asarray(keep_BL)], np.asarray(e0_BLD)[np.asarray(keep_BL)])
  assert (np.asarray(zt_BLD)[~np.asarray(keep_BL)] != np.asarray(e0_BLD)[~np.asarray(keep_BL)]).all()


def test_step_kl_is_nonnegative_and_zero_when_exact():
  process = _process()
  e0_BLD = jax.random.normal(jax.random.key(11), (3, 4, D))
  t, s = jnp.array([0.01, 0.5, 1.0]), jnp.array([0.0, 0.49, 0.99])
  wrong_BLD = e0_BLD + 0.1 * jax.random.normal(jax.random.key(12), e0_BLD.shape)
  assert bool((process.step_kl(e0_BLD, wrong_BLD, t, s) > 0).all())
  np.testing.assert_array_equal(process.step_kl(e0_BLD, e0_BLD, t, s), 0.0)
  assert bool((process.prior_kl(e0_BLD) >= 0).all())


def test_ddim_eta1_step_is_the_ddpm_step():
  process = _process()
  zt_BLD, z0_hat_BLD = jax.random.normal(jax.random.key(13), (2, 2, 3, D))
  for t, s in [(1.0, 0.9), (0.5, 0.4), (0.01, 0.0)]:
    ddim = process.step_mean_var(zt_BLD, z0_hat_BLD, t, s, "ddim", 1.0)
    ddpm = process.step_mean_var(zt_BLD, z0_hat_BLD, t, s, "ddpm")
    for ddim_part, ddpm_part in zip(ddim, ddpm):
      np.testing.assert_allclose(ddim_part, ddpm_part, atol=1e-5, rtol=1e-5)


def test_ddim_eta0_has_no_noise_and_keeps_the_predicted_noise():
  """z_s = sqrt(abar_s) z0_hat + sqrt(1 - abar_s) eps_hat: the same eps_hat reads back at s."""
  process = _process()
  zt_BLD, z0_hat_BLD = jax.random.normal(jax.random.key(13), (2, 2, 3, D))
  t, s = 0.6, 0.3
  mean_BLD, noise_var, _ = process.step_mean_var(zt_BLD, z0_hat_BLD, t, s, "ddim", 0.0)
  assert float(jnp.max(noise_var)) == 0.0
  eps_hat = lambda z, time: ((z - jnp.sqrt(process.schedule.alpha_bar(time)) * z0_hat_BLD)
                             / jnp.sqrt(process.schedule.noise_var(time)))
  np.testing.assert_allclose(eps_hat(mean_BLD, s), eps_hat(zt_BLD, t), atol=1e-4)


def _sample(model, process, steps, key, fixed_tokens_BL, fixed_BL, strategy="ancestral", eta=0.0, clamp=False,
            record_trajectory=False):
  config = samplers.SamplerConfig(steps=steps, strategy=strategy, eta=eta, clamp=clamp,
                                  record_trajectory=record_trajectory)
  return samplers.sample(model, process, config, fixed_tokens_BL, fixed_BL, key)


def test_ddim_with_eta0_is_deterministic():
  """From the same z_1, DDIM (eta = 0) steps give the same result whatever the noise keys."""
  process, table_VD = _process(), _table()
  model = gaussian.EmbeddingModel(exact_denoiser(process, table_VD), table_VD)
  config = samplers.SamplerConfig(steps=10, strategy="ddim")
  z1_BLD = jax.random.normal(jax.random.key(14), (2, 5, D))
  free_BL = jnp.zeros((2, 5), bool)

  @jax.jit
  def run_from(z_BLD, key):
    state = process.initial_state(model, jnp.zeros((2, 5), jnp.int32), free_BL, jax.random.split(key, 2))
    state = state.replace(z_BLD=z_BLD)
    for i in range(10):
      t, s = samplers.step_times(config, i)
      state = process.reverse_step(state, model(state.z_BLD, jnp.full((2,), t)), t, s,
                                   jax.random.split(jax.random.fold_in(key, i), 2), config.step_settings)
    return state.z_BLD

  np.testing.assert_array_equal(run_from(z1_BLD, jax.random.key(1)), run_from(z1_BLD, jax.random.key(2)))


@pytest.mark.parametrize("strategy,eta,clamp", [("ancestral", 0.0, False), ("ddim", 0.5, True)])
def test_sampler_never_changes_fixed_tokens(strategy, eta, clamp):
  process, table_VD = _process(), _table()
  fixed_BL = jnp.zeros((4, 8), bool).at[:, ::3].set(True)
  fixed_tokens_BL = jax.random.randint(jax.random.key(15), (4, 8), 0, V)
  shifted_fn = lambda zt_BLD, t_B: jnp.roll(zt_BLD, 1, axis=1)  # a denoiser that mixes positions
  model = gaussian.EmbeddingModel(shifted_fn, table_VD)
  tokens_BL = jax.jit(lambda key: _sample(model, process, 20, key, fixed_tokens_BL, fixed_BL, strategy, eta,
                                          clamp))(jax.random.key(16))
  assert tokens_BL.dtype == jnp.int32 and tokens_BL.shape == (4, 8)
  np.testing.assert_array_equal(np.asarray(tokens_BL)[np.asarray(fixed_BL)],
                                np.asarray(fixed_tokens_BL)[np.asarray(fixed_BL)])
  assert bool(((tokens_BL >= 0) & (tokens_BL < V)).all())


@pytest.mark.parametrize("strategy", ["ancestral", "ddim"])
def test_sampler_with_exact_denoiser_draws_the_data_distribution(strategy):
  """Independent words with skewed shares and their Bayes-optimal denoiser: 25 steps give each
  word its share over 4096 positions (5 binomial standard errors plus 0.01 of discretisation)."""
  word_probs_V = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
  process, table_VD = _process(), _table()
  model = gaussian.EmbeddingModel(exact_denoiser(process, table_VD, word_probs_V), table_VD)
  tokens_BL = jax.jit(lambda key: _sample(model, process, 25, key, jnp.zeros((1024, 4), jnp.int32),
                                          jnp.zeros((1024, 4), bool), strategy))(jax.random.key(17))
  shares_V = np.bincount(np.asarray(tokens_BL).ravel(), minlength=V) / tokens_BL.size
  tolerance_V = 5 * np.sqrt(word_probs_V * (1 - word_probs_V) / tokens_BL.size) + 0.01
  assert (np.abs(shares_V - word_probs_V) < tolerance_V).all(), (shares_V, word_probs_V)


def test_nelbo_of_exact_denoiser_bounds_the_true_nll():
  """Uniform iid words: -log p(w) = L log V, and the T-step bound of the exact denoiser is close above it."""
  process, table_VD, draws, length = _process(num_steps=200), _table(), 2000, 2
  x0_NL = jax.random.randint(jax.random.key(18), (draws, length), 0, V)
  estimate = jax.jit(lambda key: process.nelbo(
      gaussian.EmbeddingModel(exact_denoiser(process, table_VD), table_VD), x0_NL, key))(
      jax.random.key(19))
  mean, stderr = float(estimate.nats_B.mean()), float(estimate.nats_B.std() / np.sqrt(draws))
  true_nll = length * np.log(V)
  assert mean > true_nll - 4 * stderr, (mean, true_nll, stderr)
  print(f"exact-denoiser NELBO {mean:.4f} +- {stderr:.4f} nats vs true NLL {true_nll:.4f}")
  assert mean < 1.1 * true_nll, (mean, true_nll, stderr)


def test_prompt_positions_are_not_scored():
  process, table_VD = _process(), _table()
  x0_BL = jax.random.randint(jax.random.key(20), (3, 6), 0, V)
  prompt_BL = jnp.zeros((3, 6), bool).at[:, :2].set(True)
  exact_fn = exact_denoiser(process, table_VD)
  ruined_fn = lambda zt_BLD, t_B: exact_fn(zt_BLD, t_B).at[:, :2].set(100.0)  # wrong only at the prompt

  @jax.jit
  def evaluate(key):
    exact_model, ruined_model = (gaussian.EmbeddingModel(fn, table_VD) for fn in (exact_fn, ruined_fn))
    exact, ruined = (process.nelbo(model, x0_BL, key, prompt_BL) for model in (exact_model, ruined_model))
    return exact, ruined, process.loss(exact_model, x0_BL, key, prompt_BL)

  exact, ruined, (loss, metrics) = evaluate(jax.random.key(21))
  np.testing.assert_array_equal(ruined.nats_B, exact.nats_B)
  np.testing.assert_array_equal(exact.num_tokens_B, 4.0)
  assert np.isfinite(float(loss)) and set(metrics) == {"loss", "mse", "prior", "rounding"}


def test_bad_input_raises():
  with pytest.raises(ValueError, match="noise schedule kind"):
    gaussian.NoiseSchedule("linear")
  with pytest.raises(ValueError, match="num_steps"):
    gaussian.GaussianDiffusion(V, D, num_steps=0)
  with pytest.raises(ValueError, match="method"):
    _process().step_mean_var(jnp.zeros((1, 2, D)), jnp.zeros((1, 2, D)), 0.5, 0.4, "euler")
  model = gaussian.EmbeddingModel(lambda z, t: z, _table())
  for strategy in ("low_confidence", "random"):
    with pytest.raises(ValueError, match="reveals tokens"):
      _sample(model, _process(), 5, jax.random.key(0), jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), bool),
              strategy)
