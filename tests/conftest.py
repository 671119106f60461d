"""Test setup: without a GPU, run the Triton kernels on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported (kernels are wrapped at definition time).
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # One configuration per kernel variant instead of compiling and timing every autotuning candidate for
    # each of the suite's many shapes; test_gpu.py checks the autotuned path on its own.
    os.environ.setdefault("VQFAST_AUTOTUNE", "0")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def kernel_device() -> torch.device:
    """Where kernel tests run: the GPU when there is one, else the CPU through the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the public ops onto the Triton kernels (interpreted on CPU)."""
    monkeypatch.setenv("VQFAST_BACKEND", "triton")
    yield "triton"


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("VQFAST_BACKEND", "torch")
    yield "torch"


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: on a busy 2-core machine, OpenMP threads waiting for each other make small
    convolutions ten times slower, while one thread costs little."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
