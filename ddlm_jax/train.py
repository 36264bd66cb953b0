"""Training: the pure jitted train step and the loop that runs an experiment in a workdir.

  state, metrics = train_step(state, batch_BL, key)

is one jitted function with in/out shardings and a donated state. `train_and_evaluate(config,
workdir)` builds data, mesh, model and optimizer from the config, resumes from the workdir's
latest checkpoint if there is one, trains with a progress bar, logs to TensorBoard, checkpoints
(also on SIGTERM), and ends with a held-out evaluation and a few samples.
"""
import dataclasses
import functools
import os
import signal
import threading
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorboardX
import tqdm
from flax import nnx

from ddlm_jax import checkpoint
from ddlm_jax import config as config_lib
from ddlm_jax import evaluate
from ddlm_jax import guidance
from ddlm_jax import schedules
from ddlm_jax import sharding
from ddlm_jax.data import datasets
from ddlm_jax.data import batching
from ddlm_jax.data import corpus
from ddlm_jax.data import tokenizers
from ddlm_jax.networks import transformer
from ddlm_jax.processes import autoregressive
from ddlm_jax.processes import d3pm
from ddlm_jax.processes import gaussian
from ddlm_jax.processes import masked
from ddlm_jax.processes import uniform


# The network's vocabulary is padded to a multiple of this so that it splits over any tensor axis;
# the process ignores the extra logits.
VOCAB_MULTIPLE = 128


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (a pytree; saved whole in checkpoints)."""
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  ema_params: nnx.State | None


@dataclasses.dataclass(frozen=True)
class Experiment:
  """The frozen settings of one run, built from its config."""
  data: datasets.DataConfig
  model: transformer.TransformerConfig
  process: Any  # one of the processes in ddlm_jax/processes (contract in processes/base.py)


def make_process(settings: ml_collections.ConfigDict, vocab_size: int,
                 neighbor_graph: "d3pm.NeighborGraph | None" = None):
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


def make_experiment(config: ml_collections.ConfigDict, vocab_size: int,
                    neighbor_graph: "d3pm.NeighborGraph | None" = None) -> Experiment:
  """Frozen settings from a validated config and the tokenizer's vocabulary size (and, for D3PM's
  nearest-neighbour transition, its token graph)."""
  data = config_lib.data_config(config)
  process = make_process(config.process, vocab_size, neighbor_graph)
  padded_vocab_size = -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
  model = transformer.TransformerConfig(vocab_size=padded_vocab_size, max_len=data.seq_len,
                                        causal=process.causal_network,
                                        latent_dim=getattr(process, "latent_dim", 0), **config.model.to_dict())
  return Experiment(data=data, model=model, process=process)


def neighbor_graph_path(workdir: str) -> str:
  return os.path.join(workdir, "neighbor_graph.npz")


def build_neighbor_graph(config: ml_collections.ConfigDict, train_rows_NL: np.ndarray, vocab_size: int,
                         workdir: str) -> "d3pm.NeighborGraph | None":
  """D3PM's nearest-neighbour graph over token co-occurrence embeddings, saved in the workdir with
  the settings that made it (None for every other process). A resumed run or a loaded pipeline
  reads the saved graph; one saved under other settings is rebuilt."""
  if config.process.name != "d3pm" or config.process.transition != "nearest_neighbor":
    return None
  settings = dict(vocab_size=vocab_size, num_neighbors=config.process.num_neighbors,
                  neighbor_embed_dim=config.process.neighbor_embed_dim)
  saved = load_neighbor_graph(workdir, settings)
  if saved is not None:
    return saved
  embeddings_VD = d3pm.cooccurrence_embeddings(train_rows_NL, vocab_size, config.process.neighbor_embed_dim)
  graph = d3pm.NeighborGraph.from_embeddings(embeddings_VD, config.process.num_neighbors)
  if jax.process_index() == 0:
    path = neighbor_graph_path(workdir)
    np.savez(path + ".tmp.npz", neighbors_VK=np.asarray(graph.neighbors_VK),
             weights_VK=np.asarray(graph.weights_VK), **settings)
    os.replace(path + ".tmp.npz", path)
  return graph


def load_neighbor_graph(workdir: str, settings: dict | None = None) -> "d3pm.NeighborGraph | None":
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


def bind(graphdef: nnx.GraphDef, params: nnx.State,
         dropout_key: jax.Array | None = None) -> Callable | gaussian.EmbeddingModel:
  """model_fn(x_t_BL, t_B) -> logits_BLV of the network with these parameters; for an
  embedding-space network (the Gaussian family) its denoiser with its embedding table."""
  model = nnx.merge(graphdef, params)
  model_fn = lambda xt_BL, t_B: model(xt_BL, t_B, dropout_key=dropout_key)
  if model.config.latent_dim:
    return gaussian.EmbeddingModel(model_fn, model.embedding[...])
  return model_fn


def source_and_rows(rows_BL: jax.Array, pairs: bool, condition_dropout: float = 0.0,
                    key: jax.Array | None = None) -> tuple[jax.Array | None, jax.Array]:
  """(prompt mask, rows) of a batch: a pair's source (up to its first [EOS]) is conditioned on and
  not scored; with `condition_dropout`, that share of the rows has its source replaced by [PAD]
  (the null condition of classifier-free guidance). (None, rows) for language modelling."""
  if not pairs:
    return None, rows_BL
  source_BL = batching.source_mask(rows_BL, tokenizers.EOS_ID)
  if condition_dropout:
    drop_B = jax.random.bernoulli(key, condition_dropout, rows_BL.shape[:1])
    condition_BL = source_BL & (rows_BL != tokenizers.EOS_ID) & drop_B[:, None]
    rows_BL = guidance.drop_condition(rows_BL, condition_BL, tokenizers.PAD_ID)
  return source_BL, rows_BL


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with linear warm-up, cosine decay and global-norm gradient clipping."""
  learning_rate = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.learning_rate, warmup_steps=train.warmup_steps,
      decay_steps=max(train.num_steps, train.warmup_steps + 1),
      end_value=train.learning_rate * train.min_learning_rate_ratio)
  return optax.chain(
      optax.clip_by_global_norm(train.grad_clip_norm),
      optax.adamw(learning_rate, b1=train.b1, b2=train.b2, weight_decay=train.weight_decay))


def train_step(state: TrainState, batch_BL: jax.Array, key: jax.Array, *, graphdef: nnx.GraphDef,
               optimizer: optax.GradientTransformation, process, ema_decay: float, pairs: bool = False,
               condition_dropout: float = 0.0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the NELBO of a batch; the key is folded with the step inside. For
  `pairs` (a sequence-to-sequence task) only the targets are noised and scored."""
  step_key = jax.random.fold_in(key, state.step)
  loss_key, dropout_key, condition_key = jax.random.split(step_key, 3)
  source_BL, batch_BL = source_and_rows(batch_BL, pairs, condition_dropout, condition_key)

  def loss_fn(params):
    return process.loss(bind(graphdef, params, dropout_key), batch_BL, loss_key, source_BL)

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = state.ema_params
  if ema_params is not None:
    ema_params = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema_params, params)
  metrics = {**metrics, "grad_norm": optax.global_norm(grads)}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params), metrics


def abstract_state(experiment: Experiment, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   optimizer: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """(graphdef, abstract state of ShapeDtypeStructs, shardings) without allocating anything."""
  graphdef, params = sharding.abstract_model(experiment.model)
  param_shardings = sharding.state_shardings(params, mesh, sharding.DEFAULT_RULES)
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                     opt_state=jax.eval_shape(optimizer.init, params),
                     ema_params=params if config.train.ema_decay > 0 else None)
  shardings = state_shardings(state, mesh, param_shardings)
  return graphdef, abstract(state, shardings), shardings


def init_state(experiment: Experiment, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               optimizer: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """(graphdef, a fresh train state created directly in its sharded layout, shardings)."""
  graphdef, _, shardings = abstract_state(experiment, config, mesh, optimizer)

  def init():
    model = transformer.Transformer(experiment.model, rngs=nnx.Rngs(config.seed))
    params = nnx.split(model, nnx.Param)[1]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      ema_params=params if config.train.ema_decay > 0 else None)

  return graphdef, jax.jit(init, out_shardings=shardings)(), shardings


def state_shardings(state: TrainState, mesh: jax.sharding.Mesh, param_shardings) -> TrainState:
  """Params and EMA keep the rules' shardings; optimizer moments (subtrees shaped like the
  params, e.g. Adam's mu and nu) take the params' shardings, and scalars are replicated."""
  params_structure = jax.tree.structure(state.params)
  is_params_like = lambda tree: jax.tree.structure(tree) == params_structure
  opt_shardings = jax.tree.map(
      lambda tree: param_shardings if is_params_like(tree) else sharding.replicated(mesh),
      state.opt_state, is_leaf=is_params_like)
  return TrainState(step=sharding.replicated(mesh), params=param_shardings, opt_state=opt_shardings,
                    ema_params=None if state.ema_params is None else param_shardings)


def abstract(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree`'s leaves carrying `shardings` (an orbax restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class _StopRequest:
  """Set by SIGTERM: the loop saves a checkpoint and returns."""

  def __init__(self):
    self.requested = False

  def __call__(self, signum, frame):
    del signum, frame
    self.requested = True


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the experiment in `workdir`, then evaluates and samples.

  Returns:
    A summary: final step, held-out bits per token with its standard error, the generator's
    exact bits per token on the same documents (embedded corpus), tokens/s and samples.
  """
  config_lib.validate(config)
  sharding.init_distributed(config.multi_process)
  train_cfg = config.train
  mesh = sharding.make_mesh(sharding.MeshConfig(**config.mesh.to_dict()))
  check_batch_sizes(config, mesh)
  identity = config_lib.run_identity(config)
  latest = checkpoint.latest_step(workdir)
  if latest is not None:
    saved = checkpoint.read_json_items(checkpoint.make_manager(workdir, read_only=True), latest)
    checkpoint.check_identity(config_lib.saved_run_identity(saved["identity"]), identity, workdir)

  data = datasets.load_data(config_lib.data_config(config), workdir)
  check_eval_rows(data, config)
  manager = checkpoint.make_manager(workdir, keep=train_cfg.keep_checkpoints)
  tokenizer = data.tokenizer
  graph = build_neighbor_graph(config, data.train_rows, tokenizer.vocab_size, workdir)
  experiment = make_experiment(config, tokenizer.vocab_size, graph)
  optimizer = make_optimizer(train_cfg)
  batches = batching.BatchIterator(data.train_rows, train_cfg.batch_size, seed=config.seed,
                                   process_index=jax.process_index(), process_count=jax.process_count())

  graphdef, state, shardings = init_state(experiment, config, mesh, optimizer)
  if latest is not None:
    state = checkpoint.restore_state(manager, latest, abstract(state, shardings))
    batches.set_state(saved["data"])
    print(f"Resumed from step {latest} in {workdir}", flush=True)

  batch_sharding = sharding.batch_sharding(mesh)
  step_fn = jax.jit(
      functools.partial(train_step, graphdef=graphdef, optimizer=optimizer, process=experiment.process,
                        ema_decay=train_cfg.ema_decay, pairs=experiment.data.task != "lm",
                        condition_dropout=train_cfg.condition_dropout),
      in_shardings=(shardings, batch_sharding, sharding.replicated(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  key = jax.random.key(config.seed)
  nelbo_fn = make_nelbo_fn(graphdef, experiment.process, mesh, config.eval.exact_time_sum,
                           pairs=experiment.data.task != "lm")
  evaluate_params = functools.partial(
      evaluate.held_out_elbo, nelbo_fn, data=data, num_samples=config.eval.elbo_samples,
      batch_size=config.eval.batch_size, max_rows=config.eval.max_docs, seed=config.seed,
      batch_sharding=batch_sharding, exact=experiment.process.exact_likelihood)

  def save(step):
    checkpoint.save(manager, step, state, batches.get_state(), identity, config.to_dict())

  stop = _StopRequest()
  in_main_thread = threading.current_thread() is threading.main_thread()  # signals need the main thread
  previous_handler = signal.signal(signal.SIGTERM, stop) if in_main_thread else None
  writer = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard")) if jax.process_index() == 0 else None
  start_step = int(state.step)
  tokens_per_step = train_cfg.batch_size * experiment.data.seq_len
  tokens_per_second = 0.0
  started = time.perf_counter()
  window_start, window_step = started, start_step
  progress = tqdm.tqdm(total=train_cfg.num_steps, initial=start_step, desc="train", unit="step",
                       disable=jax.process_index() != 0, dynamic_ncols=True)
  try:
    for step in range(start_step, train_cfg.num_steps):
      batch_BL = jax.make_array_from_process_local_data(batch_sharding, next(batches))
      state, metrics = step_fn(state, batch_BL, key)
      progress.update(1)
      done = step + 1
      out_of_time = (train_cfg.time_limit_minutes > 0 and
                     time.perf_counter() - started > 60 * train_cfg.time_limit_minutes)
      if done % train_cfg.log_every == 0 or done == train_cfg.num_steps:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        tokens_per_second = (done - window_step) * tokens_per_step / (now - window_start)
        window_start, window_step = now, done
        progress.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tokens_per_second:,.0f}")
        if writer:
          for name, value in {**metrics, "tokens_per_second": tokens_per_second}.items():
            writer.add_scalar(f"train/{name}", float(value), done)
        if not all(np.isfinite(value) for value in metrics.values()):
          raise FloatingPointError(f"training diverged at step {done}: {metrics}; the last good "
                                   f"checkpoint (step {manager.latest_step()}) is kept")
      if done % train_cfg.eval_every == 0 and done != train_cfg.num_steps:
        result = evaluate_params(state.params)
        progress.write(f"step {done}: held-out {result.bits_per_token:.3f} ± {result.stderr:.3f} bits/token")
        if writer:
          writer.add_scalar("eval/bits_per_token", result.bits_per_token, done)
      if done % train_cfg.checkpoint_every == 0 or stop.requested or out_of_time:
        save(done)
      if stop.requested or out_of_time:
        progress.write(f"stopping at step {done} ({'SIGTERM' if stop.requested else 'time limit'})")
        break
    final_step = int(state.step)
    if manager.latest_step() != final_step:
      save(final_step)
  finally:
    progress.close()
    if in_main_thread:
      signal.signal(signal.SIGTERM, previous_handler)
    if writer:
      writer.close()
  if stop.requested:
    return {"step": final_step, "stopped": "SIGTERM"}

  eval_params = state.params if state.ema_params is None else state.ema_params
  result = evaluate_params(eval_params)
  if jax.process_index() == 0:
    print(result.describe(), flush=True)
    if experiment.data.source == "embedded" and experiment.data.task == "lm":
      print(f"the generator's exact entropy: {corpus.default_corpus().entropy_bits():.2f} bits per document",
            flush=True)
  summary = {"step": final_step, "tokens_per_second": tokens_per_second, **result.summary()}
  return summary


def make_nelbo_fn(graphdef: nnx.GraphDef, process, mesh: jax.sharding.Mesh | None = None,
                  exact_time_sum: bool = False, pairs: bool = False) -> evaluate.NelboFn:
  """Jitted (params, rows_BL, key) -> NELBO nats_B of the network (the exact NLL for the
  autoregressive baseline); of the targets given their sources for `pairs`.

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

  def nelbo_fn(params, rows_BL, key):
    source_BL, rows_BL = source_and_rows(rows_BL, pairs)
    return bound(bind(graphdef, params), rows_BL, key, source_BL).nats_B

  return jax.jit(nelbo_fn, out_shardings=out_shardings)


def check_batch_sizes(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Batches are split over the mesh's data and fsdp axes: their sizes must divide evenly."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  for name, size in (("config.train.batch_size", config.train.batch_size),
                     ("config.eval.batch_size", config.eval.batch_size)):
    if size % shards:
      raise ValueError(f"{name}={size} does not split over the mesh's {shards} data x fsdp shards")


def check_eval_rows(data: datasets.DataBundle, config: ml_collections.ConfigDict) -> None:
  """Fails before training if evaluation would find nothing to score."""
  if not len(data.eval_rows):
    raise ValueError("the evaluation split is empty; raise config.data.num_eval_docs or "
                     "config.data.validation_fraction")
  if data.eval_log_probs is not None and not np.isfinite(data.eval_log_probs[:config.eval.max_docs]).any():
    raise ValueError(f"every evaluation document is longer than config.data.seq_len={config.data.seq_len}; "
                     "raise it so whole documents fit")
