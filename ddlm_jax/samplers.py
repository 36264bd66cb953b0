"""Reverse processes as one `lax.scan` kernel over a fixed step grid.

Strategies for the masked process:
  'ancestral'       MDLM's exact reverse step: a masked token is revealed between t and s < t
                    with probability (alpha_s - alpha_t) / (1 - alpha_t), drawn from p(x_0 | x_t).
  'random'          LLaDA: a scheduled number k of masked positions is revealed per step, chosen at random.
  'low_confidence'  LLaDA: the k masked positions whose sampled token the model is most sure of are revealed.
The k-strategies reveal the positions of each block evenly over the block's steps; with
`block_length > 0` blocks are generated left to right (semi-autoregressive, LLaDA sec. 2.4).
Every strategy draws its candidates with the same `draw_tokens`.

Fixed positions (prompts, infilling constraints, padding) are never changed. Randomness is per
row: row r at step i uses fold_in(fold_in(key, row_ids[r]), i), so a row's sample does not depend
on the batch it was drawn in. Tokens are sampled by inverse CDF with one uniform per position
instead of V Gumbel draws per position; with semi-autoregressive blocks only the current block's
positions pay for the softmax and the draw.
"""
import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from ddlm_jax.processes import masked

STRATEGIES = ("ancestral", "random", "low_confidence")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Settings of the reverse process (static under jit).

  Attributes:
    steps: number of reverse steps (network evaluations).
    strategy: one of STRATEGIES.
    temperature: softmax temperature of the token draws; 0 takes the argmax.
    block_length: free positions per semi-autoregressive block; 0 = one block. A row with n free
      positions has ceil(n / block_length) blocks, which share the steps as evenly as possible.
    record_trajectory: also return the canvas after every step.
  """
  steps: int = 64
  strategy: str = "low_confidence"
  temperature: float = 1.0
  block_length: int = 0
  record_trajectory: bool = False

  def __post_init__(self):
    if self.steps < 1:
      raise ValueError(f"sampler steps must be >= 1, got {self.steps}")
    if self.strategy not in STRATEGIES:
      raise ValueError(f"sampler strategy {self.strategy!r} is not one of {STRATEGIES}")
    if self.temperature < 0:
      raise ValueError(f"sampler temperature must be >= 0, got {self.temperature}")
    if self.block_length < 0:
      raise ValueError(f"sampler block_length must be >= 0, got {self.block_length}")
    if self.block_length and self.strategy == "ancestral":
      raise ValueError("block_length needs strategy 'random' or 'low_confidence'")

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
    row_keys_B: per-row PRNG keys.
  """
  block_BL: jax.Array
  block_of_step_BS: jax.Array
  reveal_counts_BS: jax.Array
  row_keys_B: jax.Array


def make_plan(config: SamplerConfig, to_generate_BL: jax.Array, row_keys_B: jax.Array) -> SamplingPlan:
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
                      reveal_counts_BS=reveal_counts_BS.astype(jnp.int32), row_keys_B=row_keys_B)


def draw_tokens(log_probs_BLV: jax.Array, uniforms_BL: jax.Array, temperature: float) -> jax.Array:
  """x_0 candidates: argmax at temperature 0, else an inverse-CDF draw from softmax(log_probs / T).

  One uniform per position replaces V Gumbel draws; a draw never lands on a zero-probability id.
  """
  greedy_BL = jnp.argmax(log_probs_BLV, axis=-1).astype(jnp.int32)
  if temperature == 0:
    return greedy_BL
  probs_BLV = jax.nn.softmax(log_probs_BLV / temperature, axis=-1)
  cdf_BLV = jnp.cumsum(probs_BLV, axis=-1)
  below_BL = (cdf_BLV <= uniforms_BL[..., None] * cdf_BLV[..., -1:]).sum(axis=-1)
  tokens_BL = jnp.minimum(below_BL, log_probs_BLV.shape[-1] - 1).astype(jnp.int32)
  drawn_prob_BL = jnp.take_along_axis(probs_BLV, tokens_BL[..., None], axis=-1)[..., 0]
  return jnp.where(drawn_prob_BL > 0, tokens_BL, greedy_BL)  # only if u * total rounded up to total


def top_k_mask(scores_BL: jax.Array, k_B: jax.Array) -> jax.Array:
  """bool[B, L]: the k_B[b] highest-scoring positions of each row (ties broken by position)."""
  order_BL = jnp.argsort(-scores_BL, axis=1, stable=True)
  rank_BL = jnp.argsort(order_BL, axis=1)
  return rank_BL < k_B[:, None]


def step_times(config: SamplerConfig, step: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(t, s): the step moves the canvas from time t to time s = t - 1/steps."""
  return 1.0 - step / config.steps, 1.0 - (step + 1) / config.steps


def sampler_step(model_fn: masked.ModelFn, process: masked.MaskedDiffusion, config: SamplerConfig,
                 plan: SamplingPlan, canvas_BL: jax.Array, step: jax.Array) -> jax.Array:
  """One reverse step of the masked process: canvas at time t -> canvas at time s."""
  batch_size, length = canvas_BL.shape
  t, s = step_times(config, step)
  step_keys_B = jax.vmap(lambda row_key: jax.random.fold_in(row_key, step))(plan.row_keys_B)
  uniforms_B2L = jax.vmap(lambda k: jax.random.uniform(k, (2, length)))(step_keys_B)
  token_u_BL, choice_u_BL = uniforms_B2L[:, 0], uniforms_B2L[:, 1]

  logits_BLW = model_fn(canvas_BL, jnp.full((batch_size,), t))
  if config.strategy == "ancestral":
    candidates_BL = draw_tokens(masked.x0_log_probs(process, logits_BLW), token_u_BL, config.temperature)
    return masked.reverse_step(process, canvas_BL, candidates_BL, t, s, choice_u_BL)

  in_block_BL = plan.block_BL == plan.block_of_step_BS[:, step, None]
  if config.block_length:  # only the current block's C = block_length positions pay for the sampling maths
    positions_BC = jnp.argsort(~in_block_BL, axis=1, stable=True)[:, :config.block_length]
    gather = lambda x_BL: jax.vmap(lambda row, positions: row[positions])(x_BL, positions_BC)
    scatter = lambda x_BL, x_BC: jax.vmap(lambda row, positions, values: row.at[positions].set(values))(
        x_BL, positions_BC, x_BC)
  else:
    gather, scatter = (lambda x_BL: x_BL), (lambda x_BL, x_BC: x_BC)
  canvas_BC = gather(canvas_BL)
  log_probs_BCV = masked.x0_log_probs(process, gather(logits_BLW))
  candidates_BC = draw_tokens(log_probs_BCV, gather(token_u_BL), config.temperature)
  active_BC = (canvas_BC == process.mask_id) & gather(in_block_BL)
  if config.strategy == "random":
    scores_BC = gather(choice_u_BL)
  else:
    scores_BC = jnp.take_along_axis(log_probs_BCV, candidates_BC[..., None], axis=-1)[..., 0]
  scores_BC = jnp.where(active_BC, scores_BC, -jnp.inf)
  reveal_BC = active_BC & top_k_mask(scores_BC, plan.reveal_counts_BS[:, step])
  return scatter(canvas_BL, jnp.where(reveal_BC, candidates_BC, canvas_BC))


def pad_after_eos(tokens_BL: jax.Array, fixed_BL: jax.Array, eos_id: int, pad_id: int) -> jax.Array:
  """Replaces every free position after a row's first [EOS] by [PAD]."""
  is_eos_BL = tokens_BL == eos_id
  after_eos_BL = (jnp.cumsum(is_eos_BL, axis=1) - is_eos_BL) > 0
  return jnp.where(after_eos_BL & ~fixed_BL, pad_id, tokens_BL)


def sample(model_fn: masked.ModelFn, process: masked.MaskedDiffusion, config: SamplerConfig,
           fixed_tokens_BL: jax.Array, fixed_BL: jax.Array, key: jax.Array,
           row_ids_B: jax.Array | None = None, eos_id: int | None = None,
           pad_id: int | None = None):
  """Runs the reverse process from the prior to a clean canvas.

  Args:
    model_fn: (x_t int32[B, L], t float32[B]) -> logits float32[B, L, V].
    process: the masked process.
    config: sampler settings.
    fixed_tokens_BL: int32[B, L], tokens at fixed positions (ignored elsewhere).
    fixed_BL: bool[B, L], positions that are never changed (prompt, constraints, padding).
    key: PRNG key.
    row_ids_B: int32[B] identities of the rows for their randomness; defaults to 0..B-1.
    eos_id, pad_id: if given, free positions after a row's first [EOS] become [PAD].

  Returns:
    tokens int32[B, L]; with `config.record_trajectory`, also the canvases int32[steps, B, L].
  """
  batch_size = fixed_BL.shape[0]
  if row_ids_B is None:
    row_ids_B = jnp.arange(batch_size)
  row_keys_B = jax.vmap(lambda row: jax.random.fold_in(key, row))(row_ids_B)
  prior_keys_B = jax.vmap(lambda row_key: jax.random.fold_in(row_key, config.steps))(row_keys_B)
  canvas_BL = jax.vmap(lambda tokens_L, fixed_L, row_key: masked.initial_canvas(
      process, tokens_L[None], fixed_L[None], row_key)[0])(fixed_tokens_BL, fixed_BL, prior_keys_B)
  plan = make_plan(config, canvas_BL == process.mask_id, row_keys_B)

  def body(canvas_BL, step):
    canvas_BL = sampler_step(model_fn, process, config, plan, canvas_BL, step)
    return canvas_BL, canvas_BL if config.record_trajectory else None

  tokens_BL, trajectory_SBL = jax.lax.scan(body, canvas_BL, jnp.arange(config.steps))
  if eos_id is not None:
    tokens_BL = pad_after_eos(tokens_BL, fixed_BL, eos_id, pad_id)
  return (tokens_BL, trajectory_SBL) if config.record_trajectory else tokens_BL
