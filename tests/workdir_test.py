"""The workdir survives anything: damaged and half-written checkpoints, Ctrl-C, a stale lock, kill -9
of TensorBoard logging. (Bad input that must be refused is in bad_input_test.py.)"""
import glob
import hashlib
import logging
import os
import shutil
import signal
import struct
import sys

import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

import ddlm_jax

from ddlm_jax import checkpoint
from ddlm_jax import experiment as experiment_lib
from ddlm_jax import sharding
from ddlm_jax import train
from ddlm_jax.data import batching
from ddlm_jax.data import tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import mdlm_tiny  # pylint: disable=g-import-not-at-top


def tiny_config(**train_overrides):
  """The smallest run that evaluates: a character model over 320-character rows, checkpoints at
  steps 2 and 4, samples logged at both."""
  config = mdlm_tiny.get_config("char")
  config.data.update(num_train_docs=200, num_eval_docs=16)
  config.train.update({"batch_size": 8, "num_steps": 4, "checkpoint_every": 2, "log_every": 2, "sample_every": 2,
                       "keep_checkpoints": 5, **train_overrides})
  config.eval.update(batch_size=16, max_docs=16)
  config.sample.update(num_samples=2, steps=4)
  return config


_TRAINED = {}


def trained_run(tmp_path_factory) -> tuple[str, dict]:
  """(workdir, summary) of `tiny_config`, trained once per session (bad_input_test shares it); copy
  it before changing it."""
  if not _TRAINED:
    workdir = str(tmp_path_factory.mktemp("trained"))
    _TRAINED["run"] = workdir, train.train_and_evaluate(tiny_config(), workdir)
  return _TRAINED["run"]


@pytest.fixture
def trained(tmp_path_factory):
  return trained_run(tmp_path_factory)


def tree_digest(directory: str) -> dict[str, str]:
  """{path relative to `directory`: sha256 of its bytes} of every file under it."""
  return {os.path.relpath(os.path.join(root, name), directory):
          hashlib.sha256(open(os.path.join(root, name), "rb").read()).hexdigest()
          for root, _, names in os.walk(directory) for name in names}


def copy_of(workdir: str, tmp_path) -> str:
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  return copy


def read_events(workdir: str) -> list[tuple[str, int, float | str]]:
  """(tag, step, value) of every scalar and text summary in workdir/tensorboard, file by file (a
  TFRecord: length, its CRC, the serialised Event, its CRC)."""
  events = []
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        text = value.tensor.string_val[0].decode() if value.tensor.string_val else None
        events.append((value.tag, event.step, value.simple_value if text is None else text))
  return events


def scalars(events, tag):
  return {step: value for name, step, value in events if name == tag}


def test_tensorboard_holds_losses_learning_rates_samples_and_the_final_evaluation(trained):
  workdir, summary = trained
  events = read_events(workdir)
  assert sorted(scalars(events, "train/loss")) == [2, 4]
  schedule = experiment_lib.learning_rate_schedule(tiny_config().train)
  learning_rates = scalars(events, "train/learning_rate")
  assert learning_rates == pytest.approx({2: float(schedule(1)), 4: float(schedule(3))})  # the last update's
  assert learning_rates[2] < learning_rates[4]  # in warm-up
  assert scalars(events, "eval/bits_per_token") == pytest.approx({4: summary["bits_per_token"]})
  assert scalars(events, "eval/bits_per_token_stderr") == pytest.approx({4: summary["bits_per_token_stderr"]})
  samples = [(step, text) for tag, step, text in events if tag.startswith("samples")]
  assert [step for step, _ in samples] == [2, 4]
  assert all(text.startswith("1. `") and "\n2. `" in text for _, text in samples), samples


def test_samples_of_a_pair_task_translate_its_first_held_out_sources():
  class Translator:
    def translate(self, sources, seed, **settings):
      assert seed == 0 and settings["steps"] == 4
      return [source.upper() for source in sources]

  config = tiny_config()
  config.data.task = "data_to_text"
  texts = train.sample_texts(Translator(), config, ("name[Aroma]", "food[Thai]", "area[riverside]"))
  assert texts == ["name[Aroma] -> NAME[AROMA]", "food[Thai] -> FOOD[THAI]"]  # config.sample.num_samples = 2
  assert train.samples_markdown(texts) == "1. `name[Aroma] -> NAME[AROMA]`\n2. `food[Thai] -> FOOD[THAI]`"


def damage_state_data(step_dir: str) -> None:
  """Flips bytes in the middle of the largest array file of a step's state: what a bad disk does."""
  path = max(glob.glob(os.path.join(step_dir, "state", "d", "*")), key=os.path.getsize)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    chunk = f.read(8)
    f.seek(-len(chunk), os.SEEK_CUR)
    f.write(bytes(byte ^ 0xFF for byte in chunk))


def test_damaged_latest_step_and_an_unfinished_save_resume_from_the_newest_good_step(trained, tmp_path, caplog,
                                                                                     capsys):
  workdir = copy_of(trained[0], tmp_path)
  checkpoints = checkpoint.checkpoint_dir(workdir)
  damage_state_data(os.path.join(checkpoints, "4"))
  damaged = tree_digest(os.path.join(checkpoints, "4"))
  unfinished = os.path.join(checkpoints, "6.orbax-checkpoint-tmp-1733300000")  # a save killed half-way
  shutil.copytree(os.path.join(checkpoints, "2"), unfinished)
  os.remove(os.path.join(unfinished, "state", "manifest.ocdbt"))
  with caplog.at_level(logging.WARNING):
    summary = train.train_and_evaluate(tiny_config(num_steps=6), workdir)
  assert summary["step"] == 6
  assert "Resumed from step 2" in capsys.readouterr().out
  warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
  assert any("checkpoint step 4" in message and "cannot be read" in message and "DATA_LOSS" in message
             for message in warnings), warnings
  set_aside = os.path.join(workdir, "unreadable_checkpoints", "4")
  assert any(set_aside in message for message in warnings), warnings
  assert tree_digest(set_aside) == damaged  # moved, not deleted nor rewritten
  assert sorted(os.listdir(checkpoints)) == ["2", "4", "6"]  # 4 and 6 written anew, no temporary left
  assert checkpoint.latest_step(workdir) == 6


def test_loading_a_workdir_whose_latest_step_is_damaged_reads_the_step_before_it(trained, tmp_path, caplog):
  workdir = copy_of(trained[0], tmp_path)
  damage_state_data(os.path.join(checkpoint.checkpoint_dir(workdir), "4"))
  before = tree_digest(workdir)
  with caplog.at_level(logging.WARNING):
    model = ddlm_jax.load(workdir)
  assert any("checkpoint step 4" in record.getMessage() and "cannot be read" in record.getMessage()
             for record in caplog.records), caplog.text
  step_2 = ddlm_jax.load(workdir, step=2)
  assert jax.tree.all(jax.tree.map(np.array_equal, model.params, step_2.params))
  assert tree_digest(workdir) == before  # loading reads: nothing moved


def abstract_train_state(workdir):
  config = tiny_config()
  tokenizer = tokenizers.load_tokenizer(os.path.join(workdir, "tokenizer"))
  experiment = experiment_lib.make_experiment(config, tokenizer.vocab_size)
  mesh = sharding.make_mesh(sharding.MeshConfig())
  return train.abstract_state(experiment, config, mesh, experiment_lib.make_optimizer(config.train))[1]


def overwrite(path, content: bytes):
  with open(path, "wb") as f:
    f.write(content)


def state_files(step_dir):
  return [path for path in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True) if os.path.isfile(path)]


DAMAGE = {
    "flipped bytes": damage_state_data,
    "truncated": lambda step_dir: [os.truncate(path, os.path.getsize(path) // 2)
                                   for path in glob.glob(os.path.join(step_dir, "state", "d", "*"))],
    "zeroed": lambda step_dir: [overwrite(path, bytes(os.path.getsize(path))) for path in state_files(step_dir)],
    "empty JSON": lambda step_dir: overwrite(os.path.join(step_dir, "identity", "metadata"), b""),
    "garbage JSON": lambda step_dir: overwrite(os.path.join(step_dir, "data", "metadata"), b"{not json"),
    "missing manifest": lambda step_dir: os.remove(os.path.join(step_dir, "state", "manifest.ocdbt")),
    "missing item": lambda step_dir: shutil.rmtree(os.path.join(step_dir, "config")),
    "empty step": lambda step_dir: [shutil.rmtree(step_dir), os.mkdir(step_dir)],
}


def test_every_kind_of_damage_is_named_and_the_step_before_it_read(trained, tmp_path, caplog):
  """What resuming reads of each step (`newest_readable` over the JSON items and the state), for
  each way a step's files break."""
  abstract = abstract_train_state(trained[0])
  for kind, damage in DAMAGE.items():
    workdir = str(tmp_path / kind.replace(" ", "_"))
    shutil.copytree(trained[0], workdir, ignore=shutil.ignore_patterns("tensorboard"))
    damage(os.path.join(checkpoint.checkpoint_dir(workdir), "4"))
    reader = checkpoint.make_manager(workdir, read_only=True)
    read = lambda step: (checkpoint.read_json_items(reader, step), checkpoint.restore_state(reader, step, abstract))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      step, (_, state), unreadable = checkpoint.newest_readable(reader.all_steps(), read, reader.directory)
    assert (step, int(state.step), unreadable) == (2, 2, [4]), kind
    assert any(f"checkpoint step 4 in {reader.directory} cannot be read (" in record.getMessage()
               for record in caplog.records), (kind, caplog.text)


def test_flipped_bits_that_orbax_reads_back_as_other_numbers_are_caught_by_the_fingerprint(tmp_path):
  weights = np.random.default_rng(0).normal(size=4096).astype(np.float32)  # incompressible, as trained weights are
  device = jax.devices()[0]
  manager = checkpoint.make_manager(str(tmp_path))
  checkpoint.save(manager, 1, {"w": jax.device_put(weights, device)}, {}, {}, {}, {})
  path = max(glob.glob(os.path.join(manager.directory, "1", "state", "ocdbt.process_0", "d", "*")), key=os.path.getsize)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))
  abstract = {"w": jax.ShapeDtypeStruct(weights.shape, weights.dtype, sharding=jax.sharding.SingleDeviceSharding(device))}
  with pytest.raises(checkpoint.UnreadableCheckpoint, match=r"step 1 .* cannot be read \(ValueError: the arrays w "
                     r"differ from those saved \(their fingerprints do not match\)"):
    checkpoint.restore_state(checkpoint.make_manager(str(tmp_path), read_only=True), 1, abstract)


def test_ctrl_c_saves_the_current_step_and_logged_steps_are_on_disk_at_once(trained, tmp_path, monkeypatch):
  workdir = copy_of(trained[0], tmp_path)
  real_next, calls, on_disk = batching.BatchIterator.__next__, [], {}

  def interrupted_next(self):  # Ctrl-C while step 6 is prepared
    calls.append(1)
    if len(calls) == 2:
      os.kill(os.getpid(), signal.SIGINT)
    return real_next(self)

  real_save = checkpoint.save

  def save_and_look(manager, step, *args):  # what kill -9 at the save would leave in TensorBoard
    on_disk[step] = sorted(scalars(read_events(workdir), "train/loss"))
    real_save(manager, step, *args)

  monkeypatch.setattr(batching.BatchIterator, "__next__", interrupted_next)
  monkeypatch.setattr(checkpoint, "save", save_and_look)
  before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler; ignored in a pytest-xdist worker
  summary = train.train_and_evaluate(tiny_config(num_steps=10, log_every=1, sample_every=0), workdir)
  assert summary == {"step": 6, "stopped": "SIGINT"}
  assert checkpoint.latest_step(workdir) == 6
  assert on_disk == {6: [2, 4, 5, 6]}  # step 5 and 6 of this run were flushed before the save
  assert signal.getsignal(signal.SIGINT) is before  # the run's own handler is gone: Ctrl-C acts as before


def test_a_stale_lock_file_does_not_block_and_a_held_lock_does(tmp_path):
  lock_file = tmp_path / checkpoint.LOCK_FILE
  lock_file.write_text("pid 999999 on a host that was switched off\n")  # left by a run killed with -9
  with checkpoint.workdir_lock(str(tmp_path)):
    assert lock_file.read_text().startswith(f"pid {os.getpid()} on ")
    with pytest.raises(checkpoint.WorkdirInUse, match=f"in use by another run \\(pid {os.getpid()} on "):
      with checkpoint.workdir_lock(str(tmp_path)):
        pass
  assert not lock_file.exists()
  with checkpoint.workdir_lock(str(tmp_path)):  # released: the next run takes it
    pass


def test_a_lock_leaves_no_trace_in_a_workdir_where_nothing_was_written(tmp_path):
  workdir = tmp_path / "new"
  with checkpoint.workdir_lock(str(workdir)):
    assert os.listdir(workdir) == [checkpoint.LOCK_FILE]
  assert not workdir.exists()
