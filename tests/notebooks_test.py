"""The Colab notebooks: each runs end to end on tiny settings (DDLM_NOTEBOOK_TINY=1) in a Jupyter
kernel, as Colab would run it, and is stored with its outputs stripped and an "Open in Colab" link.
Their long cells report progress: held-out evaluation and classifier training show a bar (whole
lines when the output is not a terminal, as here)."""
import glob
import json
import os
import re
import resource
import sys
import sysconfig
import time
import venv

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
INSTALLED_AS_ON_COLAB = "quickstart"  # runs from a fresh install (test_installs_and_runs_as_on_colab); the rest from here
PROJECT_GIT_URL = "git+https://github.com/ddlm-jax/ddlm_jax"
COLAB_LINK = "https://colab.research.google.com/github/ddlm-jax/ddlm_jax/blob/main/colab/{name}.ipynb"
SECONDS_PER_CELL = 300


def read(name: str) -> nbformat.NotebookNode:
  return nbformat.read(os.path.join(ROOT, "colab", f"{name}.ipynb"), as_version=4)


@pytest.fixture(scope="module")
def kernel_environment(tmp_path_factory) -> dict[str, str]:
  """The kernels' environment: tiny settings, this checkout's ddlm_jax first on the path, one CPU
  device (as on Colab's CPU runtime; the tests on eight devices set XLA_FLAGS), and one JAX
  compilation cache for the module, so that a network the notebooks share (their tiny MDLM and AR
  models are configured alike) compiles once."""
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


@pytest.mark.parametrize("name", [name for name in NAMES if name != INSTALLED_AS_ON_COLAB])
def test_runs_end_to_end_on_tiny_settings_on_eight_devices(name, tmp_path, kernel_environment):
  """On eight devices, as a Colab TPU v2-8 runtime has (its batches and samples split over them)."""
  notebook = read(name)
  notebook.cells.append(nbformat.v4.new_code_cell("import jax\nassert jax.device_count() == 8, jax.devices()"))
  client = nbclient.NotebookClient(notebook, timeout=SECONDS_PER_CELL, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  run_tiny(name, client, tmp_path, {**kernel_environment, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})


def fresh_interpreter(directory) -> str:
  """A Python like Colab's before the install cell: this venv's packages (no network here) and no
  ddlm_jax. The venv's site directory is put on the path by a .pth file, so its own .pth files (this
  checkout's editable install) are not run. Returns the directory of its Jupyter kernel spec."""
  venv.create(directory, with_pip=False)
  site_packages = glob.glob(os.path.join(directory, "lib", "python*", "site-packages"))[0]
  with open(os.path.join(site_packages, "dependencies.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  kernels = os.path.join(directory, "kernels")
  os.makedirs(os.path.join(kernels, "fresh"))
  with open(os.path.join(kernels, "fresh", "kernel.json"), "w") as f:
    json.dump({"argv": [os.path.join(directory, "bin", "python"), "-m", "ipykernel_launcher", "-f",
                        "{connection_file}"], "display_name": "fresh", "language": "python"}, f)
  return kernels


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, ".git")), reason="installs from this git checkout")
def test_installs_and_runs_as_on_colab(tmp_path, kernel_environment):
  """The quickstart as Colab runs it: its first cell finds no ddlm_jax and pip-installs it from git
  (this checkout's HEAD commit instead of the project's home: no network here; uncommitted changes to
  the library are not in it), then the notebook runs from a folder outside any checkout with nothing
  of this one on the path. pip builds the package in isolation, as on Colab, so it needs the index
  that `make install` uses (for setuptools)."""
  interpreter = tmp_path / "interpreter"
  kernels = fresh_interpreter(str(interpreter))
  notebook = read(INSTALLED_AS_ON_COLAB)
  install = next(cell for cell in notebook.cells if cell.cell_type == "code")
  assert PROJECT_GIT_URL in install.source
  install.source = install.source.replace(PROJECT_GIT_URL, f"git+file://localhost{ROOT}")
  notebook.cells.append(nbformat.v4.new_code_cell("import ddlm_jax\nprint(ddlm_jax.__file__)"))
  content = tmp_path / "content"
  content.mkdir()
  environment = {name: value for name, value in kernel_environment.items() if name not in ("PYTHONPATH", "VIRTUAL_ENV")}
  manager = jupyter_client.KernelManager(
      kernel_name="fresh", kernel_spec_manager=jupyter_client.kernelspec.KernelSpecManager(kernel_dirs=[kernels]))
  client = nbclient.NotebookClient(notebook, km=manager, timeout=SECONDS_PER_CELL,
                                   resources={"metadata": {"path": str(content)}})
  run_tiny(INSTALLED_AS_ON_COLAB, client, content, environment)
  imported_from = notebook.cells[-1].outputs[0].text.strip()
  assert imported_from.startswith(str(interpreter)) and imported_from.endswith("ddlm_jax/__init__.py"), imported_from


def run_tiny(name: str, client: nbclient.NotebookClient, folder, environment: dict):
  """Runs every cell of the client's notebook in `folder` (raising CellExecutionError, naming the cell,
  on any error) and checks that it trained in its tiny workdirs."""
  started, cpu_started = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
  client.execute(env=environment, cleanup_kc=True)  # shut the kernel down, also one the client did not start
  cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
  print(f"{name}: {time.perf_counter() - started:.1f} s, of which the kernel's CPU "
        f"{cpu.ru_utime + cpu.ru_stime - cpu_started.ru_utime - cpu_started.ru_stime:.1f} s")
  assert os.listdir(folder / "ddlm_workdirs" / "tiny")


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
