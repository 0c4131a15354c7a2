"""bf16 matrix products on a CPU without bf16 units, computed the way a GPU's tensor cores compute them.

On CPUs with AVX2 but neither AVX512-BF16 nor AMX (this project's 2-core machines), PyTorch's bf16 GEMM takes a
slow path: 5-10x slower than fp32, and SDPA's bf16 backward 5x slower than its fp32 one. A paper-shape rehearsal in
bf16 (12 x 768, seq 1024, C = 50,257) would then spend half an hour on one optimizer step. Inside
``emulated_bf16_matmuls`` every matrix product (``aten.mm``, ``addmm``, ``bmm``, ``baddbmm``) and CPU flash
attention (forward and backward) whose tensor inputs are all bf16 CPU tensors is computed in fp32 arithmetic and
rounded to bf16: bf16 inputs, fp32 products and accumulation, a bf16 output, which is what a tensor-core bf16 GEMM
does (cuBLAS and flash attention accumulate in fp32).

It is a ``TorchDispatchMode``: it sees the ATen operators below autograd, so backward passes are covered too,
whoever wrote them (PyTorch's own derivatives, or DeepSpeed's ZeRO-3 linear layer, whose backward calls
``matmul`` in Python). Autograd saves the same bf16 tensors as in a native run, so activation memory is that of the
bf16 run; the fp32 copies exist only inside one product. ``products`` counts the operators it computed.

Used by the benchmarks' rehearsal processes only (bench/paper_scale.py); the library never installs it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten
# operator -> which outputs are rounded to bf16 (None: the one output); flash attention's log-sum-exp stays fp32
_PRODUCTS = {
    aten.mm.default: None, aten.addmm.default: None, aten.bmm.default: None, aten.baddbmm.default: None,
    aten._scaled_dot_product_flash_attention_for_cpu.default: (0,),
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: (0, 1, 2),
}
products = 0


def _is_cpu_bf16(func, args, kwargs) -> bool:
    """Whether every floating tensor input is a bf16 CPU tensor (the attention backward's fp32 log-sum-exp
    aside): the inputs a native bf16 kernel would take."""
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if func is aten._scaled_dot_product_flash_attention_for_cpu_backward.default:
        tensors = [t for t in tensors if t.dtype != torch.float32]
    return bool(tensors) and all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors)


class _EmulatedBF16(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        global products
        kwargs = kwargs or {}
        if func not in _PRODUCTS or not _is_cpu_bf16(func, args, kwargs):
            return func(*args, **kwargs)
        up = tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 else t,
                      (args, kwargs))
        out = func(*up[0], **up[1])
        products += 1
        rounded = _PRODUCTS[func]
        if rounded is None:
            return out.to(torch.bfloat16)
        return tuple(o.to(torch.bfloat16) if k in rounded else o for k, o in enumerate(out))


@contextlib.contextmanager
def emulated_bf16_matmuls() -> Iterator[None]:
    """Inside: bf16 CPU matrix products and attention compute in fp32 and round their outputs to bf16."""
    with _EmulatedBF16():
        yield


def native_bf16_is_slow(size: int = 512) -> bool:
    """Whether this CPU multiplies bf16 matrices more than 2x slower than fp32 ones (then emulation pays)."""
    import time

    a = torch.randn(size, size)
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x
        start = time.perf_counter()
        for _ in range(3):
            x @ x
        timings[dtype] = time.perf_counter() - start
    return timings[torch.bfloat16] > 2 * timings[torch.float32]
