"""nn.Linear layers of a served model routed through pensieve's CPU linear kernel (`pensieve_cpu::linear`).

A decode step's linears have a handful of rows: the kernel streams each weight once per call, faster than BLAS
for small M (csrc/cpu_linear.cpp; larger M is handed to at::linear inside the op). The
layers are switched by class (`module.__class__ = FastLinear`, same parameters, same state dict), so a deepcopy of
the model stays self-contained, and switched back by `restore()`. Anything the kernel does not cover (autograd,
other devices or dtypes) takes `F.linear`.

With `pack=True`, each fp32/bf16 weight is also copied once, at switch time, into the blocked layout of oneDNN's
brgemm micro-kernel (VNNI pairs for bf16's AMX tiles; `pensieve_cpu::pack_weight`), and batches of 2..256 rows (bf16:
1..256) use it — fp32 up to 16 rows through an FMA loop of the op's own, the rest through brgemm: measured on
SmolLM2's linears from memory, fp32 1.3-1.6x and bf16 1.4-1.75x faster than the streaming kernel at 4-16 rows
(docs/performance-log.md). On a CPU without bf16 dot products (AVX2), bf16 weights pack into fp32's plain blocks, still
bf16, and each block is widened to fp32 when a step uses it (brgemm's fp32 kernel).
The price is a second copy of those weights in memory, and the copy is a snapshot: weights changed in place
afterwards are not seen by it (switch back and again to repack). Where brgemm does not run
(`pensieve_cpu::can_pack`), nothing is packed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pensieve.ops import cpu_kernel

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


_PACKED_DTYPES = (torch.float32, torch.bfloat16)


class FastLinear(torch.nn.Linear):
    packed_weight: torch.Tensor | None = None  # pensieve_cpu::pack_weight(self.weight), set by use_fast_linears

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight.device.type != "cpu" or torch.is_grad_enabled() or x.dtype != weight.dtype:
            return F.linear(x, weight, self.bias)
        return torch.ops.pensieve_cpu.linear(x, weight, self.bias, self.packed_weight)


def use_fast_linears(model: torch.nn.Module, pack: bool = True) -> Callable[[], None]:
    """Switch the model's CPU nn.Linear layers (fp32/bf16/fp64) to FastLinear, packing fp32/bf16 weights for brgemm
    when `pack` and brgemm runs here; -> a function that switches them back and drops the packed copies.
    Nothing changes where the C++ kernels cannot be built."""
    switched: list[torch.nn.Module] = []
    packed: dict[tuple, torch.Tensor] = {}  # a weight shared by layers (tied heads) is packed once
    if cpu_kernel.load():
        for module in model.modules():
            if type(module) is torch.nn.Linear and module.weight.device.type == "cpu":
                weight = module.weight
                if weight.dtype in _KERNEL_DTYPES:
                    module.__class__ = FastLinear
                    switched.append(module)
                    if pack and _packable(weight):
                        key = (weight.data_ptr(), weight.shape, weight.stride(), weight.dtype)
                        if key not in packed:
                            with torch.no_grad():
                                packed[key] = torch.ops.pensieve_cpu.pack_weight(weight.detach())
                        module.packed_weight = packed[key]

    def restore() -> None:
        for module in switched:
            if type(module) is FastLinear:
                module.__class__ = torch.nn.Linear
            module.__dict__.pop("packed_weight", None)

    return restore


def _packable(weight: torch.Tensor) -> bool:
    if weight.dtype not in _PACKED_DTYPES or weight.dim() != 2:
        return False
    if weight.dtype == torch.bfloat16 and weight.shape[1] % 2:  # VNNI packs pairs of K
        return False
    return bool(torch.ops.pensieve_cpu.can_pack(weight.dtype))
