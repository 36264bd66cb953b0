"""Reverse processes as one `lax.scan` kernel over a fixed step grid.

`sample` runs any `base.DiffusionProcess` the same way: `process.initial_state`, then per step the
network on `state.network_input` and a step of the state (the process's own `reverse_step`, or a
k-reveal step of an absorbing process), then `process.tokens`; fixed positions are held by the
process's state. `check_sampler` says which settings a process can use.

Strategies:
  'ancestral'       every process: its exact reverse step x_t -> x_s (`process.reverse_step`), e.g.
                    MDLM's for the masked process: a masked token is revealed between t and s < t
                    with probability (alpha_s - alpha_t) / (1 - alpha_t), drawn from p(x_0 | x_t);
                    DDPM's p(z_s | z_t) = q(z_s | z_t, z0_hat) for the Gaussian family.
  'ddim'            the Gaussian family: DDIM steps (eta = 0 deterministic), good with few steps.
  'random'          absorbing processes (LLaDA): a scheduled number k of masked positions is
                    revealed per step, chosen at random.
  'low_confidence'  absorbing processes (LLaDA): the k masked positions whose sampled token the
                    model is most sure of are revealed.
  'first_hitting'   the continuous-time masked process: its exact reverse process, one network call
                    per revealed token (Zheng et al. 2024), run until every row is complete
                    (`first_hitting`); `steps` does not apply.
The k-strategies reveal the positions of each block evenly over the block's steps; with
`block_length > 0` blocks are generated left to right (semi-autoregressive, LLaDA sec. 2.4).
Every strategy draws its tokens with the same `base.TokenDraw` (temperature, top-k, top-p).
The Gaussian family's state is a point z of the embedding space instead of a token canvas
(`gaussian.Points`): its steps can snap the predicted z0_hat to the nearest embedding (`clamp`,
Diffusion-LM's clamping trick) and take classifier guidance (`guide_fn`), and its tokens are z
rounded to the nearest embedding.

Classifier-free guidance (`guidance_scale`, see `guidance.py`) works for every diffusion family:
the network runs on the canvas with and without its condition (`condition_BL`) and the outputs
are mixed.

Fixed positions (prompts, infilling constraints, padding) are never changed. Randomness is per
row: row r at step i uses fold_in(fold_in(key, row_ids[r]), i), so a row's sample does not depend
on the batch it was drawn in. Tokens are sampled by inverse CDF with one uniform per position
instead of V Gumbel draws per position; with semi-autoregressive blocks only the current block's
positions pay for the softmax and the draw.

The autoregressive baseline decodes left to right with a KV cache instead (`decode`, at the end).
"""
import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ddlm_jax import guidance
from ddlm_jax.processes import base
from ddlm_jax.processes import gaussian
from ddlm_jax.processes import masked

REVEAL_STRATEGIES = ("random", "low_confidence")  # absorbing processes
TOKEN_STRATEGIES = ("ancestral",) + REVEAL_STRATEGIES
EMBEDDING_STRATEGIES = ("ancestral", "ddim")  # the Gaussian family
STRATEGIES = TOKEN_STRATEGIES + ("first_hitting", "ddim")  # first_hitting: the masked process


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Settings of the reverse process (static under jit).

  Attributes:
    steps: number of reverse steps (network evaluations); not used by 'first_hitting', which calls
      the network once per revealed token (at most L times).
    strategy: one of STRATEGIES.
    temperature: softmax temperature of the token draws; 0 takes the argmax.
    top_k: draw only among the k most likely tokens (None: all).
    top_p: draw only from the nucleus of mass top_p (1: all).
    block_length: free positions per semi-autoregressive block; 0 = one block. A row with n free
      positions has ceil(n / block_length) blocks, which share the steps as evenly as possible.
    record_trajectory: also return the canvas after every step ('first_hitting': L steps, the
      final canvas repeated after the last reveal).
    eta: DDIM's noise scale (strategy 'ddim'; 0: deterministic, 1: the DDPM step).
    clamp: Gaussian family: snap z0_hat to the nearest embedding before each step.
    guidance_scale: classifier-free guidance scale w (0: unconditional, 1: conditional, no
      guidance); needs a condition (`sample`'s condition_BL).
  """
  steps: int = 64
  strategy: str = "low_confidence"
  temperature: float = 1.0
  top_k: int | None = None
  top_p: float = 1.0
  block_length: int = 0
  record_trajectory: bool = False
  eta: float = 0.0
  clamp: bool = False
  guidance_scale: float = 1.0

  def __post_init__(self):
    if self.steps < 1:
      raise ValueError(f"sampler steps must be >= 1, got {self.steps}")
    if self.strategy not in STRATEGIES:
      raise ValueError(f"sampler strategy {self.strategy!r} is not one of {STRATEGIES}")
    self.draw  # validates temperature, top_k and top_p
    if self.block_length < 0:
      raise ValueError(f"sampler block_length must be >= 0, got {self.block_length}")
    if self.block_length and self.strategy not in REVEAL_STRATEGIES:
      raise ValueError(f"block_length needs strategy 'random' or 'low_confidence', not {self.strategy!r}")
    if not self.eta >= 0:
      raise ValueError(f"sampler eta must be >= 0, got {self.eta}")
    if not self.guidance_scale >= 0:
      raise ValueError(f"sampler guidance_scale must be >= 0, got {self.guidance_scale}")

  @property
  def draw(self) -> base.TokenDraw:
    return base.TokenDraw(self.temperature, self.top_k, self.top_p)

  @property
  def step_settings(self) -> base.StepSettings:
    """What a process's `reverse_step` reads."""
    return base.StepSettings(draw=self.draw, method="ddim" if self.strategy == "ddim" else "ddpm",
                             eta=self.eta, clamp=self.clamp)

  def max_blocks(self, length: int) -> int:
    """Blocks of a canvas of `length` free positions; each needs at least one step."""
    num_blocks = -(-length // self.block_length) if self.block_length else 1
    if self.steps < num_blocks:
      raise ValueError(f"steps={self.steps} is fewer than the {num_blocks} blocks of length "
                       f"{self.block_length} in a canvas of {length}")
    return num_blocks


@flax.struct.dataclass
class SamplingPlan:
  """What stays fixed over a sampling run.

  Attributes:
    block_BL: int32[B, L], semi-autoregressive block of each position to generate (-1 otherwise).
    block_of_step_BS: int32[B, steps], the block each row works on at each step.
    reveal_counts_BS: int32[B, steps], tokens revealed per row and step (k-strategies).
  """
  block_BL: jax.Array
  block_of_step_BS: jax.Array
  reveal_counts_BS: jax.Array


def make_plan(config: SamplerConfig, to_generate_BL: jax.Array) -> SamplingPlan:
  """Blocks of the positions to generate, and how many each step of each row reveals.

  Row b with n_b positions to generate has ceil(n_b / block_length) blocks; block j owns the
  steps [ceil(j S / n_b), ceil((j + 1) S / n_b)) of the S steps and reveals its positions evenly
  over them, earlier steps taking the remainder (LLaDA's schedule).
  """
  length, steps = to_generate_BL.shape[1], config.steps
  block_length = config.block_length or length
  max_blocks = config.max_blocks(length)
  block_BL = jnp.where(to_generate_BL, (jnp.cumsum(to_generate_BL, axis=1) - 1) // block_length, -1)
  block_sizes_BK = (block_BL[:, :, None] == jnp.arange(max_blocks)).sum(axis=1)
  num_blocks_B1 = jnp.maximum(-(-to_generate_BL.sum(axis=1, keepdims=True) // block_length), 1)
  step_S = jnp.arange(steps)
  block_of_step_BS = step_S * num_blocks_B1 // steps
  first_step_BS = -(-block_of_step_BS * steps // num_blocks_B1)
  steps_in_block_BS = -(-(block_of_step_BS + 1) * steps // num_blocks_B1) - first_step_BS
  size_BS = jnp.take_along_axis(block_sizes_BK, block_of_step_BS, axis=1)
  reveal_counts_BS = (size_BS // steps_in_block_BS
                      + (step_S - first_step_BS < size_BS % steps_in_block_BS))
  return SamplingPlan(block_BL=block_BL, block_of_step_BS=block_of_step_BS.astype(jnp.int32),
                      reveal_counts_BS=reveal_counts_BS.astype(jnp.int32))


def cumulative_before(x_BL: jax.Array) -> jax.Array:
  """bool[B, L]: whether x is True at some position to the left (exclusive)."""
  return jnp.cumsum(x_BL, axis=1) - x_BL > 0


def top_k_mask(scores_BL: jax.Array, k_B: jax.Array) -> jax.Array:
  """bool[B, L]: the k_B[b] highest-scoring positions of each row (ties broken by position)."""
  order_BL = jnp.argsort(-scores_BL, axis=1, stable=True)
  rank_BL = jnp.argsort(order_BL, axis=1)
  return rank_BL < k_B[:, None]


def step_times(config: SamplerConfig, step: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(t, s): the step moves the canvas from time t to time s = t - 1/steps."""
  return 1.0 - step / config.steps, 1.0 - (step + 1) / config.steps


def step_keys(row_keys_B: jax.Array, step: jax.Array) -> jax.Array:
  """The per-row keys of one step: fold_in(row_keys_B[b], step)."""
  return jax.vmap(lambda row_key: jax.random.fold_in(row_key, step))(row_keys_B)


def reveal_step(process: base.AbsorbingProcess, config: SamplerConfig, plan: SamplingPlan,
                canvas: base.Canvas, logits_BLW: jax.Array, t: jax.Array, step: jax.Array,
                step_keys_B: jax.Array, eos_id: int | None = None, pad_id: int | None = None) -> base.Canvas:
  """One step of a k-reveal strategy: reveals plan.reveal_counts_BS[:, step] masked positions of
  each row's current block, drawn from p(x_0 | x_t) ('random': at random positions,
  'low_confidence': where the model gives the drawn token the highest probability).

  'low_confidence' with eos_id and pad_id reveals a row in the shape of the data, text [EOS]
  [PAD]..., and never reveals an end ahead of the content it ends (else the confident [PAD]s of a
  mostly padded corpus are revealed first, at the start of the canvas, and the text is empty):
  [PAD] is drawn only after a revealed [EOS] (elsewhere the draw is from p(x_0 | x_t) without
  [PAD], renormalised), and a drawn [EOS] or [PAD] with a masked position to its left ranks below
  every other position (among themselves leftmost first).
  'random' draws and orders as the model says: its positions do not depend on the drawn tokens, so
  one reveal per step with an exact denoiser samples the data distribution exactly.
  """
  canvas_BL = canvas.tokens_BL
  length = canvas_BL.shape[1]
  token_u_BL, choice_u_BL = base.step_uniforms(step_keys_B, length)
  in_block_BL = plan.block_BL == plan.block_of_step_BS[:, step, None]
  if config.block_length:  # only the current block's C = block_length positions pay for the sampling maths
    positions_BC = jnp.argsort(~in_block_BL, axis=1, stable=True)[:, :config.block_length]
    gather = lambda x_BL: jax.vmap(lambda row, positions: row[positions])(x_BL, positions_BC)
    scatter = lambda x_BL, x_BC: jax.vmap(lambda row, positions, values: row.at[positions].set(values))(
        x_BL, positions_BC, x_BC)
  else:
    gather, scatter = (lambda x_BL: x_BL), (lambda x_BL, x_BC: x_BC)
  canvas_BC, token_u_BC = gather(canvas_BL), gather(token_u_BL)
  log_probs_BCV = process.denoiser_log_probs(gather(logits_BLW), canvas_BC, t)
  active_BC = (canvas_BC == process.mask_id) & gather(in_block_BL)
  shaped = config.strategy == "low_confidence" and eos_id is not None and pad_id is not None
  if shaped:
    pad_barred_BC1 = ~gather(cumulative_before(canvas_BL == eos_id))[..., None]
    log_probs_BCV = jnp.where(pad_barred_BC1 & (jnp.arange(log_probs_BCV.shape[-1]) == pad_id), -jnp.inf,
                              log_probs_BCV)
  candidates_BC = config.draw(log_probs_BCV, token_u_BC)
  if config.strategy == "random":
    scores_BC = gather(choice_u_BL)
  else:
    scores_BC = base.token_log_likelihood(log_probs_BCV, candidates_BC)
  if shaped:
    ends_BC = (candidates_BC == eos_id) | (candidates_BC == pad_id)
    # Block positions are in order, and the blocks before the current one are complete.
    scores_BC = jnp.where(ends_BC & cumulative_before(active_BC), jnp.finfo(scores_BC.dtype).min, scores_BC)
  scores_BC = jnp.where(active_BC, scores_BC, -jnp.inf)
  reveal_BC = active_BC & top_k_mask(scores_BC, plan.reveal_counts_BS[:, step])
  return canvas.moved_to(scatter(canvas_BL, jnp.where(reveal_BC, candidates_BC, canvas_BC)))


def pad_after_eos(tokens_BL: jax.Array, fixed_BL: jax.Array, eos_id: int, pad_id: int) -> jax.Array:
  """Replaces every free position after a row's first [EOS] by [PAD]."""
  is_eos_BL = tokens_BL == eos_id
  after_eos_BL = (jnp.cumsum(is_eos_BL, axis=1) - is_eos_BL) > 0
  return jnp.where(after_eos_BL & ~fixed_BL, pad_id, tokens_BL)


def first_hitting(model_fn: base.ModelFn, process: masked.MaskedDiffusion, config: SamplerConfig,
                  canvas: base.Canvas, row_keys_B: jax.Array) -> tuple[base.Canvas, jax.Array | None]:
  """The exact reverse process of the masked process, one revealed token per row and network call
  (first-hitting sampling, Zheng et al. 2024), as one `lax.while_loop` that stops when no row has a
  masked free position.

  A token masked at time t is still masked at s < t with probability m(s) / m(t), m =
  `schedule.mask_prob`, so each of a row's n masked positions has its own reveal time tau_l with
  m(tau_l) = m(t) v_l, v_l ~ U(0, 1) (a fresh draw per step is right: the process is Markov).
  The row's next reveal is the latest of them: the position with the largest v_l, chosen uniformly,
  at m(tau) = m(t) max_l v_l (max_l v_l ~ u^(1/n)). Nothing changes in (tau, t), so its token is
  drawn with config.draw from p(x_0 | x_t) read from the network at (canvas, tau); then t <- tau.
  Each row's time enters only the network call, so a network that ignores time samples in a
  uniformly random order, one token at a time. A complete row does nothing; step i uses the keys
  `step_keys(row_keys_B, i)`.

  Args:
    model_fn: (x_t int32[B, L], t float32[B]) -> logits float32[B, L, W].
    process: the masked process.
    config: the token draw and record_trajectory.
    canvas: the prior draw at t = 1 (`process.initial_state`).
    row_keys_B: the rows' keys.

  Returns:
    The complete canvas, and with config.record_trajectory the canvas after every step
    int32[L, B, L] (L steps bound the loop; after a batch's last reveal the final canvas is repeated).
  """
  batch_size, length = canvas.tokens_BL.shape
  masked_free = lambda canvas: (canvas.tokens_BL == process.mask_id) & ~canvas.fixed_BL

  def body(carry):
    canvas, mask_prob_B, step, trajectory_SBL = carry
    token_u_BL, survival_u_BL = base.step_uniforms(step_keys(row_keys_B, step), length)
    masked_BL = masked_free(canvas)
    survival_BL = jnp.where(masked_BL, survival_u_BL, -1.0)
    position_B1 = jnp.argmax(survival_BL, axis=1)[:, None]
    active_B = masked_BL.any(axis=1)
    mask_prob_B = jnp.where(active_B, mask_prob_B * survival_BL.max(axis=1), mask_prob_B)
    t_B = process.schedule.time_at_mask_prob(mask_prob_B)
    logits_BLW = model_fn(canvas.network_input, t_B)
    logits_B1W = jnp.take_along_axis(logits_BLW, position_B1[..., None], axis=1)
    log_probs_B1V = process.denoiser_log_probs(
        logits_B1W, jnp.take_along_axis(canvas.tokens_BL, position_B1, axis=1), t_B)
    token_B1 = config.draw(log_probs_B1V, jnp.take_along_axis(token_u_BL, position_B1, axis=1))
    reveal_BL = active_B[:, None] & (jnp.arange(length) == position_B1)
    canvas = canvas.moved_to(jnp.where(reveal_BL, token_B1, canvas.tokens_BL))
    if config.record_trajectory:
      trajectory_SBL = trajectory_SBL.at[step].set(canvas.tokens_BL)
    return canvas, mask_prob_B, step + 1, trajectory_SBL

  initial_mask_prob_B = process.schedule.mask_prob(jnp.ones((batch_size,), jnp.float32))
  trajectory_SBL = jnp.zeros((length, batch_size, length), jnp.int32) if config.record_trajectory else None
  canvas, _, num_steps, trajectory_SBL = jax.lax.while_loop(
      lambda carry: masked_free(carry[0]).any(), body,
      (canvas, initial_mask_prob_B, jnp.zeros((), jnp.int32), trajectory_SBL))
  if config.record_trajectory:
    after_last_S11 = (jnp.arange(length) >= num_steps)[:, None, None]
    trajectory_SBL = jnp.where(after_last_S11, canvas.tokens_BL, trajectory_SBL)
  return canvas, trajectory_SBL


def sample(model_fn: base.ModelFn | gaussian.EmbeddingModel, process: base.DiffusionProcess,
           config: SamplerConfig, fixed_tokens_BL: jax.Array, fixed_BL: jax.Array, key: jax.Array,
           row_ids_B: jax.Array | None = None, eos_id: int | None = None,
           pad_id: int | None = None, condition_BL: jax.Array | None = None,
           null_id: int | None = None, guide_fn: guidance.GuideFn | None = None):
  """Runs the reverse process from the prior to a clean canvas: `process.initial_state`, then one
  `lax.scan` over the steps of the network at `state.network_input` and the process's step (the
  strategy's; 'first_hitting': a loop of one reveal per row, `first_hitting`), then `process.tokens`.

  Args:
    model_fn: (x_t int32[B, L], t float32[B]) -> logits float32[B, L, W]; for the Gaussian
      family a `gaussian.EmbeddingModel`.
    process: a diffusion process (`base.DiffusionProcess`); the k-reveal strategies need an
      absorbing one, 'first_hitting' the masked process, 'ddim', clamp and guide_fn the Gaussian
      family (see `check_sampler`).
    config: sampler settings.
    fixed_tokens_BL: int32[B, L], tokens at fixed positions (ignored elsewhere).
    fixed_BL: bool[B, L], positions that are never changed (prompt, constraints, padding).
    key: PRNG key.
    row_ids_B: int32[B] identities of the rows for their randomness; defaults to 0..B-1.
    eos_id, pad_id: if given, free positions after a row's first [EOS] become [PAD], and
      'low_confidence' never reveals them ahead of the content they end (`reveal_step`).
    condition_BL: bool[B, L], the fixed positions that form the condition (a source segment);
      classifier-free guidance replaces them by `null_id` in the unconditional branch.
    null_id: the null condition's token (the [PAD] of conditioning dropout).
    guide_fn: classifier guidance of the Gaussian family (`guidance.ClassifierGuide`).

  Returns:
    tokens int32[B, L]; with `config.record_trajectory`, also the tokens after every step
    int32[steps, B, L] (the Gaussian family's z rounded to tokens; L steps for 'first_hitting').
  """
  check_sampler(process, config, condition_BL=condition_BL, null_id=null_id, guide_fn=guide_fn,
                sampling=True)
  batch_size = fixed_BL.shape[0]
  if row_ids_B is None:
    row_ids_B = jnp.arange(batch_size)
  row_keys_B = jax.vmap(lambda row: jax.random.fold_in(key, row))(row_ids_B)
  # The prior draws with the key after the last step's (first_hitting takes at most L steps).
  num_steps = fixed_BL.shape[1] if config.strategy == "first_hitting" else config.steps
  state = process.initial_state(model_fn, fixed_tokens_BL, fixed_BL, step_keys(row_keys_B, num_steps))
  if config.guidance_scale != 1.0:
    model_fn = guidance.classifier_free(model_fn, condition_BL, process.clean_input(state, null_id),
                                        config.guidance_scale)
  reveals = config.strategy in REVEAL_STRATEGIES
  if reveals:
    plan = make_plan(config, process.tokens(state) == process.mask_id)
  guide = {} if guide_fn is None else {"guide_fn": guide_fn}

  def body(state, step):
    t, s = step_times(config, step)
    keys_B = step_keys(row_keys_B, step)
    output = model_fn(state.network_input, jnp.full((batch_size,), t))
    if reveals:
      state = reveal_step(process, config, plan, state, output, t, step, keys_B, eos_id, pad_id)
    else:
      state = process.reverse_step(state, output, t, s, keys_B, config.step_settings, **guide)
    return state, process.tokens(state).astype(jnp.int32) if config.record_trajectory else None

  if config.strategy == "first_hitting":
    state, trajectory_SBL = first_hitting(model_fn, process, config, state, row_keys_B)
  else:
    state, trajectory_SBL = jax.lax.scan(body, state, jnp.arange(config.steps))
  tokens_BL = process.tokens(state).astype(jnp.int32)
  if eos_id is not None:
    tokens_BL = pad_after_eos(tokens_BL, fixed_BL, eos_id, pad_id)
  return (tokens_BL, trajectory_SBL) if config.record_trajectory else tokens_BL


def check_sampler(process: base.Process, config: SamplerConfig, *, condition_BL: jax.Array | None = None,
                  null_id: int | None = None, guide_fn: guidance.GuideFn | None = None,
                  sampling: bool = False) -> None:
  """Raises ValueError for a sampler setting the process cannot use.

  Args:
    process: any process; the autoregressive baseline decodes (`decode`) and reads only the token
      draw settings.
    config: the sampler settings.
    condition_BL, null_id: classifier-free guidance's condition and null token.
    guide_fn: classifier guidance (the Gaussian family only).
    sampling: a sampler call: guidance_scale != 1 then needs condition_BL and null_id (a config
      check leaves it False: the condition comes with the data).
  """
  name = type(process).__name__
  continuous = not process.causal_network and process.continuous
  if continuous and config.strategy not in EMBEDDING_STRATEGIES:
    raise ValueError(f"strategy {config.strategy!r} reveals tokens; {name} takes 'ancestral' (DDPM) or 'ddim'")
  if not continuous and (config.strategy == "ddim" or config.clamp or guide_fn is not None):
    raise ValueError(f"'ddim', clamp and classifier guidance work on embeddings; {name} has tokens")
  if process.causal_network:
    if sampling:
      raise ValueError(f"{name} has no reverse process; it decodes left to right (`decode`)")
    if config.guidance_scale != 1.0:
      raise ValueError(f"classifier-free guidance (guidance_scale != 1) needs a diffusion process; {name} "
                       "decodes left to right")
    return
  if config.strategy == "first_hitting" and not isinstance(process, masked.MaskedDiffusion):
    raise ValueError(f"strategy 'first_hitting' draws reveal times of the continuous-time masked process "
                     f"(MaskedDiffusion); {name} takes 'ancestral'")
  if config.strategy in REVEAL_STRATEGIES and not process.absorbing:
    raise ValueError(f"strategy {config.strategy!r} reveals [MASK]ed positions; {name} "
                     "has no [MASK] state, use strategy 'ancestral'")
  if sampling and config.guidance_scale != 1.0 and (condition_BL is None or null_id is None):
    raise ValueError("classifier-free guidance (guidance_scale != 1) needs the condition's positions "
                     "(condition_BL) and its null token (null_id)")


# Autoregressive decoding: one `lax.while_loop` over positions (stopping once every row has drawn its
# [EOS]), feeding one token at a time through a cached step function.

# step_fn(tokens_BT, start, cache) -> (logits_BTW, cache): the network on T tokens at positions
# [start, start + T), given a cache holding the positions before start.
DecodeStepFn = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def recompute_decoder(model_fn: base.ModelFn, batch_size: int,
                      max_len: int) -> tuple[jax.Array, DecodeStepFn]:
  """(empty cache, step_fn) for any causal model_fn, without a KV cache.

  The cache is the buffer of tokens fed so far, int32[B, max_len], and every step reruns
  model_fn(buffer, t = 0) on the whole buffer (the unwritten tail never reaches earlier positions
  of a causal model). It is the reference that cached decoders must match, and the decoder of test
  doubles.
  """
  def step_fn(tokens_BT, start, buffer_BL):
    buffer_BL = jax.lax.dynamic_update_slice(buffer_BL, tokens_BT.astype(jnp.int32), (0, start))
    logits_BLW = model_fn(buffer_BL, jnp.zeros((batch_size,), jnp.float32))
    return jax.lax.dynamic_slice_in_dim(logits_BLW, start, tokens_BT.shape[1], axis=1), buffer_BL

  return jnp.zeros((batch_size, max_len), jnp.int32), step_fn


def fixed_prefix_length(fixed_BL: np.ndarray) -> int:
  """Host-side: how many leading positions are fixed in every row, at most L - 1 (the longest
  `prefill_length` of `decode`)."""
  fixed_L = np.asarray(fixed_BL).all(axis=0)
  return int(np.logical_and.accumulate(fixed_L[:-1]).sum())


def decode(step_fn: DecodeStepFn, cache: Any, process, config: SamplerConfig,
           fixed_tokens_BL: jax.Array, fixed_BL: jax.Array, key: jax.Array,
           row_ids_B: jax.Array | None = None, eos_id: int | None = None,
           pad_id: int | None = None, prefill_length: int = 0) -> jax.Array:
  """Samples left to right from an autoregressive model with a cached step function.

  At position l the step function is fed the token at l - 1 ([BOS] at l = 0) and returns the
  logits of position l. A fixed position keeps its token (and later positions are conditioned on
  it), so prompts may have a different length in every row; a free position is drawn from
  `process.next_token_log_probs` with `config.draw`: argmax at temperature 0, else an inverse-CDF draw at
  the temperature, within top-k and the top-p nucleus. Row r at position l uses the uniform of
  fold_in(fold_in(key, row_ids[r]), l), so a row's sample does not depend on its batch.
  `config.steps`, `strategy`, `block_length` and `record_trajectory` do not apply and are ignored.

  Args:
    step_fn: see `DecodeStepFn`, e.g. from `transformer.make_decoder` or `recompute_decoder`.
    cache: step_fn's empty cache, holding at least L positions.
    process: the autoregressive process (`processes.autoregressive.Autoregressive`).
    config: token-draw settings (temperature, top_k, top_p).
    fixed_tokens_BL: int32[B, L], tokens at fixed positions (ignored elsewhere).
    fixed_BL: bool[B, L], positions that are never changed (prompt, constraints).
    key: PRNG key.
    row_ids_B: int32[B] identities of the rows for their randomness; defaults to 0..B-1.
    eos_id, pad_id: if given, free positions after a row's first [EOS] become [PAD], and decoding
      stops once every row has drawn its [EOS] (or has no free position left, with or without).
    prefill_length: static P < L; positions [0, P) must be fixed in every row (a common prompt
      prefix, see `fixed_prefix_length`). They are fed as one chunk before the loop instead of
      one by one; the result is the same.

  Returns:
    tokens int32[B, L].
  """
  batch_size, length = fixed_BL.shape
  if not 0 <= prefill_length < length:
    raise ValueError(f"prefill_length must lie in [0, {length - 1}], got {prefill_length}")
  if row_ids_B is None:
    row_ids_B = jnp.arange(batch_size)
  row_keys_B = jax.vmap(lambda row: jax.random.fold_in(key, row))(row_ids_B)
  inputs_BL = process.inputs(fixed_tokens_BL)  # [BOS, x_0, ...]: right for the prefix only
  if prefill_length:
    _, cache = step_fn(inputs_BL[:, :prefill_length], 0, cache)
  draw = config.draw

  def body(carry):
    position, previous_B, tokens_BL, done_B, cache = carry
    logits_B1W, cache = step_fn(previous_B[:, None], position, cache)
    uniforms_B1 = jax.vmap(lambda row_key: jax.random.uniform(jax.random.fold_in(row_key, position),
                                                              (1,)))(row_keys_B)
    drawn_B = draw(process.next_token_log_probs(logits_B1W), uniforms_B1)[:, 0]
    fixed_B = jax.lax.dynamic_index_in_dim(fixed_BL, position, axis=1, keepdims=False)
    token_B = jnp.where(fixed_B, jax.lax.dynamic_index_in_dim(fixed_tokens_BL, position, axis=1, keepdims=False),
                        drawn_B).astype(jnp.int32)
    if eos_id is not None:
      done_B |= (token_B == eos_id) & ~fixed_B
    tokens_BL = jax.lax.dynamic_update_index_in_dim(tokens_BL, token_B, position, axis=1)
    return position + 1, token_B, tokens_BL, done_B, cache

  def unfinished(carry):  # a row is finished once it has its [EOS] or no free position from here on
    position, _, _, done_B, _ = carry
    free_ahead_B = (~fixed_BL & (jnp.arange(length) >= position)).any(axis=1)
    return (position < length) & (free_ahead_B & ~done_B).any()

  initial = (jnp.asarray(prefill_length, jnp.int32), inputs_BL[:, prefill_length].astype(jnp.int32),
             fixed_tokens_BL.astype(jnp.int32), jnp.zeros((batch_size,), bool), cache)
  _, _, tokens_BL, _, _ = jax.lax.while_loop(unfinished, body, initial)
  if eos_id is not None:
    tokens_BL = pad_after_eos(tokens_BL, fixed_BL, eos_id, pad_id)
  return tokens_BL
