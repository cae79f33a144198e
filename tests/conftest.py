import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
MNIST_5K = os.path.join(SHARED_DATA, "mnist-5k")

import torch  # noqa: E402

# One thread: the tests' tensors are small, and on a shared 2-core machine extra OpenMP
# threads only spin against other processes.
torch.set_num_threads(1)
torch.set_flush_denormal(True)  # as ddpm.train does: denormals make x86 CPUs crawl


def shared_digits_expected():
    """Whether the shared MNIST subset (ROOT/../shared/data/mnist-5k) must be there. CI says so explicitly
    (.ci/run exports TINY_DIFFUSION_SHARED_DATA=required), and so does a checkout that sits beside the
    project's ../shared folder, as CI's fresh clone and the project's own machine do: there a missing subset
    is a broken setup, and the tests that read it fail. A clone on its own (no ../shared) skips them, and
    the summary line (pytest.ini: -rfEs) says which and why."""
    return (os.environ.get("TINY_DIFFUSION_SHARED_DATA") == "required"
            or os.path.isdir(os.path.join(ROOT, "..", "shared")))


@pytest.fixture
def shared_mnist():
    """The folder of the shared MNIST subset; missing, a failure where it is expected, else a skip."""
    if not os.path.isdir(MNIST_5K):
        why = f"the shared MNIST subset is missing: no {os.path.normpath(MNIST_5K)}"
        if shared_digits_expected():
            pytest.fail(why + " (expected: TINY_DIFFUSION_SHARED_DATA=required or ../shared exists)", pytrace=False)
        pytest.skip(why + " (a clone outside the project's folder)")
    return MNIST_5K
