/*
 * Training and inference kernels of the sequential MLP for the fedmq Wasm backend.
 *
 * Freestanding C for wasm32 (no libc, no imports); built by build.py. The maths follows
 * fedmq.edge_agent.training step for step, in float32: forward (dense + ReLU, last layer linear),
 * mean softmax cross-entropy, backward with the weights from before the step, then
 * W -= lr * dW and b -= lr * db.
 *
 * Exports: memory, train_epoch(args) and logits(args). Each function takes the offset of its
 * argument block (struct train_args / struct logits_args below) and returns 0 or a STATUS_* code.
 *
 * Memory: the host never writes to the module's initial memory (the stack and static data live
 * there); it grows the memory and places every buffer above the initial size, at offsets of its
 * choosing:
 *   widths   int32[num_layers + 1]        inputs, hidden..., classes
 *   params   float32, per layer i: W_i (widths[i] x widths[i+1], row-major) then b_i, packed
 *   x        float32[n][widths[0]];  y, order: int32[n] (0 <= y < classes)
 *   scratch  float32[train_scratch_floats() or logits_scratch_floats()]
 */

#include <stdint.h>
#include <wasm_simd128.h>

#define EXPORT(name) __attribute__((export_name(name)))
#define INLINE static inline __attribute__((always_inline))

enum {
    STATUS_OK = 0,
    STATUS_BAD_SHAPE = 1,      /* a width, count or batch size is out of range */
    STATUS_SCRATCH = 2,        /* the scratch buffer is smaller than the kernel needs */
};

enum { EPI_BIAS, EPI_BIAS_RELU, EPI_MASK, EPI_SGD };

#define MAX_LAYERS 64
#define MAX_WIDTH 65536
#define MAX_BATCH 65536
#define LOGITS_TILE 64         /* rows per inference tile: bounds the scratch, keeps it in cache */

/* ---- float32 exp and log, evaluated in double and rounded once ----------------------------
 * Double precision makes the result the correctly rounded float32 in all but rare ties, so it
 * agrees with numpy's float32 exp/log to an ulp or two; only a few values per example use them. */

INLINE double pow2i(int n) {               /* 2^n for -1022 <= n <= 1023 */
    union { uint64_t u; double d; } v;
    v.u = (uint64_t)(n + 1023) << 52;
    return v.d;
}

static float exp_f32(float xf) {
    double x = xf;
    if (x != x) return xf;
    if (x < -110.0) return 0.0f;           /* below the smallest float32 subnormal */
    if (x > 89.0) return __builtin_inff();
    double n = __builtin_rint(x * 1.4426950408889634);
    double r = x - n * 0.6931471805599453;  /* |r| <= 0.35; the error of n*ln2 is < 1e-14 */
    /* Taylor to degree 11: truncation error below 1e-14 on |r| <= 0.35 */
    double p = 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    return (float)(p * pow2i((int)n));
}

static float log_f32(float xf) {
    double x = xf;
    if (x != x || x < 0.0) return __builtin_nanf("");
    if (x == 0.0) return -__builtin_inff();
    if (x > 3.5e38) return xf;             /* +inf */
    union { uint64_t u; double d; } v = { .d = x };   /* float32 values are normal doubles */
    int e = (int)((v.u >> 52) & 0x7ff) - 1023;
    v.u = (v.u & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL;
    double m = v.d;                          /* x = m * 2^e, 1 <= m < 2 */
    if (m > 1.4142135623730951) { m *= 0.5; e += 1; }
    double s = (m - 1.0) / (m + 1.0);        /* |s| <= 0.1716: log m = 2 atanh s */
    double s2 = s * s;
    double q = 1.0 / 19.0;
    q = q * s2 + 1.0 / 17.0;
    q = q * s2 + 1.0 / 15.0;
    q = q * s2 + 1.0 / 13.0;
    q = q * s2 + 1.0 / 11.0;
    q = q * s2 + 1.0 / 9.0;
    q = q * s2 + 1.0 / 7.0;
    q = q * s2 + 1.0 / 5.0;
    q = q * s2 + 1.0 / 3.0;
    q = q * s2 + 1.0;
    return (float)(e * 0.6931471805599453 + 2.0 * s * q);
}

/* ---- dense products --------------------------------------------------------------------------
 * C[i][j] <op>= sum_p A(i, p) * B(p, j) for i < m, j < n, p < k, where A(i, p) = a[i*ais + p*aps]
 * and B(p, j) = b[p*bps + j*bjs]: either operand may be a transposed view. The epilogue <op> is
 *   EPI_BIAS       C = acc + bias[j]
 *   EPI_BIAS_RELU  C = max(acc + bias[j], 0)
 *   EPI_MASK       C = acc * (mask[i][j] > 0)          (mask has C's layout)
 *   EPI_SGD        C -= lr * acc                       (C is the weight matrix itself)
 * The accumulator starts at zero and the bias is added after the sum, as numpy's h @ W + b does.
 * No fused multiply-add: f32x4 mul then add keeps the kernel deterministic across machines, and
 * the relaxed-SIMD madd measured slower under Cranelift (it adds register moves).
 *
 * Blocking: B is copied into a contiguous buffer in panels of k x 8 columns, and 4-row tiles of C
 * are accumulated in 8 registers. Packing also turns a transposed B into a plain one (no separate
 * transpose pass) and avoids the cache-set conflicts of walking a column panel of a matrix whose
 * rows are a power-of-two bytes apart. gemm (forward, backward) walks panels outer so a panel is
 * reused by every row tile; gemm_rows (weight update, k = batch rows) packs all of B and walks
 * rows outer so the weight matrix is read and written once, in order. */

#define MR 4                   /* rows per tile */
#define NR 8                   /* columns per panel: two f32x4 vectors */
#define LANE(v, q) wasm_i32x4_shuffle(v, v, q, q, q, q)
#define MADD(acc, x, y) wasm_f32x4_add(acc, wasm_f32x4_mul(x, y))

INLINE v128_t epi_vec(int epi, v128_t acc, const float *c, const float *bias, const float *mask, float lr) {
    switch (epi) {
    case EPI_BIAS:
        return wasm_f32x4_add(acc, wasm_v128_load(bias));
    case EPI_BIAS_RELU:
        /* pmax(h, 0) = h < 0 ? 0 : h, as np.maximum for every non-NaN h; NaN passes through */
        return wasm_f32x4_pmax(wasm_f32x4_add(acc, wasm_v128_load(bias)), wasm_f32x4_splat(0.0f));
    case EPI_MASK: {
        v128_t keep = wasm_f32x4_gt(wasm_v128_load(mask), wasm_f32x4_splat(0.0f));
        return wasm_f32x4_mul(acc, wasm_v128_and(keep, wasm_f32x4_splat(1.0f)));
    }
    default:
        return wasm_f32x4_sub(wasm_v128_load(c), wasm_f32x4_mul(wasm_f32x4_splat(lr), acc));
    }
}

INLINE float epi_scalar(int epi, float acc, const float *c, const float *bias, const float *mask, float lr) {
    switch (epi) {
    case EPI_BIAS:
        return acc + *bias;
    case EPI_BIAS_RELU: {
        float h = acc + *bias;
        return h < 0.0f ? 0.0f : h;
    }
    case EPI_MASK:
        return acc * (*mask > 0.0f ? 1.0f : 0.0f);
    default:
        return *c - lr * acc;
    }
}

/* Copy B(0..k-1, j0..j0+4V-1) into pack, row after row (row stride 4V). */
INLINE void pack_panel(int V, int k, const float *b, int bps, int bjs, int j0, float *pack) {
    const int ld = 4 * V;
    if (bjs == 1) {
        for (int p = 0; p < k; p++)
            for (int v = 0; v < V; v++) wasm_v128_store(pack + p * ld + 4 * v, wasm_v128_load(b + p * bps + j0 + 4 * v));
        return;
    }
    /* B is a transposed view (column j of B is row j of a matrix): 4x4 transposes in registers */
    for (int v = 0; v < V; v++) {
        const float *r0 = b + (j0 + 4 * v) * bjs, *r1 = r0 + bjs, *r2 = r1 + bjs, *r3 = r2 + bjs;
        int p = 0;
        if (bps == 1) {
            for (; p + 4 <= k; p += 4) {
                v128_t x0 = wasm_v128_load(r0 + p), x1 = wasm_v128_load(r1 + p);
                v128_t x2 = wasm_v128_load(r2 + p), x3 = wasm_v128_load(r3 + p);
                v128_t t0 = wasm_i32x4_shuffle(x0, x1, 0, 4, 1, 5), t1 = wasm_i32x4_shuffle(x2, x3, 0, 4, 1, 5);
                v128_t t2 = wasm_i32x4_shuffle(x0, x1, 2, 6, 3, 7), t3 = wasm_i32x4_shuffle(x2, x3, 2, 6, 3, 7);
                float *dst = pack + p * ld + 4 * v;
                wasm_v128_store(dst, wasm_i32x4_shuffle(t0, t1, 0, 1, 4, 5));
                wasm_v128_store(dst + ld, wasm_i32x4_shuffle(t0, t1, 2, 3, 6, 7));
                wasm_v128_store(dst + 2 * ld, wasm_i32x4_shuffle(t2, t3, 0, 1, 4, 5));
                wasm_v128_store(dst + 3 * ld, wasm_i32x4_shuffle(t2, t3, 2, 3, 6, 7));
            }
        }
        for (; p < k; p++) {
            float *dst = pack + p * ld + 4 * v;
            dst[0] = r0[p * bps];
            dst[1] = r1[p * bps];
            dst[2] = r2[p * bps];
            dst[3] = r3[p * bps];
        }
    }
}

/* R rows (R <= MR) by V vectors of columns (V <= 2) of C at (i0, j0), from the packed panel bp.
 * Splatting A one float at a time costs Cranelift four instructions per splat; loading four floats
 * of A at once and broadcasting lanes costs one shuffle each, and unrolling four steps of p
 * amortises the register moves Cranelift inserts at every back edge. */
INLINE void tile_vec(int epi, int R, int V, int i0, int j0, int k, const float *a, int ais, int aps,
                     const float *bp, float *c, int ldc, const float *bias, const float *mask, float lr) {
    const int ldb = 4 * V;
    v128_t acc[MR][2];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) acc[r][v] = wasm_f32x4_splat(0.0f);
    const float *ap = a + i0 * ais;
    int p = 0;
    if (aps == 1) {                            /* rows of A contiguous: A(r, p..p+3) in one load */
        for (; p + 4 <= k; p += 4) {
            v128_t av[MR];
            for (int r = 0; r < R; r++) av[r] = wasm_v128_load(ap + r * ais + p);
#define STEP_ROWS(q)                                                                      \
            {                                                                             \
                v128_t bv[2];                                                             \
                for (int v = 0; v < V; v++) bv[v] = wasm_v128_load(bp + (q) * ldb + 4 * v); \
                for (int r = 0; r < R; r++) {                                             \
                    v128_t x = LANE(av[r], q);                                            \
                    for (int v = 0; v < V; v++) acc[r][v] = MADD(acc[r][v], x, bv[v]);    \
                }                                                                         \
            }
            STEP_ROWS(0) STEP_ROWS(1) STEP_ROWS(2) STEP_ROWS(3)
#undef STEP_ROWS
            bp += 4 * ldb;
        }
        ap += p;
    } else if (ais == 1 && R == MR) {          /* columns of A contiguous: A(0..3, p) in one load */
        for (; p + 4 <= k; p += 4) {
#define STEP_COLS(q)                                                                      \
            {                                                                             \
                v128_t av = wasm_v128_load(ap + (q) * aps);                               \
                v128_t xs[MR] = {LANE(av, 0), LANE(av, 1), LANE(av, 2), LANE(av, 3)};    \
                v128_t bv[2];                                                             \
                for (int v = 0; v < V; v++) bv[v] = wasm_v128_load(bp + (q) * ldb + 4 * v); \
                for (int r = 0; r < MR; r++)                                              \
                    for (int v = 0; v < V; v++) acc[r][v] = MADD(acc[r][v], xs[r], bv[v]); \
            }
            STEP_COLS(0) STEP_COLS(1) STEP_COLS(2) STEP_COLS(3)
#undef STEP_COLS
            ap += 4 * aps;
            bp += 4 * ldb;
        }
    }
    for (; p < k; p++) {
        v128_t bv[2];
        for (int v = 0; v < V; v++) bv[v] = wasm_v128_load(bp + 4 * v);
        for (int r = 0; r < R; r++) {
            v128_t x = wasm_v128_load32_splat(ap + r * ais);
            for (int v = 0; v < V; v++) acc[r][v] = MADD(acc[r][v], x, bv[v]);
        }
        ap += aps;
        bp += ldb;
    }
    for (int r = 0; r < R; r++) {
        for (int v = 0; v < V; v++) {
            int j = j0 + 4 * v, at = (i0 + r) * ldc + j;
            wasm_v128_store(c + at, epi_vec(epi, acc[r][v], c + at, bias + j, mask + at, lr));
        }
    }
}

/* R rows of one column j of C, straight from B. */
INLINE void tile_col(int epi, int R, int i0, int j, int k, const float *a, int ais, int aps,
                     const float *b, int bps, int bjs, float *c, int ldc, const float *bias, const float *mask,
                     float lr) {
    float acc[MR];
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
    const float *ap = a + i0 * ais;
    const float *bp = b + j * bjs;
    for (int p = 0; p < k; p++) {
        float bj = *bp;
        for (int r = 0; r < R; r++) acc[r] += ap[r * ais] * bj;
        ap += aps;
        bp += bps;
    }
    for (int r = 0; r < R; r++) {
        int at = (i0 + r) * ldc + j;
        c[at] = epi_scalar(epi, acc[r], c + at, bias + j, mask + at, lr);
    }
}

INLINE void panel(int epi, int V, int j, int m, int k, const float *a, int ais, int aps, const float *b, int bps,
                  int bjs, float *c, int ldc, const float *bias, const float *mask, float lr, float *pack) {
    pack_panel(V, k, b, bps, bjs, j, pack);
    int i = 0;
    for (; i + MR <= m; i += MR) tile_vec(epi, MR, V, i, j, k, a, ais, aps, pack, c, ldc, bias, mask, lr);
    for (; i < m; i++) tile_vec(epi, 1, V, i, j, k, a, ais, aps, pack, c, ldc, bias, mask, lr);
}

/* Column panels outer, row tiles inner: each packed panel (k x NR) is reused by every row tile.
 * For a large k. pack holds NR * k floats. */
INLINE void gemm(int epi, int m, int n, int k, const float *a, int ais, int aps, const float *b, int bps, int bjs,
                 float *c, int ldc, const float *bias, const float *mask, float lr, float *pack) {
    int j = 0;
    for (; j + NR <= n; j += NR) panel(epi, 2, j, m, k, a, ais, aps, b, bps, bjs, c, ldc, bias, mask, lr, pack);
    if (j + 4 <= n) {
        panel(epi, 1, j, m, k, a, ais, aps, b, bps, bjs, c, ldc, bias, mask, lr, pack);
        j += 4;
    }
    for (; j < n; j++) {
        int i = 0;
        for (; i + MR <= m; i += MR) tile_col(epi, MR, i, j, k, a, ais, aps, b, bps, bjs, c, ldc, bias, mask, lr);
        for (; i < m; i++) tile_col(epi, 1, i, j, k, a, ais, aps, b, bps, bjs, c, ldc, bias, mask, lr);
    }
}

/* All of B packed first, then row tiles outer: each line of C is read and written once, in
 * order. For a small k (the weight update, k = batch rows), where C is the big operand.
 * pack holds k * n floats. */
INLINE void gemm_rows(int epi, int m, int n, int k, const float *a, int ais, int aps, const float *b, int bps,
                      int bjs, float *c, int ldc, const float *bias, const float *mask, float lr, float *pack) {
    int n8 = n & ~(NR - 1), n4 = n & ~3;
    for (int j = 0; j < n8; j += NR) pack_panel(2, k, b, bps, bjs, j, pack + j * k);
    if (n4 > n8) pack_panel(1, k, b, bps, bjs, n8, pack + n8 * k);
    int i = 0;
    for (; i + MR <= m; i += MR) {
        for (int j = 0; j < n8; j += NR) tile_vec(epi, MR, 2, i, j, k, a, ais, aps, pack + j * k, c, ldc, bias, mask, lr);
        if (n4 > n8) tile_vec(epi, MR, 1, i, n8, k, a, ais, aps, pack + n8 * k, c, ldc, bias, mask, lr);
        for (int j = n4; j < n; j++) tile_col(epi, MR, i, j, k, a, ais, aps, b, bps, bjs, c, ldc, bias, mask, lr);
    }
    for (; i < m; i++) {
        for (int j = 0; j < n8; j += NR) tile_vec(epi, 1, 2, i, j, k, a, ais, aps, pack + j * k, c, ldc, bias, mask, lr);
        if (n4 > n8) tile_vec(epi, 1, 1, i, n8, k, a, ais, aps, pack + n8 * k, c, ldc, bias, mask, lr);
        for (int j = n4; j < n; j++) tile_col(epi, 1, i, j, k, a, ais, aps, b, bps, bjs, c, ldc, bias, mask, lr);
    }
}

/* One out-of-line instance per use keeps the module small. Unused epilogue operands point at c. */

/* c = a @ w + bias, then ReLU if relu: a is m x k, w is k x n */
static __attribute__((noinline)) void dense_forward(int relu, int m, int n, int k, const float *a, const float *w,
                                                      const float *bias, float *c, float *pack) {
    if (relu)
        gemm(EPI_BIAS_RELU, m, n, k, a, k, 1, w, n, 1, c, n, bias, c, 0.0f, pack);
    else
        gemm(EPI_BIAS, m, n, k, a, k, 1, w, n, 1, c, n, bias, c, 0.0f, pack);
}

/* c = (g @ w^T) * (mask > 0): g is m x fan_out, w is fan_in x fan_out, c and mask m x fan_in */
static __attribute__((noinline)) void dense_backward(int m, int fan_in, int fan_out, const float *g, const float *w,
                                                       const float *mask, float *c, float *pack) {
    gemm(EPI_MASK, m, fan_in, fan_out, g, fan_out, 1, w, 1, fan_out, c, fan_in, c, mask, 0.0f, pack);
}

/* w -= lr * (act^T @ g): act is rows x fan_in, g is rows x fan_out, w is fan_in x fan_out */
static __attribute__((noinline)) void dense_sgd(int fan_in, int fan_out, int rows, const float *act, const float *g,
                                                  float *w, float lr, float *pack) {
    gemm_rows(EPI_SGD, fan_in, fan_out, rows, act, 1, fan_in, g, fan_out, 1, w, fan_out, w, w, lr, pack);
}

/* ---- the model ------------------------------------------------------------------------------ */

static int valid_widths(const int32_t *widths, int num_layers) {
    if (num_layers < 1 || num_layers > MAX_LAYERS) return 0;
    for (int i = 0; i <= num_layers; i++)
        if (widths[i] < 1 || widths[i] > MAX_WIDTH) return 0;
    return widths[num_layers] >= 2;
}

static int max_width(const int32_t *widths, int num_layers) {
    int w = 0;
    for (int i = 0; i <= num_layers; i++) w = widths[i] > w ? widths[i] : w;
    return w;
}

/* Floats of scratch train_epoch needs: every layer's activations for one batch, two gradient
 * buffers and the pack buffer (a k x NR panel, or a whole batch x width gradient for gemm_rows).
 * wasm_backend.py computes the same numbers. */
static uint64_t train_scratch_floats(const int32_t *widths, int num_layers, int batch) {
    uint64_t acts = 0, widest = (uint64_t)max_width(widths, num_layers);
    for (int i = 0; i <= num_layers; i++) acts += (uint64_t)widths[i];
    uint64_t pack = widest * (uint64_t)(batch > NR ? batch : NR);
    return (uint64_t)batch * acts + 2u * (uint64_t)batch * widest + pack;
}

static uint64_t logits_scratch_floats(const int32_t *widths, int num_layers) {
    uint64_t widest = (uint64_t)max_width(widths, num_layers);
    return 2u * LOGITS_TILE * widest + NR * widest;
}

static void layer_pointers(const int32_t *widths, int num_layers, float *params, float **w, float **b) {
    float *p = params;
    for (int i = 0; i < num_layers; i++) {
        w[i] = p;
        p += widths[i] * widths[i + 1];
        b[i] = p;
        p += widths[i + 1];
    }
}

/* Softmax cross-entropy of one batch of logits z (rows x classes), as training.softmax_cross_entropy:
 * writes the loss gradient (probs - onehot) / rows into g, returns the float32 sum of the losses
 * and adds the number of rows whose first arg-max is the label to *correct. */
static float softmax_xent(const float *z, const int32_t *y, const int32_t *rows_idx, int rows, int classes,
                          float *g, int32_t *correct) {
    float loss_sum = 0.0f;
    float count = (float)rows;
    for (int r = 0; r < rows; r++) {
        const float *zr = z + r * classes;
        float *gr = g + r * classes;
        int label = y[rows_idx[r]];
        int best = 0;
        for (int j = 1; j < classes; j++)
            if (zr[j] > zr[best]) best = j;
        float zmax = zr[best];
        *correct += best == label;
        float total = 0.0f;
        for (int j = 0; j < classes; j++) {
            gr[j] = exp_f32(zr[j] - zmax);
            total += gr[j];
        }
        loss_sum += log_f32(total) - (zr[label] - zmax);
        for (int j = 0; j < classes; j++) gr[j] = gr[j] / total;
        gr[label] -= 1.0f;
        for (int j = 0; j < classes; j++) gr[j] = gr[j] / count;
    }
    return loss_sum;
}

/* The argument blocks the host writes before each call: one pointer argument instead of a dozen
 * keeps the Python -> Wasm call cheap (wasmtime-py converts every argument in Python). Pointers
 * are 32-bit offsets into linear memory, so both structs are arrays of 4-byte fields. */
struct train_args {
    const int32_t *widths;     /* num_layers + 1 widths */
    int32_t num_layers;
    float *params;             /* updated in place */
    const float *x;            /* all examples, n x widths[0] */
    const int32_t *y;
    const int32_t *order;      /* this epoch's permutation of the examples */
    int32_t n;
    int32_t batch_size;
    float lr;
    float *scratch;
    int32_t scratch_floats;
    uint8_t *out;              /* f64 loss sum at out, int32 correct count at out + 8 */
};

struct logits_args {
    const int32_t *widths;
    int32_t num_layers;
    const float *params;
    const float *x;            /* n x widths[0] */
    int32_t n;
    float *scratch;
    int32_t scratch_floats;
    float *out;                /* n x classes */
};

_Static_assert(sizeof(struct train_args) == 48 && sizeof(struct logits_args) == 32, "host-visible layout");

/* One epoch of minibatch SGD over the examples in `order` (n of them, consecutive batches of
 * batch_size, the last one possibly short), updating params in place. Writes the epoch's loss sum
 * and the number of correct on-the-fly predictions at out. */
EXPORT("train_epoch")
int32_t train_epoch(const struct train_args *args) {
    const int32_t *widths = args->widths, *y = args->y, *order = args->order;
    int num_layers = args->num_layers, n = args->n, batch_size = args->batch_size;
    const float *x = args->x;
    float lr = args->lr;
    if (!valid_widths(widths, num_layers) || n < 0 || batch_size < 1 || batch_size > MAX_BATCH) return STATUS_BAD_SHAPE;
    if (train_scratch_floats(widths, num_layers, batch_size) > (uint64_t)(uint32_t)args->scratch_floats)
        return STATUS_SCRATCH;
    float *w[MAX_LAYERS], *b[MAX_LAYERS], *act[MAX_LAYERS + 1];
    layer_pointers(widths, num_layers, args->params, w, b);
    int widest = max_width(widths, num_layers);
    float *s = args->scratch;
    for (int i = 0; i <= num_layers; i++) {
        act[i] = s;
        s += batch_size * widths[i];
    }
    float *grad = s;
    float *grad_prev = grad + batch_size * widest;
    float *pack = grad_prev + batch_size * widest;

    int last = num_layers - 1, inputs = widths[0], classes = widths[num_layers];
    double loss_sum = 0.0;
    int32_t correct = 0;
    for (int start = 0; start < n; start += batch_size) {
        int rows = n - start < batch_size ? n - start : batch_size;
        const int32_t *idx = order + start;
        for (int r = 0; r < rows; r++) {
            const float *src = x + (uint32_t)idx[r] * (uint32_t)inputs;
            float *dst = act[0] + r * inputs;
            for (int j = 0; j < inputs; j++) dst[j] = src[j];
        }
        for (int i = 0; i < num_layers; i++)
            dense_forward(i < last, rows, widths[i + 1], widths[i], act[i], w[i], b[i], act[i + 1], pack);
        loss_sum += (double)softmax_xent(act[num_layers], y, idx, rows, classes, grad, &correct);

        for (int i = last; i >= 0; i--) {
            int fan_in = widths[i], fan_out = widths[i + 1];
            /* the gradient flowing back uses the weights from before this step's update */
            if (i > 0) dense_backward(rows, fan_in, fan_out, grad, w[i], act[i], grad_prev, pack);
            dense_sgd(fan_in, fan_out, rows, act[i], grad, w[i], lr, pack);
            for (int j = 0; j < fan_out; j++) {
                float db = 0.0f;
                for (int r = 0; r < rows; r++) db += grad[r * fan_out + j];
                b[i][j] -= lr * db;
            }
            float *t = grad;
            grad = grad_prev;
            grad_prev = t;
        }
    }
    __builtin_memcpy(args->out, &loss_sum, 8);
    __builtin_memcpy(args->out + 8, &correct, 4);
    return STATUS_OK;
}

/* Logits of n examples (x is n x inputs) into out (n x classes), LOGITS_TILE rows at a time. */
EXPORT("logits")
int32_t logits(const struct logits_args *args) {
    const int32_t *widths = args->widths;
    int num_layers = args->num_layers, n = args->n;
    float *scratch = args->scratch, *out = args->out;
    if (!valid_widths(widths, num_layers) || n < 0) return STATUS_BAD_SHAPE;
    if (logits_scratch_floats(widths, num_layers) > (uint64_t)(uint32_t)args->scratch_floats) return STATUS_SCRATCH;
    float *w[MAX_LAYERS], *b[MAX_LAYERS];
    layer_pointers(widths, num_layers, (float *)args->params, w, b);
    int tile_floats = LOGITS_TILE * max_width(widths, num_layers);
    float *pack = scratch + 2 * tile_floats;
    int last = num_layers - 1, inputs = widths[0], classes = widths[num_layers];
    for (int start = 0; start < n; start += LOGITS_TILE) {
        int rows = n - start < LOGITS_TILE ? n - start : LOGITS_TILE;
        const float *h = args->x + (uint32_t)start * (uint32_t)inputs;
        float *buf = scratch;
        for (int i = 0; i < last; i++) {
            dense_forward(1, rows, widths[i + 1], widths[i], h, w[i], b[i], buf, pack);
            h = buf;
            buf = buf == scratch ? scratch + tile_floats : scratch;
        }
        dense_forward(0, rows, classes, widths[last], h, w[last], b[last], out + (uint32_t)start * (uint32_t)classes,
                      pack);
    }
    return STATUS_OK;
}
