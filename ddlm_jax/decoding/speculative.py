"""Speculative diffusion decoding (Christopher et al. 2024): a diffusion drafter proposes a window of
gamma tokens in a few parallel steps, and the autoregressive (AR) model verifies the whole window in
ONE cached forward pass, accepting by the speculative-sampling rule (Leviathan et al. 2023; Chen et
al. 2023). The output is distributed exactly as `samplers.decode`'s from the AR model.

A round, with the canvas known on [0, start) (prompt and accepted tokens):
  1. the drafter proposes d_i ~ q_i at the window positions w + i, i < gamma (w = start except at the
     canvas end, below) and returns q_i, the distribution it drew d_i from;
  2. the AR step function reads [x_{w-1}, d_0, ..., d_{gamma-1}] at positions [w, w + gamma] (AR inputs
     are the tokens shifted right), giving p_i = p(x_{w+i} | x_{<w}, d_{<i}) for i <= gamma: a p for
     every draft and one for the bonus position w + gamma;
  3. d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)) while every earlier draft was; at
     the first rejection i, x_{w+i} is drawn from normalise(max(0, p_i - q_i)); if all gamma are
     accepted, the bonus x_{w+gamma} is drawn from p_gamma. Every emitted token is then a draw from p
     given the tokens before it.
p and q are both the distributions the run's `base.TokenDraw` samples from (tempered, top-k, top-p),
so the output follows `samplers.decode` under the same draw; at temperature 0 both are one-hot
argmaxes and the output is token-identical to greedy AR decoding.

Step 3 is exact when d_i given the tokens to its left is distributed as q_i, i.e. q_i and the draw of
d_i depend only on the known canvas and the drafts LEFT of i. `MaskedDrafter` reveals the window left
to right for this reason; a drafter that reveals its most confident positions first chooses the
order from the drawn tokens themselves, so its q_i would not be the law of d_i given its left.

Known positions in the window (fixed prompt or constraint tokens, and the accepted positions that a
window moved back at the canvas end re-covers) get p_i = q_i = one-hot on their token: they are kept
with probability 1 and the AR model conditions on them, as `samplers.decode` does.

A batch shares its positions (the cache's `start` is a scalar): row b's rule accepts n_b drafts and
emits n_b + 1 tokens, and every row keeps the first m = min(n_b + 1) over the unfinished rows; the
rest is drawn again next round with fresh randomness. This is exact: whether row b keeps its token
at window index i depends only on events before i (its own acceptances of the drafts before i, and
the other rows', which are independent of it), so the cut is a stopping time of the row's sequential
acceptance. Finished rows (with eos_id: an [EOS] is known) do not hold the others back.

The canvas end: the verify window holds gamma + 1 positions and must not run past L, so its start
is w = min(start, L - gamma - 1); the positions [w, start) it then re-covers are known (kept with
certainty; their cache slots are rewritten with the same inputs). Shapes stay static; gamma < L.

Randomness: row r's round at `start` uses fold_in(fold_in(key, row_ids[r]), start) (start grows
every round). A row's distribution does not depend on its batch; its exact draw does, through the
shared cut (not at temperature 0).
"""
import dataclasses
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp

from ddlm_jax import samplers
from ddlm_jax.processes import autoregressive
from ddlm_jax.processes import base
from ddlm_jax.processes import block
from ddlm_jax.processes import masked


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
  """Settings of speculative decoding (static under jit).

  Attributes:
    draft_length: gamma, the tokens drafted (and verified in one AR call) per round.
    draft_steps: k, the drafter's parallel steps per round, 1 <= k <= gamma.
    draw: the token draw of both the drafter and the AR model (temperature, top-k, top-p).
  """
  draft_length: int = 4
  draft_steps: int = 2
  draw: base.TokenDraw = base.TokenDraw()

  def __post_init__(self):
    if self.draft_length < 1:
      raise ValueError(f"draft_length (gamma) must be >= 1, got {self.draft_length}")
    if not 1 <= self.draft_steps <= self.draft_length:
      raise ValueError(f"draft_steps (k) must lie in [1, draft_length={self.draft_length}], "
                       f"got {self.draft_steps}")


@flax.struct.dataclass
class Draft:
  """A drafter's proposal for the window [start, start + gamma).

  Attributes:
    tokens_BG: int32[B, gamma], the drafted tokens.
    log_probs_BGV: float32[B, gamma, V], the normalised log-distribution each token was drawn from.
    network_calls: int32 scalar, the drafter's network calls.
  """
  tokens_BG: jax.Array
  log_probs_BGV: jax.Array
  network_calls: jax.Array


class Drafter(Protocol):
  """What `speculative_decode` asks of a drafter.

  Attributes:
    mask_id: the id the canvas holds at the positions not known yet.
  """
  mask_id: int

  def draft(self, canvas_BL: jax.Array, start: jax.Array, keys_B: jax.Array,
            config: SpeculativeConfig) -> Draft:
    """Proposes the window [start, start + gamma) of canvas_BL (int32[B, L]: known tokens, [MASK] at
    the free positions not known yet; start an int32 scalar, may be traced), drawing row b with
    keys_B[b] only and with config.draw. The decoder keeps the known window positions whatever is
    proposed there. For the rule to be exact, the proposal at window index i may depend only on the
    canvas and the drafts at indices < i (see the module docstring)."""


@dataclasses.dataclass(frozen=True)
class MaskedDrafter:
  """A masked-diffusion drafter: the denoiser on the whole canvas (no cache) reveals the window LEFT
  TO RIGHT in k chunks of consecutive positions (floor or ceil of gamma / k each), one network call
  per chunk; each chunk's positions are drawn independently from config.draw applied to
  p(x_0 | canvas) at that step, and a position's proposal is that step's distribution. Left to right
  makes the proposal at a position depend only on the positions to its left, which the exactness
  of the acceptance rule needs (module docstring). Known window positions are drawn as themselves.

  The network reads the canvas at the time t whose mask probability is the canvas's masked fraction.

  Attributes:
    model_fn: (x_t int32[B, L], t float32[B]) -> logits float32[B, L, W] of the masked denoiser.
    process: its masked process (vocabulary, [MASK], schedule).
  """
  model_fn: base.ModelFn
  process: masked.MaskedDiffusion

  @property
  def mask_id(self) -> int:
    return self.process.mask_id

  def draft(self, canvas_BL: jax.Array, start: jax.Array, keys_B: jax.Array,
            config: SpeculativeConfig) -> Draft:
    """See `Drafter.draft`."""
    gamma, steps = config.draft_length, config.draft_steps
    batch_size = canvas_BL.shape[0]
    schedule = self.process.schedule
    chunk_G = jnp.arange(gamma) * steps // gamma
    uniforms_BG = jax.vmap(lambda row_key: jax.random.uniform(row_key, (gamma,)))(keys_B)
    window = lambda x_BL: jax.lax.dynamic_slice_in_dim(x_BL, start, gamma, axis=1)

    def reveal_chunk(step, carry):
      canvas_BL, tokens_BG, log_probs_BGV = carry
      masked_fraction_B = (canvas_BL == self.mask_id).mean(axis=1)
      t_B = schedule.time_at_mask_prob(jnp.minimum(masked_fraction_B, schedule.mask_prob(1.0)))
      window_BG = window(canvas_BL)
      step_log_probs_BGV = config.draw.log_probs(
          self.process.denoiser_log_probs(window(self.model_fn(canvas_BL, t_B)), window_BG, t_B))
      step_tokens_BG = base.inverse_cdf_draw(jnp.exp(step_log_probs_BGV), uniforms_BG)
      revealed_G = chunk_G == step
      tokens_BG = jnp.where(revealed_G, step_tokens_BG, tokens_BG)
      log_probs_BGV = jnp.where(revealed_G[:, None], step_log_probs_BGV, log_probs_BGV)
      canvas_BL = jax.lax.dynamic_update_slice_in_dim(
          canvas_BL, jnp.where(revealed_G, step_tokens_BG, window_BG), start, axis=1)
      return canvas_BL, tokens_BG, log_probs_BGV

    initial = (canvas_BL, jnp.zeros((batch_size, gamma), jnp.int32),
               jnp.zeros((batch_size, gamma, self.process.vocab_size), jnp.float32))
    _, tokens_BG, log_probs_BGV = jax.lax.fori_loop(0, steps, reveal_chunk, initial)
    return Draft(tokens_BG, log_probs_BGV, jnp.int32(steps))


def diffusion_drafter(model_fn: base.ModelFn, process: masked.MaskedDiffusion | block.BlockDiffusion) -> MaskedDrafter:
  """The drafter of a masked or a block diffusion model: a block network reads the canvas
  block-causally and reveals with the masked process within its blocks (`within_block`)."""
  if isinstance(process, block.BlockDiffusion):
    process = process.within_block
  if not isinstance(process, masked.MaskedDiffusion):
    raise ValueError(f"a drafter needs a masked or block diffusion model, got {type(process).__name__}")
  return MaskedDrafter(model_fn, process)


@flax.struct.dataclass
class SpeculativeStats:
  """What a run cost, and how much of the drafts the AR model accepted.

  Attributes:
    rounds: int32, AR verify calls (one step_fn call of gamma + 1 tokens each).
    drafter_calls: int32, drafter network calls.
    row_rounds_B: int32[B], rounds in which the row was unfinished.
    drafted_B: int32[B], free positions the drafter proposed for the row in those rounds.
    accepted_B: int32[B], of those, the ones the rule accepted (the row's own run of acceptances,
      before the batch's common cut).
  """
  rounds: jax.Array
  drafter_calls: jax.Array
  row_rounds_B: jax.Array
  drafted_B: jax.Array
  accepted_B: jax.Array

  @property
  def mean_accepted_length_B(self) -> jax.Array:
    """float32[B]: drafts accepted per round of each row."""
    return self.accepted_B / jnp.maximum(self.row_rounds_B, 1)


def speculative_rule(log_p_BTV: jax.Array, log_q_BGV: jax.Array, drafts_BG: jax.Array,
                     accept_u_BG: jax.Array, correct_u_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The speculative-sampling rule on a window of G drafts and T = G + 1 verified positions.

  Draft i is accepted if u_i < p_i(d_i) / q_i(d_i) (in logs) and every earlier one was; position i
  has the correction c_i ~ normalise(max(0, p_i - q_i)) (q_G = 0: the bonus draw from p_G; p_i itself
  where p_i <= q_i everywhere, a rounding case in which draft i is accepted almost surely).

  Args:
    log_p_BTV: float32[B, T, V], the target distributions (normalised logs).
    log_q_BGV: float32[B, G, V], the distributions the drafts were drawn from.
    drafts_BG: int32[B, G].
    accept_u_BG, correct_u_BT: uniforms in [0, 1).

  Returns:
    (accepted_B, emitted_BT): n, the leading drafts accepted (0..G), and the tokens: the drafts
    before n and the correction at n (the entries after n are not meaningful).
  """
  num_drafts = drafts_BG.shape[1]
  log_ratio_BG = (base.token_log_likelihood(log_p_BTV[:, :num_drafts], drafts_BG)
                  - base.token_log_likelihood(log_q_BGV, drafts_BG))
  accepts_BG = jnp.log(accept_u_BG) < log_ratio_BG
  accepted_B = jnp.cumprod(accepts_BG, axis=1).sum(axis=1)
  p_BTV = jnp.exp(log_p_BTV)
  q_BTV = jnp.pad(jnp.exp(log_q_BGV), ((0, 0), (0, 1), (0, 0)))
  residual_BTV = jnp.maximum(p_BTV - q_BTV, 0.0)
  residual_BTV = jnp.where(residual_BTV.sum(axis=-1, keepdims=True) > 0, residual_BTV, p_BTV)
  corrections_BT = base.inverse_cdf_draw(residual_BTV, correct_u_BT)
  drafts_BT = jnp.pad(drafts_BG, ((0, 0), (0, 1)))
  emitted_BT = jnp.where(jnp.arange(num_drafts + 1) < accepted_B[:, None], drafts_BT, corrections_BT)
  return accepted_B.astype(jnp.int32), emitted_BT.astype(jnp.int32)


def speculative_decode(ar_step_fn: samplers.DecodeStepFn, ar_cache: Any,
                       ar_process: autoregressive.Autoregressive, drafter: Drafter,
                       config: SpeculativeConfig, fixed_tokens_BL: jax.Array, fixed_BL: jax.Array,
                       key: jax.Array, *, row_ids_B: jax.Array | None = None, eos_id: int | None = None,
                       pad_id: int | None = None) -> tuple[jax.Array, SpeculativeStats]:
  """Samples from an AR model with a diffusion drafter, one `lax.while_loop` over rounds (module
  docstring); stops when the canvas is full or, with eos_id, every row has an [EOS].

  Args:
    ar_step_fn: the AR model's `samplers.DecodeStepFn` (`transformer.make_decoder`,
      `samplers.recompute_decoder`).
    ar_cache: its empty cache, holding at least L positions.
    ar_process: the autoregressive process; its vocabulary is the drafter's.
    drafter: proposes the windows (`Drafter`, e.g. `MaskedDrafter`).
    config: gamma, k and the token draw.
    fixed_tokens_BL: int32[B, L], tokens at fixed positions (ignored elsewhere).
    fixed_BL: bool[B, L], positions that are never changed (prompt, constraints).
    key: PRNG key.
    row_ids_B: int32[B] identities of the rows for their randomness; defaults to 0..B-1.
    eos_id, pad_id: if given, a row is finished once it holds an [EOS], and its free positions after
      the first [EOS] become [PAD].

  Returns:
    (tokens int32[B, L], SpeculativeStats).
  """
  batch_size, length = fixed_BL.shape
  gamma = config.draft_length
  if gamma >= length:
    raise ValueError(f"draft_length (gamma) must be < the canvas length {length}, got {gamma}")
  if (eos_id is None) != (pad_id is None):
    raise ValueError("eos_id and pad_id must be given together")
  if row_ids_B is None:
    row_ids_B = jnp.arange(batch_size)
  row_keys_B = jax.vmap(lambda row: jax.random.fold_in(key, row))(row_ids_B)
  positions_L = jnp.arange(length)
  window_size = gamma + 1
  mask_id = drafter.mask_id

  def finished(canvas_BL, start):
    if eos_id is None:
      return jnp.zeros((batch_size,), bool)
    return ((canvas_BL == eos_id) & (positions_L < start)).any(axis=1)

  def unfinished(carry):
    start, _, _, done_B, _ = carry
    return (start < length) & ~done_B.all()

  def one_round(carry):
    start, canvas_BL, cache, done_B, stats = carry
    window = jnp.minimum(start, length - window_size)
    round_keys_B2 = jax.vmap(lambda row_key: jax.random.split(jax.random.fold_in(row_key, start)))(row_keys_B)
    draft = drafter.draft(canvas_BL, window, round_keys_B2[:, 0], config)
    if draft.log_probs_BGV.shape[-1] != ar_process.vocab_size:
      raise ValueError(f"the drafter's vocabulary ({draft.log_probs_BGV.shape[-1]} ids) is not the AR "
                       f"model's ({ar_process.vocab_size})")
    in_window = lambda x_BL: jax.lax.dynamic_slice_in_dim(x_BL, window, window_size, axis=1)
    known_BT = in_window(fixed_BL | (positions_L < start))
    window_tokens_BT = in_window(canvas_BL)
    one_hot_BTV = jnp.where(jax.nn.one_hot(window_tokens_BT, ar_process.vocab_size, dtype=bool), 0.0, -jnp.inf)
    known_BG = known_BT[:, :gamma]
    drafts_BG = jnp.where(known_BG, window_tokens_BT[:, :gamma], draft.tokens_BG)
    log_q_BGV = jnp.where(known_BG[..., None], one_hot_BTV[:, :gamma], draft.log_probs_BGV)
    proposed_BL = jax.lax.dynamic_update_slice_in_dim(canvas_BL, drafts_BG, window, axis=1)
    logits_BTW, cache = ar_step_fn(in_window(ar_process.inputs(proposed_BL)), window, cache)
    log_p_BTV = jnp.where(known_BT[..., None], one_hot_BTV,
                          config.draw.log_probs(ar_process.next_token_log_probs(logits_BTW)))
    accept_u_BT, correct_u_BT = base.step_uniforms(round_keys_B2[:, 1], window_size)
    accepted_B, emitted_BT = speculative_rule(log_p_BTV, log_q_BGV, drafts_BG, accept_u_BT[:, :gamma],
                                              correct_u_BT)
    advance = jnp.min(jnp.where(done_B, window_size, accepted_B + 1))
    kept_BT = jnp.arange(window_size) < advance
    canvas_BL = jax.lax.dynamic_update_slice_in_dim(
        canvas_BL, jnp.where(kept_BT, emitted_BT, window_tokens_BT), window, axis=1)
    drafted_BG = ~known_BG & ~done_B[:, None]
    stats = SpeculativeStats(
        rounds=stats.rounds + 1, drafter_calls=stats.drafter_calls + draft.network_calls,
        row_rounds_B=stats.row_rounds_B + ~done_B, drafted_B=stats.drafted_B + drafted_BG.sum(axis=1),
        accepted_B=stats.accepted_B + (drafted_BG & (jnp.arange(gamma) < accepted_B[:, None])).sum(axis=1))
    start = window + advance
    return start, canvas_BL, cache, finished(canvas_BL, start), stats

  zeros_B = jnp.zeros((batch_size,), jnp.int32)
  stats = SpeculativeStats(rounds=jnp.int32(0), drafter_calls=jnp.int32(0), row_rounds_B=zeros_B,
                           drafted_B=zeros_B, accepted_B=zeros_B)
  canvas_BL = jnp.where(fixed_BL, fixed_tokens_BL, mask_id).astype(jnp.int32)
  initial = (jnp.int32(0), canvas_BL, ar_cache, jnp.zeros((batch_size,), bool), stats)
  _, canvas_BL, _, _, stats = jax.lax.while_loop(unfinished, one_round, initial)
  tokens_BL = jnp.where(fixed_BL, fixed_tokens_BL, canvas_BL).astype(jnp.int32)
  if eos_id is not None:
    tokens_BL = samplers.pad_after_eos(tokens_BL, fixed_BL, eos_id, pad_id)
  return tokens_BL, stats
