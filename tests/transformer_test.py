"""Tests of the transformer denoiser and its layers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddlm_jax.networks import layers
from ddlm_jax.networks import transformer

VOCAB, MAX_LEN = 13, 16


def _config(**overrides):
  settings = dict(vocab_size=VOCAB, max_len=MAX_LEN, num_layers=2, num_heads=2,
                  embed_dim=16, mlp_dim=32)
  settings.update(overrides)
  return transformer.TransformerConfig(**settings)


def _model(seed=0, **overrides):
  return transformer.Transformer(_config(**overrides), rngs=nnx.Rngs(seed))


def _randomize(model, seed=1):
  """Sets every parameter to N(0, 0.5^2): zero-initialised ones matter too."""
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  sizes = [x.size for x in leaves]
  noise = 0.5 * jax.random.normal(jax.random.key(seed), (sum(sizes),))
  chunks = jnp.split(noise, np.cumsum(sizes)[:-1])
  leaves = [c.reshape(x.shape) for c, x in zip(chunks, leaves)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def _jit_forward(model):
  """model(tokens, t) compiled once per input shape."""
  graphdef, params = nnx.split(model)
  apply = jax.jit(lambda params, *args: nnx.merge(graphdef, params)(*args))
  return lambda *args: apply(params, *args)


def _tokens(batch=2, length=8, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


def _loss_and_grads(model, tokens_BL, dropout_key):
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_fn(params):
    logits_BLV = nnx.merge(graphdef, params)(tokens_BL, dropout_key=dropout_key)
    log_probs_BLV = jax.nn.log_softmax(logits_BLV)
    return -jnp.take_along_axis(log_probs_BLV, tokens_BL[..., None], -1).mean()

  return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.mark.parametrize("causal", [False, True])
def test_any_length_up_to_max_len_gives_float32_logits(causal):
  forward = _jit_forward(_model(causal=causal))
  for length in (5, MAX_LEN):
    logits_BLV = forward(_tokens(3, length))
    assert logits_BLV.shape == (3, length, VOCAB)
    assert logits_BLV.dtype == jnp.float32
    assert np.all(np.isfinite(logits_BLV))


def _numpy_forward(model, tokens_BL, t_B):
  """The transformer's forward pass written again in float64 numpy, from its parameters: token
  ids int[B, L] (or points float[B, L, E] with latent_dim E) -> float64[B, L, V (or E)]."""
  config = model.config
  value = lambda param: np.asarray(param[...], np.float64)
  silu = lambda x: x / (1 + np.exp(-x))

  def norm(x_BLD, layer, shift_and_scale=None):
    h_BLD = x_BLD / np.sqrt((x_BLD**2).mean(-1, keepdims=True) + 1e-6) * value(layer.scale)
    if shift_and_scale is None:
      return h_BLD
    shift_BD, scale_BD = shift_and_scale
    return h_BLD * (1 + scale_BD[:, None]) + shift_BD[:, None]

  def modulations(modulation, c_BC):
    if c_BC is None:
      return [None] * 2
    m_BND = np.einsum("BC,CND->BND", silu(c_BC), value(modulation.kernel)) + value(modulation.bias)
    return [m_BND[:, i:i + 2].transpose(1, 0, 2) for i in range(0, m_BND.shape[1], 2)]

  def rope(x_BLHK):
    half = x_BLHK.shape[-1] // 2
    angles_L1J = np.arange(x_BLHK.shape[1])[:, None, None] * 1e4 ** (-np.arange(half) / half)
    x1, x2 = x_BLHK[..., :half], x_BLHK[..., half:]
    cos, sin = np.cos(angles_L1J), np.sin(angles_L1J)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  length = tokens_BL.shape[1]
  c_BC = None
  if config.time_conditioning:
    half = config.embed_dim // 2
    args_BJ = 1000 * np.asarray(t_B, np.float64)[:, None] * np.exp(-np.log(1e4) * np.arange(half) / half)
    embedding = model.time_embedding
    h_BC = np.concatenate([np.cos(args_BJ), np.sin(args_BJ)], -1) @ value(embedding.w1) + value(embedding.b1)
    c_BC = silu(h_BC) @ value(embedding.w2) + value(embedding.b2)
  if config.latent_dim:
    x_BLD = np.asarray(tokens_BL, np.float64) @ value(model.input_projection)
  else:
    x_BLD = value(model.embedding)[np.asarray(tokens_BL)]
  for block in model.blocks:
    attn_mod, mlp_mod = modulations(block.modulation, c_BC)
    h_BLD = norm(x_BLD, block.attn_norm, attn_mod)
    q, k, v = (np.einsum("BLD,DHK->BLHK", h_BLD, value(w))
               for w in (block.attn.query, block.attn.key, block.attn.value))
    scores_BHLS = np.einsum("BLHK,BSHK->BHLS", rope(q), rope(k)) / np.sqrt(q.shape[-1])
    if config.causal:
      scores_BHLS = np.where(np.tril(np.ones((length, length), bool)), scores_BHLS, -np.inf)
    probs_BHLS = np.exp(scores_BHLS - scores_BHLS.max(-1, keepdims=True))
    probs_BHLS /= probs_BHLS.sum(-1, keepdims=True)
    out_BLHK = np.einsum("BHLS,BSHK->BLHK", probs_BHLS, v)
    x_BLD = x_BLD + np.einsum("BLHK,HKD->BLD", out_BLHK, value(block.attn.out))
    h_BLF = norm(x_BLD, block.mlp_norm, mlp_mod) @ value(block.mlp.wi)
    gelu_BLF = 0.5 * h_BLF * (1 + np.tanh(np.sqrt(2 / np.pi) * (h_BLF + 0.044715 * h_BLF**3)))
    x_BLD = x_BLD + gelu_BLF @ value(block.mlp.wo)
  final_mod = modulations(model.final_modulation, c_BC)[0]
  return norm(x_BLD, model.final_norm, final_mod) @ value(model.unembedding)


@pytest.mark.parametrize("causal, time_conditioning, latent_dim", [
    (False, True, 0), (True, False, 0), (False, True, 6)])
def test_forward_matches_a_numpy_reference(causal, time_conditioning, latent_dim):
  model = _randomize(_model(causal=causal, time_conditioning=time_conditioning, latent_dim=latent_dim), seed=4)
  tokens_BL = jax.random.normal(jax.random.key(5), (2, 7, latent_dim)) if latent_dim else _tokens(2, 7)
  t_B = jnp.array([0.2, 0.7])
  expected_BLV = _numpy_forward(model, tokens_BL, t_B)
  assert np.abs(expected_BLV).max() > 1  # not a degenerate comparison
  np.testing.assert_allclose(_jit_forward(model)(tokens_BL, t_B), expected_BLV, rtol=1e-4, atol=1e-4)


def test_bidirectional_later_token_changes_earlier_logits():
  model = _model()
  tokens_BL = _tokens()
  changed_BL = tokens_BL.at[:, -1].set((tokens_BL[:, -1] + 1) % VOCAB)
  diff = jnp.abs(model(tokens_BL)[:, 0] - model(changed_BL)[:, 0]).max()
  assert diff > 1e-4


def test_causal_logits_never_see_later_tokens():
  forward = _jit_forward(_randomize(_model(causal=True)))
  tokens_BL = _tokens(length=8)
  logits_BLV = forward(tokens_BL)
  for j in range(8):
    changed_BL = tokens_BL.at[:, j].set((tokens_BL[:, j] + 1) % VOCAB)
    changed_logits_BLV = forward(changed_BL)
    np.testing.assert_array_equal(changed_logits_BLV[:, :j], logits_BLV[:, :j])
    assert jnp.abs(changed_logits_BLV[:, j] - logits_BLV[:, j]).max() > 1e-4


@pytest.mark.parametrize("attention", ["xla", "chunked"])
@pytest.mark.parametrize("kind", ["bidirectional", "causal", "block", "block_with_clean_copy"])
def test_hidden_keys_change_nothing_at_the_visible_positions(kind, attention):
  """Row b sees its first n_b positions: their logits are those of the row cut to n_b tokens, and
  the hidden positions' tokens (of both copies of a block pass) can be anything."""
  settings = dict(causal=kind == "causal", block_size=3 if kind.startswith("block") else 0)
  graphdef, params = nnx.split(_randomize(_model(attention=attention, attention_chunk_size=4, **settings)))
  apply = jax.jit(lambda params, tokens_BL, clean_BL, visible_BL: nnx.merge(graphdef, params)(
      tokens_BL, clean_tokens_BL=clean_BL if kind == "block_with_clean_copy" else None, visible_BL=visible_BL))
  forward = lambda tokens_BL, clean_BL, visible_BL=None: apply(params, tokens_BL, clean_BL, visible_BL)
  tokens_BL, clean_BL, other_BL = (_tokens(length=10, seed=seed) for seed in range(3))
  lengths_B = np.array([5, 7])
  visible_BL = jnp.arange(10) < lengths_B[:, None]
  logits_BLV = forward(tokens_BL, clean_BL, visible_BL)
  hidden_changed_BLV = forward(jnp.where(visible_BL, tokens_BL, other_BL), jnp.where(visible_BL, clean_BL, other_BL),
                               visible_BL)
  for row, length in enumerate(lengths_B):
    cut_LV = forward(tokens_BL[row:row + 1, :length], clean_BL[row:row + 1, :length])[0]
    np.testing.assert_allclose(logits_BLV[row, :length], cut_LV, atol=1e-5)
    np.testing.assert_allclose(hidden_changed_BLV[row, :length], cut_LV, atol=1e-5)
  if kind != "causal":  # without the mask, later tokens reach the visible positions
    assert jnp.abs(forward(tokens_BL, clean_BL)[0, :5] - logits_BLV[0, :5]).max() > 1e-3
  with pytest.raises(ValueError, match="visible_BL has shape"):
    forward(tokens_BL, clean_BL, visible_BL[:, :9])


def test_time_conditioning_changes_output_iff_enabled():
  tokens_BL = _tokens()
  t_lo, t_hi = jnp.array([0.1, 0.2]), jnp.array([0.8, 0.9])

  untrained = _model(time_conditioning=True)  # zero-initialised modulation
  np.testing.assert_allclose(untrained(tokens_BL, t_lo),
                             untrained(tokens_BL, t_hi), atol=1e-6)
  conditioned = _randomize(untrained)
  diff = jnp.abs(conditioned(tokens_BL, t_lo) - conditioned(tokens_BL, t_hi))
  assert diff.max() > 1e-3
  with pytest.raises(ValueError, match="t_B"):
    conditioned(tokens_BL)

  unconditioned = _randomize(_model(time_conditioning=False))
  np.testing.assert_array_equal(unconditioned(tokens_BL, t_lo),
                                unconditioned(tokens_BL, t_hi))
  np.testing.assert_array_equal(unconditioned(tokens_BL, t_lo),
                                unconditioned(tokens_BL))


def _has_remat(model, tokens_BL):
  """Whether the gradient of model's loss recomputes activations (a remat primitive)."""
  graphdef, params = nnx.split(model, nnx.Param)
  loss_fn = lambda params: nnx.merge(graphdef, params)(tokens_BL).sum()
  jaxpr = str(jax.make_jaxpr(jax.grad(loss_fn))(params))
  return "remat" in jaxpr or "checkpoint" in jaxpr


def test_remat_gives_same_loss_and_gradients():
  tokens_BL, key = _tokens(), jax.random.key(3)
  model, remat_model = _model(dropout_rate=0.1), _model(dropout_rate=0.1, remat=True)
  loss, grads = _loss_and_grads(model, tokens_BL, key)
  remat_loss, remat_grads = _loss_and_grads(remat_model, tokens_BL, key)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               remat_grads, grads)
  assert _has_remat(remat_model, tokens_BL) and not _has_remat(model, tokens_BL)


def test_dropout_only_with_key():
  model = _model(dropout_rate=0.5)
  tokens_BL = _tokens()
  np.testing.assert_array_equal(model(tokens_BL), model(tokens_BL))
  dropped = model(tokens_BL, dropout_key=jax.random.key(0))
  assert jnp.abs(dropped - model(tokens_BL)).max() > 1e-3


def test_dropout_zeroes_a_share_rate_and_rescales_the_rest():
  x = jnp.arange(1.0, 40_001.0).reshape(200, 200)
  dropped = np.asarray(layers.dropout(x, 0.25, jax.random.key(0)))
  kept = dropped != 0
  np.testing.assert_allclose(dropped[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
  assert abs(kept.mean() - 0.75) < 0.01  # 5 binomial standard errors of 40,000 draws
  assert layers.dropout(x, 0.25, None) is x and layers.dropout(x, 0.0, jax.random.key(0)) is x


def test_bfloat16_compute_is_close_to_float32():
  tokens_BL = _tokens()
  model_bf16 = _model(dtype="bfloat16")
  logits_BLV = _model(dtype="float32")(tokens_BL)
  logits_bf16_BLV = model_bf16(tokens_BL)
  assert logits_bf16_BLV.dtype == jnp.float32
  assert model_bf16.embedding[...].dtype == jnp.float32
  assert jnp.abs(logits_bf16_BLV - logits_BLV).max() > 0  # really bf16
  np.testing.assert_allclose(logits_bf16_BLV, logits_BLV, atol=0.05)


def test_sequence_longer_than_max_len_raises():
  with pytest.raises(ValueError, match="max_len"):
    _model()(_tokens(length=MAX_LEN + 1))


@pytest.mark.parametrize("overrides, field", [
    (dict(vocab_size=0), "vocab_size"),
    (dict(max_len=-1), "max_len"),
    (dict(num_layers=0), "num_layers"),
    (dict(mlp_dim=0), "mlp_dim"),
    (dict(num_heads=3), "num_heads"),
    (dict(embed_dim=12, num_heads=4), "head_dim"),
    (dict(dropout_rate=1.0), "dropout_rate"),
    (dict(dtype="float16"), "dtype"),
    (dict(latent_dim=-1), "latent_dim"),
    (dict(latent_dim=4, causal=True), "latent_dim"),
])
def test_invalid_config_raises_naming_the_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    _config(**overrides)


@pytest.mark.parametrize("time_conditioning, latent_dim", [(False, 0), (True, 0), (True, 6)])
def test_num_params_counts_the_state(time_conditioning, latent_dim):
  config = _config(time_conditioning=time_conditioning, latent_dim=latent_dim)
  model = transformer.Transformer(config, rngs=nnx.Rngs(0))
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert transformer.num_params(config) == sum(x.size for x in leaves)


@pytest.mark.parametrize("latent_dim", [0, 6])
def test_flops_per_token_counts_the_matmul_weights(latent_dim):
  config = _config(num_layers=3, latent_dim=latent_dim)
  model = transformer.Transformer(config, rngs=nnx.Rngs(0))
  input_projection = model.input_projection[...].size if latent_dim else 0
  matmul_params = model.unembedding[...].size + input_projection + sum(
      w[...].size for block in model.blocks
      for w in (block.attn.query, block.attn.key, block.attn.value,
                block.attn.out, block.mlp.wi, block.mlp.wo))
  attention = 12 * config.num_layers * config.embed_dim * 10
  expected = 6 * matmul_params + attention
  assert transformer.flops_per_token(config, 10) == expected


def test_rope_scores_depend_only_on_relative_position():
  q_key, k_key = jax.random.split(jax.random.key(0))
  q_1L1K = jax.random.normal(q_key, (1, 1, 1, 8))
  k_1L1K = jax.random.normal(k_key, (1, 1, 1, 8))

  def score(q_position, k_position):
    q = layers.apply_rope(q_1L1K, jnp.array([[q_position]]))
    k = layers.apply_rope(k_1L1K, jnp.array([[k_position]]))
    return jnp.sum(q * k)

  for q_position, k_position in [(0, 0), (3, 1), (2, 7)]:
    for shift in (1, 5, 100):
      np.testing.assert_allclose(score(q_position + shift, k_position + shift),
                                 score(q_position, k_position), rtol=1e-4)
  assert jnp.abs(score(3, 1) - score(1, 1)) > 1e-3


def _decode_in_chunks(model, tokens_BL, t_B, prefill):
  """Logits of model.decode fed a prefill chunk, a chunk of 3, then one token
  per `lax.scan` step; and the final cache."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, tokens_BL, t_B):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(tokens_BL.shape[0])
    first_BPV, cache = model.decode(tokens_BL[:, :prefill], 0, cache, t_B)
    second_B3V, cache = model.decode(tokens_BL[:, prefill:prefill + 3],
                                     prefill, cache, t_B)

    def step(cache, position):
      token_B1 = jax.lax.dynamic_slice_in_dim(tokens_BL, position, 1, axis=1)
      logits_B1V, cache = model.decode(token_B1, position, cache, t_B)
      return cache, logits_B1V[:, 0]

    positions = jnp.arange(prefill + 3, tokens_BL.shape[1])
    cache, rest_LBV = jax.lax.scan(step, cache, positions)
    logits_BLV = jnp.concatenate(
        [first_BPV, second_B3V, rest_LBV.transpose(1, 0, 2)], axis=1)
    return logits_BLV, cache

  return run(state, tokens_BL, t_B)


# bfloat16: the cache holds the same bf16 keys and values as the bf16 forward,
# but decoding sums the softmax chunk by chunk in float32 while the forward
# rounds the normalised probabilities to bf16: they differ by about as much as
# bf16 differs from float32 (~0.05).
@pytest.mark.parametrize("time_conditioning, dtype, atol",
                         [(True, "float32", 1e-5), (False, "bfloat16", 0.1)])
def test_cached_decoding_matches_the_full_causal_forward(time_conditioning,
                                                         dtype, atol):
  model = _randomize(_model(causal=True, time_conditioning=time_conditioning,
                            dtype=dtype))
  tokens_BL, t_B = _tokens(3, 12), jnp.array([0.0, 0.3, 0.9])
  logits_BLV, cache = _decode_in_chunks(model, tokens_BL, t_B, prefill=5)
  full_BLV = _jit_forward(model)(tokens_BL, t_B)
  np.testing.assert_allclose(logits_BLV, full_BLV, rtol=1e-5, atol=atol)
  assert len(cache) == 2
  for layer_cache in cache:  # [B, H, max_len, K]; slots past 12 untouched
    assert layer_cache.k_BHSK.shape == (3, 2, MAX_LEN, 8)
    assert layer_cache.k_BHSK.dtype == jnp.dtype(dtype)
    assert not layer_cache.k_BHSK[:, :, 12:].any()
    assert not layer_cache.v_BHSK[:, :, 12:].any()
    assert layer_cache.k_BHSK[:, :, :12].any(axis=(0, 1, 3)).all()


def test_a_bidirectional_model_over_a_cache_of_its_whole_canvas_is_its_forward():
  """Every query sees the whole cache: one pass over the canvas equals `__call__`, and a later
  window over that cache equals `__call__` on the canvas with the window changed only where the
  window's own keys were refreshed (the other positions' keys are the stale ones by design)."""
  model = _model(causal=False, time_conditioning=True)
  _randomize(model)
  graphdef, params = nnx.split(model, nnx.Param)
  tokens_BL, t_B = _tokens(2, MAX_LEN), jnp.array([0.3, 0.8])

  @jax.jit
  def outputs(params):
    model = nnx.merge(graphdef, params)
    logits_BLV, cache = model.decode(tokens_BL, 0, model.init_cache(2, MAX_LEN), t_B)
    return logits_BLV, model(tokens_BL, t_B), model.decode(tokens_BL[:, 4:8], 4, cache, t_B)[0]

  logits_BLV, full_BLV, again_BTV = outputs(params)
  np.testing.assert_allclose(logits_BLV, full_BLV, atol=1e-5)
  np.testing.assert_allclose(again_BTV, logits_BLV[:, 4:8], atol=1e-5)


def test_cached_decoding_needs_a_token_model_and_a_cache_that_fits():
  with pytest.raises(ValueError, match="token model"):
    _model(latent_dim=4, time_conditioning=True).init_cache(2)
  model = _model(causal=True)
  with pytest.raises(ValueError, match="max_len"):
    model.init_cache(2, MAX_LEN + 1)
  with pytest.raises(ValueError, match="do not fit"):
    model.decode(_tokens(2, 5), 0, model.init_cache(2, 4))
