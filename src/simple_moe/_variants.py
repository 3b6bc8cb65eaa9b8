"""Registry of every Triton kernel variant the library can launch, for `check-build`.

Each kernel module registers a function that lists the variants its heuristics can pick (tile configs x dtypes x flags) for the
model shapes we support. `python -m simple_moe check-build` compiles each one for SM80/86/89/90 without a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

@dataclass(frozen=True)
class KernelVariant:
    kernel: str  # short kernel family name, e.g. "grouped_gemm"
    variant: str  # human readable: dtype, tile config, flags
    fn: Any  # the @triton.jit function
    signature: dict  # argument name -> Triton type string ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict  # argument name -> compile-time value
    num_warps: int = 4
    num_stages: int = 3
    has_matrix_loop: bool = False  # True when the kernel has a tl.dot loop: the SASS must show tensor-core instructions
    archs: tuple = (80, 86, 89, 90)  # restrict a variant to the archs whose heuristics can pick it
    maxnreg: int | None = None  # the launch's register cap a thread (ptxas -maxrregcount), None: the compiler's choice


_PROVIDERS: list[Callable[[], list[KernelVariant]]] = []


def register_variants(provider: Callable[[], list[KernelVariant]]) -> Callable[[], list[KernelVariant]]:
    _PROVIDERS.append(provider)
    return provider


def all_kernel_variants() -> list[KernelVariant]:
    # Importing the package registers every kernel module's provider.
    import simple_moe  # noqa: F401

    variants: list[KernelVariant] = []
    for provider in _PROVIDERS:
        variants.extend(provider())
    return variants
