"""walrus_jax: Walrus (PolymathicAI, arXiv 2511.15684) in JAX + Flax NNX."""
from setuptools import find_packages, setup

setup(
    name="walrus_jax",
    version="0.1.0",
    description="JAX + Flax NNX port of Walrus, the space-time transformer for continuum dynamics",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["walrus_jax", "walrus_jax.*", "configs", "tools", "tools.*"]),
    # C++ sources of the CPU kernels, compiled for the host on first use (walrus_jax/cpu_kernels/build.py)
    package_data={"walrus_jax.cpu_kernels": ["*.cc", "*.h"]},
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "h5py>=3.10",
        "fsspec>=2024.6",  # data paths: local, gs://, s3://, hf://, http(s):// (walrus_jax/data/filesystem.py)
        "numpy>=1.26",
        "ml_collections>=1.0",
        "chex>=0.1.90",
        "absl-py>=2.0",
        "pyyaml>=6.0",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
        "flatbuffers>=24.3",  # jax.export's serialization (wj.export)
        "huggingface_hub>=0.34",  # wj.from_pretrained: hub repositories, its download cache
        "filelock>=3.12",  # one conversion per checkpoint across processes (checkpoints/hub.py)
    ],
    extras_require={
        # the stores' fsspec implementations, only where data lives there
        "remote": ["gcsfs", "s3fs", "huggingface_hub", "aiohttp"],
        # libtpu: runs on a TPU VM, and compiles for any TPU slice on a CPU host (tools/aot)
        "tpu": ["jax[tpu]"],
        "test": [
            "jax[tpu]",  # libtpu: tests/test_kernels.py and tests/test_aot.py compile TPU programs on the CPU
            # pytest 9 keeps a node's id where pytest-xdist 3.8 cannot add its group to it, so
            # xdist_group (pytest.ini's --dist loadgroup) would be ignored
            "pytest>=8,<9",
            "pytest-xdist>=3.5",  # pytest.ini runs the tests in two worker processes
            "aiohttp>=3.9",  # tests/test_data_remote.py reads through a local HTTP server
            "pyyaml>=6.0",
            "torch==2.13.0",
            "safetensors>=0.4",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
        ],
    },
)
