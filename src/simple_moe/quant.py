"""INT8 for the MoE layer: quantisation helpers, the per-row activation quantiser (a Triton kernel), and the two schemes.

Quantisation formula, used everywhere in this library (weights, activations, the kernel and its torch twin):

    scale = max|x| / 127  over the values that share the scale (1 where that is 0: an all-zero row, or one below 127 * 2^-150
                          whose division underflows; both then quantise to zeros. NaN where one value is NaN, Inf where one
                          is infinite: their dequantised values carry it, as the float layer would, and their q are 0)
    q     = clamp(round_half_away_from_zero(x / scale), -127, 127)      dequantised value: q * scale

all computed in float32 (`x` cast to float32 first; the divisions correctly rounded), symmetric (no zero point, -128 unused).

Schemes (pass one as `fused_moe_simple(..., quant=...)`, with int8 `fc1_expert_weights`/`fc2_expert_weights`):

- `W8A16(fc1_scales, fc2_scales, group_size=None)`: weight-only. Activations stay fp16/bf16 (fp32 works too). The grouped GEMM loads
  int8 weight tiles and converts them to the activation dtype in registers (exact: |q| <= 127). Per output channel
  (`group_size=None`, scales `[E, N]`) the scale multiplies the fp32 accumulator once, in the epilogue; group-wise along K
  (`group_size` g in {32, 64, 128}, scales `[E, N, K/g]`) each weight tile is scaled by its group's scales inside the K loop, in
  fp32, and rounded once to the activation dtype before the tensor-core dot (so the dot accumulates in place).
- `W8A8(fc1_scales, fc2_scales)`: int8 weights with per-output-channel scales `[E, N]` and int8 activations with dynamic per-row
  scales, multiplied on the int8 tensor cores with int32 accumulation; the epilogue computes `acc * a_scale[row] * w_scale[col]` in
  fp32, then bias and activation as usual.
  * GEMM1's input is quantised per token *before* the gather: `T` rows, not `T*top_k`. The grouped GEMM gathers the int8 rows through
    the routing map and reads the token's scale with the same index.
  * The intermediate is quantised by a separate small pass: a row's scale needs the whole row (all I columns), but GEMM1's programs
    each own only a column block of it, so GEMM1 writes `[rows, I]` in the activation dtype and `quantize_activations_int8` turns it
    into int8 plus one float32 scale per row (only the `expert_first_token_offset[E]` kept rows; dropped rows are never read).
    Fusing it would need a cross-program reduction or a full-row GEMM1 tile; the extra pass reads and writes `rows * I * 3` bytes.
  * Output and GEMM2's result are in the activation dtype.

Scales may be float32, float16 or bfloat16 (the kernels read them as float32); `quantize_weights_int8` returns float32.

GEMM callbacks (`gemm1_fn`/`gemm2_fn`) with a scheme get the int8 weights and, as keyword arguments only then,
`weight_scales=` (that GEMM's scales), `group_size=` (int or None) and `quantize_input=` (True for W8A8: quantise the input rows
per row with the formula above before the int8 product). `simple_moe.callbacks` shows how (`torch_loop_gemm`, `cublas_gemm`).
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch
import triton
import triton.language as tl

from ._host import is_int, next_power_of_2
from ._launch import PlannedLaunch
from ._variants import KernelVariant, register_variants
from .activations import activation_params as build_activation_params, get_activation
from .pipeline import FLOAT_DTYPES, _check_tensor, is_negated_view, moe_forward, triton_runs_on, validate_moe_inputs

QMAX = 127
GROUP_SIZES = (32, 64, 128)
SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ---------------------------------------------------------------------------------------------------------------------------------
# The formula in torch (weights, the CPU fallback, the callbacks)


def _scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    # Divide by a tensor, not a Python number: torch's CUDA division by a scalar multiplies by its reciprocal (not correctly
    # rounded), which would make the torch twin differ from the kernel in the last bit.
    scale = amax / torch.full_like(amax, QMAX)
    # 1 for an all-zero row; a NaN or Inf max stays, so that the dequantised row (and the layer's output) carries it as the
    # float layer would, instead of a finite row with its other values rounded away.
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _round_to_int8(y: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, clamp to [-127, 127]; `y` float32 (the same operations as the Triton kernel)."""
    q = torch.where(y >= 0, torch.floor(y + 0.5), torch.ceil(y - 0.5))
    q = torch.where(torch.isnan(q), torch.zeros_like(q), q)  # rows scaled by NaN or Inf: 0 (their scale carries the NaN)
    return q.clamp(-QMAX, QMAX).to(torch.int8)


def quantize_weights_int8(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weights, `[E, N, K]` (nn.Linear layout, K the reduction dim) -> (int8 `[E, N, K]`, float32 scales).

    `group_size=None`: one scale per output channel, scales `[E, N]`. `group_size=g` (32, 64 or 128, dividing K): one scale per
    g consecutive K values, scales `[E, N, K/g]`. The dequantised weight is `q * scale` (the scale of its channel or group).
    """
    _check_tensor("w", w, 3, FLOAT_DTYPES + (torch.float64,))
    num_experts, n, k = w.shape
    if k == 0:
        raise ValueError(f"w: expected a reduction dimension K of at least 1, got shape {tuple(w.shape)}")
    group = _check_group_size(group_size, k, "w")
    x = w.float().reshape(num_experts, n, k // group, group)
    scale = _scale_from_amax(x.abs().amax(dim=-1))  # [E, N, K/g]
    q = _round_to_int8(x / scale.unsqueeze(-1)).reshape(num_experts, n, k)
    return q.contiguous(), (scale.squeeze(-1) if group_size is None else scale).contiguous()


def dequantize_weights_int8(q: torch.Tensor, scales: torch.Tensor, group_size: int | None = None,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`q * scale` as `dtype`. `q` `[E, N, K]`, `scales` as `quantize_weights_int8` returns them.

    float64 gives the exact dequantised weights (what a reference should use); other dtypes are computed in float32 and rounded once.
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    s = scales.to(work)
    s = s.unsqueeze(-1) if group_size is None else s.repeat_interleave(group_size, dim=-1)
    return (q.to(work) * s).to(dtype)


def quantize_activations_int8_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-row formula in torch: `[rows, K]` -> (int8 `[rows, K]`, float32 scales `[rows]`); bit-identical to the kernel."""
    xf = x.float()
    scale = _scale_from_amax(xf.abs().amax(dim=1)) if xf.shape[1] else torch.ones(xf.shape[0], device=x.device)
    return _round_to_int8(xf / scale.unsqueeze(1)), scale


def _check_group_size(group_size, k: int, name: str) -> int:
    if group_size is None:
        return k
    if not is_int(group_size) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size: expected None (per channel) or one of {GROUP_SIZES}, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"group_size: {group_size} does not divide the reduction dimension K={k} of {name}")
    return group_size


# ---------------------------------------------------------------------------------------------------------------------------------
# Per-row activation quantisation: one Triton program per row.


@triton.jit
def _max_keeping_nan(a, b):
    """max(a, b), NaN if either is (tl.max skips NaN): a row holding a NaN gets a NaN scale, as in the torch twin."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _quantize_rows_kernel(
    x_ptr,  # [rows, K] fp16/bf16/fp32
    q_ptr,  # int8 [rows, K], contiguous rows
    scale_ptr,  # float32 [rows]
    valid_rows_ptr,  # int64 scalar: rows at and past it are left unwritten (e.g. &expert_first_token_offset[E]); or unused
    num_cols,
    stride_xm,
    stride_xk,
    stride_qm,
    HAS_VALID_ROWS: tl.constexpr,
    SINGLE_PASS: tl.constexpr,  # BLOCK >= num_cols: keep the row in registers between the max and the rounding
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    q_row = q_ptr + row.to(tl.int64) * stride_qm
    offs = tl.arange(0, BLOCK)
    # The row is read whether or not it is valid (every row is allocated), so the loads need not wait for the valid-row count;
    # only the stores do. Waiting first made W8A8's intermediate pass 133 us at Qwen3-30B T=4096, against 54 us without.
    if SINGLE_PASS:
        mask = offs < num_cols
        x = tl.load(x_row + offs * stride_xk, mask=mask, other=0.0).to(tl.float32)
        row_max = tl.reduce(tl.abs(x), 0, _max_keeping_nan)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for c0 in range(0, num_cols, BLOCK):
            cols = c0 + offs
            xc = tl.load(x_row + cols * stride_xk, mask=cols < num_cols, other=0.0).to(tl.float32)
            amax = _max_keeping_nan(amax, tl.abs(xc))
        row_max = tl.reduce(amax, 0, _max_keeping_nan)
    valid = True
    if HAS_VALID_ROWS:
        valid = row < tl.load(valid_rows_ptr)
    scale, lift, lifted_scale, reciprocal = row_scale(row_max)
    if SINGLE_PASS:
        tl.store(q_row + offs, round_to_int8_tl(x, lift, lifted_scale, reciprocal), mask=mask & valid)
    else:
        for c0 in range(0, num_cols, BLOCK):
            cols = c0 + offs
            mask_c = (cols < num_cols) & valid
            xc = tl.load(x_row + cols * stride_xk, mask=mask_c, other=0.0).to(tl.float32)
            tl.store(q_row + cols, round_to_int8_tl(xc, lift, lifted_scale, reciprocal), mask=mask_c)
    tl.store(scale_ptr + row, scale, mask=valid)


@triton.jit
def row_scale(row_max):
    """(scale, lift, lifted_scale, reciprocal) of a row, or of a vector of rows, from its max |x|. scale = max|x| / 127 (1 where
    that is 0; NaN and Inf kept), correctly rounded so the torch twin gives the same bits. Each element's x / scale then comes
    from one reciprocal (see _divide_rn): a power of two lifts a tiny scale, and its row, so that the reciprocal and the
    residuals stay normal floats; it changes no quotient."""
    scale = tl.math.div_rn(row_max, 127.0)
    scale = tl.where(scale == 0, 1.0, scale)  # NaN and Inf stay (as in the torch twin's _scale_from_amax)
    lift = tl.where(scale < 8.673617379884035e-19, 1.152921504606847e18, 1.0)  # scale < 2^-60: times 2^60
    lifted_scale = scale * lift
    return scale, lift, lifted_scale, tl.math.div_rn(1.0, lifted_scale)


@triton.jit
def _divide_rn(x, divisor, reciprocal):
    """`x / divisor` correctly rounded, given `reciprocal` = 1 / divisor correctly rounded: the quotient `x * reciprocal` is
    within an ulp, its residual `x - divisor * quotient` is exact in one fma, and one more fma with the reciprocal rounds it
    correctly (Markstein's theorem, with no underflow or overflow on the way: the caller keeps the divisor >= 2^-96 and the
    quotients at most 127 in magnitude; a quotient small enough for its residual to underflow rounds to 0 either way).
    `tl.math.div_rn` per element computes a reciprocal, two checks and a slow-path branch for each one (sm_90 SASS: a MUFU.RCP,
    a BSSY and a CALL per element of the row quantiser)."""
    quotient = x * reciprocal
    residual = tl.fma(-divisor, quotient, x)
    return tl.fma(residual, reciprocal, quotient)


@triton.jit
def round_to_int8_tl(x, lift, lifted_scale, reciprocal):
    """The formula's rounding: clamp(round_half_away_from_zero(x / scale), -127, 127) as int8, with the row's scale given as
    `lifted_scale` = scale * `lift` and its correctly rounded `reciprocal` (see the kernel)."""
    y = _divide_rn(x * lift, lifted_scale, reciprocal)
    q = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
    q = tl.where(q == q, q, 0.0)  # NaN quotients (a row scaled by NaN or Inf) -> 0, as in the torch twin
    return tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)


_MAX_ROW_BLOCK = 4096


def _row_block(num_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps): the whole row in one block up to 4096 columns, else 4096-wide blocks; one row a program, with 16-32
    elements a thread (2 warps up to 2048 columns). H200 sweep after the one-reciprocal division (quant_rows_h200.json),
    against the 4/8 warps of the H100 rule: intermediate at T=4096, Qwen3-30B (768 columns) 35.6 vs 38.1 us, DeepSeek-V2-Lite
    (1408) 48.6 vs 56.7, OLMoE 36.7 vs 39.4; GEMM1's input (2048) 13.0-13.7 vs 14.1-14.8. Several rows a program as one tile
    (the sweep's other kernel) gained at most 0.7 us more, so the kernel keeps one row."""
    block = min(_MAX_ROW_BLOCK, max(16, next_power_of_2(num_cols)))
    return block, max(2, block // 1024)


def quantize_activations_int8(x: torch.Tensor, *, valid_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row (per-token) symmetric int8: `[rows, K]` fp16/bf16/fp32 -> (int8 `[rows, K]`, float32 scales `[rows]`).

    Uses the module's formula (see the docstring), one Triton program per row. `valid_rows`, an int64 tensor holding one count on
    the device (e.g. `maps.expert_first_token_offset[E:]`), limits the work to the rows before it without a host sync; the outputs
    of later rows are left unwritten. On a CPU tensor without Triton's interpreter this runs the torch twin.
    """
    _check_tensor("x", x, 2, FLOAT_DTYPES)
    if valid_rows is not None:
        if not isinstance(valid_rows, torch.Tensor) or valid_rows.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"valid_rows: expected None or an int64/int32 tensor holding one row count, got "
                            f"{valid_rows.dtype if isinstance(valid_rows, torch.Tensor) else type(valid_rows).__name__}")
        if valid_rows.numel() != 1 or valid_rows.device != x.device:
            raise ValueError(f"valid_rows: expected one count on {x.device} (where x is), got shape {tuple(valid_rows.shape)} "
                             f"on {valid_rows.device}")
    rows, cols = x.shape
    if not triton_runs_on(x.device) or rows == 0 or cols == 0:
        return quantize_activations_int8_torch(x)
    return RowQuantizerPlan.like(x, valid_rows)(x, valid_rows)


class RowQuantizerPlan:
    """`quantize_activations_int8` for one signature, its launch prepared once (a call plan's; see pipeline.py "Call plans"):
    `[rows, cols]` rows of stride (`stride_row`, `stride_col`), with or without `valid_rows`. Calling it checks nothing: the
    caller's plan is keyed by that signature, the input's dtype and 16-byte alignment included (`quantize_activations_int8`
    makes one for each call). Where the kernel would not run (no rows or columns, or no Triton on the device) it runs the
    torch twin. Eager W8A8 decode on the H100 spent as much host time as GPU time with the unplanned quantiser (Qwen3-30B
    T=1: 66.8 us eager against 33.7 in a CUDA graph, `bench_nvidia_h100_80gb_hbm3_21cb874.md`), two of its four launches
    being these; planned, 35.6 us eager against 33.5 (`bench_nvidia_h100_80gb_hbm3_45848a7.md`; host time a call 117 -> 64
    us, `host_int8_h100_v14.txt`)."""

    def __init__(self, rows: int, cols: int, stride_row: int, stride_col: int, has_valid_rows: bool, device: torch.device):
        self.rows, self.cols = rows, cols
        self.launch = None
        if rows and cols and triton_runs_on(device):
            block, num_warps = _row_block(cols)
            self.launch = PlannedLaunch(_quantize_rows_kernel, (rows,), (cols, stride_row, stride_col, cols),
                                        num_warps=num_warps, HAS_VALID_ROWS=has_valid_rows, SINGLE_PASS=cols <= block,
                                        BLOCK=block)

    @classmethod
    def like(cls, x: torch.Tensor, valid_rows: torch.Tensor | None = None) -> "RowQuantizerPlan":
        return cls(x.shape[0], x.shape[1], x.stride(0), x.stride(1), valid_rows is not None, x.device)

    def __call__(self, x: torch.Tensor, valid_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.launch is None:
            return quantize_activations_int8_torch(x)
        q = torch.empty(self.rows, self.cols, dtype=torch.int8, device=x.device)
        scales = torch.empty(self.rows, dtype=torch.float32, device=x.device)
        self.launch(x, q, scales, valid_rows if valid_rows is not None else scales)
        return q, scales


# ---------------------------------------------------------------------------------------------------------------------------------
# One int8 linear layer in torch: the CPU fallback and the built-in callbacks.


def int8_linear_torch(x: torch.Tensor, w_q: torch.Tensor, w_scales: torch.Tensor, group_size: int | None = None,
                      quantize_input: bool = False) -> torch.Tensor:
    """`x @ dequant(w_q).T` for one expert (`w_q` `[N, K]`), returned in float32.

    W8A16 (`quantize_input=False`): float64 product of `x` and the exact dequantised weights. W8A8: `x` is quantised per row first
    and the product is `(q_x @ q_w.T) * s_x[row] * s_w[col]` (the integer product is exact in float64).
    """
    if quantize_input:
        xq, xs = quantize_activations_int8_torch(x)
        acc = xq.double() @ w_q.double().T
        return (acc.float() * xs.unsqueeze(1) * w_scales.float().unsqueeze(0)).float()
    w = dequantize_weights_int8(w_q.unsqueeze(0), w_scales.unsqueeze(0), group_size, torch.float64)[0]
    return (x.double() @ w.T).float()


# ---------------------------------------------------------------------------------------------------------------------------------
# The schemes


@dataclass(frozen=True, eq=False)
class _Int8Scheme:
    fc1_scales: torch.Tensor
    fc2_scales: torch.Tensor

    quantize_input: ClassVar[bool] = False  # W8A8: int8 activations
    group_size: ClassVar[int | None] = None  # W8A16 makes it a field

    @property
    def name(self) -> str:
        return type(self).__name__

    # ---- the interface pipeline.py calls

    def validate(self, input, fc1_expert_weights, fc2_expert_weights) -> None:
        """Checks the weights are int8 and the scales match them; raises TypeError/ValueError naming the argument."""
        _check_tensor("input", input, 2, FLOAT_DTYPES)
        for name, w in (("fc1_expert_weights", fc1_expert_weights), ("fc2_expert_weights", fc2_expert_weights)):
            if isinstance(w, torch.Tensor) and w.dtype != torch.int8:
                raise TypeError(f"{name}: quant={self.name} needs int8 weights (see simple_moe.quant.quantize_weights_int8), "
                                f"got {w.dtype}")
            _check_tensor(name, w, 3, (torch.int8,), input.device)
        group = self.group_size
        for name, scales, w in (("fc1_scales", self.fc1_scales, fc1_expert_weights),
                                ("fc2_scales", self.fc2_scales, fc2_expert_weights)):
            num_experts, n, k = w.shape
            what = "fc1_expert_weights" if name == "fc1_scales" else "fc2_expert_weights"
            _check_group_size(group, k, what)
            expected = (num_experts, n) if group is None else (num_experts, n, k // group)
            if not isinstance(scales, torch.Tensor):
                raise TypeError(f"quant.{name}: expected a torch.Tensor of shape {expected}, got {type(scales).__name__}")
            if scales.dtype not in SCALE_DTYPES:
                raise TypeError(f"quant.{name}: expected dtype float32, float16 or bfloat16, got {scales.dtype}")
            if tuple(scales.shape) != expected:
                layout = "per output channel [E, N]" if group is None else f"group-wise [E, N, K/{group}]"
                raise ValueError(f"quant.{name}: expected {layout} scales of shape {expected} for {what} "
                                 f"{tuple(w.shape)}, got {tuple(scales.shape)}")
            if scales.device != input.device:
                raise ValueError(f"quant.{name}: expected a tensor on {input.device} (where input is), got {scales.device}")
            if is_negated_view(scales):
                raise ValueError(f"quant.{name}: a negated view (its negative bit is set); pass it .resolve_neg()")

    def op_arguments(self) -> tuple:
        """(fc1 scales, fc2 scales, scheme name, group size or 0): the scheme as the `simple_moe::moe_forward` op's trailing
        arguments (ops.py), which `scheme_from_op_arguments` turns back into this scheme."""
        return self.fc1_scales, self.fc2_scales, self.name, self.group_size or 0

    def callback_kwargs(self, gemm: int) -> dict:
        """The keyword arguments GEMM callbacks get under this scheme (see the module docstring)."""
        scales = self.fc1_scales if gemm == 1 else self.fc2_scales
        return {"weight_scales": scales, "group_size": self.group_size, "quantize_input": self.quantize_input}

    def check_callbacks(self, gemm1_fn, gemm2_fn) -> None:
        for name, fn in (("gemm1_fn", gemm1_fn), ("gemm2_fn", gemm2_fn)):
            _require_quant_kwargs(name, fn, self.name)

    def gemm1_operands(self, input: torch.Tensor, quantize=None):
        """GEMM1's A operand and the grouped GEMM's INT8 arguments. W8A8 quantises the T input rows (the GEMM gathers them),
        with `quantize` (a call plan's `RowQuantizerPlan`) or `quantize_activations_int8`."""
        if self.quantize_input:
            x_q, x_scales = (quantize or quantize_activations_int8)(input)
            return x_q, {"w_scale": self.fc1_scales, "a_scale": x_scales}
        return input, {"w_scale": self.fc1_scales, "group_size": self.group_size or 0}

    def gemm2_operands(self, intermediate: torch.Tensor, maps, quantize=None):
        """GEMM2's A operand: W8A8 quantises the intermediate per row, only the kept rows (`expert_first_token_offset[E]`),
        with `quantize` as in `gemm1_operands`."""
        if self.quantize_input:
            kept_rows = maps.expert_first_token_offset[maps.num_experts:]
            h_q, h_scales = (quantize or quantize_activations_int8)(intermediate, valid_rows=kept_rows)
            return h_q, {"w_scale": self.fc2_scales, "a_scale": h_scales}
        return intermediate, {"w_scale": self.fc2_scales, "group_size": self.group_size or 0}

    def linear_torch(self, x: torch.Tensor, weights: torch.Tensor, expert: int, gemm: int) -> torch.Tensor:
        """One expert's GEMM in torch with this scheme's numerics (the CPU path without Triton's interpreter)."""
        scales = self.fc1_scales if gemm == 1 else self.fc2_scales
        return int8_linear_torch(x, weights[expert], scales[expert], self.group_size, self.quantize_input)


@dataclass(frozen=True, eq=False)
class W8A16(_Int8Scheme):
    """Weight-only INT8: int8 `fc1`/`fc2` with per-output-channel scales (`group_size=None`; `fc1_scales` `[E, N1]`,
    `fc2_scales` `[E, H]`) or group-wise scales along K (`group_size` in {32, 64, 128}; `[E, N1, H/g]`, `[E, H, I/g]`).
    Activations and output stay in the input dtype. Build with `quantize_moe_weights(fc1, fc2, "w8a16", group_size)`."""

    group_size: int | None = None

    def __post_init__(self):
        if self.group_size is not None:
            _check_group_size(self.group_size, self.group_size, "the weights")


@dataclass(frozen=True, eq=False)
class W8A8(_Int8Scheme):
    """INT8 weights and activations on int8 tensor cores: per-output-channel weight scales (`fc1_scales` `[E, N1]`, `fc2_scales`
    `[E, H]`), activations quantised per token/row on the fly. Output in the input dtype. See the module docstring."""

    quantize_input: ClassVar[bool] = True


def scheme_from_op_arguments(fc1_scales, fc2_scales, scheme: str, group_size: int):
    """The INT8 scheme `_Int8Scheme.op_arguments` gave the op, or None for an unquantised call (`scheme` "")."""
    if not scheme:
        return None
    if scheme == "W8A8":
        return W8A8(fc1_scales, fc2_scales)
    return W8A16(fc1_scales, fc2_scales, group_size or None)


def _require_quant_kwargs(name, fn, scheme):
    if fn is None:
        return  # the built-in torch loop takes them
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return
    names = {p.name for p in params}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params) or {"weight_scales", "group_size",
                                                                         "quantize_input"} <= names:
        return
    raise TypeError(f"{name}: with quant={scheme} GEMM callbacks receive int8 weights plus the keyword arguments "
                    "weight_scales=, group_size= and quantize_input=; this callback does not accept them (see simple_moe.quant)")


def validate_quant(quant, input, fc1_expert_weights, fc2_expert_weights) -> None:
    """`fused_moe_simple`'s check of its `quant=` argument against the weights (None included)."""
    if quant is None:
        for name, w in (("fc1_expert_weights", fc1_expert_weights), ("fc2_expert_weights", fc2_expert_weights)):
            if isinstance(w, torch.Tensor) and w.dtype == torch.int8:
                raise TypeError(f"{name}: int8 weights need their scales: pass quant=simple_moe.quant.W8A16(fc1_scales, "
                                "fc2_scales, group_size) or W8A8(fc1_scales, fc2_scales)")
        return
    if not isinstance(quant, _Int8Scheme):
        raise TypeError(f"quant: expected None, simple_moe.quant.W8A16 or simple_moe.quant.W8A8, got {type(quant).__name__}")
    quant.validate(input, fc1_expert_weights, fc2_expert_weights)


def quantize_moe_weights(fc1_expert_weights: torch.Tensor, fc2_expert_weights: torch.Tensor, scheme: str = "w8a16",
                         group_size: int | None = None):
    """Quantises float `fc1`/`fc2` for a scheme: returns `(fc1 int8, fc2 int8, quant)` ready for `fused_moe_simple(quant=quant)`.

    `scheme`: "w8a16" (per channel, or group-wise with `group_size`) or "w8a8" (per channel only).
    """
    if scheme not in ("w8a16", "w8a8"):
        raise ValueError(f"scheme: expected 'w8a16' or 'w8a8', got {scheme!r}")
    if scheme == "w8a8" and group_size is not None:
        raise ValueError("group_size: W8A8 uses per-channel weight scales; group-wise scales are for W8A16 only")
    fc1_q, fc1_s = quantize_weights_int8(fc1_expert_weights, group_size)
    fc2_q, fc2_s = quantize_weights_int8(fc2_expert_weights, group_size)
    quant = W8A16(fc1_s, fc2_s, group_size) if scheme == "w8a16" else W8A8(fc1_s, fc2_s)
    return fc1_q, fc2_q, quant


# ---------------------------------------------------------------------------------------------------------------------------------
# cutlass_fused_moe's `use_int8_woq_per_channel=True` (our extension; plain layouts)


def cutlass_int8_woq_forward(input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights,
                             quant_scales, *, activation, act_params, fc1_expert_biases, fc2_expert_biases, output,
                             start_expert, total_experts: int):
    """W8A16 per channel behind `cutlass_fused_moe(..., use_int8_woq_per_channel=True)`.

    `fc1_expert_weights` int8 `[E, N1, H]` (up first, then gate, for gated activations), `fc2_expert_weights` int8 `[E, H, I]`,
    plain `[out, in]` layouts (not TensorRT-LLM's interleaved ones). `quant_scales = [fc1_scales [E, N1], fc2_scales [E, H]]`,
    symmetric per output channel, in the activation dtype (float32 accepted; they are read as float32). `activation`: an
    `ActivationType`, a name or an `Activation`; `act_params` the `[E, 3]` float32 tensor or None (defaults). `start_expert`: the
    first global expert id of this rank; `total_experts` the global expert count (E_local * ep_size), which bounds top_k.
    Returns `output` (allocated in the input dtype when None).
    """
    act = get_activation(activation)
    if not isinstance(quant_scales, (list, tuple)) or len(quant_scales) != 2:
        raise ValueError("quant_scales: use_int8_woq_per_channel expects [fc1_scales [E, N1], fc2_scales [E, H]], got "
                         f"{type(quant_scales).__name__}{'' if not isinstance(quant_scales, (list, tuple)) else f' of {len(quant_scales)}'}")
    quant = W8A16(quant_scales[0], quant_scales[1])
    quant.validate(input, fc1_expert_weights, fc2_expert_weights)
    # Read as float32 by the kernels either way; converting here (E*(N1+H) values) keeps one compiled kernel per tile.
    quant = W8A16(quant.fc1_scales.float(), quant.fc2_scales.float())
    num_experts = fc2_expert_weights.shape[0]
    validate_moe_inputs(input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights, act,
                        fc1_expert_biases, fc2_expert_biases, output, total_experts=total_experts, weight_dtype=torch.int8)
    if act_params is None:
        act_params = build_activation_params(act, num_experts, input.device)
    return moe_forward(input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights, act,
                       gate_layout="up_first", fc1_expert_biases=fc1_expert_biases, fc2_expert_biases=fc2_expert_biases,
                       act_params=act_params, output=output, start_expert=start_expert, quant=quant)


# ---------------------------------------------------------------------------------------------------------------------------------
# Accuracy report for the benchmark


# name -> (scheme, group_size)
REPORT_SCHEMES = {
    "w8a16": ("w8a16", None),
    "w8a16-g128": ("w8a16", 128),
    "w8a16-g64": ("w8a16", 64),
    "w8a16-g32": ("w8a16", 32),
    "w8a8": ("w8a8", None),
}


def _rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def quantization_error(input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights,
                       activation="swiglu", *, fc1_expert_biases=None, fc2_expert_biases=None, schemes=None) -> dict:
    """Error of each INT8 scheme against the unquantised model; reports, asserts nothing.

    Quantises the float weights (any float dtype, e.g. float32 masters) per scheme (`REPORT_SCHEMES` names, default all), runs
    `fused_moe_simple(..., quant=)` and returns `{name: {"rel_l2_vs_float64": e, "max_abs_vs_float64": m}}`, the reference being
    `reference_moe` (float64) on the *unquantised* weights; plus the entry "unquantized": the fast path on the weights cast to the
    input dtype, the floor the activation dtype sets.
    A scheme whose group size does not divide H or I gets `{"skipped": reason}`.
    """
    from .pipeline import fused_moe_simple
    from .reference import reference_moe

    ref = reference_moe(input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights, activation,
                        fc1_expert_biases=fc1_expert_biases, fc2_expert_biases=fc2_expert_biases)

    def errors(out):
        return {"rel_l2_vs_float64": _rel_l2(out, ref), "max_abs_vs_float64": float((out.double() - ref).abs().max())}

    report = {"unquantized": errors(fused_moe_simple(input, token_selected_experts, token_final_scales,
                                                     fc1_expert_weights.to(input.dtype), fc2_expert_weights.to(input.dtype),
                                                     activation=activation,
                                                     fc1_expert_biases=fc1_expert_biases,
                                                     fc2_expert_biases=fc2_expert_biases))}
    for name in (schemes or REPORT_SCHEMES):
        if name not in REPORT_SCHEMES:
            raise ValueError(f"schemes: unknown scheme {name!r}; expected some of {list(REPORT_SCHEMES)}")
        scheme, group = REPORT_SCHEMES[name]
        if group is not None and (input.shape[1] % group or fc2_expert_weights.shape[2] % group):
            report[name] = {"skipped": f"group size {group} must divide H={input.shape[1]} and "
                                       f"I={fc2_expert_weights.shape[2]}"}
            continue
        fc1_q, fc2_q, quant = quantize_moe_weights(fc1_expert_weights, fc2_expert_weights, scheme, group)
        out = fused_moe_simple(input, token_selected_experts, token_final_scales, fc1_q, fc2_q, activation=activation,
                               fc1_expert_biases=fc1_expert_biases, fc2_expert_biases=fc2_expert_biases, quant=quant)
        report[name] = errors(out)
    return report


# ---------------------------------------------------------------------------------------------------------------------------------
# check-build: the int8 variants of the grouped GEMM and the row quantiser.

def _int8_gemm_modes(block_k: int, dtype: torch.dtype, w8a8: bool):
    """(mode name, W_QUANT, GROUP_SIZE, BLOCK_K, A_INT8) of every int8 variant the launcher can run from a tile with `block_k`
    (W8A16's tiles, or W8A8's when `w8a8`).

    Group-wise: the launcher shrinks BLOCK_K to the group when the group is smaller, and GROUP_SIZE only enters `k0 // GROUP_SIZE`;
    so the groups at least as large as BLOCK_K compile to the same code and one of them stands for all. W8A8: the activation dtype
    is only the output's, bf16 stands for fp16.
    """
    if w8a8:
        return [("w8a8", 1, 1, block_k, True)]
    modes = [("w8a16", 1, 1, block_k, False)]
    for group in GROUP_SIZES:
        if group <= block_k:
            modes.append((f"w8a16-g{group}" if group < block_k else f"w8a16-g>={group}", 2, group, group, False))
    return modes


@register_variants
def _int8_gemm_variants():
    from .grouped_gemm import gemm_variant, model_gemms, pdl_modes

    seen = {}
    # What grouped_gemm() picks for int8 weights (W8A16) and for int8 weights and activations (W8A8, its own tiles).
    gemms = [(g, False) for g in model_gemms((torch.float16, torch.bfloat16), w_int8=True)]
    gemms += [(g, True) for g in model_gemms((torch.bfloat16,), w_int8=True, a_int8=True)]
    for g, w8a8 in gemms:
        for mode, w_quant, group, block_k, a_int8 in _int8_gemm_modes(g.tile.block_k, g.dtype, w8a8):
            if w_quant == 2 and (g.hidden % group or g.inter % group):
                continue
            for use_pdl in pdl_modes(g):
                key, variant = gemm_variant("grouped_gemm_int8", f"{mode} ", g, dataclasses.replace(g.tile, block_k=block_k),
                                            a_dtype=torch.int8 if a_int8 else None, w_dtype=torch.int8, w_quant=w_quant,
                                            group_size=group, a_int8=a_int8, use_pdl=use_pdl)
                seen.setdefault(key, variant)
    return list(seen.values())


_ROW_WIDTHS = (768, 1024, 1408, 1536, 2048, 2880, 4096, 7168, 14336, 16384)  # H and I of the model shapes


@register_variants
def _quantize_rows_variants():
    variants = []
    picked = sorted({(_row_block(w), w <= _row_block(w)[0]) for w in _ROW_WIDTHS})
    for (block, num_warps), single in picked:
        for tname in ("fp16", "bf16"):
            for has_valid in (False, True):  # GEMM1's input (all T rows) / the intermediate (kept rows only)
                variants.append(KernelVariant(
                    kernel="quantize_rows_int8",
                    variant=f"{tname} BLOCK={block} {'single' if single else 'two'}-pass{' valid_rows' if has_valid else ''}",
                    fn=_quantize_rows_kernel,
                    signature={"x_ptr": f"*{tname}", "q_ptr": "*i8", "scale_ptr": "*fp32",
                               "valid_rows_ptr": "*i64" if has_valid else "*fp32", "num_cols": "i32",
                               "stride_xm": "i32:16", "stride_xk": "constexpr", "stride_qm": "i32:16"},
                    constexprs={"stride_xk": 1, "HAS_VALID_ROWS": has_valid, "SINGLE_PASS": single, "BLOCK": block},
                    num_warps=num_warps,
                    num_stages=1,
                ))
    return variants
