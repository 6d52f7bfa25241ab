"""What a run computes on: the device an arm names, its determinism settings, and what
run.json records of the machine (the numbers of a run depend on it).
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from gradlab.errors import GradlabError

DTYPES = {"float32": torch.float32, "float64": torch.float64,
          "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GradlabError("device=cuda but this machine has no CUDA device (or this torch "
                           "build has no CUDA); use --set device=cpu or device=auto")
    return torch.device(name)


def configure(device: torch.device) -> None:
    """On CUDA, float32 means float32 and a run repeats: no TF32 in matmul or convolution
    (it rounds at 2^-11), no cuDNN autotuning, deterministic cuDNN kernels. Recorded in
    run.json (``environment``)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers of a run depend on besides its settings: the device, the versions,
    the threads and the determinism settings in force."""
    cuda = device.type == "cuda"
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
