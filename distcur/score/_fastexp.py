"""Fused, vectorised ``sum_j 2^(e_ij + c_j - s_i)`` over a float32 block: the KDE's only non-GEMM work.

``torch.exp_`` followed by ``torch.sum`` makes two passes over each block of exponents and uses a
10-ulp exp; on the development machine (AVX2, Zen 1) the two took more time than the GEMM at
d = 16 (measured per 256 x 1024 block: exp 2.2 ns + sum 0.14 ns per pair vs GEMM 2.0 ns).
This kernel reads the block once. The caller folds log2(e) into the GEMM operands, so exponents
arrive in base 2 and the range reduction is exact: ``2^x = 2^n * 2^f`` with ``n = rint(x)`` (one
vector round to nearest) and ``f = x - n`` in [-1/2, 1/2] (both exact in float32), ``2^n`` built
from its exponent bits and ``2^f`` a degree-4 polynomial fitted for relative error (max 5.3e-6 over
the interval: below the error bound of the float32 GEMM that produced the exponents, which the
caller keeps under 1e-4 or recomputes the row in float64). Per element that is 13 vector
operations; rounding by truncating ``x + 127.5`` (the kernel's first form) took two more and lost
the low bits of ``x`` to the bias (measured here: 0.164 vs 0.180 ns per pair, max relative error
2.2e-6 vs 3.4e-6). LLVM vectorises the loop (``fastmath`` permits the reassociated reduction);
the kernel releases the GIL, so one Python thread per core runs GEMM + kernel on its own blocks.

Exponents are clamped to [-126, 126] first: terms below 2^-126 relative to the row's shift flush
to 0 (they cannot matter next to the shift's own term, 1), and a term above 2^126 would make the
row sum overflow, which the caller detects (sum > :data:`OVERFLOW`) and recomputes exactly.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# Least-squares fit of 2^f on [-1/2, 1/2] weighted for relative error (float64 fit, float32 use).
_P0, _P1, _P2, _P3, _P4 = (np.float32(c) for c in (
    0.9999994398761426, 0.6931280300536824, 0.2402469639806772, 0.0558703904094391, 0.009554108352191393,
))
_LO, _HI = np.float32(-126.0), np.float32(126.0)
_EXP_BIAS = np.float32(127.0)
# A row sum above this may hold a clamped (overflowed) term: recompute it exactly.
OVERFLOW = 1e30
# Max relative error of one term (the polynomial's, plus float32 rounding of its evaluation).
MAX_REL_ERROR = 6e-6


@intrinsic
def _rint(typingctx, x):
    """llvm.rint.f32: round to nearest even (vectorises to one vroundps / vrndscaleps; numba's
    round() returns an int64 and does not)."""

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.rint", [ir.FloatType()])
        return builder.call(fn, args)

    return types.float32(types.float32), codegen


@intrinsic
def _pow2_biased(typingctx, k):
    """2^(k - 127) for a float32 ``k`` holding an integer in [1, 253]: the float whose bits are k << 23."""

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.shl(builder.fptosi(args[0], i32), ir.Constant(i32, 23))
        return builder.bitcast(bits, ir.FloatType())

    return types.float32(types.float32), codegen


@njit(fastmath=True, nogil=True, cache=True, error_model="numpy", boundscheck=False)
def exp2_row_sums(e, col, shift, sums):  # pragma: no cover - compiled
    """``sums[i] += sum_j 2^(e[i, j] + col[j] - shift[i])`` for a C-contiguous float32 block ``e`` [b, k]."""
    b, k = e.shape
    for i in range(b):
        s = np.float32(0.0)
        sh = shift[i]
        for j in range(k):
            x = min(max(e[i, j] + col[j] - sh, _LO), _HI)
            n = _rint(x)  # in [-126, 126]
            f = x - n  # exact
            p = _P0 + f * (_P1 + f * (_P2 + f * (_P3 + f * _P4)))
            s += p * _pow2_biased(n + _EXP_BIAS)
        sums[i] += s

