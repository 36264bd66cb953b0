"""ddlm_jax: diffusion language models in JAX/Flax NNX."""
import setuptools

setuptools.setup(
    name="ddlm_jax",
    version="0.1.0",
    description="Train, sample and evaluate diffusion language models in JAX.",
    url="https://github.com/ddlm-jax/ddlm_jax",
    packages=setuptools.find_packages(include=["ddlm_jax", "ddlm_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.12.4",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.9",
        "array_record>=0.7",
        "importlib_resources",
        "sentencepiece>=0.2",
        "absl-py",
        "ml_collections>=1.0",
        "numpy",
        "tensorboardX>=2.6",
        "tqdm",
        "sacrebleu>=2.4",  # BLEU for seq2seq (maintained reference implementation)
    ],
    extras_require={
        # The notebooks in colab/ run in the test suite (nbclient drives a Jupyter kernel).
        "dev": ["pytest>=8", "pytest-xdist", "matplotlib", "nbclient>=0.10", "nbformat>=5.10", "ipykernel"],
        "plots": ["matplotlib"],  # ddlm_jax.plots
        "bench": ["matplotlib"],  # the quality-vs-steps plot
        "tf": ["tensorflow"],
    },
)
