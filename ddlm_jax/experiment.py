"""The one place an experiment config becomes objects: the process, the network's settings, the
optimizer, D3PM's neighbour graph, the model function of a network's parameters, and the tokens
it samples.

  experiment = make_experiment(config, tokenizer.vocab_size, graph)
  model_fn = bind(graphdef, params)                 # (x_t_BL, t_B) -> logits_BLV
  nelbo_fn = make_nelbo_fn(graphdef, experiment.process)
  tokens_BL = generate_tokens(graphdef, params, experiment.process, sampler_config,
                              fixed_tokens_BL, fixed_BL, key)

`config.validate` builds the same objects over a stand-in vocabulary (`stand_in_process`), so each
setting is checked by the object that reads it. Inference needs no optimizer: `make_optimizer` is
called by training only.
"""
import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from ddlm_jax import config as config_lib
from ddlm_jax import evaluate
from ddlm_jax import guidance
from ddlm_jax import samplers
from ddlm_jax import schedules
from ddlm_jax import sharding
from ddlm_jax.data import datasets
from ddlm_jax.data import pairs as pairs_lib
from ddlm_jax.data import tokenizers
from ddlm_jax.decoding import blockwise
from ddlm_jax.decoding import speculative
from ddlm_jax.networks import transformer
from ddlm_jax.processes import autoregressive
from ddlm_jax.processes import block
from ddlm_jax.processes import d3pm
from ddlm_jax.processes import gaussian
from ddlm_jax.processes import masked
from ddlm_jax.processes import uniform

# The default of config.model.vocab_multiple: the network's vocabulary is padded to a multiple of
# this so that it splits over any tensor axis; the process ignores the extra logits.
VOCAB_MULTIPLE = 128
# The vocabulary that validation builds a config's objects over, before any tokenizer exists: the
# special ids and a few more.
LEARNING_RATE_SCHEDULES = ("cosine", "linear", "constant")
STAND_IN_VOCAB_SIZE = len(tokenizers.SPECIAL_TOKENS) + 12


@dataclasses.dataclass(frozen=True)
class Experiment:
  """The frozen settings of one run, built from its config."""
  data: datasets.DataConfig
  model: transformer.TransformerConfig
  process: Any  # one of the processes in ddlm_jax/processes (contract in processes/base.py)


@dataclasses.dataclass(frozen=True)
class NeighborGraphSettings:
  """How D3PM's 'nearest_neighbor' graph is built: each token joined to at most `num_neighbors`
  others by cosine similarity of `embed_dim`-sized co-occurrence embeddings of the training rows."""
  num_neighbors: int
  embed_dim: int

  def __post_init__(self):
    if min(self.num_neighbors, self.embed_dim) < 1:
      raise ValueError(f"num_neighbors and neighbor_embed_dim must be >= 1, got {self.num_neighbors} "
                       f"and {self.embed_dim}")

  def build(self, rows_NL: np.ndarray, vocab_size: int) -> d3pm.NeighborGraph:
    """The graph of the tokens of int[N, L] rows over a vocabulary of `vocab_size`."""
    embeddings_VD = d3pm.cooccurrence_embeddings(rows_NL, vocab_size, self.embed_dim)
    return d3pm.NeighborGraph.from_embeddings(embeddings_VD, self.num_neighbors)

  def edgeless(self, vocab_size: int) -> d3pm.NeighborGraph:
    """A graph of this degree without edges (every slot the token itself, weight 0)."""
    neighbors_VK = np.tile(np.arange(vocab_size)[:, None], (1, self.num_neighbors))
    return d3pm.NeighborGraph(neighbors_VK=jnp.asarray(neighbors_VK, jnp.int32),
                              weights_VK=jnp.zeros(neighbors_VK.shape, jnp.float32))


def neighbor_graph_settings(settings: ml_collections.ConfigDict) -> NeighborGraphSettings | None:
  """The graph settings of `config.process`; None unless it is D3PM with 'nearest_neighbor'."""
  if settings.name != "d3pm" or settings.transition != "nearest_neighbor":
    return None
  return NeighborGraphSettings(settings.num_neighbors, settings.neighbor_embed_dim)


def make_process(settings: ml_collections.ConfigDict, vocab_size: int,
                 neighbor_graph: d3pm.NeighborGraph | None = None):
  """The process named by `config.process` over a vocabulary of the tokenizers' special ids."""
  if settings.name == "autoregressive":
    return autoregressive.Autoregressive(vocab_size=vocab_size, bos_id=tokenizers.BOS_ID,
                                         excluded_ids=(tokenizers.MASK_ID,))
  if settings.name == "gaussian":
    return gaussian.GaussianDiffusion(vocab_size=vocab_size, latent_dim=settings.latent_dim,
                                      schedule=gaussian.NoiseSchedule(settings.schedule),
                                      num_steps=settings.num_steps, antithetic_time=settings.antithetic_time)
  schedule = schedules.Schedule(settings.schedule, settings.schedule_eps)
  if settings.name == "masked":
    return masked.MaskedDiffusion(vocab_size=vocab_size, mask_id=tokenizers.MASK_ID, schedule=schedule,
                                  antithetic_time=settings.antithetic_time)
  if settings.name == "block":
    return block.BlockDiffusion(vocab_size=vocab_size, mask_id=tokenizers.MASK_ID, block_size=settings.block_size,
                                schedule=schedule, antithetic_time=settings.antithetic_time)
  if settings.name == "uniform":
    return uniform.UniformDiffusion(vocab_size=vocab_size, schedule=schedule,
                                    antithetic_time=settings.antithetic_time)
  if settings.name == "d3pm":
    absorbing = settings.transition == "absorbing"
    return d3pm.D3PM(vocab_size=vocab_size, transition=settings.transition, num_steps=settings.num_steps,
                     schedule=schedule, hybrid_coeff=settings.hybrid_coeff,
                     mask_id=tokenizers.MASK_ID if absorbing else None, graph=neighbor_graph,
                     antithetic_time=settings.antithetic_time)
  raise ValueError(f"unknown process {settings.name!r}")


def stand_in_process(settings: ml_collections.ConfigDict):
  """The process of `config.process` over STAND_IN_VOCAB_SIZE ids (with an edgeless graph of the
  configured degree for 'nearest_neighbor'): every process setting checked before data exists."""
  graph_settings = neighbor_graph_settings(settings)
  graph = None if graph_settings is None else graph_settings.edgeless(STAND_IN_VOCAB_SIZE)
  return make_process(settings, STAND_IN_VOCAB_SIZE, graph)


def process_identity(process, graph_settings: NeighborGraphSettings | None) -> dict:
  """What a resumed run's process must share with its checkpoint, as JSON values: the process
  class and its fields (nested settings such as the schedule as dicts), without the vocabulary
  size (the tokenizer's) and with the neighbour graph given by the settings that build it."""
  identity = {"type": type(process).__name__}
  for field in dataclasses.fields(process):
    value = getattr(process, field.name)
    if field.name == "vocab_size":
      continue
    if field.name == "graph":
      value = None if graph_settings is None else dataclasses.asdict(graph_settings)
    elif dataclasses.is_dataclass(value):
      value = dataclasses.asdict(value)
    elif isinstance(value, tuple):
      value = list(value)
    identity[field.name] = value
  return identity


def model_config(config: ml_collections.ConfigDict, process) -> transformer.TransformerConfig:
  """The network of `config.model` that `process` trains: causal for the autoregressive baseline,
  over embeddings (time-conditioned) for the Gaussian family, its vocabulary padded to a multiple
  of `config.model.vocab_multiple`."""
  latent_dim = process.latent_dim if isinstance(process, gaussian.GaussianDiffusion) else 0
  if latent_dim and not config.model.time_conditioning:
    raise ValueError("process 'gaussian' needs time_conditioning=True")
  block_size = process.block_size if isinstance(process, block.BlockDiffusion) else 0
  if block_size and config.model.time_conditioning:
    raise ValueError("process 'block' needs time_conditioning=False: the blocks of a row are at different times")
  network_settings = config.model.to_dict()
  vocab_multiple = network_settings.pop("vocab_multiple")
  if isinstance(vocab_multiple, bool) or not isinstance(vocab_multiple, int) or vocab_multiple < 1:
    raise ValueError(f"vocab_multiple must be an integer >= 1 (1: no padding), got {vocab_multiple!r}")
  padded_vocab_size = -(-process.vocab_size // vocab_multiple) * vocab_multiple
  shift_logits = network_settings.pop("shift_logits")
  if shift_logits and (process.causal_network or latent_dim):
    raise ValueError(f"shift_logits (an AR network's next-token outputs, for adapting it to diffusion) needs a "
                     f"diffusion process over tokens (masked, uniform, d3pm, block), not {type(process).__name__}")
  # A shifted network reads a start slot before the sequence; a block network's drops the last token instead.
  max_len = config.data.seq_len + (shift_logits and not block_size)
  return transformer.TransformerConfig(vocab_size=padded_vocab_size, max_len=max_len,
                                       causal=process.causal_network, latent_dim=latent_dim, block_size=block_size,
                                       shift_start_id=tokenizers.BOS_ID if shift_logits else None,
                                       **network_settings)


def make_experiment(config: ml_collections.ConfigDict, vocab_size: int,
                    neighbor_graph: d3pm.NeighborGraph | None = None) -> Experiment:
  """Frozen settings from a validated config and the tokenizer's vocabulary size (and, for D3PM's
  nearest-neighbour transition, its token graph)."""
  process = make_process(config.process, vocab_size, neighbor_graph)
  return Experiment(data=config_lib.data_config(config), model=model_config(config, process), process=process)


def neighbor_graph_path(workdir: str) -> str:
  return os.path.join(workdir, "neighbor_graph.npz")


def build_neighbor_graph(config: ml_collections.ConfigDict, train_rows_NL: np.ndarray, vocab_size: int,
                         workdir: str) -> d3pm.NeighborGraph | None:
  """D3PM's nearest-neighbour graph over token co-occurrence embeddings, saved in the workdir with
  the settings that made it (None for every other process). A resumed run or a loaded pipeline
  reads the saved graph; one saved under other settings is rebuilt."""
  graph_settings = neighbor_graph_settings(config.process)
  if graph_settings is None:
    return None
  saved_settings = dict(vocab_size=vocab_size, num_neighbors=graph_settings.num_neighbors,
                        neighbor_embed_dim=graph_settings.embed_dim)
  saved = load_neighbor_graph(workdir, saved_settings)
  if saved is not None:
    return saved
  graph = graph_settings.build(train_rows_NL, vocab_size)
  if jax.process_index() == 0:
    path = neighbor_graph_path(workdir)
    np.savez(path + ".tmp.npz", neighbors_VK=np.asarray(graph.neighbors_VK),
             weights_VK=np.asarray(graph.weights_VK), **saved_settings)
    os.replace(path + ".tmp.npz", path)
  return graph


def load_neighbor_graph(workdir: str, settings: dict | None = None) -> d3pm.NeighborGraph | None:
  """The graph saved by `build_neighbor_graph`; None if there is none, or if `settings` are given
  and it was built under others."""
  path = neighbor_graph_path(workdir)
  if not os.path.exists(path):
    return None
  with np.load(path) as saved:
    if settings and any(int(saved[name]) != value for name, value in settings.items()):
      return None
    return d3pm.NeighborGraph(neighbors_VK=jnp.asarray(saved["neighbors_VK"]),
                              weights_VK=jnp.asarray(saved["weights_VK"]))


def abstract_params(model: transformer.TransformerConfig,
                    mesh: jax.sharding.Mesh) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, params as ShapeDtypeStructs, their shardings under the default rules), allocating
  nothing."""
  graphdef, params = sharding.abstract_model(model)
  return graphdef, params, sharding.state_shardings(params, mesh, sharding.DEFAULT_RULES)


def bind(graphdef: nnx.GraphDef, params: nnx.State, dropout_key: jax.Array | None = None,
         visible_BL: jax.Array | None = None,
         anneal: tuple[jax.Array, jax.Array] | None = None) -> Callable | gaussian.EmbeddingModel:
  """model_fn(x_t_BL, t_B, **inputs) -> logits_BLV of the network with these parameters (inputs:
  a block network's clean_tokens_BL); for an embedding-space network (the Gaussian family) its
  denoiser with its embedding table. visible_BL: bool[B, L], the only positions its attention
  reads; anneal: (ratio, key) of attention annealed from causal to bidirectional (both
  `Transformer.__call__`); None: all positions, the network's own attention."""
  model = nnx.merge(graphdef, params)
  model_fn = lambda xt_BL, t_B, **inputs: model(xt_BL, t_B, dropout_key=dropout_key, visible_BL=visible_BL,
                                                anneal=anneal, **inputs)
  if model.config.latent_dim:
    return gaussian.EmbeddingModel(model_fn, model.embedding[...])
  return model_fn


def generate_tokens(graphdef: nnx.GraphDef, params: nnx.State, process,
                    sampler_config: samplers.SamplerConfig | blockwise.BlockwiseConfig | speculative.SpeculativeConfig,
                    fixed_tokens_BL: jax.Array, fixed_BL: jax.Array, key: jax.Array, *,
                    row_ids_B: jax.Array | None = None, condition_BL: jax.Array | None = None,
                    null_id: int | None = None, guide_fn: guidance.GuideFn | None = None,
                    eos_id: int | None = None, pad_id: int | None = None, prefill_length: int = 0,
                    drafter: speculative.Drafter | None = None, on_window: Callable | None = None):
  """Token ids sampled from the network under `process`, without a checkpoint or tokenizer:
  KV-cache decoding (`samplers.decode` over `transformer.make_decoder`) for the autoregressive
  baseline, or with a `SpeculativeConfig` speculative decoding of it with a diffusion `drafter`
  (`decoding.speculative`); for a diffusion process the scan sampler (`samplers.sample`) under a
  `SamplerConfig`, block-by-block decoding (`decoding.blockwise`, with its KV cache) under a
  `BlockwiseConfig`.
  Pure; jit it with everything but the arrays static, e.g. on freshly initialised parameters:

    experiment = make_experiment(config, vocab_size)
    graphdef, params = nnx.split(transformer.Transformer(experiment.model, rngs=nnx.Rngs(0)), nnx.Param)
    sample_fn = jax.jit(lambda params, fixed_tokens_BL, fixed_BL, key: generate_tokens(
        graphdef, params, experiment.process, samplers.SamplerConfig(steps=32), fixed_tokens_BL, fixed_BL, key))
    fixed_BL = jnp.zeros((4, 32), bool).at[:, :2].set(True)  # the first two positions of each row...
    tokens_BL = sample_fn(params, jnp.where(fixed_BL, 7, 0), fixed_BL, jax.random.key(0))  # ...are id 7

  Args:
    graphdef, params: the network (`nnx.merge(graphdef, params)`); params may be sharded
      (`sharding.create_sharded_model`).
    process: the process the network is trained under (`Experiment.process`).
    sampler_config: sampler settings (`config.sampler_config` makes them from a run's config); the
      autoregressive baseline reads only the token draw (temperature, top_k, top_p) and refuses
      guidance and record_trajectory; block diffusion decodes under a `BlockwiseConfig` only.
    fixed_tokens_BL: int32[B, L], tokens at fixed positions (ignored elsewhere).
    fixed_BL: bool[B, L], positions that are never changed (prompt, constraints, [PAD] past a
      row's last position to generate).
    key: PRNG key.
    row_ids_B: int32[B] identities of the rows for their randomness; defaults to 0..B-1.
    condition_BL, null_id: classifier-free guidance's condition positions and null token (scan).
    guide_fn: classifier guidance (the Gaussian family).
    eos_id, pad_id: if given, free positions after a row's first [EOS] become [PAD]; block-by-block
      decoding also stops each row at the window holding its [EOS].
    prefill_length: positions [0, P), fixed in every row, fed as one chunk: autoregressive decoding
      (`samplers.decode`) and block diffusion (`blockwise.decode_blocks`, P a multiple of the block).
    drafter: speculative decoding's drafter, e.g. `speculative.diffusion_drafter(bind(...), process)`.
    on_window: block-by-block decoding only: called on the host after each window with the number
      of windows done and the canvas (`blockwise.decode_blocks`).

  Returns:
    tokens int32[B, L]; with `sampler_config.record_trajectory` (scan only), also the tokens after
    every step int32[steps, B, L].
  """
  name = type(process).__name__
  if isinstance(sampler_config, speculative.SpeculativeConfig):
    if not process.causal_network or drafter is None:
      raise ValueError(f"speculative decoding needs an autoregressive model and a drafter; got {name}"
                       f"{'' if drafter else ' and no drafter'}")
    if guide_fn is not None or prefill_length:
      raise ValueError("speculative decoding takes no classifier guidance and no prefill_length")
    cache, step_fn = transformer.make_decoder(graphdef, params, *fixed_BL.shape)
    return speculative.speculative_decode(step_fn, cache, process, drafter, sampler_config, fixed_tokens_BL,
                                          fixed_BL, key, row_ids_B=row_ids_B, eos_id=eos_id, pad_id=pad_id)[0]
  if isinstance(sampler_config, blockwise.BlockwiseConfig):
    if guide_fn is not None:
      raise ValueError("classifier guidance moves the Gaussian family's steps; block-by-block decoding has none")
    network = blockwise.Network(bind(graphdef, params))
    if sampler_config.cache != "none":
      cache, step_fn = transformer.make_decoder(graphdef, params, *fixed_BL.shape)
      network = blockwise.Network(network.model_fn, step_fn, cache)
    return blockwise.decode_blocks(network, process, sampler_config, fixed_tokens_BL, fixed_BL, key,
                                   row_ids_B=row_ids_B, eos_id=eos_id, pad_id=pad_id,
                                   prefill_length=prefill_length, on_window=on_window)[0]
  if on_window is not None:
    raise ValueError("on_window reports the windows of block-by-block decoding (a BlockwiseConfig)")
  if isinstance(process, block.BlockDiffusion):
    raise ValueError("block diffusion decodes block by block: pass a blockwise.BlockwiseConfig "
                     "(method 'blockwise'), not the scan sampler's settings")
  if not process.causal_network:
    if prefill_length:
      raise ValueError(f"prefill_length applies to autoregressive and block decoding, not to {name}'s scan")
    return samplers.sample(bind(graphdef, params), process, sampler_config, fixed_tokens_BL, fixed_BL, key,
                           row_ids_B, eos_id=eos_id, pad_id=pad_id, condition_BL=condition_BL, null_id=null_id,
                           guide_fn=guide_fn)
  samplers.check_sampler(process, sampler_config, guide_fn=guide_fn)
  if sampler_config.record_trajectory:
    raise ValueError("record_trajectory needs a diffusion process; the autoregressive baseline writes one "
                     "token per step")
  cache, step_fn = transformer.make_decoder(graphdef, params, *fixed_BL.shape)
  return samplers.decode(step_fn, cache, process, sampler_config, fixed_tokens_BL, fixed_BL, key, row_ids_B,
                         eos_id=eos_id, pad_id=pad_id, prefill_length=prefill_length)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with global-norm gradient clipping, under `learning_rate_schedule(train)`."""
  return optax.chain(
      optax.clip_by_global_norm(train.grad_clip_norm),
      optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2, eps=train.eps,
                  weight_decay=train.weight_decay))


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from 0 to learning_rate over warmup_steps, then the `schedule`: a 'cosine' or
  'linear' decay reaching learning_rate * min_learning_rate_ratio at num_steps, or 'constant'."""
  peak, warmup = train.learning_rate, train.warmup_steps
  if train.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                [warmup])
  end, decay_steps = peak * train.min_learning_rate_ratio, max(train.num_steps, warmup + 1)
  if train.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak, warmup_steps=warmup,
                                              decay_steps=decay_steps, end_value=end)
  if train.schedule == "linear":
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                                 optax.linear_schedule(peak, end, decay_steps - warmup)], [warmup])
  raise ValueError(f"config.train.schedule={train.schedule!r} is not one of {LEARNING_RATE_SCHEDULES}")


def make_nelbo_fn(graphdef: nnx.GraphDef, process, mesh: jax.sharding.Mesh | None = None,
                  exact_time_sum: bool = False, pairs: bool = False) -> evaluate.NelboFn:
  """Jitted (params, rows_BL, key, fixed_BL=None, visible_BL=None) -> NELBO nats_B of the network
  (the exact NLL for the autoregressive baseline); of the targets given their sources for `pairs`.

  Per-row masks: fixed_BL, bool[B, L], positions kept clean and not scored, beside a pair's source
  (the process's prompt mask); visible_BL, bool[B, L], the positions the network attends to
  (`bind`). A text shorter than the canvas, fixed and hidden after its end, has the bound it has
  on a canvas of its own length (under the same draws).

  Times are drawn independently per row (not stratified over the batch), so rows are independent
  and `evaluate.elbo`'s standard error is valid. With `exact_time_sum` a discrete-time process
  sums every step of its bound instead of drawing one. On a mesh the result is replicated, so
  every process can read it.
  """
  if "antithetic_time" in {field.name for field in dataclasses.fields(process)}:
    process = dataclasses.replace(process, antithetic_time=False)
  if exact_time_sum and not hasattr(process, "nelbo_exact_time"):
    raise ValueError(f"config.eval.exact_time_sum needs a discrete-time process, not {type(process).__name__}")
  bound = process.nelbo_exact_time if exact_time_sum else process.nelbo
  out_shardings = None if mesh is None else sharding.replicated(mesh)

  def nelbo_fn(params, rows_BL, key, fixed_BL=None, visible_BL=None):
    source_BL, rows_BL = pairs_lib.source_and_rows(rows_BL, pairs)
    if fixed_BL is not None:
      source_BL = fixed_BL if source_BL is None else source_BL | fixed_BL
    return bound(bind(graphdef, params, visible_BL=visible_BL), rows_BL, key, source_BL).nats_B

  return jax.jit(nelbo_fn, out_shardings=out_shardings)
