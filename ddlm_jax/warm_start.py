"""Starting a run from another run's parameters (`config.init_from`): pretrain, then adapt or fine-tune.

  config.init_from = "workdirs/ar"        # an AR run's workdir
  config.process.name = "masked"          # a new process, optimizer, data and workdir
  train.train_and_evaluate(config, "workdirs/ar_to_masked")

A new run (one without a checkpoint of its own) reads the latest checkpoint of `init_from`: its
parameters (the EMA when that run kept one, as `ddlm_jax.load` does) become the new run's initial
parameters, and its tokenizer becomes the new run's, so that token ids keep their meaning. The new
run's optimizer starts afresh. The checks, before anything is written: `init_from` holds a
checkpoint, the new config asks for the same tokenizer, and the new network has exactly the
parameter shapes of the old one (so any process may follow any other whose network has the same
parameters: autoregressive, masked, block, uniform, D3PM). `datasets.load_data(tokenizer=...)`
then adopts the tokenizer, refusing a char alphabet that misses a character of the new texts.

The new run records where it came from (`provenance`) in every checkpoint and in its summary; a
resumed run continues from its own checkpoints and keeps that record.
"""
import dataclasses
import os

import jax
import ml_collections
from flax import nnx

from ddlm_jax import checkpoint
from ddlm_jax import config as config_lib
from ddlm_jax import experiment as experiment_lib
from ddlm_jax import sharding
from ddlm_jax.data import tokenizers


@dataclasses.dataclass(frozen=True)
class InitSource:
  """The run a new run starts from.

  Attributes:
    workdir: its absolute workdir.
    step: the checkpoint step read.
    config: its config.
    tokenizer: its tokenizer, which the new run adopts.
    use_ema: its parameters are the EMA it kept (else the raw parameters).
    provenance: that run's own provenance ({} if it was trained from scratch).
  """
  workdir: str
  step: int
  config: ml_collections.ConfigDict
  tokenizer: tokenizers.Tokenizer
  use_ema: bool
  provenance: dict

  def record(self) -> dict:
    """The new run's provenance: this source, and where it came from in turn."""
    record = {"workdir": self.workdir, "step": self.step, "params": "EMA" if self.use_ema else "raw",
              "process": self.config.process.name}
    return {**record, "from": self.provenance} if self.provenance else record


def read_source(workdir: str) -> InitSource:
  """The latest checkpoint's settings of the run in `workdir` (no arrays are read)."""
  workdir = os.path.abspath(workdir)
  step = checkpoint.latest_step(workdir)
  if step is None:
    raise ValueError(f"config.init_from={workdir!r} holds no checkpoint to start from")
  manager = checkpoint.make_manager(workdir, read_only=True)
  config = config_lib.with_defaults(checkpoint.read_json_items(manager, step)["config"])
  return InitSource(workdir=workdir, step=step, config=config,
                    tokenizer=tokenizers.load_tokenizer(os.path.join(workdir, "tokenizer")),
                    use_ema=config.train.ema_decay > 0, provenance=checkpoint.read_provenance(manager, step))


def check_source(source: InitSource, config: ml_collections.ConfigDict) -> None:
  """Raises ValueError when a run of `config` cannot start from `source`."""
  source_data, data = source.config.data, config.data
  asked = (data.tokenizer, data.vocab_size if data.tokenizer == "sentencepiece" else None)
  held = (source_data.tokenizer, source_data.vocab_size if source_data.tokenizer == "sentencepiece" else None)
  if asked != held:
    raise ValueError(f"config.data asks for tokenizer {asked[0]!r}" + (f" of vocab_size {asked[1]}" if asked[1] else "")
                     + f", but the run in config.init_from={source.workdir!r} has {held[0]!r}"
                     + (f" of vocab_size {held[1]}" if held[1] else "")
                     + ": a run started from another adopts its tokenizer, so ask for the same one")
  vocab_size = source.tokenizer.vocab_size
  old, new = _network(source.config, vocab_size), _network(config, vocab_size)
  old_shapes, new_shapes = (_parameter_shapes(model) for model in (old, new))
  if old_shapes != new_shapes:
    differing = [f"{field.name}: {getattr(old, field.name)!r} there, {getattr(new, field.name)!r} here"
                 for field in dataclasses.fields(old) if getattr(old, field.name) != getattr(new, field.name)]
    path = next(path for path in sorted(set(old_shapes) | set(new_shapes))
                if old_shapes.get(path) != new_shapes.get(path))
    raise ValueError(f"the network of config.init_from={source.workdir!r} has other parameters than this one "
                     f"({path}: {old_shapes.get(path)} there, {new_shapes.get(path)} here; network settings "
                     f"that differ: {'; '.join(differing)})")


def _network(config: ml_collections.ConfigDict, vocab_size: int):
  """The TransformerConfig a config trains over `vocab_size` ids (D3PM's neighbour graph left edgeless:
  it shapes no parameter)."""
  graph_settings = experiment_lib.neighbor_graph_settings(config.process)
  graph = None if graph_settings is None else graph_settings.edgeless(vocab_size)
  return experiment_lib.make_experiment(config, vocab_size, graph).model


def _parameter_shapes(model) -> dict[str, tuple[int, ...] | None]:
  """Each parameter's path and shape."""
  _, params = sharding.abstract_model(model)
  return {jax.tree_util.keystr(path): leaf.shape for path, leaf in jax.tree.leaves_with_path(params)}


def restore_params(source: InitSource, model, mesh: jax.sharding.Mesh) -> nnx.State:
  """The source's parameters, laid out on `mesh` as the new network `model` (TransformerConfig) shards them."""
  _, params, shardings = experiment_lib.abstract_params(model, mesh)
  manager = checkpoint.make_manager(source.workdir, read_only=True)
  return checkpoint.restore_params(manager, source.step, "ema_params" if source.use_ema else "params",
                                   sharding.abstract(params, shardings))
