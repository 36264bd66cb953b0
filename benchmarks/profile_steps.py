"""Where the time goes: jax.profiler traces of the masked and autoregressive train steps and of
autoregressive decoding, with the top XLA ops and their share of the op time.

  python -m benchmarks.profile_steps [--targets=masked_train,autoregressive_train,autoregressive_decode]

The train steps are those users train with (`train.make_train_step` at the shape flags, as
`benchmarks.train_throughput` times them); decoding is the whole jitted KV-cache decode of
--seq_len positions (as `benchmarks.decode_throughput` times it), its op time divided by the
positions to give one token step. After a warm-up call, --calls calls are traced
(benchmarks/results/traces/<target>, git-ignored) and the trace is read back offline with
`jax.profiler.ProfileData`: each XLA op event on the CPU backend's threads is matched by name to
its instruction in the compiled HLO (`jitted.lower(...).compile().as_text()`), which gives its
opcode, output shape, the JAX op that made it (metadata op_name) and the ddlm_jax source line.

Op time is summed over threads, so per step it can exceed the wall time (by up to the cores
busy). Ops are grouped by (op, shape, op_name) for the top list, and into categories, the first
rule that matches deciding:
  matmul       a dot or convolution, or a fusion that contains one;
  layout       copies and transposes, or fusions of nothing else (bitcasts and reshapes aside);
  vocab-sized  an op that reads or writes an array with a vocabulary-sized dimension (the padded
               or the real vocabulary), or one of a log_softmax (XLA splits long reductions into
               a reduce-window and a reduce of arrays without that dimension): the logits'
               log-softmax, the loss, the token draw and their gradients;
  attention    an op of a function named like attention or softmax (the innermost ddlm_jax
               function, or the JAX op_name), or one that reads or writes a [B, H, L, L] score array;
  other        the rest (norms, RoPE, the MLP's activation, the optimizer, random bits ...).
Writes benchmarks/results/profile_<target>.json (or into --output_dir).
"""
import collections
import dataclasses
import glob
import os
import re
import shutil
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax.profiler import ProfileData

from benchmarks import common

SHAPES = common.define_shape_flags()
TARGETS = ("masked_train", "autoregressive_train", "autoregressive_decode")
_TARGETS = flags.DEFINE_list("targets", list(TARGETS), f"What to profile, from {TARGETS}.")
_CALLS = flags.DEFINE_integer("calls", 2, "Traced calls per target (after one warm-up call).")
_TOP = flags.DEFINE_integer("top", 25, "Ops listed per target.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", common.RESULTS_DIR, "Where profile_<target>.json and traces/ go.")

# Events on the op threads that are the runtime's bookkeeping, not ops.
NOT_OPS = ("ThunkExecutor", "ThreadpoolListener", "end: ", "Slinky")
# Instructions whose events enclose those of the ops they run (counted through those ops).
CONTAINERS = ("while", "conditional", "call")
MATMUL_OPCODES = ("dot", "convolution")
LAYOUT_OPCODES = ("copy", "transpose", "copy-start", "copy-done")
DATA_MOVEMENT_OPCODES = LAYOUT_OPCODES + ("parameter", "bitcast", "reshape", "tuple", "get-tuple-element")
CATEGORIES = ("matmul", "layout", "vocab-sized", "attention", "other")
# How far an instruction without metadata looks through its operands for some, and the operands
# that lend none (they come from elsewhere).
ORIGIN_DEPTH = 3
NO_ORIGIN_OPCODES = ("constant", "parameter", "get-tuple-element", "iota")


@dataclasses.dataclass(frozen=True)
class HloOp:
  """One instruction of the compiled HLO, as the profile needs it.

  Attributes:
    opcode: e.g. 'fusion', 'dot', 'copy'.
    shape: its output shape without layout, e.g. 'f32[4096,256]'.
    op_name: the JAX op that made it (metadata), e.g. 'jit(train_step)/jvp()/dot_general'.
    source: 'file.py:line function' of the innermost Python frame JAX recorded for it.
    touched_dims: the dimensions of its output and of its operands' outputs.
    contains_matmul: it is, or its called computations contain, a dot or convolution.
    only_moves_data: it is, or its called computations are made of, copies and transposes
      (bitcasts and reshapes aside).
  """
  opcode: str
  shape: str
  op_name: str
  source: str
  touched_dims: tuple[tuple[int, ...], ...]
  contains_matmul: bool
  only_moves_data: bool


# An event whose name the compiled module lacks.
UNKNOWN_OP = HloOp(opcode="?", shape="?", op_name="", source="", touched_dims=(), contains_matmul=False,
                   only_moves_data=False)

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) \(.*\) -> .* \{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
_ARRAY_SHAPE = re.compile(r"[a-z][a-z0-9]*\[([0-9,]*)\]")
_OPERAND = re.compile(r"%([\w.-]+)")
_CALLED = re.compile(r"(?:calls|body|condition|to_apply|branch_computations)=\{?%([\w.-]+)")


def _dims(shape: str) -> tuple[tuple[int, ...], ...]:
  return tuple(tuple(int(d) for d in dims.split(",") if d) for dims in _ARRAY_SHAPE.findall(shape))


def _sources(hlo: str) -> dict[str, str]:
  """stack_frame_id -> 'file.py:line function' of the frame's own location (the innermost one)."""
  tables, table = collections.defaultdict(dict), None
  for line in hlo.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      table = line
    elif table and (match := re.match(r"^(\d+) (.*)$", line)):
      tables[table][match.group(1)] = match.group(2)
    else:
      table = None
  sources = {}
  for frame, text in tables["StackFrames"].items():
    location = tables["FileLocations"].get(re.search(r"file_location_id=(\d+)", text).group(1), "")
    ids = dict(re.findall(r"(\w+)=(\d+)", location))
    if ids:
      file = os.path.basename(tables["FileNames"].get(ids["file_name_id"], '""').strip('"'))
      function = tables["FunctionNames"].get(ids["function_name_id"], '""').strip('"')
      sources[frame] = f"{file}:{ids['line']} {function}"
  return sources


def parse_hlo(hlo: str) -> dict[str, HloOp]:
  """Instruction name -> HloOp for every instruction of a compiled module's text (names are
  unique in a module). An instruction that XLA made without metadata (e.g. the pad and
  reduce-window of a cumulative sum) takes the op_name and source of the nearest operand that has
  them, and touches the arrays of the operands on the way."""
  sources = _sources(hlo)
  computation_opcodes = collections.defaultdict(set)
  computation_calls = collections.defaultdict(set)
  instructions, computation = {}, None
  for line in hlo.splitlines():
    if match := _COMPUTATION.match(line):
      computation = match.group(1)
    elif computation and (match := _INSTRUCTION.match(line)):
      name, shape, opcode, rest = match.groups()
      arguments, _, attributes = rest.partition("), ")
      op_name = re.search(r'op_name="([^"]*)"', attributes)
      frame = re.search(r"stack_frame_id=(\d+)", attributes)
      instructions[name] = dict(shape=shape, opcode=opcode, operands=_OPERAND.findall(arguments),
                                called=_CALLED.findall(attributes), op_name=op_name.group(1) if op_name else "",
                                source=sources.get(frame.group(1), "") if frame else "")
      computation_opcodes[computation].add(opcode)
      computation_calls[computation].update(_CALLED.findall(attributes))

  def reachable_opcodes(called: list[str]) -> set[str]:
    seen, stack, opcodes = set(), list(called), set()
    while stack:
      name = stack.pop()
      if name not in seen:
        seen.add(name)
        opcodes |= computation_opcodes[name]
        stack.extend(computation_calls[name])
    return opcodes

  def with_origin(name: str) -> tuple[dict, list[str]]:
    """The instruction that lends `name` its metadata (itself if it has some; else the nearest
    operand with some, at most ORIGIN_DEPTH operands away, constants and parameters aside), and the
    operands walked through to find it."""
    walked, frontier = [], [name]
    for _ in range(ORIGIN_DEPTH + 1):
      for candidate in frontier:
        if instructions[candidate]["op_name"]:
          return instructions[candidate], walked
      frontier = [operand for candidate in frontier for operand in instructions[candidate]["operands"]
                  if operand in instructions and instructions[operand]["opcode"] not in NO_ORIGIN_OPCODES]
      walked += frontier
    return instructions[name], []

  ops = {}
  for name, instruction in instructions.items():
    inner = reachable_opcodes(instruction["called"]) if instruction["called"] else {instruction["opcode"]}
    origin, walked = with_origin(name)
    operands = [operand for operand in instruction["operands"] if operand in instructions] + walked
    ops[name] = HloOp(opcode=instruction["opcode"], shape=re.sub(r"\{[^}]*\}", "", instruction["shape"]),
                      op_name=origin["op_name"], source=origin["source"],
                      touched_dims=_dims(instruction["shape"]) + tuple(
                          dims for operand in operands for dims in _dims(instructions[operand]["shape"])),
                      contains_matmul=bool(inner & set(MATMUL_OPCODES)),
                      only_moves_data=inner <= set(DATA_MOVEMENT_OPCODES) and bool(inner & set(LAYOUT_OPCODES)))
  return ops


def category(op: HloOp, vocab_sizes: tuple[int, ...], seq_len: int) -> str:
  """The first of CATEGORIES whose rule (module docstring) `op` meets."""
  if op.contains_matmul:
    return "matmul"
  if op.only_moves_data:
    return "layout"
  qualified_name = op.source.partition(" ")[2]  # e.g. 'Attention._project.<locals>.<genexpr>'
  function = [part for part in qualified_name.split(".") if not part.startswith("<")][-1:]
  names = " ".join(function + [op.op_name]).lower()
  if "log_softmax" in names or any(d in vocab_sizes for dims in op.touched_dims for d in dims):
    return "vocab-sized"
  if "attention" in names or "softmax" in names or any(len(dims) >= 4 and dims[-2:] == (seq_len, seq_len)
                                                           for dims in op.touched_dims):
    return "attention"
  return "other"


def op_events(xplane_path: str):
  """(op name, duration ns) of every XLA op event in a trace of the CPU backend (on the threads of
  its thread pool and of its client)."""
  for plane in ProfileData.from_file(xplane_path).planes:
    for line in plane.lines:
      if line.name.startswith("tf_XLA"):
        for event in line.events:
          if not event.name.startswith(NOT_OPS):
            yield event.name, event.duration_ns


def summarise(xplane_path: str, ops: dict[str, HloOp], units: int, vocab_sizes: tuple[int, ...],
              seq_len: int, top: int) -> dict:
  """Op time per unit (a train step, a decoded token step) by category and by (op, shape, op_name)."""
  time_ns, count = collections.Counter(), collections.Counter()
  by_category = collections.Counter()
  for name, duration_ns in op_events(xplane_path):
    op = ops.get(name, UNKNOWN_OP)
    if op.opcode in CONTAINERS:
      continue
    key = (re.sub(r"\.\d+$", "", name), op.opcode, op.shape, op.op_name, op.source,
           category(op, vocab_sizes, seq_len))
    time_ns[key] += duration_ns
    count[key] += 1
    by_category[key[-1]] += duration_ns
  total_ns = sum(time_ns.values())
  if not total_ns:
    raise ValueError(f"no XLA op events in {xplane_path}: this script reads the CPU backend's op threads")
  top_ops = [dict(share=round(ns / total_ns, 4), ms=round(ns / units / 1e6, 3), count=round(count[key] / units, 2),
                  op=key[0], opcode=key[1], shape=key[2], op_name=key[3], source=key[4], category=key[5])
             for key, ns in time_ns.most_common(top)]
  categories = {name: dict(ms=round(by_category[name] / units / 1e6, 3), share=round(by_category[name] / total_ns, 4))
                for name in CATEGORIES}
  return dict(op_ms=round(total_ns / units / 1e6, 3), categories=categories, top_ops=top_ops)


def target_setup(target: str):
  """(jitted function, its first arguments, a function of the outputs giving the next call's
  arguments, units per call, the experiment)."""
  batch, length = SHAPES.batch_size.value, SHAPES.seq_len.value
  if target.endswith("_train"):
    experiment, step_fn, state, batch_BL, key = common.train_step_setup(SHAPES, target.removesuffix("_train"))
    return step_fn, (state, batch_BL, key), lambda outputs: (outputs[0], batch_BL, key), 1, experiment
  experiment, graphdef, params, sampler_config = common.causal_model_setup(SHAPES)
  decode = common.make_generate(graphdef, experiment.process, sampler_config)
  args = (params, jnp.zeros((batch, length), jnp.int32), jnp.zeros((batch, length), bool), jax.random.key(0))
  return decode, args, lambda outputs: args, length, experiment


def profile(target: str) -> dict:
  """Traces --calls calls of `target` and summarises the trace."""
  jitted, args, next_args, units, experiment = target_setup(target)
  ops = parse_hlo(jitted.lower(*args).compile().as_text())
  args = next_args(jax.block_until_ready(jitted(*args)))  # warm-up
  trace_dir = os.path.join(_OUTPUT_DIR.value, "traces", target)
  shutil.rmtree(trace_dir, ignore_errors=True)
  jax.profiler.start_trace(trace_dir)
  start = time.perf_counter()
  for _ in range(_CALLS.value):
    args = next_args(jax.block_until_ready(jitted(*args)))
  wall_s = time.perf_counter() - start
  jax.profiler.stop_trace()
  xplane_path = max(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
  unit_count = units * _CALLS.value
  vocab_sizes = (experiment.model.vocab_size, experiment.process.vocab_size)
  summary = summarise(xplane_path, ops, unit_count, vocab_sizes, SHAPES.seq_len.value, _TOP.value)
  unit = "train step" if units == 1 else "token step"
  return dict(target=target, unit=unit, wall_ms=round(wall_s / unit_count * 1e3, 3),
              cores_busy=round(summary["op_ms"] / (wall_s / unit_count * 1e3), 2), trace=xplane_path, **summary)


def print_profile(result: dict) -> None:
  print(f"\n== {result['target']}: per {result['unit']}, {result['wall_ms']} ms wall, {result['op_ms']} ms of op time "
        f"(summed over threads: {result['cores_busy']} cores busy)")
  common.print_table([dict(category=name, **values) for name, values in result["categories"].items()],
                     ["category", "ms", "share"])
  print()
  rows = [{**row, "share": f"{row['share']:.1%}", "op_name": row["op_name"][-60:]} for row in result["top_ops"]]
  common.print_table(rows, ["share", "ms", "count", "category", "op", "shape", "source", "op_name"])


def main(argv):
  del argv
  for target in _TARGETS.value:
    if target not in TARGETS:
      raise ValueError(f"--targets: {target!r} is not one of {TARGETS}")
  print(f"device: {common.device_description()}; shapes: {SHAPES.values()}; {_CALLS.value} traced calls each")
  for target in _TARGETS.value:
    result = profile(target)
    print_profile(result)
    path = common.write_json_to(os.path.join(_OUTPUT_DIR.value, f"profile_{target}.json"), dict(
        command=common.command_line(), device=common.device_description(), shapes=SHAPES.values(),
        calls=_CALLS.value, **result))
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
