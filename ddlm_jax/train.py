"""Training: the pure jitted train step and the loop that runs an experiment in a workdir.

  step_fn = make_train_step(experiment, graphdef, optimizer, mesh, shardings)
  state, metrics = step_fn(state, batch_BL, key)

is one jitted function with in/out shardings and a donated state. `train_and_evaluate(config,
workdir)` builds data, mesh, model and optimizer from the config, resumes from the workdir's
latest checkpoint if there is one, trains with a progress bar, logs to TensorBoard, checkpoints
(also on SIGTERM), and ends with a held-out evaluation and a few samples.
"""
import functools
import os
import signal
import threading
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax
import tensorboardX
import tqdm
from flax import nnx

from ddlm_jax import checkpoint
from ddlm_jax import config as config_lib
from ddlm_jax import evaluate
from ddlm_jax import experiment as experiment_lib
from ddlm_jax import sharding
from ddlm_jax import warm_start
from ddlm_jax.data import datasets
from ddlm_jax.data import corpus
from ddlm_jax.data import pairs as pairs_lib
from ddlm_jax.networks import transformer


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (a pytree; saved whole in checkpoints)."""
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  ema_params: nnx.State | None


def train_step(state: TrainState, batch_BL: jax.Array, key: jax.Array, *, graphdef: nnx.GraphDef,
               optimizer: optax.GradientTransformation, process, ema_decay: float, pairs: bool = False,
               condition_dropout: float = 0.0,
               attention_anneal_steps: int = 0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the NELBO of a batch; the key is folded with the step inside. For
  `pairs` (a sequence-to-sequence task) only the targets are noised and scored. With
  `attention_anneal_steps` the network's attention is annealed from causal to bidirectional
  (`attention_anneal_ratio`; the mask is drawn inside the step)."""
  step_key = jax.random.fold_in(key, state.step)
  loss_key, dropout_key, condition_key, anneal_key = jax.random.split(step_key, 4)
  source_BL, batch_BL = pairs_lib.source_and_rows(batch_BL, pairs, condition_dropout, condition_key)
  anneal = (attention_anneal_ratio(state.step, attention_anneal_steps), anneal_key) if attention_anneal_steps else None

  def loss_fn(params):
    model_fn = experiment_lib.bind(graphdef, params, dropout_key, anneal=anneal)
    return process.loss(model_fn, batch_BL, loss_key, source_BL)

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = state.ema_params
  if ema_params is not None:
    decay = warmed_up_ema_decay(state.step, ema_decay)
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
  metrics = {**metrics, "grad_norm": optax.global_norm(grads)}
  if anneal is not None:
    metrics["attention_anneal_ratio"] = anneal[0]
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params), metrics


def make_train_step(experiment: experiment_lib.Experiment, graphdef: nnx.GraphDef,
                    optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh, shardings: TrainState, *,
                    ema_decay: float = 0.0, condition_dropout: float = 0.0,
                    attention_anneal_steps: int = 0) -> Callable:
  """The step `train_and_evaluate` runs: `train_step` jitted with the state's shardings (from
  `init_state`), the batch split over the mesh's data axes, and the state donated.

    step_fn = make_train_step(experiment, graphdef, optimizer, mesh, shardings)
    state, metrics = step_fn(state, batch_BL, key)   # state is consumed; metrics replicated
  """
  step = functools.partial(train_step, graphdef=graphdef, optimizer=optimizer, process=experiment.process,
                           ema_decay=ema_decay, pairs=experiment.data.task != "lm",
                           condition_dropout=condition_dropout, attention_anneal_steps=attention_anneal_steps)
  return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def attention_anneal_ratio(step: jax.Array, anneal_steps: int) -> jax.Array:
  """The share of later keys each query sees at `step` while attention is annealed from causal
  to bidirectional: step / anneal_steps, 0 at the first step and 1 from `anneal_steps` on (DiffuLLaMA
  anneals linearly)."""
  return jnp.minimum(step.astype(jnp.float32) / anneal_steps, 1.0)


def warmed_up_ema_decay(step: jax.Array, ema_decay: float) -> jax.Array:
  """The EMA decay of the update after `step` optimizer steps: min(ema_decay, (1 + step) / (10 + step)).

  A fixed decay of 0.9999 would leave an EMA of 5,000 steps still 60% initialisation; this one
  averages over a window that grows with the run (0.1 at step 0, 0.9 at step 80, 0.99 at step 890).
  """
  return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def abstract_state(experiment: experiment_lib.Experiment, config: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh,
                   optimizer: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """(graphdef, abstract state of ShapeDtypeStructs, shardings) without allocating anything."""
  graphdef, params, param_shardings = experiment_lib.abstract_params(experiment.model, mesh)
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                     opt_state=jax.eval_shape(optimizer.init, params),
                     ema_params=params if config.train.ema_decay > 0 else None)
  shardings = state_shardings(state, mesh, param_shardings)
  return graphdef, sharding.abstract(state, shardings), shardings


def init_state(experiment: experiment_lib.Experiment, config: ml_collections.ConfigDict,
               mesh: jax.sharding.Mesh, optimizer: optax.GradientTransformation,
               params: nnx.State | None = None) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """(graphdef, a fresh train state created directly in its sharded layout, shardings): step 0, the
  optimizer's initial state, and `params` (another run's, `warm_start`) or freshly initialised ones."""
  graphdef, _, shardings = abstract_state(experiment, config, mesh, optimizer)

  def init(params):
    if params is None:
      params = nnx.split(transformer.Transformer(experiment.model, rngs=nnx.Rngs(config.seed)), nnx.Param)[1]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      ema_params=params if config.train.ema_decay > 0 else None)

  return graphdef, jax.jit(init, out_shardings=shardings)(params), shardings


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


class TrainingClock:
  """Seconds and steps of training proper, for tokens/s: started as each step is dispatched (after
  compilation; a running clock ignores it), stopped around evaluations and saves.

    state, metrics = step_fn(...); clock.start(step)
    steps_per_second = clock.lap(done)          # since the previous lap, once step `done` has finished
    clock.stop(done, metrics); evaluate(...)    # the next clock.start resumes it
  """

  def __init__(self):
    self.total_steps, self.total_seconds = 0, 0.0
    self._lap_steps, self._lap_seconds = 0, 0.0
    self._running_since: tuple[float, int] | None = None  # (time, step) while running

  def start(self, step: int) -> None:
    if self._running_since is None:
      self._running_since = (time.perf_counter(), step)

  def stop(self, step: int, outputs: Any = None) -> None:
    """Stops after waiting for `outputs` (the arrays of the last step, still computing)."""
    if self._running_since is None:
      return
    jax.block_until_ready(outputs)
    started, first_step = self._running_since
    seconds, steps = time.perf_counter() - started, step - first_step
    self.total_seconds += seconds
    self.total_steps += steps
    self._lap_seconds += seconds
    self._lap_steps += steps
    self._running_since = None

  def lap(self, step: int) -> float:
    """Steps per second since the previous lap, pauses left out (0 before any timed step)."""
    self.stop(step)
    rate = self._lap_steps / self._lap_seconds if self._lap_seconds else 0.0
    self._lap_steps, self._lap_seconds = 0, 0.0
    self.start(step)
    return rate

  def total_rate(self) -> float:
    """Steps per second over every timed step (0 before any)."""
    return self.total_steps / self.total_seconds if self.total_seconds else 0.0


# Why a run stops early, least urgent first: processes that disagree act on the most urgent reason.
STOP_REASONS = (None, "time limit", "SIGTERM")
# Steps between the processes' exchanges of their stop reasons (multi-process runs only).
STOP_AGREEMENT_EVERY = 10


class _StopRequest:
  """This process's reason to stop: SIGTERM (this object is the signal handler) or its time limit."""

  def __init__(self, time_limit_minutes: float):
    self.sigterm = False
    self.deadline = time.perf_counter() + 60 * time_limit_minutes if time_limit_minutes > 0 else None

  def __call__(self, signum, frame):
    del signum, frame
    self.sigterm = True

  def local_reason(self) -> str | None:
    if self.sigterm:
      return "SIGTERM"
    if self.deadline is not None and time.perf_counter() > self.deadline:
      return "time limit"
    return None


def agreed_stop_reason(local_reason: str | None, step: int, process_count: int,
                       gather: Callable[[np.ndarray], np.ndarray]) -> str | None:
  """The reason to stop after `step` on which every process acts (None: carry on).

  A single process acts on its own reason at once, without a sync. Several processes each see
  their own signal and clock, so they stop only at steps that are multiples of
  STOP_AGREEMENT_EVERY, after `gather` (every process's code, e.g. multihost_utils.process_allgather)
  has shown them all the same codes: all stop, for the most urgent reason that any of them has.
  """
  if process_count == 1:
    return local_reason
  if step % STOP_AGREEMENT_EVERY:
    return None
  codes = gather(np.int32(STOP_REASONS.index(local_reason)))
  return STOP_REASONS[int(np.max(codes))]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the experiment in `workdir`, then evaluates.

  Every evaluation, during training and at the end, is of `evaluated_params` (the EMA when
  config.train.ema_decay > 0, else the raw parameters). SIGTERM or the time limit saves and stops;
  after SIGTERM nothing is evaluated.

  Returns:
    A summary: final step, which parameters were evaluated ('EMA' or 'raw'), held-out bits per
    token with its standard error, the generator's exact bits per token on the same documents
    (embedded corpus), the tokens/s of this run's training (`TrainingClock`) and, for a run started from
    another (`config.init_from`, see `warm_start`), where it came from; {'step', 'stopped': 'SIGTERM'} after SIGTERM.
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
    checkpoint.check_identity(config_lib.saved_run_identity(saved["identity"], identity), identity, workdir)
    saved_num_steps = saved["config"]["train"]["num_steps"]
    if saved_num_steps != train_cfg.num_steps and jax.process_index() == 0:
      print(f"config.train.num_steps is {train_cfg.num_steps}, the checkpoint's run had {saved_num_steps}: "
            f"from step {latest} on, the learning rate follows the schedule of a {train_cfg.num_steps}-step run",
            flush=True)

  init_source = None
  if latest is None and config.init_from:
    init_source = warm_start.read_source(config.init_from)
    warm_start.check_source(init_source, config)
  data = datasets.load_data(config_lib.data_config(config), workdir,
                            tokenizer=None if init_source is None else init_source.tokenizer)
  check_eval_rows(data, config)
  manager = checkpoint.make_manager(workdir, keep=train_cfg.keep_checkpoints)
  tokenizer = data.tokenizer
  graph = experiment_lib.build_neighbor_graph(config, data.train_rows, tokenizer.vocab_size, workdir)
  experiment = experiment_lib.make_experiment(config, tokenizer.vocab_size, graph)
  optimizer = experiment_lib.make_optimizer(train_cfg)
  batches = datasets.train_batches(data, experiment.data, train_cfg.batch_size, config.seed,
                                   process_index=jax.process_index(), process_count=jax.process_count())

  provenance = {}
  if latest is not None:
    graphdef, state, shardings = init_state(experiment, config, mesh, optimizer)
    state = checkpoint.restore_state(manager, latest, sharding.abstract(state, shardings))
    batches.set_state(saved["data"])
    provenance = checkpoint.read_provenance(manager, latest)
    print(f"Resumed from step {latest} in {workdir}", flush=True)
  elif init_source is not None:
    graphdef, state, shardings = init_state(experiment, config, mesh, optimizer,
                                            warm_start.restore_params(init_source, experiment.model, mesh))
    provenance = init_source.record()
    print(f"Starting from the {provenance['params']} parameters of step {init_source.step} in {init_source.workdir} "
          f"(process {provenance['process']!r})", flush=True)
  else:
    graphdef, state, shardings = init_state(experiment, config, mesh, optimizer)

  batch_sharding = sharding.batch_sharding(mesh)
  step_fn = make_train_step(experiment, graphdef, optimizer, mesh, shardings, ema_decay=train_cfg.ema_decay,
                            condition_dropout=train_cfg.condition_dropout,
                            attention_anneal_steps=train_cfg.attention_anneal_steps)
  key = jax.random.key(config.seed)
  nelbo_fn = experiment_lib.make_nelbo_fn(graphdef, experiment.process, mesh, config.eval.exact_time_sum,
                                          pairs=experiment.data.task != "lm")
  evaluate_params = functools.partial(
      evaluate.held_out_elbo, nelbo_fn, data=data, num_samples=config.eval.elbo_samples,
      batch_size=config.eval.batch_size, max_rows=config.eval.max_docs, seed=config.seed,
      batch_sharding=batch_sharding, exact=experiment.process.exact_likelihood,
      exact_time_sum=config.eval.exact_time_sum, rows=config.eval.rows)

  params_name = "raw" if train_cfg.ema_decay == 0 else "EMA"

  def save(step):
    checkpoint.save(manager, step, state, batches.get_state(), identity, config.to_dict(), provenance)

  stop = _StopRequest(train_cfg.time_limit_minutes)
  in_main_thread = threading.current_thread() is threading.main_thread()  # signals need the main thread
  previous_handler = signal.signal(signal.SIGTERM, stop) if in_main_thread else None
  writer = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard")) if jax.process_index() == 0 else None
  start_step = int(state.step)
  tokens_per_step = train_cfg.batch_size * experiment.data.seq_len
  clock = TrainingClock()
  stop_reason = None
  metrics = None
  progress = tqdm.tqdm(total=train_cfg.num_steps, initial=start_step, desc="train", unit="step",
                       disable=jax.process_index() != 0, dynamic_ncols=True)
  try:
    for step in range(start_step, train_cfg.num_steps):
      batch_BL = jax.make_array_from_process_local_data(batch_sharding, next(batches))
      previous_metrics = metrics
      state, metrics = step_fn(state, batch_BL, key)
      clock.start(step)  # after the call returns, so a first step's compilation is left out
      # At most two steps in flight: on a CPU with several devices, a long queue of dispatched
      # steps let device threads wait at a collective for devices whose work was queued behind.
      jax.block_until_ready(previous_metrics)
      progress.update(1)
      done = step + 1
      stop_reason = agreed_stop_reason(stop.local_reason(), done, jax.process_count(),
                                       multihost_utils.process_allgather)
      if done % train_cfg.log_every == 0 or done == train_cfg.num_steps:
        metrics = jax.device_get(metrics)
        tokens_per_second = clock.lap(done) * tokens_per_step
        progress.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tokens_per_second:,.0f}")
        if writer:
          for name, value in {**metrics, "tokens_per_second": tokens_per_second}.items():
            writer.add_scalar(f"train/{name}", float(value), done)
        if not all(np.isfinite(value) for value in metrics.values()):
          raise FloatingPointError(f"training diverged at step {done}: {metrics}; the last good "
                                   f"checkpoint (step {manager.latest_step()}) is kept")
      if done % train_cfg.eval_every == 0 and done != train_cfg.num_steps:
        clock.stop(done, metrics)
        result = evaluate_params(evaluated_params(state))
        progress.write(f"step {done}: held-out {result.bits_per_token:.3f} ± {result.stderr:.3f} bits/token "
                       f"({params_name} parameters)")
        if writer:
          writer.add_scalar("eval/bits_per_token", result.bits_per_token, done)
      if done % train_cfg.checkpoint_every == 0 or stop_reason:
        clock.stop(done, metrics)
        save(done)
      if stop_reason:
        progress.write(f"stopping at step {done} ({stop_reason})")
        break
    final_step = int(state.step)
    clock.stop(final_step)
    if manager.latest_step() != final_step:
      save(final_step)
  finally:
    progress.close()
    if in_main_thread:
      signal.signal(signal.SIGTERM, previous_handler)
    if writer:
      writer.close()
  if stop_reason == "SIGTERM":
    return {"step": final_step, "stopped": stop_reason}

  result = evaluate_params(evaluated_params(state))
  if jax.process_index() == 0:
    print(f"{params_name} parameters, {result.describe()}", flush=True)
    if experiment.data.source == "embedded" and experiment.data.task == "lm":
      print(f"the generator's exact entropy: {corpus.default_corpus().entropy_bits():.2f} bits per document",
            flush=True)
  summary = {"step": final_step, "tokens_per_second": clock.total_rate() * tokens_per_step, "params": params_name,
             **result.summary()}
  if provenance:
    summary["init_from"] = provenance
  return summary


def evaluated_params(state: TrainState) -> nnx.State:
  """The parameters that every evaluation of a run reports, and that `load` returns by default:
  the EMA when the run keeps one, else the raw parameters."""
  return state.params if state.ema_params is None else state.ema_params


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
  chosen = evaluate.select_rows(len(data.eval_rows), config.eval.max_docs, config.eval.rows)
  if data.eval_log_probs is not None and not np.isfinite(data.eval_log_probs[chosen]).any():
    raise ValueError(f"every evaluation document is longer than config.data.seq_len={config.data.seq_len}; "
                     "raise it so whole documents fit")
