"""The suite's one switch: Triton's interpreter on machines without a GPU.

Triton reads TRITON_INTERPRET once, when it is first imported, and importing torch._dynamo
(which the layer does) imports triton. So the modules that run the kernels in the
interpreter (`test_device_put`, `test_triton_kernels`, `test_fp8`) could not switch it on
themselves once an earlier module was collected: they skipped. Set here, before any test
module is imported. Left alone where CUDA is available (the kernels compile there) or where
the caller set it.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
