"""``torch.compile`` behind the ``pretrain.compile``, ``metatrain.compile`` and ``metatest.compile`` knobs."""

from __future__ import annotations

import os
import shutil

import torch

from .errors import UserError


def check_compiler(device: torch.device, knob: str) -> None:
    """Refuse ``knob: true`` on a CPU without a C++ compiler, before any work starts (on CPU,
    ``torch.compile`` builds C++ kernels, and would otherwise fail at the first step)."""
    names = (os.environ.get("CXX", ""), "g++", "c++", "clang++")
    if device.type == "cpu" and not any(shutil.which(n) for n in names if n):
        raise UserError(f"'{knob}' is true but no C++ compiler was found (torch.compile builds C++ kernels on "
                        f"CPU); install one (e.g. `apt-get install g++`) or set '{knob}: false'.")
