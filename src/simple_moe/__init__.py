"""simple-moe: a fused Mixture-of-Experts layer in Triton for NVIDIA SM80 and newer (no CUTLASS, no TensorRT-LLM)."""
from .activations import ActivationType
from .callbacks import cublas_gemm, torch_loop_gemm
from .finalize import finalize
from . import grouped_gemm_tma  # noqa: F401  (GEMM2's TMA kernel: registers its check-build variants)
from . import grouped_gemm_gluon  # noqa: F401  (W8A8 GEMM1 and GEMM2 on SM90 in Gluon: the same)
from .module import FusedMoE
from .fused_moe import cutlass_fused_moe
from .pipeline import fused_moe_simple
from .quant import W8A8, W8A16, quantize_activations_int8, quantize_weights_int8
from .reference import reference_moe
from .routing import RoutingMaps, build_routing_maps, route

__all__ = [
    "ActivationType",
    "RoutingMaps",
    "build_routing_maps",
    "cublas_gemm",
    "cutlass_fused_moe",
    "finalize",
    "FusedMoE",
    "fused_moe_simple",
    "reference_moe",
    "route",
    "torch_loop_gemm",
]
__all__ += ["W8A8", "W8A16", "quant", "quantize_activations_int8", "quantize_weights_int8"]
__version__ = "0.1.0"
