"""Checks of the uniform-noise process (UDLM) against dense-matrix brute force and exact answers."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm_jax import samplers
from ddlm_jax import schedules
from ddlm_jax import testing
from ddlm_jax.processes import base
from ddlm_jax.processes import uniform

TOKENS = (0, 1, 2)  # the tiny distributions' ids; V = 4, so id 3 is only ever noise
VOCAB = 4


def alpha64(schedule, t):
  """alpha(t) in float64, clipped at 0 (the library computes it in float32)."""
  t = np.asarray(t, np.float64)
  alpha = np.cos(np.pi / 2 * t) if schedule.kind == "cosine" else 1 - (1 - schedule.final_alpha) * t
  return np.clip(alpha, 0.0, 1.0)


def marginal(alpha, vocab_size):
  """Dense q(x_t = j | x_0 = k) = alpha [j = k] + (1 - alpha) / V, float64[..., V, V] (k, j)."""
  alpha = np.asarray(alpha, np.float64)[..., None, None]
  return alpha * np.eye(vocab_size) + (1 - alpha) / vocab_size


def dense_posterior(alpha_t, alpha_s, vocab_size):
  """Bayes' rule with dense matrices: q(x_s = j | x_t = i, x_0 = k), float64[k, i, j].

  q(x_s | x_t, x_0) ∝ q(x_t | x_s) q(x_s | x_0), with the uniform transition of alpha_t / alpha_s
  from s to t.
  """
  step_ji = marginal(alpha_t / alpha_s, vocab_size)  # q(x_t = i | x_s = j)
  joint_kij = step_ji.T[None] * marginal(alpha_s, vocab_size)[:, None, :]
  return joint_kij / joint_kij.sum(-1, keepdims=True)


def exact_uniform_denoiser(dist: testing.TinyDistribution, process: uniform.UniformDiffusion):
  """model_fn(x_t, t) -> logits whose denoiser p(x_0^l | x_t) is the true posterior marginal.

  p(x_0 | x_t) ∝ sum over the sequences with that x_0^l of p(x_0) prod_m q(x_t^m | x_0^m); the
  process's parameterisation wants x_theta ∝ p(x_0 | x_t) / q(x_t | x_0), so log(1 + c_t) comes off
  the observed id's logit.
  """
  sequences_SL = jnp.asarray(dist.sequences_SL)
  log_probs_S = jnp.asarray(dist.log_probs_S, jnp.float32)
  vocab_size = process.vocab_size
  one_hot_SLV = jax.nn.one_hot(sequences_SL, vocab_size, dtype=jnp.float32)

  def model_fn(xt_BL, t_B):
    noise_B = process.schedule.mask_prob(t_B)
    log_hit_B = jnp.log(jnp.maximum(process.schedule.alpha(t_B), 0.0) + noise_B / vocab_size)
    log_miss_B = jnp.log(noise_B / vocab_size)
    hit_BSL = xt_BL[:, None, :] == sequences_SL[None]
    log_likelihood_BS = jnp.where(hit_BSL, log_hit_B[:, None, None], log_miss_B[:, None, None]).sum(-1)
    weights_BS = jax.nn.softmax(log_probs_S + log_likelihood_BS, axis=-1)
    log_posterior_BLV = jnp.log(jnp.einsum("bs,slv->blv", weights_BS, one_hot_SLV))
    observed_BLV = jax.nn.one_hot(xt_BL, vocab_size, dtype=bool)
    return log_posterior_BLV - jnp.where(observed_BLV, (log_hit_B - log_miss_B)[:, None, None], 0.0)

  return model_fn


def prior_mismatch_nats(log_p0_S, sequences_SL, x0_L, schedule, vocab_size):
  """E_{q(x_1 | x_0)} log(V^L q_1(x_1)), q_1 the data pushed to t = 1 (all of V^L enumerated).

  A model that reverses the forward process exactly, from the uniform prior instead of q_1, has
  E NELBO(x_0) = -log p(x_0) + this; zero when alpha(1) = 0.
  """
  length = sequences_SL.shape[1]
  x1_XL = np.array(list(itertools.product(range(vocab_size), repeat=length)))
  q_kj = marginal(alpha64(schedule, 1.0), vocab_size)
  log_q1_given_SX = np.log(q_kj[sequences_SL[:, None, :], x1_XL[None]]).sum(-1)
  log_q1_X = np.logaddexp.reduce(log_p0_S[:, None] + log_q1_given_SX, axis=0)
  q1_given_x0_X = np.exp(np.log(q_kj[x0_L[None], x1_XL]).sum(-1))
  return float((q1_given_x0_X * (log_q1_X + length * np.log(vocab_size))).sum())


@pytest.mark.parametrize("kind", schedules.SCHEDULES)
@pytest.mark.parametrize("t", [0.05, 0.5, 0.95])
def test_forward_marginal_is_alpha_x0_plus_uniform(kind, t):
  process = uniform.UniformDiffusion(vocab_size=5, schedule=schedules.Schedule(kind))
  x0_BL = jnp.full((200, 250), 2, jnp.int32)
  xt_BL = process.corrupt(x0_BL, jnp.full((200,), t), jax.random.key(1))
  frequencies_V = np.bincount(np.asarray(xt_BL).ravel(), minlength=5) / x0_BL.size
  expected_V = marginal(alpha64(process.schedule, t), 5)[2]
  # 5 binomial standard errors per id.
  tolerance_V = 5 * np.sqrt(expected_V * (1 - expected_V) / x0_BL.size)
  assert (np.abs(frequencies_V - expected_V) < tolerance_V).all(), (frequencies_V, expected_V)


def test_prompt_is_never_noised_nor_scored_and_loss_is_nats_per_scored_position():
  """NaN logits at prompt positions and at padded ids >= V: a bound that read them would be NaN."""
  process = uniform.UniformDiffusion(vocab_size=7)
  x0_BL = jnp.tile(jnp.arange(6)[None], (64, 1))
  prompt_BL = jnp.arange(6)[None, :] < jnp.arange(64)[:, None] % 6
  logits_BLW = jax.random.normal(jax.random.key(1), (64, 6, 9))
  logits_BLW = jnp.where(prompt_BL[..., None] | (jnp.arange(9) >= 7), jnp.nan, logits_BLW)

  @jax.jit  # the arrays are arguments, not closed-over constants that XLA would fold slowly
  def run(x0_BL, prompt_BL, logits_BLW):
    model_fn = lambda x, t: logits_BLW
    xt_BL = process.corrupt(x0_BL, jnp.ones((64,)), jax.random.key(0), keep_BL=prompt_BL)
    return (xt_BL, process.nelbo(model_fn, x0_BL, jax.random.key(2), prompt_BL),
            process.loss(model_fn, x0_BL, jax.random.key(2), prompt_BL))

  xt_BL, estimate, (loss, metrics) = run(x0_BL, prompt_BL, logits_BLW)
  np.testing.assert_array_equal(xt_BL[prompt_BL], x0_BL[prompt_BL])
  np.testing.assert_array_equal(estimate.num_tokens_B, (~prompt_BL).sum(1))
  assert np.isfinite(estimate.nats_B).all()
  np.testing.assert_allclose(loss, estimate.nats_B.sum() / estimate.num_tokens_B.sum(), rtol=1e-6)
  assert metrics["loss"] == loss


def test_prior_term_and_prior_draw():
  process = uniform.UniformDiffusion(vocab_size=9, schedule=schedules.Schedule("loglinear", eps=0.2))
  q_x1 = marginal(0.2, 9)[4]
  np.testing.assert_allclose(process.prior_nats_per_token(), (q_x1 * np.log(9 * q_x1)).sum(), rtol=1e-6)
  assert uniform.UniformDiffusion(9, schedules.Schedule("linear")).prior_nats_per_token() == 0
  fixed_BL = jnp.arange(50)[None, :] < jnp.arange(200)[:, None] % 7
  fixed_tokens_BL = jnp.full((200, 50), 4, jnp.int32)
  canvas_BL = process.initial_state(None, fixed_tokens_BL, fixed_BL, jax.random.split(jax.random.key(2), 200)).tokens_BL
  np.testing.assert_array_equal(canvas_BL[fixed_BL], 4)
  free = np.asarray(canvas_BL)[~np.asarray(fixed_BL)]
  counts_V = np.bincount(free, minlength=9)
  assert len(counts_V) == 9 and (np.abs(counts_V / free.size - 1 / 9) < 5 * np.sqrt(8 / 81 / free.size)).all()


def udlm_integrand64(x_theta_V, xt, x0, alpha, vocab_size):
  """UDLM's closed form (Schiff et al. 2024), float64, per unit of beta_t / V:
  sum_{j != i} rhohat_j - rho_j - rho_j log(rhohat_j / rho_j), rho = xbar_t / xbar_t[i], rhohat likewise."""
  xbar_t_V = vocab_size * alpha * np.eye(vocab_size)[x0] + (1 - alpha)
  xbar_theta_V = vocab_size * alpha * x_theta_V + (1 - alpha)
  rho_V, rhohat_V = xbar_t_V / xbar_t_V[xt], xbar_theta_V / xbar_theta_V[xt]
  terms_V = rhohat_V - rho_V - rho_V * np.log(rhohat_V / rho_V)
  return terms_V.sum() - terms_V[xt]


@pytest.mark.parametrize("vocab_size", [5, 1000])
def test_jump_divergence_is_udlm_closed_form(vocab_size):
  rng = np.random.default_rng(0)
  schedule = schedules.Schedule("linear")
  process = uniform.UniformDiffusion(vocab_size, schedule)
  times = [1e-5, 1e-3, 0.1, 0.5, 0.9, 0.999]
  cases = [(t, scale, same) for t in times for scale in (0.5, 4.0) for same in (True, False)]
  logits_CV = rng.normal(size=(len(cases), vocab_size)) * np.array([scale for _, scale, _ in cases])[:, None]
  x0_C = rng.integers(vocab_size, size=len(cases))
  other_C = (x0_C + 1 + rng.integers(vocab_size - 1, size=len(cases))) % vocab_size
  xt_C = np.where([same for _, _, same in cases], x0_C, other_C)
  t_C = np.array([t for t, _, _ in cases])
  log_x_theta_CV = jax.nn.log_softmax(jnp.asarray(logits_CV, jnp.float32))
  got_C = jax.jit(uniform.jump_divergence)(
      log_x_theta_CV[:, None], jnp.asarray(xt_C)[:, None], jnp.asarray(x0_C)[:, None],
      process.snr(jnp.asarray(t_C, jnp.float32))[:, None, None])[:, 0]
  x_theta_CV = np.exp(np.asarray(log_x_theta_CV, np.float64))
  for c, t in enumerate(t_C):
    alpha = 1 - t
    # integrand = beta / V * closed form = w(t) * jump_divergence, beta = 1 / alpha, w = 1 / t.
    expected = udlm_integrand64(x_theta_CV[c], xt_C[c], x0_C[c], alpha, vocab_size) / (alpha * vocab_size)
    np.testing.assert_allclose(float(got_C[c]) / t, expected, rtol=2e-5, err_msg=str(cases[c]))


def test_jump_divergence_gradient_matches_finite_differences():
  """d/dlogits of the float32 integrand against central differences of the float64 closed form."""
  vocab_size, step = 5, 1e-5
  rng = np.random.default_rng(2)
  divergence = jax.jit(jax.grad(lambda logits_V, xt, x0, snr: uniform.jump_divergence(
      jax.nn.log_softmax(logits_V)[None, None], xt[None, None], x0[None, None], snr)[0, 0]))
  for t, xt, x0 in [(1e-3, 2, 2), (1e-3, 1, 2), (0.3, 0, 0), (0.3, 4, 1), (0.9, 3, 3)]:
    logits_V = rng.normal(size=vocab_size)
    alpha = 1 - t

    def closed_form(logits):
      x_theta = np.exp(logits - np.logaddexp.reduce(logits))
      return udlm_integrand64(x_theta, xt, x0, alpha, vocab_size) * t / (alpha * vocab_size)

    numeric_V = np.array([(closed_form(logits_V + step * e) - closed_form(logits_V - step * e)) / (2 * step)
                          for e in np.eye(vocab_size)])
    got_V = divergence(jnp.asarray(logits_V, jnp.float32), jnp.asarray(xt), jnp.asarray(x0),
                       jnp.float32(vocab_size * alpha / t))
    np.testing.assert_allclose(got_V, numeric_V, rtol=1e-3, atol=1e-4 * np.abs(numeric_V).max())


@pytest.mark.parametrize("t,s", [(0.9, 0.6), (0.3, 0.29), (0.05, 0.0), (1.0, 0.5)])
@pytest.mark.parametrize("kind", ["linear", "cosine", "loglinear"])
def test_reverse_probs_are_bayes_rule(t, s, kind):
  """p(x_s | x_t) = sum_k q(x_s | x_t, x_0 = k) p(x_0 = k | x_t), the posterior by dense Bayes' rule,
  and equal to q(x_s | x_t, x_0) for a one-hot denoiser; p(x_0 | x_t) ∝ x_theta q(x_t | x_0)."""
  vocab_size = 6
  process = uniform.UniformDiffusion(vocab_size, schedules.Schedule(kind))
  alpha_t, alpha_s = alpha64(process.schedule, t), alpha64(process.schedule, s)
  posterior_kij = dense_posterior(alpha_t, alpha_s, vocab_size)
  rng = np.random.default_rng(1)
  xt_1L = jnp.arange(vocab_size)[None]
  logits_1LV = jnp.asarray(rng.normal(size=(1, vocab_size, vocab_size)) * 2, jnp.float32)
  log_x_theta_LV = np.asarray(process.x_theta_log_probs(logits_1LV)[0], np.float64)
  denoiser_LV = np.exp(np.asarray(process.denoiser_log_probs(logits_1LV, xt_1L, t)[0], np.float64))
  bayes_LV = np.exp(log_x_theta_LV) * marginal(alpha_t, vocab_size)[:, np.arange(vocab_size)].T
  np.testing.assert_allclose(denoiser_LV, bayes_LV / bayes_LV.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)

  def normalised_reverse(x0_probs_LV):
    probs_1LV = process.reverse_probs(jnp.asarray(x0_probs_LV, jnp.float32)[None], xt_1L, t, s)
    probs_LV = np.asarray(probs_1LV[0], np.float64)
    return probs_LV / probs_LV.sum(-1, keepdims=True)

  expected_LV = np.einsum("ik,kij->ij", denoiser_LV, posterior_kij)
  np.testing.assert_allclose(normalised_reverse(denoiser_LV), expected_LV, rtol=1e-5, atol=1e-7)
  for x0 in range(vocab_size):
    np.testing.assert_allclose(normalised_reverse(np.eye(vocab_size)[[x0] * vocab_size]), posterior_kij[x0],
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("draw", [base.TokenDraw(), base.TokenDraw(temperature=0.0),
                                  base.TokenDraw(temperature=0.7, top_k=3), base.TokenDraw(top_p=0.6)])
def test_reverse_step_draws_from_the_reverse_probs(draw):
  """reverse_step's draws follow reverse_probs of the filtered denoiser (5 binomial standard errors
  per id over 40,000 draws), and at s = 0 they are the TokenDraw of p(x_0 | x_t) itself."""
  vocab_size, rows = 6, 40000
  process = uniform.UniformDiffusion(vocab_size, schedules.Schedule("linear"))
  logits_1LV = jax.random.normal(jax.random.key(0), (1, 2, vocab_size)) * 2
  canvas_1L = jnp.array([[1, 4]])
  keys_N = jax.random.split(jax.random.key(1), rows)
  canvas_NL, logits_NLV = jnp.tile(canvas_1L, (rows, 1)), jnp.tile(logits_1LV, (rows, 1, 1))

  @jax.jit  # the arrays are arguments, not closed-over constants that XLA would fold slowly
  def run(canvas_NL, logits_NLV, keys_N):
    canvas = base.Canvas(canvas_NL, jnp.zeros(canvas_NL.shape, bool))
    step = lambda s: process.reverse_step(canvas, logits_NLV, 0.4, s, keys_N, base.StepSettings(draw)).tokens_BL
    denoiser_NLV = process.denoiser_log_probs(logits_NLV, canvas_NL, 0.4)
    expected_1LV = process.reverse_probs(jnp.exp(draw.log_probs(denoiser_NLV[:1])), canvas_NL[:1], 0.4, 0.3)
    token_u_NL, _ = base.step_uniforms(keys_N, 2)
    return step(0.0), draw(denoiser_NLV, token_u_NL), step(0.3), expected_1LV

  x0_NL, x0_draw_NL, xs_NL, expected_1LV = run(canvas_NL, logits_NLV, keys_N)
  np.testing.assert_array_equal(x0_NL, x0_draw_NL)
  expected_LV = np.asarray(expected_1LV[0], np.float64)
  expected_LV /= expected_LV.sum(-1, keepdims=True)
  xs_NL = np.asarray(xs_NL)
  for position in range(2):
    frequencies_V = np.bincount(xs_NL[:, position], minlength=vocab_size) / rows
    tolerance_V = 5 * np.sqrt(expected_LV[position] * (1 - expected_LV[position]) / rows) + 1e-9
    assert (np.abs(frequencies_V - expected_LV[position]) <= tolerance_V).all(), (frequencies_V, expected_LV)


def discrete_vlb(log_x_theta, x0, schedule, vocab_size, num_steps):
  """The D3PM variational bound (nats) of a one-token x_0 over `num_steps` uniform steps t_k = k / T,
  by dense matrices and an exact expectation over x_t (float64):

    L_T + sum_{k=2}^T E_{x_{t_k}} KL(q(x_{t_{k-1}} | x_{t_k}, x_0) || p(x_{t_{k-1}} | x_{t_k}))
        + E_{x_{t_1}} -log p(x_0 | x_{t_1}),

  with L_T = KL(q(x_1 | x_0) || Uniform), p(x_s | x_t) = sum_k q(x_s | x_t, k) p(k | x_t) and the
  denoiser p(k | x_t = i) ∝ x_theta(k; i, t) q(x_t = i | k).
  """
  t_K = np.arange(num_steps + 1) / num_steps
  alpha_K = alpha64(schedule, t_K)
  q_Kkj = marginal(alpha_K, vocab_size)
  q_x1_V = q_Kkj[-1, x0]
  nats = (q_x1_V * np.log(vocab_size * q_x1_V)).sum()
  ids = np.arange(vocab_size)
  log_denoiser_Kik = log_x_theta(ids[None, :], t_K[1:, None]) + np.log(np.swapaxes(q_Kkj[1:], 1, 2))
  denoiser_Kik = np.exp(log_denoiser_Kik - np.logaddexp.reduce(log_denoiser_Kik, axis=-1, keepdims=True))
  nats += (q_Kkj[1, x0] * -np.log(denoiser_Kik[0, :, x0])).sum()
  posterior_Kkij = np.stack([dense_posterior(alpha_K[k], alpha_K[k - 1], vocab_size)
                             for k in range(2, num_steps + 1)])
  model_Kij = np.einsum("Kik,Kkij->Kij", denoiser_Kik[1:], posterior_Kkij)
  true_Kij = posterior_Kkij[:, x0]
  kl_Ki = (true_Kij * (np.log(true_Kij) - np.log(model_Kij))).sum(-1)
  return nats + (q_Kkj[2:, x0] * kl_Ki).sum()


def continuous_nelbo(log_x_theta, x0, process, num_points=4000):
  """The process's NELBO of a one-token x_0 with the expectation over x_t exact: the trapezoid rule
  in log t over [1e-10, 1] (the integrand is O(log 1/t) at 0) of w(t) sum_i q(i | x_0) jump_divergence."""
  vocab_size = process.vocab_size
  log_t_N = np.linspace(np.log(1e-10), 0.0, num_points)
  t_N = np.exp(log_t_N)
  ids_NV = np.broadcast_to(np.arange(vocab_size), (num_points, vocab_size))
  t32_N = jnp.asarray(t_N, jnp.float32)
  divergence_NV = uniform.jump_divergence(jnp.asarray(log_x_theta(ids_NV, t_N[:, None]), jnp.float32),
                                          jnp.asarray(ids_NV), jnp.full(ids_NV.shape, x0),
                                          process.snr(t32_N)[:, None, None])
  q_NV = marginal(alpha64(process.schedule, t_N), vocab_size)[:, x0]
  weight_N = np.asarray(process.schedule.loss_weight(t32_N), np.float64)
  integrand_N = weight_N * (q_NV * np.asarray(divergence_NV)).sum(-1)
  return np.trapezoid(integrand_N * t_N, log_t_N) + process.prior_nats_per_token()


def table_network(vocab_size, seed):
  """log x_theta(. ; x_t = i, t) = log_softmax(A[i] + t B[i]): a smooth, t-dependent test network."""
  rng = np.random.default_rng(seed)
  a_IV, b_IV = rng.normal(size=(2, vocab_size, vocab_size))

  def log_x_theta(i, t):
    logits = a_IV[i] + np.asarray(t)[..., None] * b_IV[i]
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)

  return log_x_theta


@pytest.mark.parametrize("kind", ["linear", "loglinear"])
def test_continuous_nelbo_is_the_limit_of_the_discrete_vlb(kind):
  """|VLB_T - NELBO| falls like 1/T (measured: about 3e-2, 3e-3, 3e-4 nats at T = 10, 100, 1000,
  and 4e-5 at T = 10^4); the quadrature of the NELBO is good to about 1e-5 nats. eps = 0.1 makes
  the prior term 0.018 nats."""
  vocab_size = 5
  process = uniform.UniformDiffusion(vocab_size, schedules.Schedule(kind, eps=0.1))
  log_x_theta = table_network(vocab_size, seed=0)
  for x0 in (0, 3):
    limit = continuous_nelbo(log_x_theta, x0, process)
    gaps = [abs(discrete_vlb(log_x_theta, x0, process.schedule, vocab_size, steps) - limit)
            for steps in (10, 100, 1000)]
    assert gaps[0] > 4 * gaps[1] > 16 * gaps[2], gaps
    assert gaps[2] < 2e-3, gaps


@pytest.mark.parametrize("kind", schedules.SCHEDULES)
def test_nelbo_of_a_constant_network_is_its_nll(kind):
  """A network that ignores its input, x_theta = r, makes the denoiser Bayes' rule under the prior r:
  the model is the exact time reversal of the forward process started from r, so its NELBO is
  -log r(x_0) (plus the prior mismatch when alpha(1) > 0), to quadrature accuracy."""
  vocab_size = 5
  process = uniform.UniformDiffusion(vocab_size, schedules.Schedule(kind, eps=0.1))
  log_r_V = np.log(np.random.default_rng(3).dirichlet(np.ones(vocab_size)))

  def log_x_theta(i, t):
    return np.broadcast_to(log_r_V, np.broadcast_shapes(np.shape(i), np.shape(t)) + log_r_V.shape)

  sequences_S1 = np.arange(vocab_size)[:, None]
  for x0 in range(vocab_size):
    mismatch = prior_mismatch_nats(log_r_V, sequences_S1, np.array([x0]), process.schedule, vocab_size)
    expected = -log_r_V[x0] + mismatch
    np.testing.assert_allclose(continuous_nelbo(log_x_theta, x0, process), expected, atol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "loglinear"])
def test_nelbo_of_the_exact_denoiser_is_the_nll(kind):
  """With the true posterior p(x_0^l | x_t) the reverse process is the exact time reversal of the
  forward process, so E NELBO(x_0) = -log p(x_0) + m(x_0), m(x_0) = E_{q(x_1|x_0)} log(V^L q_1(x_1))
  (`prior_mismatch_nats`): 0 for 'linear'; for 'loglinear' (eps = 1e-3) |m| < 2e-6 here, and m
  averages to KL(q_1 || Uniform) >= 0 over the data, so the expected bound is >= the entropy.
  The estimate is a mean of 4000 one-sample NELBOs (standard error 0.1 to 0.16 nats): the test
  fails if it lies more than 4 standard errors (plus 1e-3 for float32) from that value, which a
  heavy tail (weights w(t) ~ 1/t) makes likelier than the normal 6e-5."""
  process = uniform.UniformDiffusion(VOCAB, schedules.Schedule(kind))
  dist = testing.TinyDistribution.random(TOKENS, length=3, seed=0)
  x0_BL = dist.sample(5, seed=1)
  draws = 4000
  model_fn = exact_uniform_denoiser(dist, process)
  estimate = jax.jit(lambda key: process.nelbo(model_fn, jnp.tile(x0_BL, (draws, 1)), key))(jax.random.key(0))
  nats_DB = np.asarray(estimate.nats_B).reshape(draws, len(x0_BL))
  mean_B, stderr_B = nats_DB.mean(0), nats_DB.std(0) / np.sqrt(draws)
  mismatch_B = np.array([prior_mismatch_nats(dist.log_probs_S, dist.sequences_SL, x0_L, process.schedule, VOCAB)
                         for x0_L in x0_BL])
  expected_B = -dist.log_prob(x0_BL) + mismatch_B
  assert (np.abs(mean_B - expected_B) < 4 * stderr_B + 1e-3).all(), (mean_B, expected_B, stderr_B)


@pytest.mark.parametrize("kind", schedules.SCHEDULES)
def test_nelbo_is_finite_and_non_negative_with_a_large_vocabulary(kind):
  """V = 32768 at t near 0 and near 1, for diffuse, confidently wrong and confidently right models;
  the gradient with respect to the logits is finite too."""
  vocab_size, length = 32768, 4
  process = uniform.UniformDiffusion(vocab_size, schedules.Schedule(kind))
  t_B = jnp.array([base.MIN_TIME, 1e-4, 0.5, 1 - 1e-6, 1.0])
  x0_BL = jax.random.randint(jax.random.key(0), (5, length), 0, vocab_size)
  noise_BLV = jax.random.normal(jax.random.key(1), (5, length, vocab_size))
  right_BLV = jax.nn.one_hot(x0_BL, vocab_size)

  @jax.jit
  def nats_and_gradient(logits_BLV):
    nelbo = lambda logits: process.nelbo(lambda x, t: logits, x0_BL, jax.random.key(2), t_B=t_B).nats_B
    nats_B, vjp = jax.vjp(nelbo, logits_BLV)
    return nats_B, vjp(jnp.ones_like(nats_B))[0]

  for logits_BLV in (noise_BLV, 30 * noise_BLV, 30 * right_BLV, noise_BLV + 50 * right_BLV):
    nats_B, gradient_BLV = nats_and_gradient(logits_BLV)
    assert np.isfinite(nats_B).all() and (nats_B >= 0).all(), nats_B
    assert np.isfinite(gradient_BLV).all()


def test_k_strategies_are_rejected():
  process, fixed_BL = uniform.UniformDiffusion(vocab_size=10), jnp.zeros((2, 5), bool)
  for strategy in ("random", "low_confidence"):
    with pytest.raises(ValueError, match="ancestral"):
      samplers.sample(lambda x, t: jnp.zeros(x.shape + (10,)), process,
                      samplers.SamplerConfig(steps=8, strategy=strategy), jnp.zeros((2, 5), jnp.int32), fixed_BL,
                      jax.random.key(1))


def test_ancestral_sampler_keeps_fixed_positions_and_samples_the_distribution():
  """4000 free rows in 64 steps with the exact denoiser. Exact sampling would give an empirical TV
  of about sum_x sqrt(p (1 - p) / (2 pi N)) = 0.028 (it was 0.009 with 20,000 samples); the bound
  allows twice that plus 0.01 for the 64-step discretisation. Id 3 is noise only and must never
  come out. Using p(x_0 | x_t) as x_theta (counting the observed token twice) gives TV 0.19.
  64 more rows hold id 3 fixed at some positions, which must stay."""
  process = uniform.UniformDiffusion(VOCAB)
  dist = testing.TinyDistribution.random(TOKENS, length=3, seed=0)
  rows = 4000
  config = samplers.SamplerConfig(steps=64, strategy="ancestral")
  prefix_N = jnp.concatenate([jnp.zeros(rows, jnp.int32), jnp.arange(64) % 4])
  fixed_NL = jnp.arange(3)[None, :] < prefix_N[:, None]
  tokens_NL = jnp.where(fixed_NL, 3, 0)
  out_NL = np.asarray(jax.jit(lambda tokens_NL, fixed_NL, key: samplers.sample(
      exact_uniform_denoiser(dist, process), process, config, tokens_NL, fixed_NL, key))(
          tokens_NL, fixed_NL, jax.random.key(7)))
  np.testing.assert_array_equal(out_NL[np.asarray(fixed_NL)], 3)
  assert (out_NL[~np.asarray(fixed_NL)] != 3).all()
  match_NS = (out_NL[:rows, None, :] == dist.sequences_SL[None]).all(-1)
  probs_S = np.exp(dist.log_probs_S)
  tv = 0.5 * np.abs(match_NS.mean(0) - probs_S).sum()
  expected_tv = np.sqrt(probs_S * (1 - probs_S) / (2 * np.pi * rows)).sum()
  assert tv < 2 * expected_tv + 0.01, (tv, expected_tv)
