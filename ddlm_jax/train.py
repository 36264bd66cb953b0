"""Training: the pure jitted train step and the loop that runs an experiment in a workdir.

  step_fn = make_train_step(experiment, graphdef, optimizer, mesh, shardings)
  state, metrics = step_fn(state, batch_BL, key)

is one jitted function with in/out shardings and a donated state. `train_and_evaluate(config,
workdir)` builds data, mesh, model and optimizer from the config, resumes from the workdir's
newest readable checkpoint if there is one, trains with a progress bar, logs to TensorBoard, checkpoints
(also on SIGTERM and SIGINT), and ends with a held-out evaluation.
"""
import contextlib
import functools
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from absl import logging as absl_logging
import flax.struct
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax
import tensorboardX
from tensorboardX import event_file_writer
from tensorboardX.proto import event_pb2
from tensorboardX.proto import summary_pb2
from flax import nnx

from ddlm_jax import checkpoint
from ddlm_jax import config as config_lib
from ddlm_jax import evaluate
from ddlm_jax import experiment as experiment_lib
from ddlm_jax import pipeline as pipeline_lib
from ddlm_jax import progress
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
STOP_REASONS = (None, "time limit", "SIGTERM", "SIGINT")
# The reasons after which train_and_evaluate saves and returns at once, without its final evaluation.
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}
# Steps between the processes' exchanges of their stop reasons (multi-process runs only).
STOP_AGREEMENT_EVERY = 10


class _StopRequest:
  """This process's reason to stop: SIGTERM or SIGINT (this object is their handler; a second
  SIGINT interrupts at once) or its time limit."""

  def __init__(self, time_limit_minutes: float):
    self.signal_name: str | None = None
    self.deadline = time.perf_counter() + 60 * time_limit_minutes if time_limit_minutes > 0 else None

  def __call__(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signal_name == "SIGINT":
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name

  def local_reason(self) -> str | None:
    if self.signal_name:
      return self.signal_name
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


@contextlib.contextmanager
def handling_signals(handler: Callable) -> Iterator[None]:
  """`handler` handles SIGTERM and SIGINT inside the block, in the main thread (Python delivers
  signals to no other); the previous handlers are restored on leaving it."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {number: signal.signal(number, handler) for number in SIGNALS.values()}
  try:
    yield
  finally:
    for number, old in previous.items():
      signal.signal(number, old)


def lock_workdir(workdir: str, stack: contextlib.ExitStack) -> None:
  """Process 0 takes the workdir's lock (`checkpoint.workdir_lock`) until `stack` closes; every
  process raises WorkdirInUse if it could not."""
  refusal = None
  if jax.process_index() == 0:
    try:
      stack.enter_context(checkpoint.workdir_lock(workdir))
    except checkpoint.WorkdirInUse as error:
      refusal = error
  if jax.process_count() > 1 and not multihost_utils.broadcast_one_to_all(np.int32(refusal is None)):
    refusal = refusal or checkpoint.WorkdirInUse(f"process 0 found the workdir {workdir} in use by another run")
  if refusal:
    raise refusal


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the experiment in `workdir`, then evaluates.

  The workdir is locked while the run writes there: another run on it raises
  `checkpoint.WorkdirInUse`. A run resumes from the newest checkpoint that can be read: newer steps
  that cannot (damaged or missing files) are reported and moved to workdir/unreadable_checkpoints/.
  Every evaluation, during training and at the end, is of `evaluated_params` (the EMA when
  config.train.ema_decay > 0, else the raw parameters). SIGTERM, SIGINT (Ctrl-C; a second one
  interrupts at once) or the time limit saves and stops; after a signal nothing is evaluated.
  TensorBoard events go to workdir/tensorboard (`EventLog`), on disk at each write.

  Returns:
    A summary: final step, which parameters were evaluated ('EMA' or 'raw'), held-out bits per
    token with its standard error, the generator's exact bits per token on the same documents
    (embedded corpus), the tokens/s of this run's training (`TrainingClock`) and, for a run started from
    another (`config.init_from`, see `warm_start`), where it came from. After a signal only
    {'step': the step saved, 'stopped': 'SIGTERM' or 'SIGINT'}.
  """
  config_lib.validate(config)
  sharding.init_distributed(config.multi_process)
  mesh = sharding.make_mesh(sharding.MeshConfig(**config.mesh.to_dict()))
  check_batch_sizes(config, mesh)
  with contextlib.ExitStack() as stack:
    lock_workdir(workdir, stack)
    return _train_and_evaluate(config, workdir, mesh)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """`train_and_evaluate` in a workdir that this run holds."""
  train_cfg = config.train
  identity = config_lib.run_identity(config)
  reader = checkpoint.make_manager(workdir, read_only=True) if checkpoint.latest_step(workdir) is not None else None
  latest, saved, unreadable = None, None, []
  if reader is not None:  # the identity of the newest readable step is checked before anything is written

    def read_identity(step):
      items = checkpoint.read_json_items(reader, step)
      checkpoint.check_identity(config_lib.saved_run_identity(items["identity"], identity), identity, workdir)
      return items

    latest, saved, unreadable = checkpoint.newest_readable(reader.all_steps(), read_identity, reader.directory)
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
  tokenizer = data.tokenizer
  graph = experiment_lib.build_neighbor_graph(config, data.train_rows, tokenizer.vocab_size, workdir)
  experiment = experiment_lib.make_experiment(config, tokenizer.vocab_size, graph)
  optimizer = experiment_lib.make_optimizer(train_cfg)
  batches = datasets.train_batches(data, experiment.data, train_cfg.batch_size, config.seed,
                                   process_index=jax.process_index(), process_count=jax.process_count())

  provenance = {}
  if latest is not None:
    graphdef, abstract, shardings = abstract_state(experiment, config, mesh, optimizer)

    def restore(step):
      items = saved if step == latest else read_identity(step)
      return items, checkpoint.restore_state(reader, step, abstract), checkpoint.read_provenance(reader, step)

    latest, (saved, state, provenance), older_unreadable = checkpoint.newest_readable(
        [step for step in reader.all_steps() if step <= latest], restore, reader.directory)
    batches.set_state(saved["data"])
    unreadable += older_unreadable
    if unreadable:  # moved out of the way of the steps this run saves again
      multihost_utils.sync_global_devices("read the checkpoints")
      if jax.process_index() == 0:
        checkpoint.set_aside(workdir, unreadable)
      multihost_utils.sync_global_devices("set aside the unreadable checkpoints")
    if jax.process_index() == 0:
      print(f"Resumed from step {latest} in {workdir}", flush=True)
  elif init_source is not None:
    graphdef, state, shardings = init_state(experiment, config, mesh, optimizer,
                                            warm_start.restore_params(init_source, experiment.model, mesh))
    provenance = init_source.record()
    if jax.process_index() == 0:
      print(f"Starting from the {provenance['params']} parameters of step {init_source.step} in {init_source.workdir} "
            f"(process {provenance['process']!r})", flush=True)
  else:
    graphdef, state, shardings = init_state(experiment, config, mesh, optimizer)
  manager = checkpoint.make_manager(workdir, keep=train_cfg.keep_checkpoints)

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
  learning_rate = experiment_lib.learning_rate_schedule(train_cfg)
  sample_model = pipeline_lib.Pipeline(graphdef=graphdef, params=None, tokenizer=tokenizer, process=experiment.process,
                                       seq_len=experiment.data.seq_len, config=config)

  params_name = "raw" if train_cfg.ema_decay == 0 else "EMA"

  def save(step):
    checkpoint.save(manager, step, state, batches.get_state(), identity, config.to_dict(), provenance)

  stop = _StopRequest(train_cfg.time_limit_minutes)
  start_step = int(state.step)
  tokens_per_step = train_cfg.batch_size * experiment.data.seq_len
  clock = TrainingClock()
  stop_reason = None
  metrics = None
  sample_every = train_cfg.sample_every if jax.process_count() == 1 else 0
  if train_cfg.sample_every and not sample_every:
    absl_logging.warning("config.train.sample_every: samples are logged by single-process runs only")
  with contextlib.ExitStack() as cleanup:
    log = EventLog(os.path.join(workdir, "tensorboard")) if jax.process_index() == 0 else None
    if log:
      cleanup.callback(log.close)
    bar = progress.bar(train_cfg.num_steps, "train", "step", initial=start_step, disable=jax.process_index() != 0)
    cleanup.callback(bar.close)
    with handling_signals(stop):
      for step in range(start_step, train_cfg.num_steps):
        batch_BL = jax.make_array_from_process_local_data(batch_sharding, next(batches))
        previous_metrics = metrics
        state, metrics = step_fn(state, batch_BL, key)
        clock.start(step)  # after the call returns, so a first step's compilation is left out
        # At most two steps in flight: on a CPU with several devices, a long queue of dispatched
        # steps let device threads wait at a collective for devices whose work was queued behind.
        jax.block_until_ready(previous_metrics)
        bar.update(1)
        done = step + 1
        stop_reason = agreed_stop_reason(stop.local_reason(), done, jax.process_count(),
                                         multihost_utils.process_allgather)
        if done % train_cfg.log_every == 0 or done == train_cfg.num_steps:
          metrics = jax.device_get(metrics)
          tokens_per_second = clock.lap(done) * tokens_per_step
          bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tokens_per_second:,.0f}")
          if log:
            log.scalars(done, {**metrics, "tokens_per_second": tokens_per_second,
                               "learning_rate": learning_rate(done - 1)})
          if not all(np.isfinite(value) for value in metrics.values()):
            raise FloatingPointError(f"training diverged at step {done}: {metrics}; the last good "
                                     f"checkpoint (step {manager.latest_step()}) is kept")
        if done % train_cfg.eval_every == 0 and done != train_cfg.num_steps:
          clock.stop(done, metrics)
          result = evaluate_params(evaluated_params(state))
          bar.write(f"step {done}: held-out {result.bits_per_token:.3f} ± {result.stderr:.3f} bits/token "
                    f"({params_name} parameters)")
          if log:
            log.scalars(done, evaluation_scalars(result))
        if sample_every and done % sample_every == 0:
          clock.stop(done, metrics)
          sample_model.params = evaluated_params(state)
          texts = sample_texts(sample_model, config, data.eval_sources)
          if log:
            log.text(done, "samples", samples_markdown(texts))
        if done % train_cfg.checkpoint_every == 0 or stop_reason:
          clock.stop(done, metrics)
          save(done)
        if stop_reason:
          bar.write(f"stopping at step {done} ({stop_reason})")
          break
      final_step = int(state.step)
      clock.stop(final_step)
      if manager.latest_step() != final_step:
        save(final_step)
    bar.close()
    if stop_reason in SIGNALS:
      return {"step": final_step, "stopped": stop_reason}
    result = evaluate_params(evaluated_params(state))
    if log:
      log.scalars(final_step, evaluation_scalars(result))
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


class EventLog:
  """A run's TensorBoard events (workdir/tensorboard), each write on disk before it returns, so a
  killed run loses nothing it logged (tensorboardX's SummaryWriter queues writes in a thread).

    log = EventLog(os.path.join(workdir, "tensorboard"))
    log.scalars(step, {"train/loss": 2.3}); log.text(step, "samples", "1. `...`"); log.close()
  """

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    # events.out.tfevents.<seconds>.<host>.<pid>.<ns>: a name of its own even for a run restarted within the second
    self._writer = event_file_writer.EventsWriter(os.path.join(logdir, "events"),
                                                  filename_suffix=f".{os.getpid()}.{time.monotonic_ns()}")

  def scalars(self, step: int, values: dict[str, Any]) -> None:
    """Scalars named 'group/name' (a bare name goes to 'train/') at `step`."""
    summaries = [tensorboardX.summary.scalar(name if "/" in name else f"train/{name}", float(value))
                 for name, value in values.items()]
    self._write(step, summary_pb2.Summary(value=[value for summary in summaries for value in summary.value]))

  def text(self, step: int, tag: str, text: str) -> None:
    """A text summary (markdown) at `step`, shown in TensorBoard's Text tab."""
    self._write(step, tensorboardX.summary.text(tag, text))

  def _write(self, step: int, summary: summary_pb2.Summary) -> None:
    self._writer.write_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def evaluation_scalars(result: evaluate.ElboResult) -> dict[str, float]:
  """The bits of a held-out evaluation (per token, character and document, their standard errors
  and the generator's) as 'eval/...' scalars."""
  return {f"eval/{name}": value for name, value in result.summary().items() if "bits" in name}


def sample_texts(model: pipeline_lib.Pipeline, config: ml_collections.ConfigDict, sources: Sequence[str],
                 prompts: Sequence[str] | None = None) -> list[str]:
  """Texts from `model` under the config's sample settings, config.sample.num_samples of them (of
  each prompt, if `prompts`): from scratch or continuing the prompts for a language model;
  'source -> target' for the prompts, or the first held-out `sources`, of a pair task."""
  settings = config.sample.to_dict()
  num_samples = settings.pop("num_samples")
  repeated = [prompt for prompt in prompts for _ in range(num_samples)] if prompts else None
  if config.data.task == "lm":
    return model.generate(repeated, num_samples=num_samples, seed=config.seed, **settings)
  sources = repeated or list(sources[:num_samples])
  return [f"{source} -> {target}" for source, target in zip(sources, model.translate(sources, seed=config.seed,
                                                                                       **settings))]


def samples_markdown(texts: Sequence[str]) -> str:
  """Texts as a numbered markdown list, each as code (TensorBoard's Text tab renders markdown)."""
  return "\n".join(f"{i}. `{text}`" for i, text in enumerate(texts, 1))


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
