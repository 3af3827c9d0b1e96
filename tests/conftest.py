"""Test-session setup. Without a GPU, Triton kernels run on the CPU interpreter, which must be
switched on before anything imports triton."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests' tensors are tiny: intra-op threads only add overhead (and contention on small CI boxes).
torch.set_num_threads(1)

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(params=["cpu", "cuda"] if HAS_CUDA else ["cpu"])
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope="session")
def quick_toy(tmp_path_factory):
    """A ``train-toy --quick`` output (a few steps of every stage: the plumbing, not the accuracy),
    standing in for the shipped toy checkpoints."""
    from hybridkernels.toy.train import train_toy

    out = tmp_path_factory.mktemp("toy")
    train_toy(out, overwrite=True, quick=True, progress=False, log=lambda *a: None)
    return out
