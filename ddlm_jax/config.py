"""The experiment config: defaults, validation, and the frozen settings built from it.

Every experiment in `experiments/` starts from `base_config()` and changes values; it may not
add keys. `validate` rejects unknown keys and wrong types by name, before anything runs.
"""
import contextlib
import math

import ml_collections
from ml_collections import config_dict

from ddlm_jax import evaluate
from ddlm_jax import experiment as experiment_lib
from ddlm_jax import samplers
from ddlm_jax import sharding
from ddlm_jax.data import datasets
from ddlm_jax.decoding import blockwise
from ddlm_jax.decoding import speculative
from ddlm_jax.processes import base

PROCESSES = ("masked", "uniform", "d3pm", "gaussian", "autoregressive", "block")
# Each numeric setting that `validate` checks here: (low, high, whether low is excluded, whether
# high is excluded). Settings read by a frozen dataclass (data, model, process, sample, mesh) are
# checked by that class.
NUMERIC_RANGES = {
    "seed": (0, math.inf, False, True),
    "train.batch_size": (1, math.inf, False, True),
    "train.num_steps": (1, math.inf, False, True),
    "train.time_limit_minutes": (0, math.inf, False, True),
    "train.learning_rate": (0, math.inf, True, True),
    "train.warmup_steps": (0, math.inf, False, True),
    "train.attention_anneal_steps": (0, math.inf, False, True),
    "train.min_learning_rate_ratio": (0, 1, False, False),
    "train.weight_decay": (0, math.inf, False, True),
    "train.b1": (0, 1, False, True),
    "train.b2": (0, 1, False, True),
    "train.eps": (0, math.inf, True, True),
    "train.grad_clip_norm": (0, math.inf, True, True),
    "train.ema_decay": (0, 1, False, True),
    "train.log_every": (1, math.inf, False, True),
    "train.eval_every": (1, math.inf, False, True),
    "train.checkpoint_every": (1, math.inf, False, True),
    "train.keep_checkpoints": (1, math.inf, False, True),
    "train.sample_every": (0, math.inf, False, True),
    "eval.batch_size": (1, math.inf, False, True),
    "eval.elbo_samples": (2, math.inf, False, True),  # two draws at least, for a standard error
    "eval.max_docs": (1, math.inf, False, True),
    "sample.num_samples": (1, math.inf, False, True),
}


def base_config() -> ml_collections.ConfigDict:
  """Every key an experiment may set, with its default."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.multi_process = False  # call jax.distributed.initialize() (multi-host pods)
  # Another run's workdir: a new run (no checkpoint of its own yet) starts from that run's parameters (its EMA
  # if it kept one) and tokenizer, with its own process, optimizer and data; empty: from scratch.
  config.init_from = ""

  config.data = ml_collections.ConfigDict(dict(
      source="embedded",         # 'embedded' | 'text_files' | 'tfds'
      paths=(),                  # local text files for source='text_files'
      tfds_name="",              # catalog name for source='tfds', e.g. 'lm1b'
      tfds_eval_split="validation",  # 'test' for lm1b
      tfds_data_dir="",          # empty: TFDS's default data directory
      unit="paragraph",          # local/catalog texts are cut into 'paragraph's or 'line's
      tokenizer="sentencepiece",  # 'char' | 'sentencepiece'
      vocab_size=1024,           # sentencepiece only
      seq_len=128,
      packing="pad",             # 'pad': one document per row; 'pack': concatenate and chunk
      train_windows="rows",      # 'rows': the layout's fixed rows, reshuffled per epoch; 'random' (pack):
                                 # contiguous windows of the training stream at fresh offsets every batch
      num_train_docs=50_000,     # sampled (embedded corpus) or read at most (other sources)
      num_eval_docs=1_000,
      validation_fraction=0.05,  # local text files only
      seed=0,
      task="lm",                 # 'lm' | 'data_to_text' | 'text_to_data' | 'instructions' | 'completion' (pairs)
      record_attributes=(),      # pair tasks: the record's attributes; empty: all a document mentions
  ))

  config.model = ml_collections.ConfigDict(dict(
      num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512,
      time_conditioning=False, dropout_rate=0.0, remat=False, dtype="float32",
      # How attention is computed (same results; see networks/layers.attention): 'xla' | 'chunked'
      # (causal attention in query blocks of attention_chunk_size, skipping the masked blocks) |
      # 'cudnn' (NVIDIA GPUs, dtype bfloat16); decoding reads the cache in chunks of decode_chunk_size.
      attention="chunked", attention_chunk_size=64, decode_chunk_size=32,
      # The network's vocabulary is padded to a multiple of vocab_multiple (the process ignores the
      # extra logits; 1: no padding); with mesh.tensor > 1 it must be a multiple of mesh.tensor.
      vocab_multiple=experiment_lib.VOCAB_MULTIPLE,
      # Keep an autoregressive network's next-token outputs (position i's logits from the slot holding the
      # token before it, after a [BOS] slot): a masked/uniform/d3pm model started from an AR run (init_from)
      shift_logits=False,
  ))

  config.process = ml_collections.ConfigDict(dict(
      name="masked",             # one of PROCESSES
      schedule="linear",         # alpha(t) of the discrete families: 'linear' | 'cosine' | 'loglinear';
                                 # abar(t) of 'gaussian': 'sqrt' | 'cosine'
      schedule_eps=1e-3,         # alpha(1) of 'loglinear'
      antithetic_time=True,      # stratified times over a batch
      transition="absorbing",    # d3pm: 'uniform' | 'absorbing' | 'nearest_neighbor'
      num_steps=1000,            # d3pm, gaussian: T of the discrete-time bound
      latent_dim=16,             # gaussian: size of the diffused token embeddings
      hybrid_coeff=0.01,         # d3pm: lambda of the hybrid loss VLB + lambda * CE
      num_neighbors=8,           # d3pm 'nearest_neighbor': graph degree over token embeddings
      neighbor_embed_dim=32,     # d3pm 'nearest_neighbor': co-occurrence embedding size
      block_size=4,              # block: positions per block (BD3-LM); data.seq_len must be a multiple
  ))

  config.train = ml_collections.ConfigDict(dict(
      batch_size=32,
      num_steps=2_000,
      time_limit_minutes=0.0,    # stop (and save) after this much training time; 0 = no limit
      learning_rate=1e-3,
      warmup_steps=100,
      schedule="cosine",         # after warm-up: 'cosine' | 'linear' decay to learning_rate * min_learning_rate_ratio,
                                 # or 'constant'
      min_learning_rate_ratio=0.1,  # the decay ends at learning_rate * this
      weight_decay=0.01,
      b1=0.9, b2=0.98, eps=1e-8,  # AdamW's moment decays and the epsilon added to its denominator
      grad_clip_norm=1.0,
      ema_decay=0.0,             # 0 disables the EMA of parameters
      condition_dropout=0.0,     # pair tasks: share of rows trained without their source (for CFG)
      log_every=50,
      eval_every=500,
      checkpoint_every=500,
      keep_checkpoints=3,
      sample_every=0,            # log config.sample.num_samples samples to TensorBoard every this many steps; 0 = never
      sample_at_end=True,        # the launcher's --mode=train prints config.sample.num_samples samples at the end
      # AR -> diffusion adaptation: over this many first steps the attention of a bidirectional model is annealed
      # from causal (step 0) to bidirectional, each later key visible with probability step / attention_anneal_steps
      # (a block model's, within its blocks, to block diffusion's mask)
      attention_anneal_steps=0,
  ))

  config.eval = ml_collections.ConfigDict(dict(
      batch_size=64,
      elbo_samples=4,            # Monte Carlo draws of t per held-out sequence
      max_docs=1_000,
      rows="spread",             # which max_docs held-out rows are scored: 'spread' evenly over the split, or the 'first'
      exact_time_sum=False,      # d3pm: sum all T terms of the bound instead of drawing t
  ))

  config.sample = ml_collections.ConfigDict(dict(
      # 'auto': block-by-block for process 'block', the scan sampler for the other diffusion families
      # (the autoregressive baseline decodes left to right) | 'scan' | 'blockwise' (decoding/blockwise.py:
      # windows of block_length over a KV cache; masked and block processes) | 'speculative'
      # (decoding/speculative.py: the autoregressive baseline verifying a diffusion drafter's tokens)
      method="auto",
      cache="auto",              # blockwise: 'exact' (block) | 'none' | 'prefix' | 'dual' (masked); 'auto':
                                 # 'exact' for block, 'none' for masked
      steps_per_block=4,         # blockwise: steps of each window (its strategy: ancestral, random, low_confidence)
      # blockwise strategies that reveal every position they are sure of (steps_per_block unused):
      # 'threshold' (confidence >= threshold), 'factor' (Fast-dLLM's factor rule), 'entropy_bound' (EB-sampler)
      threshold=0.9, factor=1.0, entropy_bound=0.1,
      # speculative (an autoregressive model, with a diffusion drafter given to Pipeline.generate):
      # tokens drafted per round and the drafter's steps for them
      draft_length=4, draft_steps=2,
      num_samples=8, steps=64, strategy="ancestral", temperature=1.0, block_length=0,
      top_k=config_dict.placeholder(int),  # None: no top-k limit
      top_p=1.0,
      eta=0.0,                   # gaussian, strategy 'ddim': noise scale (0: deterministic)
      clamp=False,               # gaussian: snap the predicted x_0 to the nearest embedding each step
      guidance_scale=1.0,        # classifier-free guidance (pair tasks): 0 unconditional, 1 conditional
  ))

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first key that `base_config()` lacks, has another type, or
  holds an impossible value, before anything is written."""
  _check_against(config, base_config(), prefix="config")
  if config.process.name not in PROCESSES:
    raise ValueError(f"config.process.name={config.process.name!r} is not one of {PROCESSES}")
  if config.eval.exact_time_sum and config.process.name != "d3pm":
    raise ValueError("config.eval.exact_time_sum sums the steps of a discrete-time bound: it needs "
                     f"process 'd3pm', not {config.process.name!r}")
  _check_pair_task_settings(config)
  for key, allowed in (("train.schedule", experiment_lib.LEARNING_RATE_SCHEDULES),
                       ("eval.rows", evaluate.ROW_SELECTIONS)):
    if config[key] not in allowed:
      raise ValueError(f"config.{key}={config[key]!r} is not one of {allowed}")
  if config.train.attention_anneal_steps and config.process.name in ("autoregressive", "gaussian"):
    raise ValueError("config.train.attention_anneal_steps anneals a diffusion token network's attention from "
                     f"causal: it needs process masked, uniform, d3pm or block, not {config.process.name!r}")
  if config.sample.method == "speculative":
    raise ValueError("config.sample.method 'speculative' needs a drafter model, which a run's config cannot name: "
                     "call Pipeline.generate(method='speculative', drafter=ddlm_jax.load(DRAFTER_WORKDIR))")
  if config.process.name == "block" and config.data.seq_len % config.process.block_size:
    raise ValueError(f"config.data.seq_len={config.data.seq_len} must be a multiple of "
                     f"config.process.block_size={config.process.block_size} (block diffusion decodes whole blocks)")
  # The objects the settings make, over a stand-in vocabulary, check the settings themselves.
  with _errors_named("config.data"):
    data_config(config)
  with _errors_named("config.process"):
    process = experiment_lib.stand_in_process(config.process)
  with _errors_named("config.model"):
    experiment_lib.model_config(config, process)
  with _errors_named("config.mesh"):
    sharding.MeshConfig(**config.mesh.to_dict())
  if config.mesh.tensor > 1 and config.model.vocab_multiple % config.mesh.tensor:
    raise ValueError(f"config.model.vocab_multiple={config.model.vocab_multiple} must be a multiple of "
                     f"config.mesh.tensor={config.mesh.tensor}: the vocabulary is split over the tensor axis")
  with _errors_named("config.sample"):
    sampler = sampler_config(config)
    if isinstance(sampler, blockwise.BlockwiseConfig):
      blockwise.check_blockwise(process, sampler, config.data.seq_len)
      if config.model.shift_logits and sampler.cache != "none":
        raise ValueError(f"cache {sampler.cache!r} needs KV-cache decoding, which a network with shift_logits "
                         "lacks: use cache 'none'")
    elif isinstance(sampler, samplers.SamplerConfig):
      sampler.max_blocks(config.data.seq_len)
      samplers.check_sampler(process, sampler)
  for key, (low, high, low_open, high_open) in NUMERIC_RANGES.items():
    value = config[key]
    if not (math.isfinite(value) and (low < value if low_open else low <= value)
            and (value < high if high_open else value <= high)):
      interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
      raise ValueError(f"config.{key} must be a finite number in {interval}, got {value}")


def _check_pair_task_settings(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for a training or sampling setting that needs a pair task (config.data.task)
  on a language-modelling one."""
  pairs = config.data.task != "lm"
  if not 0.0 <= config.train.condition_dropout < 1.0:
    raise ValueError(f"config.train.condition_dropout must lie in [0, 1), got {config.train.condition_dropout}")
  if config.train.condition_dropout and not pairs:
    raise ValueError("config.train.condition_dropout drops a pair's source: it needs a pair task "
                     "(config.data.task 'data_to_text', 'text_to_data', 'instructions' or 'completion')")
  if config.sample.guidance_scale != 1.0 and not pairs:
    raise ValueError("config.sample.guidance_scale (classifier-free guidance) guides toward a pair's source: "
                     "it needs a pair task (config.data.task 'data_to_text', 'text_to_data', 'instructions' or 'completion')")


@contextlib.contextmanager
def _errors_named(group: str):
  """Prefixes a ValueError raised inside with the config group it came from."""
  try:
    yield
  except ValueError as error:
    raise ValueError(f"{group}: {error}") from error


BLOCKWISE_ONLY_KEYS = ("cache", "steps_per_block", "threshold", "factor", "entropy_bound")
SPECULATIVE_ONLY_KEYS = ("draft_length", "draft_steps")
METHODS = ("auto", "scan", "blockwise", "speculative")
DecodingConfig = samplers.SamplerConfig | blockwise.BlockwiseConfig | speculative.SpeculativeConfig


def sampler_config(config: ml_collections.ConfigDict, **overrides) -> DecodingConfig:
  """The frozen decoding settings of a config's `sample` group (with overrides): the scan sampler's
  (`samplers.SamplerConfig`, which the autoregressive baseline's own decoding reads too),
  block-by-block decoding's (`blockwise.BlockwiseConfig`, whose window is block_length, the
  process's block for 'block', and whose rule is the strategy), or speculative decoding's
  (`speculative.SpeculativeConfig`, for an autoregressive model with a diffusion drafter)."""
  settings = {**config.sample.to_dict(), **overrides}
  del settings["num_samples"]
  method = settings.pop("method")
  if method not in METHODS:
    raise ValueError(f"sample method {method!r} is not one of {METHODS}")
  is_block = config.process.name == "block"
  if method == "auto":
    method = "blockwise" if is_block else "scan"
  if is_block and method != "blockwise":
    raise ValueError(f"block diffusion decodes block by block: method 'blockwise' (or 'auto'), not {method!r}")
  blockwise_settings = {key: settings.pop(key) for key in BLOCKWISE_ONLY_KEYS}
  speculative_settings = {key: settings.pop(key) for key in SPECULATIVE_ONLY_KEYS}
  if method == "scan":
    return samplers.SamplerConfig(**settings)
  for key in ("record_trajectory", "guidance_scale"):
    default = samplers.SamplerConfig.__dataclass_fields__[key].default
    if settings.get(key, default) != default:
      raise ValueError(f"{key} applies to the scan sampler (method 'scan'), not to method {method!r}")
  draw = dict(temperature=settings["temperature"], top_k=settings["top_k"], top_p=settings["top_p"])
  if method == "speculative":
    if config.process.name != "autoregressive":
      raise ValueError("method 'speculative' decodes an autoregressive model with a diffusion drafter; the "
                       f"process is {config.process.name!r}")
    return speculative.SpeculativeConfig(**speculative_settings, draw=base.TokenDraw(**draw))
  cache = blockwise_settings["cache"]
  if cache == "auto":
    cache = "exact" if is_block else "none"
  block_size = settings["block_length"] or (config.process.block_size if is_block else 0)
  if not block_size:
    raise ValueError("method 'blockwise' on a bidirectional model needs block_length > 0 (its window)")
  return blockwise.BlockwiseConfig(block_size=block_size, rule=settings["strategy"], **draw,
                                   **{**blockwise_settings, "cache": cache})


def data_config(config: ml_collections.ConfigDict) -> datasets.DataConfig:
  """The frozen data settings of a config."""
  return datasets.DataConfig(**{**config.data.to_dict(), "paths": tuple(config.data.paths)})


def run_identity(config: ml_collections.ConfigDict) -> dict:
  """The settings a resumed run must share with its checkpoint: everything that shapes the state,
  the data order or the random keys, and the fingerprint of the texts (`datasets.texts_fingerprint`:
  an edited text file is other data). Step counts (a changed train.num_steps is logged), logging,
  evaluation and sampling may change. Reads the data's text files, if any."""
  return {"seed": config.seed, "data": config.data.to_dict(), "model": _model_identity(config.model.to_dict()),
          "process": _process_identity(config.process.to_dict()), "train.batch_size": config.train.batch_size,
          "train.ema_decay": config.train.ema_decay, "train.condition_dropout": config.train.condition_dropout,
          "data_fingerprint": datasets.texts_fingerprint(data_config(config))}


def saved_run_identity(identity: dict, current: dict | None = None) -> dict:
  """A run identity read from a checkpoint, reduced to what `run_identity` compares today. Older
  versions saved every process setting, also those the family does not read, and lack the keys
  added since: data, model and training settings take their defaults, and a missing data
  fingerprint, which nothing can recover, is taken from `current` (the identity of the run that
  resumes)."""
  defaults = {key: value for key, value in run_identity(base_config()).items() if key != "data_fingerprint"}
  missing = {} if current is None else {"data_fingerprint": current["data_fingerprint"]}
  return {**defaults, **missing, **identity, "process": _process_identity(identity["process"]),
          "data": {**defaults["data"], **identity["data"]},
          "model": _model_identity({**defaults["model"], **identity["model"]})}


# Model settings that change how the network is computed, not what it computes: a run may resume
# with others.
COMPUTATION_ONLY_MODEL_KEYS = ("remat", "attention", "attention_chunk_size", "decode_chunk_size")


def _model_identity(model: dict) -> dict:
  return {key: value for key, value in model.items() if key not in COMPUTATION_ONLY_MODEL_KEYS}


def _process_identity(process: dict) -> dict:
  """The identity of the process that `config.process` settings make: its class and fields
  (`experiment.process_identity`). Older versions saved the settings themselves (keyed by 'name';
  a missing one takes today's default); an identity saved in today's form is returned as it is."""
  if "name" not in process:
    return process
  settings = ml_collections.ConfigDict({**base_config().process.to_dict(), **process})
  return experiment_lib.process_identity(experiment_lib.stand_in_process(settings),
                                         experiment_lib.neighbor_graph_settings(settings))


def with_defaults(saved: dict) -> ml_collections.ConfigDict:
  """A config saved by a run (maybe by an older version, with fewer keys) over today's defaults."""
  config = base_config()
  config.update(saved)  # merges group by group
  return config


def _check_against(config, reference, prefix: str) -> None:
  for key, value in config.items():
    name = f"{prefix}.{key}"
    if key not in reference:
      raise ValueError(f"unknown config key {name!r}; known keys here: {sorted(reference.keys())}")
    expected = reference[key]
    if isinstance(expected, ml_collections.ConfigDict):
      if not isinstance(value, (ml_collections.ConfigDict, dict)):
        raise ValueError(f"config key {name!r} must be a group of settings, got {value!r}")
      _check_against(value, expected, name)
    elif isinstance(expected, bool) != isinstance(value, bool) or not isinstance(
        value, _compatible_types(expected)):
      raise ValueError(f"config key {name!r} must be of type {type(expected).__name__}, got {value!r}")


def _compatible_types(expected) -> tuple[type, ...]:
  if expected is None:  # an optional int such as sample.top_k
    return (int, type(None))
  if isinstance(expected, float):
    return (float, int)
  if isinstance(expected, (tuple, list)):
    return (tuple, list)
  return (type(expected),)
