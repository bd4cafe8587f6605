"""nn.Linear layers of a served model routed through pensieve's CPU linear kernel (`pensieve_cpu::linear`).

A decode step's linears have a handful of rows: the kernel streams each weight once per call, faster than BLAS
for small M (csrc/cpu_linear.cpp; larger M is handed to at::linear inside the op). The
layers are switched by class (`module.__class__ = FastLinear`, same parameters, same state dict), so a deepcopy of
the model stays self-contained, and switched back by `restore()`. Anything the kernel does not cover (autograd,
other devices or dtypes) takes `F.linear`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pensieve.ops import cpu_kernel

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


class FastLinear(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight.device.type != "cpu" or torch.is_grad_enabled() or x.dtype != weight.dtype:
            return F.linear(x, weight, self.bias)
        return torch.ops.pensieve_cpu.linear(x, weight, self.bias)


def use_fast_linears(model: torch.nn.Module) -> Callable[[], None]:
    """Switch the model's CPU nn.Linear layers (fp32/bf16/fp64) to FastLinear; -> a function that switches them back.
    Nothing changes where the C++ kernels cannot be built."""
    switched: list[torch.nn.Module] = []
    if cpu_kernel.load():
        for module in model.modules():
            if type(module) is torch.nn.Linear and module.weight.device.type == "cpu":
                if module.weight.dtype in _KERNEL_DTYPES:
                    module.__class__ = FastLinear
                    switched.append(module)

    def restore() -> None:
        for module in switched:
            if type(module) is FastLinear:
                module.__class__ = torch.nn.Linear

    return restore
