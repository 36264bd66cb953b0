"""Config -> objects in one place: every experiment builds, bad settings are named, run identities
come from the process, and inference restores parameters without training code."""
import dataclasses
import importlib
import itertools
import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ddlm_jax
from ddlm_jax import checkpoint
from ddlm_jax import config as config_lib
from ddlm_jax import experiment as experiment_lib
from ddlm_jax import samplers
from ddlm_jax import sharding
from ddlm_jax import train
from ddlm_jax.data import datasets
from ddlm_jax.data import tokenizers
from ddlm_jax.networks import transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import char_stream  # pylint: disable=g-import-not-at-top
from experiments import compare  # pylint: disable=g-import-not-at-top
from experiments import diffusion_lm  # pylint: disable=g-import-not-at-top
from experiments import mdlm_tiny  # pylint: disable=g-import-not-at-top
from experiments import reversal  # pylint: disable=g-import-not-at-top
from experiments import seq2seq  # pylint: disable=g-import-not-at-top
from experiments import sft  # pylint: disable=g-import-not-at-top

# Every experiment file with each variant its get_config takes (None: the default; (): no argument).
VARIANTS = {
    "ar_tiny": [None],
    "bd3lm_tiny": [None, "char"],
    "bpe_stream": [",".join(v) for v in itertools.product(compare.FAMILIES, char_stream.SIZES)],
    "char_stream": [",".join(v) for v in itertools.product(compare.FAMILIES, char_stream.SIZES)],
    "compare": [",".join(v) for v in itertools.product(compare.FAMILIES, compare.DATASETS, compare.SIZES)],
    "d3pm_absorbing_tiny": [None],
    "d3pm_uniform_tiny": [None],
    "diffuseq_tiny": list(seq2seq.TASKS),
    "diffusion_lm": list(diffusion_lm.VARIANTS),
    "diffusion_lm_tiny": [None],
    "mdlm_demo": [()],
    "mdlm_tiny": [None, "char"],
    "reversal": [m + sft for m in reversal.MODELS for sft in ("", ",sft")],
    "sft": [",".join(v) for v in itertools.product(sft.FAMILIES, sft.TASKS)],
    "seq2seq": [",".join(v) for v in itertools.product(seq2seq.FAMILIES, seq2seq.TASKS, seq2seq.SIZES)],
    "udlm_tiny": [None],
}


def test_the_variant_table_names_every_experiment_file():
  files = {name[:-3] for name in os.listdir(os.path.join(ROOT, "experiments"))
           if name.endswith(".py") and name != "__init__.py"}
  assert files == set(VARIANTS)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_experiment_config_validates_and_builds_its_objects(name):
  module = importlib.import_module(f"experiments.{name}")
  mesh = sharding.make_mesh(sharding.MeshConfig())
  rows_NL = np.random.default_rng(0).integers(0, experiment_lib.STAND_IN_VOCAB_SIZE, (8, 16))
  for variant in VARIANTS[name]:
    config = module.get_config() if variant == () else module.get_config(variant)
    if config.data.source == "text_files":
      config.data.paths = ("input.txt",)
    config_lib.validate(config)
    graph_settings = experiment_lib.neighbor_graph_settings(config.process)
    graph = None if graph_settings is None else graph_settings.build(rows_NL, experiment_lib.STAND_IN_VOCAB_SIZE)
    experiment = experiment_lib.make_experiment(config, experiment_lib.STAND_IN_VOCAB_SIZE, graph)
    assert experiment.model.vocab_size % config.model.vocab_multiple == 0
    assert experiment.model.causal == (config.process.name == "autoregressive")
    _, params, _ = experiment_lib.abstract_params(experiment.model, mesh)
    optimizer = experiment_lib.make_optimizer(config.train)
    assert jax.tree.leaves(jax.eval_shape(optimizer.init, params))


@pytest.mark.parametrize("variant,edit,group,message", [
    ("compare:udlm", dict(sample=dict(strategy="low_confidence")), "config.sample", "MASK"),
    ("compare:mdlm", dict(sample=dict(strategy="ddim")), "config.sample", "ddim"),
    ("compare:mdlm", dict(sample=dict(clamp=True)), "config.sample", "clamp"),
    ("compare:ar", dict(sample=dict(strategy="ddim")), "config.sample", "ddim"),
    ("seq2seq:diffuseq", dict(sample=dict(strategy="random")), "config.sample", "reveals tokens"),
    ("seq2seq:ar", dict(sample=dict(guidance_scale=2.0)), "config.sample", "diffusion process"),
    ("seq2seq:diffuseq", dict(model=dict(time_conditioning=False)), "config.model", "time_conditioning"),
    ("compare:mdlm", dict(process=dict(schedule="loglinear", schedule_eps=0.0)), "config.process", "eps"),
    ("seq2seq:diffuseq", dict(process=dict(latent_dim=0)), "config.process", "latent_dim"),
    ("seq2seq:diffuseq", dict(process=dict(schedule="linear")), "config.process", "noise schedule"),
    ("compare:d3pm_uniform", dict(process=dict(num_steps=0)), "config.process", "num_steps"),
    ("compare:d3pm_uniform", dict(process=dict(hybrid_coeff=-0.5)), "config.process", "hybrid_coeff"),
    ("compare:d3pm_uniform", dict(process=dict(hybrid_coeff=math.nan)), "config.process", "hybrid_coeff"),
    ("compare:d3pm_nearest_neighbor", dict(process=dict(num_neighbors=0)), "config.process", "num_neighbors"),
    ("compare:d3pm_nearest_neighbor", dict(process=dict(neighbor_embed_dim=0)), "config.process",
     "neighbor_embed_dim"),
    ("compare:mdlm", dict(sample=dict(guidance_scale=2.0)), "config.sample.guidance_scale", "pair task"),
    ("compare:mdlm", dict(model=dict(vocab_multiple=0)), "config.model", "vocab_multiple must be an integer >= 1"),
    ("compare:mdlm", dict(model=dict(vocab_multiple=3), mesh=dict(data=1, tensor=2)), "config.model.vocab_multiple=3",
     "multiple of config.mesh.tensor=2"),
])
def test_settings_the_objects_refuse_fail_validation_naming_their_group(variant, edit, group, message):
  name, family = variant.split(":")
  config = importlib.import_module(f"experiments.{name}").get_config(family)
  for group_name, values in edit.items():
    config[group_name].update(**values)
  with pytest.raises(ValueError, match=f"^{re.escape(group)}[: ].*{message}"):
    config_lib.validate(config)


def test_vocab_multiple_pads_the_networks_vocabulary():
  config = config_lib.base_config()
  process = experiment_lib.make_process(config.process, 37)
  padded = {}
  for multiple in (1, 8, 128):
    config.model.vocab_multiple = multiple
    padded[multiple] = experiment_lib.model_config(config, process).vocab_size
  assert padded == {1: 37, 8: 40, 128: 128}


def test_a_checkpoint_saved_before_vocab_multiple_existed_resumes_with_the_default_only():
  current = config_lib.run_identity(config_lib.base_config())
  older = json.loads(json.dumps(current))
  del older["model"]["vocab_multiple"]  # its vocabulary was padded to 128, today's default
  checkpoint.check_identity(config_lib.saved_run_identity(older, current), current, "workdir")
  unpadded_config = config_lib.base_config()
  unpadded_config.model.vocab_multiple = 1
  unpadded = config_lib.run_identity(unpadded_config)
  with pytest.raises(checkpoint.CheckpointError, match="model.vocab_multiple: checkpoint 128 vs now 1"):
    checkpoint.check_identity(config_lib.saved_run_identity(older, unpadded), unpadded, "workdir")


def test_how_attention_is_computed_is_not_part_of_the_run_identity():
  """A run may resume with another attention implementation or chunking (or remat), as a checkpoint
  saved with remat and before the attention settings existed does; the model's shapes still count."""
  saved = json.loads(json.dumps(config_lib.run_identity(config_lib.base_config())))
  saved["model"]["remat"] = True
  config = config_lib.base_config()
  config.model.update(attention="xla", attention_chunk_size=16, decode_chunk_size=8)
  current = config_lib.run_identity(config)
  checkpoint.check_identity(config_lib.saved_run_identity(saved, current), current, "workdir")
  config.model.embed_dim = 64
  other = config_lib.run_identity(config)
  with pytest.raises(checkpoint.CheckpointError, match="model.embed_dim"):
    checkpoint.check_identity(config_lib.saved_run_identity(saved, other), other, "workdir")


# The process settings that checkpoints of the previous version recorded, per family.
OLDER_READ_KEYS = {
    "masked": ("schedule", "schedule_eps", "antithetic_time"),
    "gaussian": ("schedule", "antithetic_time", "num_steps", "latent_dim"),
    "d3pm": ("schedule", "schedule_eps", "antithetic_time", "transition", "num_steps", "hybrid_coeff",
             "num_neighbors", "neighbor_embed_dim"),
    "autoregressive": (),
}


def _identity(**process):
  config = config_lib.base_config()
  config.process.update(**process)
  return config_lib.run_identity(config)["process"]


def test_run_identity_holds_the_process_fields_and_only_them():
  masked = _identity(name="masked")
  assert masked["type"] == "MaskedDiffusion" and masked["schedule"] == {"kind": "linear", "eps": 1e-3}
  assert _identity(name="masked", num_steps=7, latent_dim=3, hybrid_coeff=0.5) == masked  # not read by it
  assert _identity(name="masked", schedule_eps=1e-2) != masked
  absorbing = _identity(name="d3pm", transition="absorbing")
  assert _identity(name="d3pm", transition="absorbing", num_neighbors=3) == absorbing
  neighbors = _identity(name="d3pm", transition="nearest_neighbor")
  assert neighbors["graph"] == {"num_neighbors": 8, "embed_dim": 32}
  assert _identity(name="d3pm", transition="nearest_neighbor", neighbor_embed_dim=4) != neighbors
  # A field with no config key (here D3PM's max_graph_time) is part of the identity all the same.
  d3pm_settings = config_lib.base_config().process
  d3pm_settings.update(name="d3pm", transition="uniform")
  process = experiment_lib.stand_in_process(d3pm_settings)
  longer = dataclasses.replace(process, max_graph_time=5.0)
  assert experiment_lib.process_identity(longer, None) != experiment_lib.process_identity(process, None)


@pytest.mark.parametrize("process", [dict(name="masked"), dict(name="gaussian", schedule="cosine"),
                                     dict(name="d3pm", transition="nearest_neighbor"), dict(name="autoregressive")])
def test_a_saved_identity_resumes_and_older_saved_settings_still_match(process):
  config = config_lib.base_config()
  config.process.update(**process)
  identity = config_lib.run_identity(config)
  saved = json.loads(json.dumps(identity))  # as a checkpoint holds it
  assert config_lib.saved_run_identity(saved)["process"] == identity["process"]
  # Older versions saved the settings: all of them, or (later) those each family read.
  every_setting = {**saved, "process": config.process.to_dict()}
  assert config_lib.saved_run_identity(every_setting)["process"] == identity["process"]
  read_keys = OLDER_READ_KEYS[config.process.name]
  read_by_family = {**saved, "process": {key: config.process[key] for key in ("name",) + read_keys}}
  assert config_lib.saved_run_identity(read_by_family)["process"] == identity["process"]


def test_importing_the_pipeline_imports_no_training_code():
  code = "import sys, ddlm_jax.pipeline; print('ddlm_jax.train' in sys.modules)"
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["False"]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A workdir with a tokenizer and a checkpoint, saved as training saves it, whose EMA differs
  from its parameters."""
  workdir = str(tmp_path_factory.mktemp("saved"))
  config = mdlm_tiny.get_config("char")
  config.data.update(num_train_docs=64, num_eval_docs=16)
  config.train.ema_decay = 0.5
  data = datasets.load_data(config_lib.data_config(config), workdir)
  experiment = experiment_lib.make_experiment(config, data.tokenizer.vocab_size)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
  _, state, _ = train.init_state(experiment, config, mesh, experiment_lib.make_optimizer(config.train))
  state = state.replace(ema_params=jax.tree.map(lambda p: p + 1.0, state.params))
  checkpoint.save(checkpoint.make_manager(workdir), 3, state, {}, config_lib.run_identity(config), config.to_dict(), {})
  return workdir, jax.device_get(state)


def test_load_restores_params_or_their_ema_without_an_optimizer(saved_run, monkeypatch):
  workdir, state = saved_run

  def no_optimizer(*args, **kwargs):
    raise AssertionError("load built an optimizer")

  monkeypatch.setattr(optax, "adamw", no_optimizer)
  for use_ema, expected in ((True, state.ema_params), (False, state.params)):
    loaded = jax.device_get(ddlm_jax.load(workdir, use_ema=use_ema).params)
    assert jax.tree.structure(loaded) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(a, b)


def untrained_network(process_name: str, length: int = 12):
  """(graphdef, params, process) of a freshly initialised one-layer network trained by the process."""
  config = config_lib.base_config()
  config.process.name = process_name
  config.data.seq_len = length
  config.model.update(num_layers=1, num_heads=2, embed_dim=16, mlp_dim=32, vocab_multiple=1)
  experiment = experiment_lib.make_experiment(config, experiment_lib.STAND_IN_VOCAB_SIZE)
  graphdef, params = nnx.split(transformer.Transformer(experiment.model, rngs=nnx.Rngs(0)), nnx.Param)
  return graphdef, params, experiment.process


def prompted_canvas(batch_size: int = 3, length: int = 12) -> tuple[jax.Array, jax.Array]:
  """(fixed tokens, fixed mask) [B, L]: two prompt tokens in every row, one more in row 0 at position 7."""
  fixed_BL = np.zeros((batch_size, length), bool)
  fixed_BL[:, :2] = fixed_BL[0, 7] = True
  ids_BL = np.random.default_rng(0).integers(len(tokenizers.SPECIAL_TOKENS), experiment_lib.STAND_IN_VOCAB_SIZE,
                                             (batch_size, length))
  return jnp.asarray(np.where(fixed_BL, ids_BL, tokenizers.PAD_ID), jnp.int32), jnp.asarray(fixed_BL)


def test_generate_tokens_decodes_the_autoregressive_baseline_as_the_uncached_reference_does():
  graphdef, params, process = untrained_network("autoregressive")
  fixed_tokens_BL, fixed_BL = prompted_canvas()
  config = samplers.SamplerConfig(temperature=1.0)
  key = jax.random.key(4)
  decode_fn = jax.jit(lambda params, tokens_BL, fixed_BL, key: experiment_lib.generate_tokens(
      graphdef, params, process, config, tokens_BL, fixed_BL, key, prefill_length=2))
  tokens_BL = decode_fn(params, fixed_tokens_BL, fixed_BL, key)
  cache, step_fn = samplers.recompute_decoder(experiment_lib.bind(graphdef, params), *fixed_BL.shape)
  reference_BL = samplers.decode(step_fn, cache, process, config, fixed_tokens_BL, fixed_BL, key)
  assert tokens_BL.dtype == jnp.int32
  np.testing.assert_array_equal(tokens_BL, reference_BL)
  tokens_BL, fixed_BL = np.asarray(tokens_BL), np.asarray(fixed_BL)
  np.testing.assert_array_equal(tokens_BL[fixed_BL], np.asarray(fixed_tokens_BL)[fixed_BL])
  assert len(np.unique(tokens_BL[:, 2:])) > 3  # drawn tokens, not a constant


def test_generate_tokens_samples_a_masked_process_under_jit_keeping_fixed_tokens():
  graphdef, params, process = untrained_network("masked")
  fixed_tokens_BL, fixed_BL = prompted_canvas()
  config = samplers.SamplerConfig(steps=4, strategy="random", record_trajectory=True)
  sample_fn = jax.jit(lambda params, tokens_BL, fixed_BL, key: experiment_lib.generate_tokens(
      graphdef, params, process, config, tokens_BL, fixed_BL, key))
  tokens_BL, trajectory_SBL = sample_fn(params, fixed_tokens_BL, fixed_BL, jax.random.key(1))
  tokens_BL, fixed_BL = np.asarray(tokens_BL), np.asarray(fixed_BL)
  assert trajectory_SBL.shape == (4, *fixed_BL.shape) and (trajectory_SBL[0] == process.mask_id).any()
  assert not (tokens_BL == process.mask_id).any()
  np.testing.assert_array_equal(tokens_BL[fixed_BL], np.asarray(fixed_tokens_BL)[fixed_BL])


@pytest.mark.parametrize("process_name,settings,message", [
    ("autoregressive", dict(record_trajectory=True), "record_trajectory needs a diffusion process"),
    ("autoregressive", dict(guidance_scale=2.0), "diffusion process"),
    ("masked", dict(prefill_length=2), "prefill_length applies to autoregressive and block decoding"),
])
def test_generate_tokens_refuses_what_the_process_cannot_do(process_name, settings, message):
  graphdef, params, process = untrained_network(process_name)
  fixed_tokens_BL, fixed_BL = prompted_canvas()
  prefill_length = settings.pop("prefill_length", 0)
  with pytest.raises(ValueError, match=message):
    experiment_lib.generate_tokens(graphdef, params, process, samplers.SamplerConfig(**settings), fixed_tokens_BL,
                                   fixed_BL, jax.random.key(0), prefill_length=prefill_length)
