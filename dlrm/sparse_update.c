/* The embedding tables' optimizer on the rows a sparse gradient touches, in two passes: see dlrm/optim.py
 * (which compiles and calls this, and holds the same arithmetic in PyTorch ops).
 *
 * The gradient is n rows: rows[i] (a weight row, repeated when a batch names an id twice) gets
 * grad[i]. Adagrad needs each row's *summed* gradient before squaring it, so the first pass sums the
 * repeats into sums[k], the k-th distinct row's (slot[row] = k: a map over the weight's rows, all -1
 * between calls), where PyTorch sorts the ids (torch.unique) and scatters. The second pass updates
 * each distinct row once, by the rule its state's width says:
 *   state_cols == dim (Adagrad):          state += g²;        weight -= lr * g / (sqrt(state) + eps)
 *   state_cols == 1 (row-wise Adagrad):   state += mean(g²);  weight -= lr * g / (sqrt(state) + eps)
 *   state_cols == 0 (SGD):                                     weight -= lr * g
 * float32 rows of dim floats; rows int64. Returns the number of distinct rows, or -1 - i when rows[i]
 * is out of range (nothing updated).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

int64_t sparse_update(int64_t n, int64_t dim, const int64_t *rows, int64_t rows_stride, const float *grad,
                      int64_t grad_stride, float *weight, int64_t weight_stride, float *state, int64_t state_stride,
                      int64_t state_cols, int64_t weight_rows, float lr, float eps, int32_t *slot, float *sums,
                      int64_t *distinct)
{
    int64_t count = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t row = rows[i * rows_stride];
        if (row < 0 || row >= weight_rows) {
            for (int64_t k = 0; k < count; k++) slot[distinct[k]] = -1;  /* the map stays all -1 */
            return -1 - i;
        }
        const float *g = grad + i * grad_stride;
        float *sum;
        if (slot[row] < 0) {
            slot[row] = (int32_t)count;
            distinct[count] = row;
            memcpy(sums + count++ * dim, g, dim * sizeof(float));
            continue;
        }
        sum = sums + slot[row] * dim;
#pragma omp simd
        for (int64_t j = 0; j < dim; j++) sum[j] += g[j];
    }
    for (int64_t k = 0; k < count; k++) {
        int64_t row = distinct[k];
        const float *g = sums + k * dim;
        float *w = weight + row * weight_stride, *s = state + row * state_stride;
        slot[row] = -1;
        if (state_cols == dim) {
#pragma omp simd
            for (int64_t j = 0; j < dim; j++) {
                float total = s[j] + g[j] * g[j];
                s[j] = total;
                w[j] -= lr * (g[j] / (sqrtf(total) + eps));
            }
        } else if (state_cols == 1) {
            float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
            for (int64_t j = 0; j < dim; j++) squares += g[j] * g[j];
            const float total = s[0] + squares / (float)dim;
            s[0] = total;
            const float denominator = sqrtf(total) + eps;
#pragma omp simd
            for (int64_t j = 0; j < dim; j++) w[j] -= lr * (g[j] / denominator);
        } else {
#pragma omp simd
            for (int64_t j = 0; j < dim; j++) w[j] -= lr * g[j];
        }
    }
    return count;
}
