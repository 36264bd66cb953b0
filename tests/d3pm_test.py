"""Closed-form and Monte Carlo checks of D3PM: transitions, posteriors, the bound, sampling."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from ddlm_jax import samplers
from ddlm_jax import schedules
from ddlm_jax import testing
from ddlm_jax.processes import base
from ddlm_jax.processes import d3pm
from ddlm_jax.processes import masked
from ddlm_jax.processes import uniform

V = 6
MASK_ID = 0
GRAPH = d3pm.NeighborGraph.from_embeddings(np.random.default_rng(0).normal(size=(V, 3)), 2)


def run(fn, *args):
  """fn(*args) compiled as one program without LLVM optimisation: the arrays here are tiny and
  compiling dominates the run time."""
  return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def make_process(transition, num_steps=4, kind="cosine", **kwargs):
  extra = {"absorbing": dict(mask_id=MASK_ID), "nearest_neighbor": dict(graph=GRAPH)}.get(transition, {})
  return d3pm.D3PM(vocab_size=V, transition=transition, num_steps=num_steps,
                   schedule=schedules.Schedule(kind), **extra, **kwargs)


def rate_matrix(graph):
  """R of the graph, built densely from its arrays (float64[V, V])."""
  neighbors_VK, weights_VK = np.asarray(graph.neighbors_VK), np.asarray(graph.weights_VK, np.float64)
  rates_VV = np.zeros((len(neighbors_VK),) * 2)
  np.add.at(rates_VV, (np.arange(len(neighbors_VK))[:, None], neighbors_VK), weights_VK)
  return rates_VV - np.diag(rates_VV.sum(1))


def reference_matrix(process, to_step, from_step):
  """Qbar_{to|from} from the definitions, in float64: product of the one-step Q_i for the
  uniform / absorbing transitions (beta_i = 1 - alphabar_i / alphabar_{i-1}), expm for the graph."""
  alpha_bar = np.clip(np.cos(0.5 * np.pi * np.arange(process.num_steps + 1) / process.num_steps), 0, 1)
  if process.schedule.kind == "linear":
    alpha_bar = 1 - np.arange(process.num_steps + 1) / process.num_steps
  if process.transition == "nearest_neighbor":
    graph_time = np.minimum(-np.log(np.maximum(alpha_bar, 1e-300)), process.max_graph_time)
    return scipy.linalg.expm((graph_time[to_step] - graph_time[from_step]) * rate_matrix(process.graph))
  limit_VV = np.full((V, V), 1 / V) if process.transition == "uniform" else np.eye(V)[[MASK_ID] * V]
  product_VV = np.eye(V)
  for i in range(from_step + 1, to_step + 1):
    beta = 1 - alpha_bar[i] / alpha_bar[i - 1]
    product_VV = product_VV @ ((1 - beta) * np.eye(V) + beta * limit_VV)
  return product_VV


def step_pairs(num_steps):
  """(to, from) for every 0 <= from < to <= T."""
  pairs = [(to, frm) for to in range(1, num_steps + 1) for frm in range(to)]
  return np.array(pairs).T


@pytest.mark.parametrize("transition,kind", [("uniform", "cosine"), ("absorbing", "cosine"),
                                             ("absorbing", "linear"), ("nearest_neighbor", "cosine")])
def test_closed_form_transitions_are_products_of_one_step_matrices(transition, kind):
  process = make_process(transition, num_steps=5, kind=kind)
  to_P, from_P = step_pairs(process.num_steps)
  rows_PVV = jnp.broadcast_to(d3pm.log_one_hot(jnp.arange(V)[None], V), (len(to_P), V, V))
  matrices_PVV = np.exp(np.asarray(run(process.propagate, rows_PVV, from_P, to_P), np.float64))
  for matrix_VV, to, frm in zip(matrices_PVV, to_P, from_P):
    np.testing.assert_allclose(matrix_VV.sum(1), 1.0, atol=2e-6)
    np.testing.assert_allclose(matrix_VV, reference_matrix(process, to, frm), atol=2e-6,
                               err_msg=f"Qbar_{to}|{frm}")
  np.testing.assert_allclose(process.transition_matrix(5, 2),
                             matrices_PVV[(to_P == 5) & (from_P == 2)][0], atol=1e-6)
  if transition == "absorbing" and kind == "linear":  # D3PM's absorbing schedule beta_i = 1 / (T - i + 1)
    for i in range(1, 6):
      q_VV = np.asarray(process.transition_matrix(i, i - 1))
      np.testing.assert_allclose(q_VV[1, MASK_ID], 1 / (5 - i + 1), rtol=1e-5)


def test_nearest_neighbor_uniformization_matches_expm_at_the_largest_time():
  process = make_process("nearest_neighbor", num_steps=3)
  assert process.num_uniformization_terms == 28  # P(Poisson(10) > 28) < 1e-6
  expected_VV = scipy.linalg.expm(process.max_graph_time * rate_matrix(GRAPH))
  np.testing.assert_allclose(process.transition_matrix(3, 0), expected_VV, atol=2e-6)
  np.testing.assert_allclose(expected_VV, expected_VV.T, atol=1e-12)  # so uniform is stationary


@pytest.mark.parametrize("transition", d3pm.TRANSITIONS)
def test_forward_samples_follow_the_closed_form_marginal(transition):
  process = make_process(transition, num_steps=10)
  num = 10000
  x0_BL = jnp.tile(jnp.array([[1, 2, 4]]), (num, 1))
  steps = (3, 10)  # 10: the graph's largest time, where the random walk is truncated

  def draws(key):
    return [(process.corrupt(x0_BL, jnp.full((num,), t), jax.random.fold_in(key, t)),
             process.marginal_log_probs(x0_BL[:1], jnp.full((1,), t))) for t in steps]

  for xt_BL, marginal_1LV in run(draws, jax.random.key(0)):
    expected_LV = np.exp(np.asarray(marginal_1LV[0], np.float64))
    empirical_LV = np.stack([np.bincount(np.asarray(x_B), minlength=V) for x_B in xt_BL.T]) / num
    # 5 binomial standard errors per id (plus float32 slack).
    bound_LV = 5 * np.sqrt(expected_LV * (1 - expected_LV) / num) + 1e-4
    np.testing.assert_array_less(np.abs(empirical_LV - expected_LV), bound_LV)


@pytest.mark.parametrize("transition", d3pm.TRANSITIONS)
def test_posterior_and_reverse_model_are_bayes_rule(transition):
  process = make_process(transition, num_steps=6)
  pairs = [(3, 2), (6, 1), (5, 0), (6, 5)]  # (t, s), skipping steps too
  x0_N, xt_N, pair_N = (grid.ravel() for grid in
                        np.meshgrid(np.arange(V), np.arange(V), np.arange(len(pairs)), indexing="ij"))
  t_N, s_N = np.array(pairs)[pair_N].T
  # A model's x_0 prediction.
  log_p0_NV = np.log(np.random.default_rng(1).dirichlet(np.ones(V), size=len(x0_N)))
  xt_N1, one_hot_N1V = xt_N[:, None], d3pm.log_one_hot(x0_N[:, None], V)
  outputs = run(lambda: (process.posterior_log_probs(xt_N1, x0_N[:, None], t_N, s_N),
                         process.reverse_log_probs(xt_N1, one_hot_N1V, t_N, s_N),
                         process.reverse_log_probs(xt_N1, log_p0_NV[:, None], t_N, s_N)))
  posterior_NV, reverse_one_hot_NV, reverse_NV = (np.exp(np.asarray(log_probs_N1V[:, 0], np.float64))
                                                  for log_probs_N1V in outputs)
  for pair, (t, s) in enumerate(pairs):
    qbar_t, qbar_ts, qbar_s = (reference_matrix(process, t, 0), reference_matrix(process, t, s),
                               reference_matrix(process, s, 0))
    rows_N = pair_N == pair
    x0_R, xt_R = x0_N[rows_N], xt_N[rows_N]
    joint_RV = qbar_s[x0_R] * qbar_ts[:, xt_R].T  # q(x_s, x_t | x_0) over x_s
    reachable_R = qbar_t[x0_R, xt_R] > 1e-12
    np.testing.assert_allclose(posterior_NV[rows_N][reachable_R],
                               joint_RV[reachable_R] / qbar_t[x0_R, xt_R][reachable_R, None], atol=2e-5)
    np.testing.assert_allclose(reverse_one_hot_NV[rows_N][reachable_R], posterior_NV[rows_N][reachable_R],
                               atol=1e-6)
    # A spread-out prediction: sum_{x_0} q(x_s, x_t | x_0) p(x_0), normalised over x_s, where x_t
    # is possible.
    mixed_RV = (np.exp(log_p0_NV[rows_N]) @ qbar_s) * qbar_ts[:, xt_R].T
    possible_R = mixed_RV.sum(1) > 1e-12
    np.testing.assert_allclose(reverse_NV[rows_N][possible_R],
                               (mixed_RV / mixed_RV.sum(1, keepdims=True))[possible_R], atol=2e-5)


def random_model(seed=0, vocab=V, width=V + 2):
  """A fixed random 'network' emitting W > V logits that depend on the canvas and on t."""
  table = jax.random.normal(jax.random.key(seed), (vocab, width)) * 1.5

  def model_fn(xt_BL, t_B):
    return table[xt_BL] + table[xt_BL].mean(1, keepdims=True) + 2 * t_B[:, None, None] * jnp.arange(width)

  return model_fn


DISCRETE_PROCESSES = (
    [masked.MaskedDiffusion(V, MASK_ID, schedules.Schedule(kind)) for kind in schedules.SCHEDULES]
    + [uniform.UniformDiffusion(V, schedules.Schedule(kind)) for kind in schedules.SCHEDULES]
    + [make_process(transition, kind=kind) for transition in d3pm.TRANSITIONS for kind in schedules.SCHEDULES])


@pytest.mark.parametrize("process", DISCRETE_PROCESSES, ids=lambda process: "-".join(
    [type(process).__name__] + ([process.transition] if isinstance(process, d3pm.D3PM) else [])
    + [process.schedule.kind]))
def test_nelbo_loss_and_its_gradient_run_under_jit(process):
  """Every discrete family under every schedule it accepts: the bound, the loss and the loss's
  gradient trace under jax.jit (static numbers of the process stay Python numbers) and are finite."""
  x0_BL = jax.random.randint(jax.random.key(0), (4, 5), 1, V)
  table_VW = jax.random.normal(jax.random.key(1), (V, V + 2))
  model = lambda table_VW: lambda xt_BL, t_B: table_VW[xt_BL] * (1.0 + t_B[:, None, None])

  def bound_loss_and_gradient(table_VW, key):
    loss_fn = lambda table_VW: process.loss(model(table_VW), x0_BL, key)[0]
    return (process.nelbo(model(table_VW), x0_BL, key).nats_B,) + jax.value_and_grad(loss_fn)(table_VW)

  nats_B, loss, gradient_VW = run(bound_loss_and_gradient, table_VW, jax.random.key(2))
  assert np.isfinite(nats_B).all() and np.isfinite(loss) and np.isfinite(gradient_VW).all()
  assert np.abs(gradient_VW).max() > 0


@pytest.mark.parametrize("transition", d3pm.TRANSITIONS)
def test_bound_terms_prompt_and_hybrid_loss(transition):
  process = make_process(transition, num_steps=4, hybrid_coeff=0.5)
  x0_BL = jnp.tile(jnp.array([[1, 2, 5, 3, 4]]), (16, 1))
  t_B = jnp.tile(jnp.arange(1, 5), 4) / 4  # every step t = 1..T
  oracle_B = jnp.arange(16) >= 8  # rows 8.. predict the true x_0 with certainty
  prompt_BL = jnp.arange(5)[None, :] < jnp.array([0] * 12 + [2, 2, 5, 5])[:, None]
  random_fn = random_model()

  def model_fn(xt_BL, t_B, scale=1.0):
    oracle_BLW = 1e4 * jax.nn.one_hot(x0_BL, V + 2)
    return jnp.where(oracle_B[:, None, None], oracle_BLW, scale * random_fn(xt_BL, t_B))

  def loss(scale):
    scaled_fn = lambda xt_BL, t_B: model_fn(xt_BL, t_B, scale)
    return process.loss(scaled_fn, x0_BL, jax.random.key(0), prompt_BL)

  def everything():
    estimate = process.nelbo(model_fn, x0_BL, jax.random.key(1), prompt_BL, t_B=t_B)
    prior_B = jnp.where(prompt_BL, 0.0, process.prior_nats(x0_BL)).sum(-1)
    noisy_BL = process.corrupt(x0_BL, jnp.full((16,), 4), jax.random.key(2), keep_BL=prompt_BL)
    return estimate, estimate.nats_B - prior_B, noisy_BL, jax.value_and_grad(loss, has_aux=True)(1.0)

  estimate, kl_terms_B, noisy_BL, ((total, metrics), grad) = run(everything)
  kl_terms_B = np.asarray(kl_terms_B)
  # Every term T * L_{t-1} (or T * L_0) is >= 0, and 0 when the model predicts the true x_0.
  assert (kl_terms_B[:8] > -1e-4).all() and (kl_terms_B[:8] > 0.1).any()
  np.testing.assert_allclose(kl_terms_B[8:], 0.0, atol=1e-4)
  # Prompt positions are never noised and never scored.
  assert bool((noisy_BL[prompt_BL] == x0_BL[prompt_BL]).all()) and bool((noisy_BL != x0_BL).any())
  np.testing.assert_array_equal(estimate.num_tokens_B, (~prompt_BL).sum(1))
  np.testing.assert_array_equal(estimate.nats_B[14:], 0.0)
  # The hybrid loss: one step's term per position + hybrid_coeff * cross-entropy, with finite
  # gradients (also where a prompt token is clean at t = T, a state q never reaches).
  assert set(metrics) >= {"loss", "vlb", "step_kl", "ce"}
  np.testing.assert_allclose(total, metrics["step_kl"] + 0.5 * metrics["ce"], rtol=1e-6)
  assert metrics["vlb"] > 0 and metrics["ce"] > 0 and np.isfinite(grad) and grad != 0


@pytest.mark.parametrize("transition", d3pm.TRANSITIONS)
def test_hybrid_loss_trains_one_step_term_plus_lambda_ce(transition):
  """The gradient of `loss` is that of sum (L_{t-1} + lambda CE) / (scored positions), D3PM's hybrid
  loss at the drawn (t, x_t), with L_{t-1} and CE rebuilt here from the posterior, the reverse model
  and the denoiser; the T-weighted sum and the prior belong to `nelbo` only."""
  hybrid_coeff, num_steps = 2.0, 4
  process = make_process(transition, num_steps=num_steps, hybrid_coeff=hybrid_coeff)
  x0_BL = jnp.tile(jnp.array([[1, 2, 5, 3, 4]]), (8, 1))
  prompt_BL = jnp.arange(5)[None, :] < jnp.arange(8)[:, None] % 3
  model = lambda table_VW: lambda xt_BL, t_B: table_VW[xt_BL] * (1.0 + t_B[:, None, None])
  table_VW = jax.random.normal(jax.random.key(1), (V, V + 2))
  key = jax.random.key(2)

  def drawn_model_inputs():
    """The (x_t, t) that loss draws with this key."""
    seen = {}

    def recording_model(xt_BL, t_B):
      seen.update(xt_BL=xt_BL, t_B=t_B)
      return model(table_VW)(xt_BL, t_B)

    process.loss(recording_model, x0_BL, key, prompt_BL)
    return seen["xt_BL"], seen["t_B"]

  xt_BL, t_B = run(drawn_model_inputs)
  steps_B = jnp.round(t_B * num_steps).astype(jnp.int32)
  assert set(np.asarray(steps_B).tolist()) == {1, 2, 3, 4}

  def reference(table_VW):
    logits_BLW = model(table_VW)(xt_BL, t_B)
    ce_BL = -base.token_log_likelihood(process.denoiser_log_probs(logits_BLW, xt_BL, t_B), x0_BL)
    kl_steps_B = jnp.maximum(steps_B, 2)  # L_0 = CE at t = 1; the KL there is dropped
    x_theta_BLV = process.x_theta_log_probs(logits_BLW)
    kl_BL = d3pm.kl_divergence(process.posterior_log_probs(xt_BL, x0_BL, kl_steps_B, kl_steps_B - 1),
                               process.reverse_log_probs(xt_BL, x_theta_BLV, kl_steps_B, kl_steps_B - 1))
    step_term_BL = jnp.where((steps_B == 1)[:, None], ce_BL, kl_BL)
    return jnp.where(prompt_BL, 0.0, step_term_BL + hybrid_coeff * ce_BL).sum() / (~prompt_BL).sum()

  loss_fn = lambda table_VW: process.loss(model(table_VW), x0_BL, key, prompt_BL)
  (total, metrics), gradient_VW = run(jax.value_and_grad(loss_fn, has_aux=True), table_VW)
  expected, expected_gradient_VW = run(jax.value_and_grad(reference), table_VW)
  np.testing.assert_allclose(total, expected, rtol=1e-5)
  np.testing.assert_allclose(gradient_VW, expected_gradient_VW, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(total, metrics["step_kl"] + hybrid_coeff * metrics["ce"], rtol=1e-6)
  assert hybrid_coeff * metrics["ce"] > 0.2 * total  # the CE share matters
  # vlb reports the one-step bound of `nelbo` at the same draw.
  estimate = run(lambda: process.nelbo(model(table_VW), x0_BL, key, prompt_BL, t_B=t_B))
  np.testing.assert_allclose(metrics["vlb"], estimate.nats_B.sum() / estimate.num_tokens_B.sum(), rtol=1e-5)


def confident_model(x0_1L):
  """A model that knows the data row, less surely as t grows: low-variance bounds that depend on t."""
  table = jax.random.normal(jax.random.key(3), (V, V))

  def model_fn(xt_BL, t_B):
    knowledge_BLV = 10 * (1 - t_B[:, None, None]) * jax.nn.one_hot(x0_1L, V)
    return knowledge_BLV + table[xt_BL] + table[xt_BL].mean(1, keepdims=True)

  return model_fn


@pytest.mark.parametrize("transition,continuous", [
    ("absorbing", masked.MaskedDiffusion(V, MASK_ID, schedules.Schedule("linear"))),
    ("uniform", uniform.UniformDiffusion(V, schedules.Schedule("linear")))])
def test_discrete_bound_tends_to_the_continuous_time_nelbo(transition, continuous):
  x0_1L = jnp.array([[1, 2, 3]])
  model_fn = confident_model(x0_1L)
  num = 4096
  x0_BL = jnp.tile(x0_1L, (num, 1))
  coarse, fine = (make_process(transition, num_steps=num_steps, kind="linear") for num_steps in (4, 32))

  def bounds(key):
    keys = jax.random.split(key, 4)
    return (continuous.nelbo(model_fn, jnp.tile(x0_BL, (4, 1)), keys[0]).nats_B,
            coarse.nelbo_exact_time(model_fn, x0_BL, keys[1]).nats_B,
            fine.nelbo_exact_time(model_fn, x0_BL, keys[2]).nats_B,
            coarse.nelbo(model_fn, x0_BL, keys[3]).nats_B)

  reference_N, coarse_B, fine_B, one_step_B = (np.asarray(nats, np.float64)
                                               for nats in run(bounds, jax.random.key(0)))
  stderr = lambda *samples: np.sqrt(sum(sample.var() / len(sample) for sample in samples))
  # The one-step estimate T L_{t-1} + L_T is unbiased for the sum over all t.
  assert abs(one_step_B.mean() - coarse_B.mean()) < 4 * stderr(one_step_B, coarse_B)
  # The continuous-time NELBO is the T -> infinity limit, with an O(1 / T) gap (0.5 to 0.8 nats at
  # T = 4, 0.05 to 0.09 at T = 32 here): it must shrink by more than 4x (up to 4 standard errors).
  coarse_gap, fine_gap = coarse_B.mean() - reference_N.mean(), fine_B.mean() - reference_N.mean()
  assert coarse_gap > 4 * stderr(coarse_B, reference_N), (coarse_gap, fine_gap)
  assert abs(fine_gap) < coarse_gap / 4 + 4 * stderr(fine_B, reference_N), (coarse_gap, fine_gap)


def test_absorbing_reverse_step_reveals_like_the_masked_process():
  t_N, s_N = np.array([20, 20, 13, 7, 2, 1]), np.array([19, 5, 12, 0, 1, 0])  # any grid
  for kind in ("linear", "cosine"):
    process = make_process("absorbing", num_steps=20, kind=kind)
    reference = masked.MaskedDiffusion(V, MASK_ID, schedules.Schedule(kind))
    x0_log_probs_1V = process.x_theta_log_probs(random_model()(jnp.full((1, 1), MASK_ID), jnp.ones(1)))[0]
    masked_N1 = jnp.full((len(t_N), 1), MASK_ID)
    log_probs_NV = run(lambda: process.reverse_log_probs(masked_N1, x0_log_probs_1V[None], t_N, s_N)[:, 0])
    reveal_N = 1 - np.exp(log_probs_NV[:, MASK_ID])
    np.testing.assert_allclose(reveal_N, reference.unmask_prob(t_N / 20, s_N / 20), rtol=1e-5, atol=1e-6)
    # A revealed token is drawn from the network's x_0 prediction.
    revealed_NV = np.exp(log_probs_NV[:, 1:]) / reveal_N[:, None]
    np.testing.assert_allclose(revealed_NV, np.exp(x0_log_probs_1V[:, 1:]).repeat(len(t_N), 0), rtol=1e-5)


def test_perfect_denoiser_bounds_reach_the_true_nll():
  dist = testing.TinyDistribution.random((1, 2, 3), length=3, seed=0)
  vocab = 4
  model_fn = testing.exact_masked_denoiser(dist, vocab, MASK_ID)
  process = d3pm.D3PM(vocab, "absorbing", num_steps=64, schedule=schedules.Schedule("linear"),
                      mask_id=MASK_ID)
  continuous = masked.MaskedDiffusion(vocab, MASK_ID, schedules.Schedule("linear"))
  x0_BL = dist.sample(4, seed=1)
  draws = 1000  # per sequence; 8x as many for the continuous bound, whose estimate is noisier
  x0_NL = jnp.tile(jnp.asarray(x0_BL), (draws, 1))
  discrete_N, continuous_N = run(lambda key: (
      process.nelbo_exact_time(model_fn, x0_NL, jax.random.fold_in(key, 0)).nats_B,
      continuous.nelbo(model_fn, jnp.tile(x0_NL, (8, 1)), jax.random.fold_in(key, 1)).nats_B), jax.random.key(0))
  nll_B = -dist.log_prob(x0_BL)
  for nats_N in (discrete_N, continuous_N):
    nats_DB = np.asarray(nats_N).reshape(-1, len(x0_BL))
    mean_B, stderr_B = nats_DB.mean(0), nats_DB.std(0) / np.sqrt(len(nats_DB))
    # A valid bound (>= NLL) and, with a perfect denoiser, equal to it up to MC error (the
    # discrete one also up to its O(1 / T) gap from tokens revealed in the same step).
    assert (mean_B > nll_B - 4 * stderr_B).all(), (mean_B, nll_B, stderr_B)
    assert (np.abs(mean_B - nll_B) < 4 * stderr_B + 0.02).all(), (mean_B, nll_B, stderr_B)


def test_reverse_step_skips_merged_steps_and_ends_with_an_x0_draw():
  process = make_process("uniform", num_steps=4)
  canvas_BL = jnp.array([[1, 2, 3, 4, 5]])
  certain_BLW = 1e4 * jax.nn.one_hot(jnp.array([[5, 4, 3, 2, 1]]), V + 2)
  random_BLW = random_model()(canvas_BL, jnp.full((1,), 0.25))
  keys_B = jax.random.split(jax.random.key(0), 1)
  canvas = base.Canvas(canvas_BL, jnp.zeros((1, 5), bool))
  sampled, greedy = base.StepSettings(), base.StepSettings(base.TokenDraw(temperature=0.0))

  def steps():
    return (process.reverse_step(canvas, random_BLW, 1.0, 0.9, keys_B, sampled).tokens_BL,  # 4 -> 4
            process.reverse_step(canvas, certain_BLW, 0.25, 0.0, keys_B, sampled).tokens_BL,
            process.reverse_step(canvas, random_BLW, 0.25, 0.0, keys_B, greedy).tokens_BL,
            process.denoiser_log_probs(random_BLW, canvas_BL, 0.25))

  unchanged_BL, certain_x0_BL, greedy_x0_BL, denoiser_BLV = run(steps)
  np.testing.assert_array_equal(unchanged_BL, canvas_BL)
  np.testing.assert_array_equal(certain_x0_BL, [[5, 4, 3, 2, 1]])
  np.testing.assert_array_equal(greedy_x0_BL, np.argmax(denoiser_BLV, -1))


@pytest.mark.parametrize("transition", d3pm.TRANSITIONS)
def test_ancestral_sampling_keeps_fixed_positions(transition):
  process = make_process(transition, num_steps=16)
  config = samplers.SamplerConfig(steps=8, strategy="ancestral", temperature=0.8, top_k=4)
  fixed_BL = jnp.arange(10)[None, :] < jnp.array([[0], [3], [9]])
  tokens_BL = jnp.where(fixed_BL, 2, 0)
  out_BL = run(lambda key: samplers.sample(random_model(), process, config, tokens_BL, fixed_BL, key),
               jax.random.key(0))
  np.testing.assert_array_equal(out_BL[fixed_BL], 2)
  assert bool(((out_BL >= 0) & (out_BL < V)).all())
  if transition == "absorbing":
    assert not bool((out_BL == MASK_ID).any())


def test_ancestral_sampling_with_the_exact_denoiser_samples_the_true_distribution():
  dist = testing.TinyDistribution.random((1, 2, 3), length=3, seed=4)
  model_fn = testing.exact_masked_denoiser(dist, 4, MASK_ID)
  process = d3pm.D3PM(4, "absorbing", num_steps=96, schedule=schedules.Schedule("linear"),
                      mask_id=MASK_ID)
  num = 8000
  config = samplers.SamplerConfig(steps=48, strategy="ancestral")  # every other step of the grid
  out_BL = run(lambda key: samplers.sample(model_fn, process, config, jnp.zeros((num, 3), jnp.int32),
                                           jnp.zeros((num, 3), bool), key), jax.random.key(0))
  counts = collections.Counter(map(tuple, np.asarray(out_BL).tolist()))
  empirical = np.array([counts[tuple(s)] / num for s in dist.sequences_SL.tolist()])
  total_variation = 0.5 * np.abs(empirical - np.exp(dist.log_probs_S)).sum()
  # 27 outcomes, 8000 draws: a correct sampler's expected TV is about 0.02. Tokens revealed in the
  # same of 48 steps are drawn independently, which costs < 0.01 (measured with 200k draws); with
  # 3 steps the TV is 0.13.
  assert total_variation < 0.045, total_variation


def test_neighbor_graph_is_symmetric_bounded_and_local():
  rng = np.random.default_rng(0)
  centers_CD = rng.normal(size=(5, 8)) * 10
  embeddings_VD = np.repeat(centers_CD, 4, axis=0) + rng.normal(size=(20, 8))  # 5 clusters of 4 tokens
  graph = d3pm.NeighborGraph.from_embeddings(embeddings_VD, 3)
  chunked = d3pm.NeighborGraph.from_embeddings(embeddings_VD, 3, chunk_size=7)
  np.testing.assert_array_equal(graph.neighbors_VK, chunked.neighbors_VK)
  rates_VV = rate_matrix(graph)
  np.testing.assert_array_equal(rates_VV, rates_VV.T)
  np.testing.assert_allclose(np.diag(rates_VV), -1.0)  # every token's 3 cluster mates, at rate 1/3
  cluster_V = np.arange(20) // 4
  np.testing.assert_array_equal(cluster_V[np.asarray(graph.neighbors_VK)],
                                np.repeat(cluster_V[:, None], 3, 1))
  assert graph == graph and graph != chunked and hash(make_process("nearest_neighbor"))


def test_cooccurrence_embeddings_are_deterministic_and_group_interchangeable_tokens():
  rng = np.random.default_rng(0)
  # 2 and 3 are interchangeable (both follow 1 and precede 4); 5 and 6 follow 7; 9 never occurs.
  rows_NL = np.where(rng.random((400, 12)) < 0.5, 2, 3)
  rows_NL[:, 0::3], rows_NL[:, 2::3] = 1, 4
  rows_NL[::2, 1::3] = np.where(rng.random((200, 4)) < 0.5, 5, 6)
  rows_NL[::2, 0::3] = 7
  rows_NL[:, -1] = 8
  embeddings_VD = d3pm.cooccurrence_embeddings(rows_NL, 10, dim=4)
  assert embeddings_VD.shape == (10, 4) and embeddings_VD.dtype == np.float32
  np.testing.assert_array_equal(embeddings_VD, d3pm.cooccurrence_embeddings(rows_NL, 10, dim=4))
  unit_VD = embeddings_VD / np.linalg.norm(embeddings_VD, axis=1, keepdims=True)
  assert unit_VD[2] @ unit_VD[3] > 0.99 and unit_VD[5] @ unit_VD[6] > 0.99
  assert np.linalg.norm(embeddings_VD[[0, 9]], axis=1).min() > 0  # never seen: random, distinct
  assert not np.allclose(unit_VD[0], unit_VD[9])
  graph = d3pm.NeighborGraph.from_embeddings(embeddings_VD, 2)
  assert 3 in np.asarray(graph.neighbors_VK[2]) and 6 in np.asarray(graph.neighbors_VK[5])
  assert d3pm.cooccurrence_embeddings(rows_NL, 10, dim=12).shape == (10, 12)  # dense SVD, zero-padded


def test_bad_settings_are_rejected():
  with pytest.raises(ValueError, match="transition 'gaussian'"):
    d3pm.D3PM(vocab_size=V, transition="gaussian")
  with pytest.raises(ValueError, match="num_steps"):
    d3pm.D3PM(vocab_size=V, transition="uniform", num_steps=0)
  with pytest.raises(ValueError, match="mask_id"):
    d3pm.D3PM(vocab_size=V, transition="absorbing")
  with pytest.raises(ValueError, match="mask_id"):
    d3pm.D3PM(vocab_size=V, transition="uniform", mask_id=0)
  with pytest.raises(ValueError, match="graph"):
    d3pm.D3PM(vocab_size=V, transition="nearest_neighbor")
  with pytest.raises(ValueError, match="graph"):
    d3pm.D3PM(vocab_size=V, transition="uniform", graph=GRAPH)
  with pytest.raises(ValueError, match="hybrid_coeff"):
    d3pm.D3PM(vocab_size=V, transition="uniform", hybrid_coeff=-1.0)
  with pytest.raises(ValueError, match="num_neighbors"):
    d3pm.NeighborGraph.from_embeddings(np.eye(3), 3)
  one_way = d3pm.NeighborGraph(neighbors_VK=jnp.array([[1], [1], [2]]), weights_VK=jnp.array([[0.5], [0], [0]]))
  with pytest.raises(ValueError, match="symmetric"):
    d3pm.D3PM(vocab_size=3, transition="nearest_neighbor", graph=one_way)
  with pytest.raises(ValueError, match="describe 4 tokens"):
    d3pm.D3PM(vocab_size=4, transition="nearest_neighbor", graph=GRAPH)
