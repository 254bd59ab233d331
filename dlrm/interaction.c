/* DLRM's dot interaction, fused: one pass per sample over its feature vectors while they sit in L1.
 * See dlrm/interaction_kernel.py (which compiles and calls this) and dlrm/model.py (the math).
 *
 * A sample's F feature vectors (the bottom MLP's output, then one per table, in the order of T)
 * are read where they lie, so the lookups' blocks are never concatenated into T: vector f of
 * sample b starts at base[f] + i * stride[f] (floats), where i is b for a tensor of vectors
 * (index[f] NULL), or, for a table read in place, the row index[f][b * index_stride[f]] of the
 * table (rows[f] rows) starting at base[f]: the lookup itself is fused in, and backward adds the
 * gradient to the table's gradient rows instead of writing a vector per sample. All tensors are
 * float32, indices int64.
 */
#include <stdint.h>
#include <string.h>

/* vec: one vector register of floats. The backward tile is TILE_ROWS x TILE_VECS accumulators
 * (see gradient_tile): 24 of AVX-512's 32 registers, 12 of AVX's or SSE's 16 (more would spill). */
#if defined(__AVX512F__)
#define LANES 16
#define TILE_VECS 4
#elif defined(__AVX__)
#define LANES 8
#define TILE_VECS 2
#else
#define LANES 4
#define TILE_VECS 2
#endif
#define TILE_ROWS 6
#define HELD_FLOATS 128 /* the longest first vector the AVX-512 forward keeps in registers (8 of 32) */
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

static inline vec load(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

/* Two-source lane shuffle: lane i of the result is lane (i-th index) of the 2 * LANES lanes of a then b. */
#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int32_t ivec __attribute__((vector_size(LANES * sizeof(int32_t))));
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (ivec){__VA_ARGS__})
#endif

/* Lane q of the result is the sum of v[q]'s lanes. A transposing tree: level h adds the lanes h
 * apart of two vectors while interleaving them (x[i] for i mod 2h < h, else y[i - h]; plus the same
 * h lanes on), so after log2(LANES) levels each lane holds one vector's sum: 2 * (LANES - 1) shuffles
 * and LANES - 1 adds, where LANES separate horizontal sums take ~2 log2(LANES) dependent steps each. */
static inline vec sum_lanes(const vec v[LANES]) {
#if LANES == 16
    vec w[8], z[4], u[2];
    for (int m = 0; m < 8; m++)
        w[m] = SHUFFLE(v[2 * m], v[2 * m + 1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
               SHUFFLE(v[2 * m], v[2 * m + 1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    for (int m = 0; m < 4; m++)
        z[m] = SHUFFLE(w[2 * m], w[2 * m + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
               SHUFFLE(w[2 * m], w[2 * m + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    for (int m = 0; m < 2; m++)
        u[m] = SHUFFLE(z[2 * m], z[2 * m + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
               SHUFFLE(z[2 * m], z[2 * m + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    return SHUFFLE(u[0], u[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           SHUFFLE(u[0], u[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
#elif LANES == 8
    vec w[4], z[2];
    for (int m = 0; m < 4; m++)
        w[m] = SHUFFLE(v[2 * m], v[2 * m + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
               SHUFFLE(v[2 * m], v[2 * m + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    for (int m = 0; m < 2; m++)
        z[m] = SHUFFLE(w[2 * m], w[2 * m + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
               SHUFFLE(w[2 * m], w[2 * m + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    return SHUFFLE(z[0], z[1], 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE(z[0], z[1], 4, 5, 6, 7, 12, 13, 14, 15);
#else
    const vec w[2] = {SHUFFLE(v[0], v[1], 0, 4, 2, 6) + SHUFFLE(v[0], v[1], 1, 5, 3, 7),
                      SHUFFLE(v[2], v[3], 0, 4, 2, 6) + SHUFFLE(v[2], v[3], 1, 5, 3, 7)};
    return SHUFFLE(w[0], w[1], 0, 1, 4, 5) + SHUFFLE(w[0], w[1], 2, 3, 6, 7);
#endif
}

/* out[p] = <row[first[p]], row[second[p]]> for every pair p, LANES pairs at a time: each pair's
 * products summed lane-wise, then the LANES sums reduced together by sum_lanes; dim must be a
 * multiple of LANES (see pair_dots).
 * With AVX2 or SSE a group is a run of pairs sharing their first vector (the layout lists each
 * row of the triangle together), padded with throwaway pairs: each chunk of that vector is loaded
 * once for the group, so loads no longer outnumber multiply-adds 2 to 1 (Zen 3, dim 64: forward
 * 1.22 instead of 1.67-1.71 ms per 1024 rows). With AVX-512's 16 lanes the padding would waste more
 * than that saves: any LANES consecutive pairs make a group. */
static inline void pair_dots_blocked(int64_t dim, int64_t pairs, const float *const *row, const int32_t *first,
                                     const int32_t *second, float *out) {
    for (int64_t p = 0; p < pairs;) {
#if LANES <= 8
        const float *a = row[first[p]];
        int64_t count = 1;
        while (count < LANES && p + count < pairs && first[p + count] == first[p]) count++;
        const float *b[LANES];
        for (int q = 0; q < LANES; q++) b[q] = q < count ? row[second[p + q]] : a;
        vec part[LANES] = {0};
        for (int64_t k = 0; k < dim; k += LANES) {
            const vec x = load(a + k);
            for (int q = 0; q < LANES; q++) part[q] += x * load(b[q] + k);
        }
#else
        const int64_t count = pairs - p < LANES ? pairs - p : LANES;
        vec part[LANES] = {0};
        if (dim <= HELD_FLOATS) {
            /* The first vector is reloaded only when it changes (once per row of the triangle), so each
             * pair loads only its second: one load per multiply-add, not two (forward 1.33 -> 1.16 ms per
             * 1024 rows of the small profile, dim 64). */
            vec a[HELD_FLOATS / LANES];
            int32_t held = -1;
            for (int64_t q = 0; q < count; q++) {
                if (first[p + q] != held) {
                    held = first[p + q];
                    for (int64_t k = 0; k < dim; k += LANES) a[k / LANES] = load(row[held] + k);
                }
                const float *b = row[second[p + q]];
                vec sum = a[0] * load(b);
                for (int64_t k = LANES; k < dim; k += LANES) sum += a[k / LANES] * load(b + k);
                part[q] = sum;
            }
        } else {
            for (int64_t q = 0; q < count; q++) {
                const float *a = row[first[p + q]], *b = row[second[p + q]];
                vec sum = load(a) * load(b);
                for (int64_t k = LANES; k < dim; k += LANES) sum += load(a + k) * load(b + k);
                part[q] = sum;
            }
        }
#endif
        const vec sums = sum_lanes(part);
        if (count == LANES) store(out + p, sums);
        else memcpy(out + p, &sums, count * sizeof(float));
        p += count;
    }
}

/* The same for any dim, one pair at a time. */
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

/* Which row i of its tensor or table vector f of sample b is (see the top of the file), and where it
 * starts: base[f] + i * stride[f]. Returns 0, or -1 when a table row is out of range (the caller
 * raises; nothing is read there). */
static inline int locate(int64_t b, int64_t features, const float *const *base, const int64_t *stride,
                         const int64_t *const *index, const int64_t *index_stride, const int64_t *rows,
                         int64_t *at, const float **row) {
    for (int64_t f = 0; f < features; f++) {
        int64_t i = b;
        if (index[f] != NULL) {
            i = index[f][b * index_stride[f]];
            if (i < 0 || i >= rows[f]) return -1;
        }
        at[f] = i;
        row[f] = base[f] + i * stride[f];
    }
    return 0;
}

/* Rows [start, stop) of the output [batch, width]: the bottom vector, the pairs' dot products,
 * then zeros up to width. Returns 0, or -1 - b for the first sample b naming a row out of range. */
int64_t interaction_forward(int64_t start, int64_t stop, int64_t dim, int64_t features, const float *const *base,
                            const int64_t *stride, const int64_t *const *index, const int64_t *index_stride,
                            const int64_t *rows, int64_t pairs, const int32_t *first, const int32_t *second,
                            float *out, int64_t width) {
    const float *row[features];
    int64_t at[features];
    for (int64_t b = start; b < stop; b++) {
        if (locate(b, features, base, stride, index, index_stride, rows, at, row) != 0) return -1 - b;
        float *o = out + b * width;
        memcpy(o, row[0], dim * sizeof(float));
        /* A constant dim lets the compiler unroll the dot products completely. */
        if (dim == 64) pair_dots_blocked(64, pairs, row, first, second, o + dim);
        else if (dim == 128) pair_dots_blocked(128, pairs, row, first, second, o + dim);
        else if (dim % LANES == 0) pair_dots_blocked(dim, pairs, row, first, second, o + dim);
        else pair_dots(dim, pairs, row, first, second, o + dim);
        memset(o + dim + pairs, 0, (width - dim - pairs) * sizeof(float));
    }
    return 0;
}

/* grad[f][k..k+vecs*LANES) = sum over o of S[f][o] * row[o][k..k+vecs*LANES) for the features f
 * in [first, first + count), count <= rows (S has zero rows past the features); added to what
 * grad[f] holds where add[f] (a table's gradient row). A rows x vecs tile
 * of accumulators stays in registers: each vector loaded feeds `rows` multiply-adds and each S
 * entry broadcast feeds `vecs`. Called with constant rows and vecs, so the loops unroll. */
static inline __attribute__((always_inline)) void gradient_tile(int64_t features, const float *const *row,
                                                                const float *S, int64_t first, int64_t count,
                                                                int64_t k, float *const *grad_row, const char *add,
                                                                const int rows, const int vecs) {
    vec acc[TILE_ROWS][TILE_VECS] = {{0}};
    for (int64_t o = 0; o < features; o++) {
        vec v[TILE_VECS];
        for (int j = 0; j < vecs; j++) v[j] = load(row[o] + k + j * LANES);
        for (int r = 0; r < rows; r++) {
            const float s = S[(first + r) * features + o];
            for (int j = 0; j < vecs; j++) acc[r][j] += s * v[j];
        }
    }
    for (int64_t r = 0; r < count; r++) {
        float *g = grad_row[first + r] + k;
        if (add[first + r])
            for (int j = 0; j < vecs; j++) store(g + j * LANES, load(g + j * LANES) + acc[r][j]);
        else
            for (int j = 0; j < vecs; j++) store(g + j * LANES, acc[r][j]);
    }
}

/* gradient_tile over all the features, for the columns [k, k + vecs * LANES) (vecs: 1 or TILE_VECS). */
static inline void gradient_columns(int64_t features, const float *const *row, const float *S, int64_t k,
                                    float *const *grad_row, const char *add, int vecs) {
    for (int64_t f = 0; f < features; f += TILE_ROWS) {
        const int64_t count = features - f < TILE_ROWS ? features - f : TILE_ROWS;
        /* A last group of at most half a tile runs a half tile (27 features: 4 x 6 + 3). */
        if (vecs == TILE_VECS) {
            if (count > TILE_ROWS / 2) gradient_tile(features, row, S, f, count, k, grad_row, add, TILE_ROWS, TILE_VECS);
            else gradient_tile(features, row, S, f, count, k, grad_row, add, TILE_ROWS / 2, TILE_VECS);
        } else {
            if (count > TILE_ROWS / 2) gradient_tile(features, row, S, f, count, k, grad_row, add, TILE_ROWS, 1);
            else gradient_tile(features, row, S, f, count, k, grad_row, add, TILE_ROWS / 2, 1);
        }
    }
}

/* The same for one column k, for the columns past the last multiple of LANES. */
static inline void gradient_column(int64_t features, const float *const *row, const float *S, int64_t k,
                                   float *const *grad_row, const char *add) {
    for (int64_t f = 0; f < features; f++) {
        float sum = 0.0f;
        for (int64_t o = 0; o < features; o++) sum += S[f * features + o] * row[o][k];
        grad_row[f][k] = add[f] ? grad_row[f][k] + sum : sum;
    }
}

/* Rows [start, stop) of every vector's gradient, at grad_base[f] + i * grad_stride[f] (i as for the
 * vector: a table's gradient rows are added to, in sample order, so a row many samples share sums
 * their gradients as index_add would). Z = T Tᵀ is symmetric, so dT = S T with S = dZ + dZᵀ:
 * S[f][o] is the gradient of the pair (f, o) (symmetric[f * features + o] is its column among the
 * pairs; the diagonal's is `pairs`, a zero). The bottom vector also gets the gradient of its copy
 * at the front of the output. Returns 0, or -1 - b as forward (rows before b are done). */
int64_t interaction_backward(int64_t start, int64_t stop, int64_t dim, int64_t features, const float *const *base,
                             const int64_t *stride, const int64_t *const *index, const int64_t *index_stride,
                             const int64_t *rows, int64_t pairs, const int32_t *symmetric, const float *grad_out,
                             int64_t width, float *const *grad_base, const int64_t *grad_stride) {
    const float *row[features];
    float *grad_row[features];
    int64_t at[features];
    char add[features];
    for (int64_t f = 0; f < features; f++) add[f] = index[f] != NULL;
    const int64_t padded = (features + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS;
    float S[padded * features];
    memset(S, 0, sizeof S);
    float g[pairs + 1];
    g[pairs] = 0.0f;
    for (int64_t b = start; b < stop; b++) {
        if (locate(b, features, base, stride, index, index_stride, rows, at, row) != 0) return -1 - b;
        for (int64_t f = 0; f < features; f++) grad_row[f] = grad_base[f] + at[f] * grad_stride[f];
        const float *go = grad_out + b * width;
        memcpy(g, go + dim, pairs * sizeof(float));
        for (int64_t i = 0; i < features * features; i++) S[i] = g[symmetric[i]];
        int64_t k = 0;
        for (; k + TILE_VECS * LANES <= dim; k += TILE_VECS * LANES) gradient_columns(features, row, S, k, grad_row, add, TILE_VECS);
        for (; k + LANES <= dim; k += LANES) gradient_columns(features, row, S, k, grad_row, add, 1);
        for (; k < dim; k++) gradient_column(features, row, S, k, grad_row, add);
        for (int64_t k = 0; k < dim; k++) grad_row[0][k] += go[k];
    }
    return 0;
}
