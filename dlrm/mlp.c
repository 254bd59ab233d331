/* The element-wise halves of a Linear + ReLU layer, one pass each: see dlrm/mlp.py (which compiles
 * and calls this). Row-major float32 [rows, cols]; relu 0 for a layer without ReLU.
 *
 * bias_act:      y = max(y + b, 0)  (or y + b), in place on the GEMM's output
 * act_backward:  g_out = y > 0 ? g : 0  (or g), and db += the column sums of g_out
 *                (g_out may be g: in place); y is the layer's output after ReLU, which is > 0
 *                exactly where the input of ReLU was.
 */
#include <stdint.h>

void bias_act(float *y, const float *b, int64_t rows, int64_t cols, int32_t relu)
{
    for (int64_t i = 0; i < rows; i++) {
        float *r = y + i * cols;
        if (relu) {
#pragma omp simd
            for (int64_t j = 0; j < cols; j++) {
                float v = r[j] + b[j];
                r[j] = v > 0.0f ? v : 0.0f;
            }
        } else {
#pragma omp simd
            for (int64_t j = 0; j < cols; j++) r[j] += b[j];
        }
    }
}

void act_backward(const float *g, const float *y, float *g_out, float *db, int64_t rows, int64_t cols, int32_t relu)
{
    for (int64_t i = 0; i < rows; i++) {
        const float *r = g + i * cols, *o = y + i * cols;
        float *w = g_out + i * cols;
        if (relu) {
#pragma omp simd
            for (int64_t j = 0; j < cols; j++) {
                float v = o[j] > 0.0f ? r[j] : 0.0f;
                w[j] = v;
                db[j] += v;
            }
        } else {
#pragma omp simd
            for (int64_t j = 0; j < cols; j++) {
                w[j] = r[j];
                db[j] += r[j];
            }
        }
    }
}
