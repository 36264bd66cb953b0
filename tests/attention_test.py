"""One attention function for every mask (networks/layers.py): its implementations agree with a
softmax written out by hand, and cached decoding reads only the filled part of the cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddlm_jax.networks import layers
from ddlm_jax.networks import transformer


def reference_attention(q_BTHK, k_BSHK, v_BSHK, mask_BTS):
  """softmax(q.k / sqrt(K)) v over the visible keys, by the book (float64 on the host)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q_BTHK, k_BSHK, v_BSHK))
  logits_BHTS = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
  logits_BHTS = np.where(np.asarray(mask_BTS)[:, None], logits_BHTS, -np.inf)
  probs_BHTS = np.exp(logits_BHTS - logits_BHTS.max(-1, keepdims=True))
  probs_BHTS /= probs_BHTS.sum(-1, keepdims=True)
  return np.einsum("bhts,bshk->bthk", probs_BHTS, v)


def qkv(batch=2, queries=11, keys=11, heads=2, head_dim=8, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (batch, queries, heads, head_dim)),
          jax.random.normal(kk, (batch, keys, heads, head_dim)),
          jax.random.normal(kv, (batch, keys, heads, head_dim)))


def block_causal_mask(length, block_size):
  """bool[1, L, L]: a query sees its own block and the blocks before it."""
  blocks_L = np.arange(length) // block_size
  return jnp.asarray(blocks_L[None, :] <= blocks_L[:, None])[None]


CAUSAL_11 = jnp.tril(jnp.ones((1, 11, 11), bool))
# Keys each row's queries see (a row's text and not what follows it): bool[2, 1, 11].
VISIBLE_B1S = (jnp.arange(11) < jnp.array([7, 3])[:, None])[:, None]


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
@pytest.mark.parametrize("chunk_size", [4, 11, 64])
@pytest.mark.parametrize("causal, mask_BTS, expected_mask", [
    (False, None, jnp.ones((1, 11, 11), bool)),
    (True, None, CAUSAL_11),
    (False, block_causal_mask(11, 3), block_causal_mask(11, 3)),
    (True, block_causal_mask(11, 3), block_causal_mask(11, 3) & CAUSAL_11),
    (False, VISIBLE_B1S, VISIBLE_B1S),
    (True, VISIBLE_B1S, VISIBLE_B1S & CAUSAL_11),
    (True, block_causal_mask(11, 3) & VISIBLE_B1S, block_causal_mask(11, 3) & VISIBLE_B1S & CAUSAL_11),
])
def test_every_implementation_and_mask_is_the_softmax_over_visible_keys(implementation, chunk_size, causal,
                                                                        mask_BTS, expected_mask):
  q, k, v = qkv()
  attend = jax.jit(lambda q, k, v: layers.attention(q, k, v, causal=causal, mask_BTS=mask_BTS,
                                                    implementation=implementation, chunk_size=chunk_size))
  np.testing.assert_allclose(attend(q, k, v), reference_attention(q, k, v, expected_mask), atol=1e-5)


def test_chunked_causal_attention_has_the_gradients_of_the_full_one():
  q, k, v = qkv(queries=13, keys=13)
  loss = lambda implementation: jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(layers.attention(
      q, k, v, causal=True, implementation=implementation, chunk_size=5))), argnums=(0, 1, 2)))
  for chunked, full in zip(loss("chunked")(q, k, v), loss("xla")(q, k, v)):
    np.testing.assert_allclose(chunked, full, atol=1e-5)


def test_chunked_causal_attention_skips_the_blocks_after_each_query_block():
  """At L = 12 in blocks of 4 the score and value matmuls cover 4 * (4 + 8 + 12) = 96 of the
  144 query-key pairs: XLA's count of the step's FLOPs falls by more than 30%."""
  q, k, v = qkv(queries=12, keys=12)
  def flops(implementation):
    attend = jax.jit(lambda q, k, v: layers.attention(q, k, v, causal=True, implementation=implementation,
                                                      chunk_size=4))
    return attend.lower(q, k, v).cost_analysis()["flops"]
  assert flops("chunked") < 0.7 * flops("xla")


@pytest.mark.parametrize("start, num_queries, chunk_size", [
    (0, 1, 4), (5, 1, 4), (8, 1, 4), (13, 1, 4), (0, 6, 4), (3, 7, 5), (14, 2, 5), (9, 1, 32)])
def test_cached_attention_is_causal_attention_over_the_filled_cache(start, num_queries, chunk_size):
  """Queries at [start, start + T) against a 16-slot cache whose slots from the end of the last
  chunk holding position start + T - 1 on are NaN: any read of them would poison the output."""
  max_len, end = 16, start + num_queries
  _, k, v = qkv(keys=end, seed=1)
  q = qkv(queries=num_queries, seed=2)[0]
  cache = layers.KVCache.zeros(2, max_len, 2, 8, jnp.float32).write(k, v, 0)
  chunk = min(chunk_size, max_len)
  poison_S = jnp.arange(max_len) >= min(-(-end // chunk) * chunk, max_len)
  poisoned = layers.KVCache(k_BHSK=jnp.where(poison_S[:, None], jnp.nan, cache.k_BHSK),
                            v_BHSK=jnp.where(poison_S[:, None], jnp.nan, cache.v_BHSK))
  out = jax.jit(layers.cached_attention, static_argnums=3)(q, poisoned, start, chunk_size)
  mask_1TS = (np.arange(end)[None, :] <= start + np.arange(num_queries)[:, None])[None]
  np.testing.assert_allclose(out, reference_attention(q, k, v, mask_1TS), atol=1e-5)


def test_cached_attention_takes_a_traced_start_inside_a_scan():
  _, k, v = qkv(keys=10, seed=1)
  cache = layers.KVCache.zeros(2, 10, 2, 8, jnp.float32).write(k, v, 0)
  q = qkv(queries=10, seed=2)[0]

  def step(_, position):
    q_B1HK = jax.lax.dynamic_slice_in_dim(q, position, 1, axis=1)
    return None, layers.cached_attention(q_B1HK, cache, position, 3)[:, 0]

  _, out_TBHK = jax.jit(lambda: jax.lax.scan(step, None, jnp.arange(10)))()
  np.testing.assert_allclose(out_TBHK.transpose(1, 0, 2, 3), reference_attention(q, k, v, CAUSAL_11[:, :10, :10]),
                             atol=1e-5)


def test_the_chunked_causal_network_equals_the_xla_one_forward_and_backward():
  settings = dict(vocab_size=13, max_len=12, num_layers=2, num_heads=2, embed_dim=16, mlp_dim=32, causal=True)
  xla = transformer.Transformer(transformer.TransformerConfig(**settings), rngs=nnx.Rngs(0))
  chunked = transformer.Transformer(
      transformer.TransformerConfig(**settings, attention="chunked", attention_chunk_size=5), rngs=nnx.Rngs(0))
  tokens_BL = jax.random.randint(jax.random.key(0), (2, 12), 0, 13)

  def loss_and_grads(model):
    graphdef, params = nnx.split(model)
    loss = lambda params: jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, params)(tokens_BL))[..., 0])
    return jax.jit(jax.value_and_grad(loss))(params)

  (xla_loss, xla_grads), (chunked_loss, chunked_grads) = loss_and_grads(xla), loss_and_grads(chunked)
  np.testing.assert_allclose(chunked_loss, xla_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), chunked_grads, xla_grads)


def test_attention_settings_are_checked():
  q, k, v = qkv()
  with pytest.raises(ValueError, match="not one of"):
    layers.attention(q, k, v, implementation="flash")
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
      layers.attention(q, k, v, implementation="cudnn")
  with pytest.raises(ValueError, match="as many keys as queries"):
    layers.attention(q[:, :5], k, v, causal=True)
  settings = dict(vocab_size=13, max_len=12)
  with pytest.raises(ValueError, match="attention must be one of"):
    transformer.TransformerConfig(**settings, attention="flash")
  with pytest.raises(ValueError, match="bfloat16"):
    transformer.TransformerConfig(**settings, attention="cudnn")
  with pytest.raises(ValueError, match="attention_chunk_size"):
    transformer.TransformerConfig(**settings, attention_chunk_size=0)
  with pytest.raises(ValueError, match="decode_chunk_size"):
    transformer.TransformerConfig(**settings, decode_chunk_size=-1)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention runs on NVIDIA GPUs only")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("visible_lengths", [None, (100, 37)])
def test_cudnn_attention_equals_the_xla_one(causal, visible_lengths):
  q, k, v = (x.astype(jnp.bfloat16) for x in qkv(queries=128, keys=128, head_dim=64))
  mask_B1S = None if visible_lengths is None else (jnp.arange(128) < jnp.array(visible_lengths)[:, None])[:, None]
  cudnn = layers.attention(q, k, v, causal=causal, mask_BTS=mask_B1S, implementation="cudnn")
  xla = layers.attention(q, k, v, causal=causal, mask_BTS=mask_B1S, implementation="xla")
  np.testing.assert_allclose(cudnn.astype(jnp.float32), xla.astype(jnp.float32), atol=2e-2)
