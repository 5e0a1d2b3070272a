"""The fold kernel: ``acc += w * x`` and ``sum(x * x)`` in one pass over an update.

FedAvg's streaming mean (:class:`~.strategy.WeightedMean`) must check every value of an update
(finite, norm under the bound) and add it to the sums. As numpy passes that is a dot product,
a multiply and an add, reading the update from memory more than once; this kernel reads it once,
which is what numpy's own ``acc += x`` costs.

With numba installed (``pip install 'fedmq[fast]'``) the kernel is compiled on first use (about
half a second; the daemon does it at start-up with :func:`warm_up`) and folds tensors of at
least :data:`SMALL` elements (and, once compiled, the smaller ones as well). Small tensors before
that, and all of them without numba, are folded with the same arithmetic as numpy passes. Both
give bit-identical sums: each element becomes ``float32(acc + float32(w * x))``, with no fused
multiply-add. Only the sum of squares may differ
in its last bits (numba adds it in another order); it only feeds the checks.

``FEDMQ_FOLD=numpy`` in the environment forces the numpy path.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

FoldFn = Callable[[np.ndarray, np.ndarray, np.float32], float]

#: Tensors smaller than this are folded with numpy (same bits): for them a pass is cheap either
#: way, and a small model (the demo's) never pays for importing numba and compiling the kernel.
SMALL = 1 << 16

_lock = threading.Lock()
_kernel: FoldFn | None = None
_kernel_name = ""


def fold_numpy(acc: np.ndarray, x: np.ndarray, w: np.float32) -> float:
    """``acc += w * x`` (float32, 1-D, same size) and return ``sum(x * x)``, as numpy passes."""
    with np.errstate(over="ignore", invalid="ignore"):
        squares = float(np.dot(x, x))
        acc += x * w
    return squares


def _compile_numba() -> FoldFn:
    import numba  # optional and slow to import: only when the kernel is first needed

    # "reassoc" lets the sum of squares use vector lanes. No "contract" (it would fuse w * x + acc
    # into one rounding and differ from the numpy path), no "nnan"/"ninf" (the caller's checks
    # rely on NaN and infinity propagating into the sum).
    # The loop walks four quarters of the tensor at once: four streams of reads and writes keep
    # more cache misses in flight than one, and on this kind of machine that reads memory faster
    # than numpy's single pass of ``acc += x`` (bench/PERFORMANCE.md). Each element's arithmetic
    # is the same whatever the order, so the sums keep their bits.
    @numba.njit(nogil=True, fastmath={"reassoc", "nsz", "arcp"}, boundscheck=False, cache=False)
    def fold_numba(acc, x, w):  # pragma: no cover - compiled; the tests run it through fold()
        n = x.size
        q = n // 4
        s0 = s1 = s2 = s3 = np.float32(0.0)
        for i in range(q):
            v0 = x[i]
            v1 = x[q + i]
            v2 = x[2 * q + i]
            v3 = x[3 * q + i]
            s0 += v0 * v0
            s1 += v1 * v1
            s2 += v2 * v2
            s3 += v3 * v3
            acc[i] += w * v0
            acc[q + i] += w * v1
            acc[2 * q + i] += w * v2
            acc[3 * q + i] += w * v3
        for i in range(4 * q, n):
            v = x[i]
            s0 += v * v
            acc[i] += w * v
        return (s0 + s1) + (s2 + s3)

    float32_1d = numba.float32[::1]
    fold_numba.compile((float32_1d, numba.types.Array(numba.float32, 1, "C", readonly=True), numba.float32))
    fold_numba.compile((float32_1d, float32_1d, numba.float32))
    fold_numba.disable_compile()  # any other argument type is a bug in the caller, not a new signature
    return fold_numba


def kernel() -> tuple[FoldFn, str]:
    """The fold function and its name (``numba`` or ``numpy``); compiles on the first call."""
    global _kernel, _kernel_name
    with _lock:
        if _kernel is None:
            if os.environ.get("FEDMQ_FOLD", "").strip().lower() == "numpy":
                _kernel, _kernel_name = fold_numpy, "numpy"
            else:
                try:
                    _kernel, _kernel_name = _compile_numba(), "numba"
                except ImportError:
                    log.info("numba is not installed: folding updates with numpy passes (about 1.5x slower "
                             "on large models; pip install 'fedmq[fast]' for the one-pass kernel)")
                    _kernel, _kernel_name = fold_numpy, "numpy"
        return _kernel, _kernel_name


def warm_up(largest: int) -> str:
    """Compile the kernel now if a tensor of ``largest`` elements will need it (call it from a
    worker thread at start-up); return the name of what folds the largest tensor."""
    return kernel()[1] if largest >= SMALL else "numpy"


def fold(acc: np.ndarray, x: np.ndarray, weight: float) -> float:
    """``acc += weight * x`` elementwise in float32 and return ``sum(x * x)``.

    ``acc`` is a C-contiguous float32 array of ``x``'s size (any shape); ``x`` is converted to a
    contiguous float32 array if it is not one, and must not overlap ``acc``. A NaN or infinity in
    ``x`` makes the returned sum non-finite, and so does a sum that overflows float32; ``acc`` is
    changed either way (see :class:`~.strategy.WeightedMean` for how a refusal is undone).
    """
    # once compiled, the kernel folds small tensors too: the same bits, and no BLAS call (numpy's
    # dot wakes OpenBLAS's threads, which then spin on this machine's few cores)
    fn = _kernel if _kernel is not None else kernel()[0] if x.size >= SMALL else fold_numpy
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)
    return float(fn(acc.reshape(-1), x.reshape(-1), np.float32(weight)))
