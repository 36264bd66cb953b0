"""Every kind of bad input a user can give (configs, data files, prompts, checkpoints, a busy
workdir), each refused through the API users call with a message that names the problem, and
with the workdir's files left exactly as they were."""
import contextlib
import os
import shutil

import ml_collections
import pytest

import ddlm_jax
from ddlm_jax import checkpoint
from ddlm_jax import train
from workdir_test import damage_state_data, tiny_config, trained_run, tree_digest


def train_with(**settings):
  """train_and_evaluate on `tiny_config` with settings {'group.key': value}, set as an experiment
  file may set them (a key that does not exist, a value of another type)."""
  def run(workdir, _):
    values = tiny_config().to_dict()
    for key, value in settings.items():
      *groups, name = key.split(".")
      (values[groups[0]] if groups else values)[name] = value
    train.train_and_evaluate(ml_collections.ConfigDict(values), workdir)
  return run


def train_on_file(content: bytes | None):
  """train_and_evaluate on a text file holding `content` (None: a path with no file)."""
  def run(workdir, tmp_path):
    path = tmp_path / "corpus.txt"
    if content is not None:
      path.write_bytes(content)
    config = tiny_config()
    config.data.update(source="text_files", paths=(str(path),))
    train.train_and_evaluate(config, workdir)
  return run


def generate(prompts, **settings):
  return lambda workdir, _: ddlm_jax.load(workdir).generate(prompts, **settings)


def load_step(step):
  return lambda workdir, _: ddlm_jax.load(workdir, step=step)


def while_held(action):
  """`action` while another run holds the workdir's lock."""
  def run(workdir, tmp_path):
    with checkpoint.workdir_lock(workdir):
      action(workdir, tmp_path)
  return run


def damage_every_step(workdir):
  damage_state_data(os.path.join(checkpoint.checkpoint_dir(workdir), "4"))
  with open(os.path.join(checkpoint.checkpoint_dir(workdir), "2", "data", "metadata"), "w") as f:
    f.write("{not json")


def damage_latest_step(workdir):
  damage_state_data(os.path.join(checkpoint.checkpoint_dir(workdir), "4"))


# (what is wrong, the workdir it meets: 'trained' (the shared run), 'empty', or a function that
# damages a copy of the trained one; what the user calls; the error; its message)
CASES = [
    # configs
    ("unknown config key", "trained", train_with(**{"model.num_layerz": 3}), ValueError,
     r"unknown config key 'config.model.num_layerz'"),
    ("wrong type", "trained", train_with(**{"train.batch_size": "big"}), ValueError,
     r"config key 'config.train.batch_size' must be of type int, got 'big'"),
    ("impossible value", "trained", train_with(**{"train.learning_rate": -1.0}), ValueError,
     r"config.train.learning_rate must be a finite number in \(0, inf\), got -1.0"),
    ("negative sample_every", "trained", train_with(**{"train.sample_every": -1}), ValueError,
     r"config.train.sample_every must be a finite number in \[0, inf\), got -1"),
    ("seq_len not a multiple of the block", "trained", train_with(**{"process.name": "block", "process.block_size": 7}),
     ValueError, r"config.data.seq_len=320 must be a multiple of config.process.block_size=7"),
    ("heads not dividing the width", "trained", train_with(**{"model.num_heads": 3}), ValueError,
     r"config.model: embed_dim \(32\) must be divisible by num_heads \(3\)"),
    ("batch not splitting over the devices", "trained", train_with(**{"train.batch_size": 12}), ValueError,
     r"config.train.batch_size=12 does not split over the mesh's 8 data x fsdp shards"),
    ("sequence too short", "trained", train_with(**{"data.seq_len": 1}), ValueError,
     r"config.data: DataConfig.seq_len must be at least 2, got 1"),
    ("init_from without a checkpoint", "empty", train_with(init_from="/nonexistent/run"), ValueError,
     r"config.init_from='/nonexistent/run' holds no checkpoint to start from"),
    # data files
    ("empty data file", "empty", train_on_file(b""), ValueError,
     r"text file .*corpus.txt has no documents: it is empty or only whitespace"),
    ("binary data file", "empty", train_on_file(b"\x00\x01\x02binary\xff\xfe"), ValueError,
     r"text file .*corpus.txt contains NUL bytes \(first at byte 0\); it looks binary"),
    ("missing data file", "empty", train_on_file(None), ValueError,
     r"text file .*corpus.txt does not exist or is not a file"),
    ("one document", "empty", train_on_file(b"A single paragraph."), ValueError,
     r".*corpus.txt: 1 document \(a paragraph ends at a blank line\); a train/validation split needs at least 2: "
     r"add documents, or cut the text into chunks with unit='stream' \(config.data.unit\)"),
    # prompts
    ("prompt longer than the canvas", "trained", generate(["word " * 100], steps=4), ValueError,
     r"prompt 0 has 500 tokens but the canvas holds 320"),
    ("canvas longer than the model's", "trained", generate(None, num_samples=1, length=10_000), ValueError,
     r"length must lie in \[1, 320\] \(the model's training length\), got 10000"),
    # checkpoints
    ("no checkpoint to sample from", "empty", generate(None, num_samples=1), FileNotFoundError,
     r"no checkpoint in .*checkpoints"),
    ("every checkpoint damaged", damage_every_step, train_with(), checkpoint.UnreadableCheckpoint,
     r"no checkpoint in .*checkpoints can be read \(step 4: ValueError: DATA_LOSS.*; step 2: JSONDecodeError"),
    ("damaged checkpoint loaded", damage_latest_step, load_step(4), checkpoint.UnreadableCheckpoint,
     r"checkpoint step 4 in .*checkpoints cannot be read \(ValueError: DATA_LOSS"),
    ("checkpoint of another model", "trained", train_with(**{"model.num_layers": 3}), checkpoint.CheckpointError,
     r"written by a run with other settings \(model.num_layers: checkpoint 2 vs now 3\)"),
    ("checkpoint of another data order", "trained", train_with(**{"data.seed": 5}), checkpoint.CheckpointError,
     r"data.seed: checkpoint 0 vs now 5"),
    # the workdir
    ("workdir in use", "trained", while_held(train_with()), checkpoint.WorkdirInUse,
     rf"the workdir .* is in use by another run \(pid {os.getpid()} on .*\); wait for it to end"),
]


@pytest.mark.parametrize("workdir_kind,action,error,message", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_input_is_refused_by_name_and_the_workdir_kept(workdir_kind, action, error, message, tmp_path,
                                                           tmp_path_factory):
  if workdir_kind == "trained":
    workdir = trained_run(tmp_path_factory)[0]
  else:
    workdir = str(tmp_path / "workdir")
    if workdir_kind == "empty":
      os.mkdir(workdir)
    else:
      shutil.copytree(trained_run(tmp_path_factory)[0], workdir)
      workdir_kind(workdir)
  before = tree_digest(workdir)
  with pytest.raises(error, match=message):
    action(workdir, tmp_path)
  assert tree_digest(workdir) == before
