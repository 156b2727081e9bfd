"""On a machine without CUDA, Triton kernels run in Triton's interpreter. Set here, before any
test module imports Triton (the package's kernels are jitted at import)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
