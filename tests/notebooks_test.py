"""The Colab notebooks: each runs end to end on tiny settings (DDLM_NOTEBOOK_TINY=1) in a Jupyter
kernel, as Colab would run it, and is stored with its outputs stripped and an "Open in Colab" link.
Their long cells report progress: held-out evaluation and classifier training show a bar (whole
lines when the output is not a terminal, as here)."""
import glob
import os
import re
import resource
import sys
import time

import jax
import jupyter_client
import jax.numpy as jnp
import nbclient
import nbformat
import numpy as np
import pytest

from ddlm_jax import control
from ddlm_jax import evaluate
from ddlm_jax.networks import classifier
from ddlm_jax.processes import gaussian

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))
NAMES = [os.path.splitext(os.path.basename(path))[0] for path in NOTEBOOKS]
COLAB_LINK = "https://colab.research.google.com/github/ddlm-jax/ddlm_jax/blob/main/colab/{name}.ipynb"
SECONDS_PER_CELL = 300


def read(name: str) -> nbformat.NotebookNode:
  return nbformat.read(os.path.join(ROOT, "colab", f"{name}.ipynb"), as_version=4)


@pytest.fixture(scope="module")
def kernel_environment(tmp_path_factory) -> dict[str, str]:
  """The kernels' environment: tiny settings, this checkout's ddlm_jax first on the path, one CPU
  device (not the suite's eight fake ones: a notebook runs on whatever devices it finds), and one
  JAX compilation cache for the module, so that a network the notebooks share (their tiny MDLM
  and AR models are configured alike) compiles once."""
  path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
  return {**os.environ, "DDLM_NOTEBOOK_TINY": "1", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": path,
          "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("compilation_cache")),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def test_every_notebook_is_tested():
  assert set(NAMES) >= {"quickstart", "families", "control", "fast_decoding"}


def test_the_kernel_runs_this_python():
  """The notebooks run in the interpreter that has this checkout's dependencies (the venv's)."""
  command = jupyter_client.KernelManager(kernel_name="python3").format_kernel_cmd()
  assert os.path.realpath(command[0]) == os.path.realpath(sys.executable), command


@pytest.mark.parametrize("name", NAMES)
def test_stored_stripped_with_a_colab_link(name):
  notebook = read(name)
  nbformat.validate(notebook)
  code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert all(not cell.outputs and cell.execution_count is None for cell in code_cells), "strip the outputs"
  assert COLAB_LINK.format(name=name) in notebook.cells[0].source
  first = code_cells[0].source
  assert "git+https://github.com/ddlm-jax/ddlm_jax" in first and 'find_spec("ddlm_jax")' in first
  assert "DDLM_NOTEBOOK_TINY" in first
  assert not any("/work/" in cell.source or "../shared" in cell.source for cell in notebook.cells)


@pytest.mark.parametrize("name", NAMES)
def test_runs_end_to_end_on_tiny_settings(name, tmp_path, kernel_environment):
  notebook = read(name)
  client = nbclient.NotebookClient(notebook, timeout=SECONDS_PER_CELL, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  started, cpu_started = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
  client.execute(env=kernel_environment)  # raises CellExecutionError, naming the cell, on any error
  cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
  print(f"{name}: {time.perf_counter() - started:.1f} s, of which the kernel's CPU "
        f"{cpu.ru_utime + cpu.ru_stime - cpu_started.ru_utime - cpu_started.ru_stime:.1f} s")
  assert os.listdir(tmp_path / "ddlm_workdirs" / "tiny")


def finished_output(capsys) -> str:
  """What a loop printed: whole lines on stdout where nobody watches, a tqdm bar on stderr in a
  terminal."""
  captured = capsys.readouterr()
  return captured.out + captured.err


def test_evaluation_reports_each_finished_call(capsys):
  nelbo_fn = jax.jit(lambda params, rows_BL, key: rows_BL.sum(1).astype(jnp.float32) * params)
  rows_NL = np.ones((10, 3), np.int32)
  evaluate.elbo(nelbo_fn, 1.0, rows_NL, np.full(10, 3), num_samples=2, batch_size=2, seed=0)
  assert re.search(r"evaluate: .*\b10/10\b", finished_output(capsys)), "no progress reported"


def test_classifier_training_reports_its_steps(capsys):
  process = gaussian.GaussianDiffusion(vocab_size=8, latent_dim=4)
  rows_NL = np.arange(32, dtype=np.int32).reshape(8, 4) % 8
  config = classifier.ClassifierConfig(vocab_size=8, num_classes=(2,), max_len=4, num_layers=1, embed_dim=8, mlp_dim=8)
  control.train_classifier(process, jax.random.normal(jax.random.key(0), (8, 4)), rows_NL, rows_NL[:, :1] % 2, config,
                           num_steps=3, batch_size=4)
  assert re.search(r"classifier: .*\b3/3\b", finished_output(capsys)), "no progress reported"
