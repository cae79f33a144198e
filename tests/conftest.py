import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")

import torch  # noqa: E402

# One thread: the tests' tensors are small, and on a shared 2-core machine extra OpenMP
# threads only spin against other processes.
torch.set_num_threads(1)
torch.set_flush_denormal(True)  # as ddpm.train does: denormals make x86 CPUs crawl
