/* DLRM's dot interaction, fused: one pass per sample over its feature vectors while they sit in L1.
 * See dlrm/interaction_kernel.py (which compiles and calls this) and dlrm/model.py (the math).
 *
 * A sample's F feature vectors (the bottom MLP's output, then one per table, in the order of T)
 * are read where they lie: vector f of sample b starts at base[f] + b * stride[f] (floats), so
 * the lookups' blocks are never concatenated into T. All tensors are float32.
 */
#include <stdint.h>
#include <string.h>

typedef float vec __attribute__((vector_size(64))); /* 16 floats: one AVX-512 register (two AVX2 ones) */
#define LANES 16
#define ROWS 8 /* gradient rows accumulated at once: each vector loaded feeds ROWS multiply-adds */

static inline vec load(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

/* out[p] = <row[first[p]], row[second[p]]> for every pair p. */
static inline void pair_dots(int64_t dim, int64_t pairs, const float *const *row, const int32_t *first,
                             const int32_t *second, float *out) {
    for (int64_t p = 0; p < pairs; p++) {
        const float *a = row[first[p]], *b = row[second[p]];
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t k = 0; k < dim; k++) sum += a[k] * b[k];
        out[p] = sum;
    }
}

/* Rows [start, stop) of the output [batch, width]: the bottom vector, the pairs' dot products,
 * then zeros up to width. */
void interaction_forward(int64_t start, int64_t stop, int64_t dim, int64_t features, const float *const *base,
                         const int64_t *stride, int64_t pairs, const int32_t *first, const int32_t *second,
                         float *out, int64_t width) {
    const float *row[features];
    for (int64_t b = start; b < stop; b++) {
        for (int64_t f = 0; f < features; f++) row[f] = base[f] + b * stride[f];
        float *o = out + b * width;
        memcpy(o, row[0], dim * sizeof(float));
        /* A constant dim lets the compiler unroll the dot products completely. */
        if (dim == 64) pair_dots(64, pairs, row, first, second, o + dim);
        else if (dim == 128) pair_dots(128, pairs, row, first, second, o + dim);
        else pair_dots(dim, pairs, row, first, second, o + dim);
        memset(o + dim + pairs, 0, (width - dim - pairs) * sizeof(float));
    }
}

/* grad[f][k..k+LANES) = sum over o of S[f][o] * row[o][k..k+LANES) for the features f in
 * [first, first + count), count <= ROWS (S has zero rows past the features). */
static inline void gradient_block(int64_t features, const float *const *row, const float *S, int64_t first,
                                  int64_t count, int64_t k, float *const *grad_row) {
    vec acc[ROWS] = {0};
    for (int64_t o = 0; o < features; o++) {
        const vec v = load(row[o] + k);
        for (int64_t r = 0; r < ROWS; r++) acc[r] += S[(first + r) * features + o] * v;
    }
    for (int64_t r = 0; r < count; r++) store(grad_row[first + r] + k, acc[r]);
}

/* The same for one column k, for the columns past the last multiple of LANES. */
static inline void gradient_column(int64_t features, const float *const *row, const float *S, int64_t k,
                                   float *const *grad_row) {
    for (int64_t f = 0; f < features; f++) {
        float sum = 0.0f;
        for (int64_t o = 0; o < features; o++) sum += S[f * features + o] * row[o][k];
        grad_row[f][k] = sum;
    }
}

/* Rows [start, stop) of every vector's gradient, written to grad_base[f] + b * grad_stride[f].
 * Z = T Tᵀ is symmetric, so dT = S T with S = dZ + dZᵀ: S[f][o] is the gradient of the pair
 * (f, o) (symmetric[f * features + o] is its column among the pairs; the diagonal's is `pairs`,
 * a zero). The bottom vector also gets the gradient of its copy at the front of the output. */
void interaction_backward(int64_t start, int64_t stop, int64_t dim, int64_t features, const float *const *base,
                          const int64_t *stride, int64_t pairs, const int32_t *symmetric, const float *grad_out,
                          int64_t width, float *const *grad_base, const int64_t *grad_stride) {
    const float *row[features];
    float *grad_row[features];
    const int64_t padded = (features + ROWS - 1) / ROWS * ROWS;
    float S[padded * features];
    memset(S, 0, sizeof S);
    float g[pairs + 1];
    g[pairs] = 0.0f;
    for (int64_t b = start; b < stop; b++) {
        for (int64_t f = 0; f < features; f++) {
            row[f] = base[f] + b * stride[f];
            grad_row[f] = grad_base[f] + b * grad_stride[f];
        }
        const float *go = grad_out + b * width;
        memcpy(g, go + dim, pairs * sizeof(float));
        for (int64_t i = 0; i < features * features; i++) S[i] = g[symmetric[i]];
        int64_t k = 0;
        for (; k + LANES <= dim; k += LANES)
            for (int64_t f = 0; f < features; f += ROWS)
                gradient_block(features, row, S, f, features - f < ROWS ? features - f : ROWS, k, grad_row);
        for (; k < dim; k++) gradient_column(features, row, S, k, grad_row);
        for (int64_t k = 0; k < dim; k++) grad_row[0][k] += go[k];
    }
}
