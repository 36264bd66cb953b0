"""The user-facing model: `ddlm_jax.load(workdir)` -> Pipeline with generate(), translate() and score()."""
import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ddlm_jax import checkpoint
from ddlm_jax import config as config_lib
from ddlm_jax import evaluate
from ddlm_jax import experiment as experiment_lib
from ddlm_jax import guidance
from ddlm_jax import progress
from ddlm_jax import samplers
from ddlm_jax import sharding
from ddlm_jax.data import datasets
from ddlm_jax.data import pairs
from ddlm_jax.data import tokenizers
from ddlm_jax.decoding import blockwise
from ddlm_jax.decoding import speculative
from ddlm_jax.processes import block
from ddlm_jax.processes import masked


def _split_guide(guide_fn: guidance.GuideFn | None) -> tuple[list, Any]:
  """(arrays, static rest) of a guide pytree: the arrays are traced arguments of a jitted sampler;
  the rest (tree structure, static fields, leaves that are not arrays, such as a plain function)
  keys its compile cache. ([], None) without a guide."""
  if guide_fn is None:
    return [], None
  leaves, treedef = jax.tree.flatten(guide_fn)
  is_array = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]
  return ([leaf for leaf, array in zip(leaves, is_array) if array],
          (treedef, tuple(None if array else leaf for leaf, array in zip(leaves, is_array))))


def _join_guide(arrays: Sequence[Any], static: Any) -> guidance.GuideFn | None:
  """The guide that `_split_guide` took apart."""
  if static is None:
    return None
  treedef, others = static
  arrays = iter(arrays)
  return jax.tree.unflatten(treedef, [next(arrays) if leaf is None else leaf for leaf in others])


@dataclasses.dataclass
class Pipeline:
  """A trained model with its tokenizer and process.

  Attributes:
    graphdef, params: the network (`nnx.merge(graphdef, params)`).
    tokenizer: the run's tokenizer.
    process: the process the network was trained under (a diffusion family or the AR baseline).
    seq_len: the canvas length the network was trained on (its max_len).
    config: the experiment config.
    params_name: which parameters these are, 'EMA' (the run's average) or 'raw'.
    provenance: the run this one started from (`config.init_from`, see `warm_start`), and that run's
      in turn; {} for a run trained from scratch.
    mesh: the device mesh the parameters lie on; the sampler's and the bound's outputs are replicated
      over it, so that every process of a multi-process run reads them (None: wherever JAX puts them).
  """
  graphdef: nnx.GraphDef
  params: Any
  tokenizer: tokenizers.Tokenizer
  process: Any
  seq_len: int
  config: ml_collections.ConfigDict
  params_name: str = "raw"
  provenance: dict = dataclasses.field(default_factory=dict)
  mesh: jax.sharding.Mesh | None = None

  def __post_init__(self):
    self._pairs = self.config.data.task != "lm"
    self._nelbo_fns = {}
    self._samplers = {}
    self._window_listener = None  # what a block-by-block decoder's windows report to (`_run`)

  def _nelbo_fn(self, exact_time_sum: bool) -> evaluate.NelboFn:
    """The jitted bound (every step of it summed with `exact_time_sum`), built once per kind."""
    if exact_time_sum not in self._nelbo_fns:
      self._nelbo_fns[exact_time_sum] = experiment_lib.make_nelbo_fn(
          self.graphdef, self.process, self.mesh, exact_time_sum=exact_time_sum, pairs=self._pairs)
    return self._nelbo_fns[exact_time_sum]

  def _sampler(self, sampler_config: config_lib.DecodingConfig, prefill_length: int, pad_after_eos: bool,
               guide_fn: guidance.GuideFn | None, drafter: "Pipeline | None" = None, streamed: bool = False):
    """The jitted `experiment.generate_tokens` of one configuration (compiled once per batch and
    length; for the autoregressive baseline, after a prefill of the rows' common prompt prefix). A
    guide's arrays are arguments of the jitted function (`_split_guide`), so guides of one
    structure share it whatever their parameters; so are a speculative drafter's parameters.
    `streamed`: block-by-block decoding reports each window to the host (`_window_done`), the
    only host round-trip inside the loop, taken only when asked for."""
    guide_static = _split_guide(guide_fn)[1]
    drafter_static = None if drafter is None else (drafter.graphdef, drafter.process)
    name = (sampler_config, prefill_length, pad_after_eos, guide_static, drafter_static, streamed)
    if name in self._samplers:
      return self._samplers[name]
    special_ids = dict(eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id) if pad_after_eos else {}
    on_window = self._window_done if streamed else None

    def run(params, fixed_tokens_BL, fixed_BL, condition_BL, key, row_ids_B, guide_arrays, drafter_params):
      drafter_fn = None if drafter is None else speculative.diffusion_drafter(
          experiment_lib.bind(drafter.graphdef, drafter_params), drafter.process)
      return experiment_lib.generate_tokens(
          self.graphdef, params, self.process, sampler_config, fixed_tokens_BL, fixed_BL, key, row_ids_B=row_ids_B,
          condition_BL=condition_BL, null_id=self.tokenizer.pad_id, guide_fn=_join_guide(guide_arrays, guide_static),
          prefill_length=prefill_length, drafter=drafter_fn, on_window=on_window, **special_ids)
    self._samplers[name] = jax.jit(run, out_shardings=None if self.mesh is None else sharding.replicated(self.mesh))
    return self._samplers[name]

  def _window_done(self, windows_done: np.ndarray, canvas_BL: np.ndarray) -> None:
    """Host end of a block-by-block decoder's `on_window`: passes the report to the listener."""
    if self._window_listener is not None:
      self._window_listener(int(windows_done), np.asarray(canvas_BL))

  def _run(self, fixed_tokens_NL: np.ndarray, fixed_NL: np.ndarray, condition_NL: np.ndarray,
           sampler_config: config_lib.DecodingConfig, seed: int, batch_size: int, pad_after_eos: bool,
           guide_fn: guidance.GuideFn | None = None, drafter: "Pipeline | None" = None,
           stream: Callable[[int, list[str]], None] | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Sampled canvases int32[N, L], in batches; row n's randomness depends only on (seed, n).
    With `sampler_config.record_trajectory`, also the canvas after every step int32[steps, N, L].
    A progress bar counts batches, or with `stream` (block-by-block decoding) windows, which
    `stream` receives as (index of the batch's first text, its texts so far)."""
    num_rows = len(fixed_NL)
    record = getattr(sampler_config, "record_trajectory", False)
    key = jax.random.key(seed)
    batch_size = min(batch_size, 1 << (num_rows - 1).bit_length())  # few shapes, little padding
    guide_arrays = _split_guide(guide_fn)[0]
    tokens, trajectories = [], []
    batch_starts = range(0, num_rows, batch_size)
    windows = fixed_NL.shape[1] // sampler_config.block_size if stream is not None else 0
    bar = _progress_bar(len(batch_starts) * max(windows, 1), "generate", "window" if windows else "batch")
    for batch, start in enumerate(batch_starts):
      rows = np.arange(start, min(start + batch_size, num_rows))

      def on_window(windows_done, canvas_BL, batch=batch, start=start, rows=rows):
        bar.update(batch * windows + windows_done - bar.n)
        end = windows_done * sampler_config.block_size
        stream(start, [self.tokenizer.decode(row[:end]) for row in canvas_BL[:len(rows)].tolist()])
      self._window_listener = on_window if stream is not None else None
      padded = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])
      run = self._sampler(sampler_config, self._prefill_length(sampler_config, fixed_NL[padded]), pad_after_eos,
                          guide_fn, drafter, streamed=stream is not None)
      outputs = run(self.params, fixed_tokens_NL[padded], fixed_NL[padded], condition_NL[padded], key,
                    jnp.asarray(padded), guide_arrays, None if drafter is None else drafter.params)
      tokens_BL, trajectory_SBL = outputs if record else (outputs, None)
      tokens.append(np.asarray(tokens_BL)[:len(rows)])
      if record:
        trajectories.append(np.asarray(trajectory_SBL)[:, :len(rows)])
      bar.update((batch + 1) * max(windows, 1) - bar.n)  # rows done early skip windows
    self._window_listener = None
    bar.close()
    tokens_NL = np.concatenate(tokens)
    return (tokens_NL, np.concatenate(trajectories, axis=1)) if record else tokens_NL

  def _prefill_length(self, sampler_config, fixed_BL: np.ndarray) -> int:
    """The leading positions fixed in every row that a cached decoder runs as one chunk: for the
    autoregressive baseline the largest power of two within them, for block diffusion's exact cache
    a power of two of whole blocks; 0 for the others. Few lengths, few compilations."""
    if isinstance(sampler_config, speculative.SpeculativeConfig):
      return 0
    if self.process.causal_network:
      unit = 1
    elif isinstance(sampler_config, blockwise.BlockwiseConfig) and sampler_config.cache == "exact":
      unit = sampler_config.block_size
    else:
      return 0
    units = samplers.fixed_prefix_length(fixed_BL) // unit
    return unit << (units.bit_length() - 1) if units else 0

  def _sampler_config(self, settings: dict) -> config_lib.DecodingConfig:
    """The run's `config.sample` settings with the given ones on top."""
    return config_lib.sampler_config(self.config, **settings)

  def generate(self, prompts: str | Sequence[str] | None = None, *, num_samples: int | None = None,
               length: int | None = None, max_new_tokens: int | None = None,
               constraints: Sequence[Mapping[int, str]] | None = None, seed: int = 0, batch_size: int = 64,
               guide_fn: guidance.GuideFn | None = None, record_trajectory: bool = False,
               drafter: "Pipeline | None" = None, stream: Callable[[int, list[str]], None] | None = None,
               **settings) -> list[str] | tuple[list[str], np.ndarray]:
    """Samples texts: from scratch, continuing prompts, and/or with tokens fixed anywhere (infilling).

    Args:
      prompts: a text, or texts, whose tokens are fixed at the start of the canvas; None samples
        `num_samples` texts (or one per constraint) from scratch.
      num_samples: number of unconditional samples (default: the config's sample.num_samples).
      length: canvas length in tokens, prompt included (default and maximum: the training length).
      max_new_tokens: at most this many tokens after each row's prompt (the rest of its canvas is
        [PAD]); the canvas is then as long as the longest prompt plus these, within `length`, and
        rounded up to whole windows for block-by-block decoding. Block-by-block, autoregressive
        and speculative decoding stop once every row of a batch has its [EOS].
      constraints: per text, {token position: text}: the text's tokens are fixed from that
        position on (e.g. {4: " blue"}); fixed tokens are never changed.
      seed: the i-th text's randomness depends only on (seed, i), not on the batch it lands in.
      batch_size: rows per sampler call.
      guide_fn: classifier guidance for the Gaussian family (`guidance.classifier_guidance`). The
        sampler compiles once for guides of one structure when their arrays are pytree leaves (as
        with `control.attribute_log_prob_fn`), and once per function for a plain function inside.
      record_trajectory: also return the canvas after every step (diffusion families).
      drafter: method 'speculative': a masked or block diffusion Pipeline with this one's tokenizer,
        whose drafts this autoregressive model verifies (the output follows this model exactly).
      stream: block-by-block decoding: called after each window with (index of the batch's first
        text, the batch's texts so far), e.g. `lambda first, texts: print(texts[0])`.
      **settings: decoding settings over the run's `config.sample` (see `config.sampler_config`):
        method ('auto', 'scan', 'blockwise', 'speculative'), steps, strategy, temperature, top_k,
        top_p, block_length, eta, clamp (`samplers.SamplerConfig`), cache, steps_per_block,
        threshold, factor, entropy_bound (`decoding.blockwise.BlockwiseConfig`), draft_length and
        draft_steps (`decoding.speculative.SpeculativeConfig`); the autoregressive baseline's own
        decoding uses only temperature, top_k and top_p. guidance_scale is `translate`'s: a sample from scratch has no condition
        to guide toward.

    Returns:
      The decoded texts (prompt included), up to their first [EOS], one per prompt (a list of one
      for a single text); with `record_trajectory`, (texts, trajectory int32[steps, N, L]), whose
      rows `tokenizer.decode(row, show_mask=True)` shows.
    """
    if isinstance(prompts, str):
      prompts = [prompts]
    if prompts is not None and not len(prompts) or constraints is not None and not len(constraints):
      raise ValueError("prompts and constraints must be None or non-empty; generate(None, num_samples=n) "
                       "samples n texts from scratch")
    length = self.seq_len if length is None else length
    if not 1 <= length <= self.seq_len:
      raise ValueError(f"length must lie in [1, {self.seq_len}] (the model's training length), got {length}")
    if settings.get("guidance_scale", 1.0) != 1.0:
      raise ValueError("guidance_scale (classifier-free guidance) needs a condition, and generate has none: use "
                       "translate(sources, guidance_scale=...) on a model trained on a pair task with "
                       "config.train.condition_dropout (or guide_fn= for classifier guidance)")
    num_texts = (len(prompts) if prompts is not None else len(constraints) if constraints is not None
                 else self.config.sample.num_samples if num_samples is None else num_samples)
    if num_texts < 1:
      raise ValueError(f"num_samples must be >= 1, got {num_texts}")
    prompts = [""] * num_texts if prompts is None else list(prompts)
    constraints = [{}] * num_texts if constraints is None else list(constraints)
    if len(constraints) != num_texts:
      raise ValueError(f"{len(constraints)} constraints for {num_texts} texts")
    sampler_config = self._sampler_config({**settings, "guidance_scale": 1.0, "record_trajectory": record_trajectory})
    if max_new_tokens is not None:
      if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
      prompt_lengths_N = np.array([len(self.tokenizer.encode(prompt)) for prompt in prompts])
      window = sampler_config.block_size if isinstance(sampler_config, blockwise.BlockwiseConfig) else 1
      length = min(length, -(-(prompt_lengths_N.max() + max_new_tokens) // window) * window)
    fixed_tokens_NL, fixed_NL = self._canvas(prompts, constraints, length)
    if max_new_tokens is not None:
      past_end_NL = np.arange(length) >= (prompt_lengths_N + max_new_tokens)[:, None]
      fixed_tokens_NL = np.where(past_end_NL & ~fixed_NL, self.tokenizer.pad_id, fixed_tokens_NL)
      fixed_NL = fixed_NL | past_end_NL
    if isinstance(sampler_config, speculative.SpeculativeConfig) != (drafter is not None):
      raise ValueError("method 'speculative' and drafter= go together: a drafter Pipeline proposes the tokens "
                       "that this autoregressive model verifies")
    if drafter is not None:
      self._check_drafter(drafter, length)
    if stream is not None and not isinstance(sampler_config, blockwise.BlockwiseConfig):
      raise ValueError("stream reports the windows of block-by-block decoding: it needs method 'blockwise' "
                       "(the default of block diffusion)")
    outputs = self._run(fixed_tokens_NL, fixed_NL, np.zeros_like(fixed_NL), sampler_config, seed, batch_size,
                        pad_after_eos=True, guide_fn=guide_fn, drafter=drafter, stream=stream)
    tokens_NL, trajectory_SNL = outputs if record_trajectory else (outputs, None)
    texts = [self.tokenizer.decode(row) for row in tokens_NL.tolist()]
    return (texts, trajectory_SNL) if record_trajectory else texts

  def translate(self, sources: str | Sequence[str], *, num_candidates: int = 1, seed: int = 0,
                batch_size: int = 64, **settings) -> list[str]:
    """The target of each source, for a model trained on a pair task (DiffuSeq-style seq2seq).

    The canvas is [source tokens, EOS, target...]: the source stays fixed (clean, for the Gaussian
    family) and the target is generated. With `num_candidates` > 1 each source gets that many
    samples and the minimum-Bayes-risk one is returned (`evaluate.mbr_select`, DiffuSeq's decoding).

    Args:
      sources: source texts (serialised records for 'data_to_text', texts for 'text_to_data'), or
        one source text (a list of one target is returned).
      num_candidates: samples per source for MBR.
      seed, batch_size: as in `generate`.
      **settings: sampler settings over the run's `config.sample`, including guidance_scale
        (classifier-free guidance with the source as the condition).
    """
    if not self._pairs:
      raise ValueError("translate needs a model trained on a pair task (config.data.task), "
                       f"this one was trained on {self.config.data.task!r}")
    if num_candidates < 1:
      raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    sources = [sources] if isinstance(sources, str) else sources
    if not len(sources):
      raise ValueError("sources is empty: translate needs at least one source text")
    if settings.get("record_trajectory"):
      raise ValueError("record_trajectory applies to generate, not to translate")
    eos_id = self.tokenizer.eos_id
    tokens_NL = np.full((len(sources), self.seq_len), self.tokenizer.pad_id, np.int32)
    for row, source in enumerate(sources):
      ids = pairs.encode_pair(self.tokenizer.encode(source), [], eos_id)
      if len(ids) >= self.seq_len:
        raise ValueError(f"source {row} has {len(ids) - 1} tokens; with its [EOS] it leaves no room for a "
                         f"target in the model's canvas of {self.seq_len}")
      tokens_NL[row, :len(ids)] = ids
    tokens_NL = np.repeat(tokens_NL, num_candidates, axis=0)
    source_NL = pairs.source_mask(tokens_NL, eos_id)  # the rest of the canvas is free: no [EOS] yet
    outputs_NL = self._run(tokens_NL, source_NL, pairs.condition_mask(tokens_NL, eos_id),
                           self._sampler_config(settings), seed, batch_size, pad_after_eos=False)
    targets = [self.tokenizer.decode(row[~source_L]) for row, source_L in zip(outputs_NL, source_NL)]
    grouped = [targets[i:i + num_candidates] for i in range(0, len(targets), num_candidates)]
    return [candidates[evaluate.mbr_select(candidates)] for candidates in grouped]

  def _check_drafter(self, drafter: "Pipeline", length: int) -> None:
    """Raises ValueError unless `drafter` can draft for this model on a canvas of `length`."""
    if not isinstance(drafter.process, (masked.MaskedDiffusion, block.BlockDiffusion)):
      raise ValueError("the drafter must be a masked or block diffusion model, got "
                       f"{type(drafter.process).__name__}")
    if drafter.tokenizer.vocab_size != self.tokenizer.vocab_size or drafter.process.vocab_size != self.process.vocab_size:
      raise ValueError("the drafter's tokenizer must be this model's (their vocabularies differ)")
    if drafter.seq_len < length:
      raise ValueError(f"the drafter's canvas holds {drafter.seq_len} tokens, fewer than the {length} asked for")

  def _canvas(self, prompts: Sequence[str], constraints: Sequence[Mapping[int, str]],
              length: int) -> tuple[np.ndarray, np.ndarray]:
    """(fixed tokens int32[N, L], fixed bool[N, L]): each prompt at the start of its row, each
    constraint's tokens from its position on."""
    tokens_NL = np.full((len(prompts), length), self.tokenizer.pad_id, np.int32)
    fixed_NL = np.zeros((len(prompts), length), bool)
    for row, (prompt, constraint) in enumerate(zip(prompts, constraints)):
      ids = self.tokenizer.encode(prompt)
      if len(ids) >= length:
        raise ValueError(f"prompt {row} has {len(ids)} tokens but the canvas holds {length}; "
                         "shorten the prompt or raise `length`")
      tokens_NL[row, :len(ids)] = ids
      fixed_NL[row, :len(ids)] = True
      for position, text in constraint.items():
        ids = self.tokenizer.encode(text)
        if not 0 <= position or position + len(ids) > length:
          raise ValueError(f"constraint {text!r} at position {position} of text {row} does not fit "
                           f"the canvas of {length} tokens")
        tokens_NL[row, position:position + len(ids)] = ids
        fixed_NL[row, position:position + len(ids)] = True
    return tokens_NL, fixed_NL

  def score(self, texts: str | Sequence[str], *, sources: str | Sequence[str] | None = None,
            eos: bool | None = None, num_samples: int = 16, seed: int = 0, batch_size: int = 64,
            truncate: bool = False) -> evaluate.ElboResult:
    """Bits of each text (`bits_per_sequence`) and per text token over all (`bits_per_token`),
    never counting padding.

    Each row holds the text (after its source and the source's [EOS], for a model trained on a
    pair task, one source per text) and, with `eos`, the text's [EOS]: exactly these tokens are
    scored, and bits per token divide by the text's tokens ([EOS] scored, not counted). The
    positions after them are never noised nor scored. A model trained on padded documents
    (config.data.packing 'pad') sees them as in training, [EOS] then [PAD]; one trained on packed
    rows does not see them at all (`Transformer.__call__`'s visible_BL). So a text's score does not
    depend on the canvas length or on what lies after it.

    What it measures: for a diffusion model, a bound on -log p(text [, EOS] | its length), the
    length given as in fixed-window evaluation (by the canvas's end or the padding), estimated by
    Monte Carlo with draws keyed by the seed and the text's batch (so a text's estimate, not its
    expectation, changes with its batch); for the autoregressive baseline, the exact
    -log p(text [, EOS]), the same in any batch.

    Args:
      texts: the texts, or one text (scored as a list of one). Every text needs a token: an
        empty one is refused, since its bits per token are undefined.
      sources: a pair task's sources (or one source), one per text.
      eos: score each text's [EOS] too; None: True for a model trained on padded documents,
        False for one trained on packed rows.
      num_samples: Monte Carlo draws per text (1 pass for the autoregressive baseline).
      seed, batch_size: as in `generate`.
      truncate: cut texts longer than the canvas to fit instead of refusing them.
    """
    texts = [texts] if isinstance(texts, str) else texts
    sources = [sources] if isinstance(sources, str) else sources
    if not len(texts):
      raise ValueError("texts is empty: score needs at least one text")
    if self._pairs != (sources is not None):
      raise ValueError("a model trained on a pair task scores texts as targets of sources=[...]" if self._pairs
                       else "sources= applies to a model trained on a pair task, not to this language model")
    if sources is not None and len(sources) != len(texts):
      raise ValueError(f"got {len(sources)} sources for {len(texts)} texts")
    padded_documents = self.config.data.packing == "pad"
    eos = padded_documents if eos is None else eos
    eos_id, pad_id = self.tokenizer.eos_id, self.tokenizer.pad_id
    prefixes = ([[]] * len(texts) if sources is None
                else [pairs.encode_pair(self.tokenizer.encode(source), [], eos_id) for source in sources])
    encoded = [self.tokenizer.encode(text) for text in texts]
    if truncate:
      encoded = [ids[:max(self.seq_len - eos - len(prefix), 0)] for ids, prefix in zip(encoded, prefixes)]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
      raise ValueError(f"texts {empty} have no tokens{' left once cut to fit' if truncate else ''}; score needs "
                       "at least one per text (bits per token divide by the token count)")
    too_long = [i for i, (ids, prefix) in enumerate(zip(encoded, prefixes)) if len(prefix) + len(ids) + eos > self.seq_len]
    if too_long:
      what = ", ".join(["after their sources"] * self._pairs + ["with their [EOS]"] * eos)
      raise ValueError(f"texts {too_long}{f' ({what})' if what else ''} have more tokens than the model's canvas "
                       f"of {self.seq_len} holds; pass truncate=True to cut them")
    rows_NL = np.full((len(texts), self.seq_len), pad_id, np.int32)
    starts_N1 = np.array([[len(prefix)] for prefix in prefixes])
    ends_N1 = np.array([[len(prefix) + len(ids) + eos] for prefix, ids in zip(prefixes, encoded)])
    for row_L, prefix, ids in zip(rows_NL, prefixes, encoded):
      document = [*prefix, *ids, eos_id]  # the [EOS] after the text is scored only with `eos`
      row_L[:min(len(document), self.seq_len)] = document[:self.seq_len]
    positions_1L = np.arange(self.seq_len)[None]
    fixed_NL = (positions_1L < starts_N1) | (positions_1L >= ends_N1)
    row_inputs = (fixed_NL,) if padded_documents else (fixed_NL, positions_1L < ends_N1)
    return evaluate.elbo(self._nelbo_fn(exact_time_sum=False), self.params, rows_NL, np.array([len(ids) for ids in encoded]),
                         num_samples=num_samples, batch_size=min(batch_size, 1 << (len(texts) - 1).bit_length()),
                         seed=seed, exact=self.process.exact_likelihood, row_inputs=row_inputs)

  def evaluate(self, workdir: str, num_samples: int | None = None, seed: int = 0,
               exact_time_sum: bool | None = None, max_docs: int | None = None,
               rows: str | None = None) -> evaluate.ElboResult:
    """Held-out bound on the eval split of the run's data (with the generator's NLL where known).

    Settings left None take the run's `config.eval` values; `exact_time_sum` (D3PM) sums all T
    steps of the bound instead of drawing one per sample; `rows` picks the max_docs rows scored,
    'spread' evenly over the split or the 'first' (`evaluate.select_rows`).
    """
    data = datasets.load_data(config_lib.data_config(self.config), workdir)
    eval_config = self.config.eval
    exact_time_sum = eval_config.exact_time_sum if exact_time_sum is None else exact_time_sum
    nelbo_fn = self._nelbo_fn(exact_time_sum)  # the jitted bound that `score` compiled, if it ran
    return evaluate.held_out_elbo(nelbo_fn, self.params, data,
                                  num_samples=num_samples or eval_config.elbo_samples,
                                  batch_size=eval_config.batch_size, max_rows=max_docs or eval_config.max_docs,
                                  seed=seed, exact=self.process.exact_likelihood, exact_time_sum=exact_time_sum,
                                  rows=eval_config.rows if rows is None else rows)


def _progress_bar(total: int, desc: str, unit: str):
  """`progress.bar` over `total` units of a long call: shown by process 0 when there are several."""
  return progress.bar(total, desc, unit, disable=total < 2 or jax.process_index() != 0)


def default_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """Where `load` puts the parameters: one device in a single-process run; in a multi-process run
  (after `sharding.init_distributed`), the run's mesh (`config.mesh`) over every process's devices,
  since each process reads only what lies on its own devices."""
  if jax.process_count() == 1:
    return sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
  return sharding.make_mesh(sharding.MeshConfig(**config.mesh.to_dict()))


def load(workdir: str, step: int | None = None, use_ema: bool = True, mesh: jax.sharding.Mesh | None = None) -> Pipeline:
  """The model saved in `workdir` at `step`, or at its newest step that can be read (each newer,
  damaged one named in a warning): only its parameters are read, the EMA of them if `use_ema` and
  the run kept one, onto `mesh` (default: `default_mesh`). In a multi-process run every process
  calls it, and then makes the same calls of the Pipeline: each one's outputs are the whole result."""
  manager = checkpoint.make_manager(workdir, read_only=True)
  steps = manager.all_steps() if step is None else [step]
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {checkpoint.checkpoint_dir(workdir)}")

  def read(step: int) -> Pipeline:
    saved = checkpoint.read_json_items(manager, step)
    config = config_lib.with_defaults(saved["config"])
    tokenizer = tokenizers.load_tokenizer(os.path.join(workdir, "tokenizer"))
    experiment = experiment_lib.make_experiment(config, tokenizer.vocab_size,
                                                experiment_lib.load_neighbor_graph(workdir))
    run_mesh = default_mesh(config) if mesh is None else mesh
    graphdef, params, shardings = experiment_lib.abstract_params(experiment.model, run_mesh)
    ema = use_ema and config.train.ema_decay > 0
    params = checkpoint.restore_params(manager, step, "ema_params" if ema else "params",
                                       sharding.abstract(params, shardings))
    return Pipeline(graphdef=graphdef, params=params, tokenizer=tokenizer, process=experiment.process,
                    seq_len=experiment.data.seq_len, config=config, params_name="EMA" if ema else "raw",
                    provenance=checkpoint.read_provenance(manager, step), mesh=run_mesh)

  if step is not None:
    return read(step)
  return checkpoint.newest_readable(steps, read, manager.directory)[1]
