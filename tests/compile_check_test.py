"""The compile-only check on tiny configs over the 8 fake CPU devices of conftest: its byte counts
against the closed form of the parameters, its FLOPs against 6 N per token, and its budget."""
import jax
import pytest
from flax import nnx

from ddlm_jax import compile_check
from ddlm_jax import experiment as experiment_lib
from ddlm_jax.networks import transformer
from experiments import ar_tiny
from experiments import mdlm_tiny


def tiny_config(get_config=mdlm_tiny.get_config, **mesh):
  config = get_config()
  config.sample.num_samples = 8  # splits over the 8 devices
  config.train.ema_decay = 0.9
  config.mesh.update(**mesh)
  return config


def network(config):
  return experiment_lib.make_experiment(config, compile_check.config_vocab_size(config)).model


@pytest.fixture(scope="module")
def data_parallel():
  """(config, its report on a mesh of 8 data shards, checked against a budget it fits)."""
  config = tiny_config()
  return config, compile_check.check(config, memory_budget_gib=1.0)


def test_parameter_and_optimizer_bytes_are_the_closed_form(data_parallel):
  config, report = data_parallel
  params = nnx.split(transformer.Transformer(network(config), rngs=nnx.Rngs(0)), nnx.Param)[1]
  num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
  assert report.num_devices == 8 and report.mesh_shape["data"] == 8
  assert report.num_params == num_params
  assert report.param_bytes == report.ema_bytes == 4 * num_params  # float32, a full copy per data shard
  assert 0 <= report.optimizer_bytes - 2 * report.param_bytes <= 16  # Adam's two moments and step counts
  batch_bytes = config.train.batch_size // 8 * config.data.seq_len * 4
  assert report.train_tokens == config.train.batch_size // 8 * config.data.seq_len
  # The step's inputs are the state, the batch shard, the key and the step count; the state is donated.
  state_bytes = report.param_bytes + report.optimizer_bytes + report.ema_bytes
  assert 0 <= report.train_step.argument_bytes - state_bytes - batch_bytes <= 16
  assert state_bytes <= report.train_step.alias_bytes <= state_bytes + 16
  assert report.train_step.temp_bytes > 0 and report.sampler.argument_bytes >= report.param_bytes


def test_flops_are_six_per_parameter_per_token(data_parallel):
  config, report = data_parallel
  flops_per_token = transformer.flops_per_token(network(config), config.data.seq_len)  # 6 N + attention
  assert 0.9 < report.train_step.flops / (flops_per_token * report.train_tokens) < 1.3
  # One step of the scan sampler: a forward pass (2 N per token) over this device's rows.
  sample_tokens = config.sample.num_samples // 8 * config.data.seq_len
  assert 0.9 < report.sampler.flops / (flops_per_token / 3 * sample_tokens) < 1.3
  assert report.sampler_steps == config.sample.steps


def test_fsdp_splits_parameters_and_optimizer_over_devices(data_parallel):
  _, replicated = data_parallel
  report = compile_check.compile_report(tiny_config(data=1, fsdp=8))
  assert report.mesh_shape == {"data": 1, "fsdp": 8, "tensor": 1}
  # Every matrix splits its embed dimension over the 8 devices; only norm scales stay whole.
  assert report.param_bytes == pytest.approx(replicated.param_bytes / 8, rel=0.05)
  assert report.optimizer_bytes == pytest.approx(replicated.optimizer_bytes / 8, rel=0.05)
  assert report.train_step.flops == pytest.approx(replicated.train_step.flops, rel=0.1)  # same tokens per device


def test_a_budget_too_small_fails_naming_it(data_parallel):
  _, report = data_parallel
  peak_gib = report.train_step.peak_bytes / compile_check.GIB
  compile_check.check_budget(report, peak_gib * 1.01)
  with pytest.raises(compile_check.MemoryBudgetError, match=r"the train step needs .* [GM]iB per device, over the "
                     r"budget of .* GiB .*config.mesh.fsdp"):
    compile_check.check_budget(report, peak_gib * 0.99)
  with pytest.raises(ValueError, match="positive number of GiB, got nan"):
    compile_check.check_budget(report, float("nan"))


def test_autoregressive_decoding_runs_one_position_per_step():
  config = tiny_config(ar_tiny.get_config)
  report = compile_check.compile_report(config)
  flops_per_token = transformer.flops_per_token(network(config), config.data.seq_len)
  assert 0.9 < report.train_step.flops / (flops_per_token * report.train_tokens) < 1.3
  assert report.sampler_steps == config.data.seq_len
  # A step of cached decoding runs one position of each row: about a token's forward pass (and attention
  # over the cache) per row, where a pass over the canvas would cost seq_len tokens'.
  rows_per_device = config.sample.num_samples // 8
  assert 0 < report.sampler.flops < 4 * flops_per_token / 3 * rows_per_device


def test_bad_settings_are_refused_before_compiling():
  config = tiny_config()
  config.data.tokenizer = "char"
  with pytest.raises(ValueError, match="pass vocab_size"):
    compile_check.compile_report(config)
  config = tiny_config()
  config.sample.num_samples = 4
  with pytest.raises(ValueError, match=r"config.sample.num_samples=4 does not split over the mesh's 8"):
    compile_check.compile_report(config)
