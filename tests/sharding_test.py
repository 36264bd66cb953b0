"""Tests of meshes, logical-axis rules and sharded init on 8 fake CPUs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddlm_jax import sharding
from ddlm_jax.networks import transformer

CONFIG = transformer.TransformerConfig(
    vocab_size=16, max_len=8, num_layers=1, num_heads=2, embed_dim=16,
    mlp_dim=32, time_conditioning=True)

MESHES = {  # name -> (MeshConfig, number of devices)
    "single": (sharding.MeshConfig(data=1), 1),
    "data8": (sharding.MeshConfig(data=-1), 8),
    "data2_fsdp2_tensor2": (sharding.MeshConfig(data=2, fsdp=2, tensor=2), 8),
}


@pytest.fixture(scope="module")
def sharded_models():
  """name -> (mesh, graphdef, params) for every mesh in MESHES."""
  assert jax.device_count() == 8, "tests/conftest.py should fake 8 CPU devices"
  models = {}
  for name, (mesh_config, num_devices) in MESHES.items():
    mesh = sharding.make_mesh(mesh_config, jax.devices()[:num_devices])
    graphdef, params = sharding.create_sharded_model(
        CONFIG, mesh, sharding.DEFAULT_RULES, seed=0)
    models[name] = (mesh, graphdef, params)
  return models


@pytest.mark.parametrize("name", list(MESHES))
def test_params_are_created_with_the_prescribed_shardings(sharded_models, name):
  mesh, _, params = sharded_models[name]
  block = params["blocks"][0]
  expected = {
      ("embedding",): jax.P("tensor", "fsdp"),
      ("unembedding",): jax.P("fsdp", "tensor"),
      ("final_norm", "scale"): jax.P("fsdp"),
      ("blocks", 0, "attn", "query"): jax.P("fsdp", "tensor", None),
      ("blocks", 0, "attn", "out"): jax.P("tensor", None, "fsdp"),
      ("blocks", 0, "mlp", "wi"): jax.P("fsdp", "tensor"),
      ("blocks", 0, "mlp", "wo"): jax.P("tensor", "fsdp"),
      ("blocks", 0, "modulation", "kernel"): jax.P(None, None, "fsdp"),
      ("time_embedding", "w1"): jax.P(None, None),
  }
  for path, spec in expected.items():
    value = params
    for key in path:
      value = value[key]
    value = value[...]
    assert value.sharding.mesh == mesh, path
    assert value.sharding.spec == spec, path
    assert value.dtype == jnp.float32
  mlp_in = block["mlp"]["wi"][...]
  fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
  assert mlp_in.addressable_shards[0].data.shape == (16 // fsdp, 32 // tensor)


def test_forward_pass_agrees_on_all_meshes(sharded_models):
  tokens_BL = jax.random.randint(jax.random.key(0), (8, 8), 0, 16)
  t_B = jnp.linspace(0.0, 1.0, 8)
  logits = {}
  for name, (mesh, graphdef, params) in sharded_models.items():
    apply = jax.jit(
        lambda params, tokens, t: nnx.merge(graphdef, params)(tokens, t))
    logits[name] = np.asarray(apply(
        params, jax.device_put(tokens_BL, sharding.batch_sharding(mesh)),
        jax.device_put(t_B, sharding.replicated(mesh))))
  for name, logits_BLV in logits.items():
    np.testing.assert_allclose(logits_BLV, logits["single"], atol=1e-5,
                               err_msg=name)


def test_make_mesh_resolves_remaining_devices():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=2))
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3


@pytest.mark.parametrize("mesh_config", [
    sharding.MeshConfig(data=3),
    sharding.MeshConfig(data=2, fsdp=2),
    sharding.MeshConfig(data=-1, fsdp=3),
])
def test_make_mesh_product_mismatch_raises(mesh_config):
  with pytest.raises(ValueError, match="8 devices"):
    sharding.make_mesh(mesh_config)


def test_mesh_config_rejects_two_wildcards():
  with pytest.raises(ValueError, match="-1"):
    sharding.MeshConfig(data=-1, tensor=-1)


def test_logical_to_mesh_spec_follows_rules():
  spec = sharding.logical_to_mesh_spec(("batch", "length", None),
                                       sharding.DEFAULT_RULES)
  assert spec == jax.P(("data", "fsdp"), None, None)


@pytest.mark.parametrize("logical_axes", [
    ("embed", "embed"),
    ("batch", "embed"),  # batch -> (data, fsdp) and embed -> fsdp
])
def test_mesh_axis_used_twice_raises(logical_axes):
  with pytest.raises(ValueError, match="'fsdp'"):
    sharding.logical_to_mesh_spec(logical_axes, sharding.DEFAULT_RULES)


def test_unknown_logical_name_raises():
  with pytest.raises(ValueError, match="'embedding'"):
    sharding.logical_to_mesh_spec(("embedding",), sharding.DEFAULT_RULES)


def test_rule_given_twice_raises():
  rules = sharding.DEFAULT_RULES + (("embed", None),)
  with pytest.raises(ValueError, match="'embed'"):
    sharding.logical_to_mesh_spec(("embed",), rules)


def test_state_shardings_replicates_unnamed_and_checks_divisibility():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  state = {
      "count": jax.ShapeDtypeStruct((), jnp.int32),
      "w": nnx.Param(jax.ShapeDtypeStruct((4, 6), jnp.float32),
                     out_sharding=("embed", "mlp"), eager_sharding=False),
  }
  shardings = sharding.state_shardings(state, mesh, sharding.DEFAULT_RULES)
  assert shardings["count"].spec == jax.P()
  assert shardings["w"].get_value().spec == jax.P("fsdp", "tensor")

  state["w"] = nnx.Param(jax.ShapeDtypeStruct((4, 5), jnp.float32),
                         out_sharding=("embed", "mlp"), eager_sharding=False)
  with pytest.raises(ValueError, match=r"\['w'\].*size 5"):
    sharding.state_shardings(state, mesh, sharding.DEFAULT_RULES)


def test_batch_and_replicated_shardings():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  assert sharding.batch_sharding(mesh).spec == jax.P(("data", "fsdp"), None)
  assert sharding.replicated(mesh).is_fully_replicated
