// tightfit's quantization kernels (portable C++: the compiler vectorizes them for the machine it runs on).
//
// gptq_block: GPTQ's sequential column loop over one block of columns, for every row at once. Rows are
// independent given the inverse Hessian, so each thread takes whole rows and keeps its row's block (at most a
// few hundred floats) and the block of the inverse Hessian (128 x 128 floats: 64 KB) in cache; the Python loop
// this replaces did a dozen tensor operations per column over strided memory. The update of the columns after
// the block (a GEMM) stays in torch.
//
// Compiled without -ffast-math and with -ffp-contract=off, so every operation rounds as torch's do and the
// result equals the torch loop bit for bit (tests/test_quant.py checks it).

#include <cmath>
#include <cstdint>
#include <omp.h>

// Index of the level nearest v on a non-uniform grid (levels ascending, n of them): the count of midpoints
// below v, ties to the lower level (core.nearest_level: torch.bucketize on the same fp32 midpoints).
static inline float nearest_level(float v, const float* levels, int n) {
    int i = 0;
    for (int k = 0; k < n - 1; k++) i += (levels[k] + levels[k + 1]) / 2 < v;  // ascending: no branch, vectorizes
    return (float)i;
}

// One code and its value: round to nearest within [lo, hi] on a uniform grid, else the nearest level.
static inline float code_of(float v, float lo, float hi, const float* levels, int nlev, float* value) {
    if (levels) {
        const float q = nearest_level(v, levels, nlev);
        *value = levels[(int)q];
        return q;
    }
    float q = std::nearbyint(v);  // round half to even, as torch.round
    q = q < lo ? lo : (q > hi ? hi : q);
    *value = q;
    return q;
}

extern "C" {

// W: [rows, ld] fp32; columns c0 .. c0+nb-1 are the block, updated in place as the loop goes.
// S, M: [rows, ld] each column's group scale and min (M null: symmetric). lo, hi: [rows] code range of each row.
// levels: a non-uniform grid's nlev values (null: uniform). Hinv: [n, n] upper Cholesky factor of the inverse Hessian (row-major, n = ld columns in quantization order).
// Q: [rows, ld] codes out (as floats); E: [rows, nb] each column's scaled error out.
void gptq_block(float* W, const float* S, const float* M, const float* lo, const float* hi, const float* levels,
                int nlev, const float* Hinv, int rows, int ld, int c0, int nb, float* Q, float* E, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < rows; r++) {
        float* w = W + (int64_t)r * ld + c0;
        const float* s = S + (int64_t)r * ld + c0;
        const float* m = M ? M + (int64_t)r * ld + c0 : nullptr;
        float* q = Q + (int64_t)r * ld + c0;
        float* e = E + (int64_t)r * nb;
        const float qlo = lo[r], qhi = hi[r];
        for (int i = 0; i < nb; i++) {
            const float* h = Hinv + (int64_t)(c0 + i) * ld + c0;  // row c0+i of Hinv, from column c0
            const float mn = m ? m[i] : 0.0f;
            const float x = m ? w[i] - mn : w[i];
            float v;
            const float code = code_of(s[i] != 0.0f ? x / s[i] : 0.0f, qlo, qhi, levels, nlev, &v);
            const float deq = m ? v * s[i] + mn : v * s[i];
            const float err = (w[i] - deq) / h[i];
            q[i] = code;
            e[i] = err;
            for (int k = i; k < nb; k++) {
                const float t = err * h[k];
                w[k] -= t;
            }
        }
    }
}

}  // extern "C"

extern "C" {

// The clip search of group parameters (core.searched_params): for each (row, group) the candidate c (of C)
// whose round-to-nearest error d = w - (clamp(round((w - m_c) / s_c)) s_c + m_c) has the least d^T H_g d
// (on a non-uniform grid, levels non-null: the nearest level's value in place of the rounded code).
// wg: [rows, G, gl]; S, M: [C, rows, G] the candidates' scale and min (M null: symmetric), already rounded to
// the format's scale dtype; Hb: [G, gl, gl]; best: [rows, G] out, the first candidate of least error.
void search_clips(const float* wg, int rows, int G, int gl, const float* S, const float* M, int C,
                  const float* Hb, float qlo, float qhi, const float* levels, int nlev, int32_t* best, int threads) {
#pragma omp parallel num_threads(threads)
    {
        float* d = new float[gl];
        float* t = new float[gl];
#pragma omp for schedule(static)
        for (int64_t rg = 0; rg < (int64_t)rows * G; rg++) {
            const int g = (int)(rg % G);
            const float* w = wg + rg * gl;
            const float* h = Hb + (int64_t)g * gl * gl;
            float best_err = INFINITY;
            int32_t arg = 0;
            for (int c = 0; c < C; c++) {
                const float s = S[(int64_t)c * rows * G + rg];
                const float m = M ? M[(int64_t)c * rows * G + rg] : 0.0f;
                for (int i = 0; i < gl; i++) {
                    const float x = M ? w[i] - m : w[i];
                    float v;
                    code_of(s != 0.0f ? x / s : 0.0f, qlo, qhi, levels, nlev, &v);  // s 0: a group of zeros
                    const float deq = M ? v * s + m : v * s;
                    d[i] = w[i] - deq;
                    t[i] = 0.0f;
                }
                for (int i = 0; i < gl; i++) {
                    const float di = d[i];
                    const float* hi = h + (int64_t)i * gl;
                    for (int j = 0; j < gl; j++) t[j] += di * hi[j];
                }
                float err = 0.0f;
                for (int j = 0; j < gl; j++) err += d[j] * t[j];
                if (err < best_err) {
                    best_err = err;
                    arg = c;
                }
            }
            best[rg] = arg;
        }
        delete[] d;
        delete[] t;
    }
}

}  // extern "C"

extern "C" {

// The mixed-precision proxy's loss of one format (sensitivity.tensor_losses): sum F (w - RTN(w))^2 over a block
// of weights, fused into one pass where torch's rtn_error made a tensor-sized temporary at each of its 8 steps
// (with ~24 formats per tensor that was half of the sensitivities' time at 1.5B). w, F: [groups, gl] fp32; S, M:
// [groups] each group's scale and min (M null: symmetric), already in the format's scale dtype; codes as in
// search_clips. Sums in double per thread.
double fisher_loss(const float* w, const float* F, int64_t groups, int gl, const float* S, const float* M,
                   float qlo, float qhi, const float* levels, int nlev, int threads) {
    double total = 0.0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : total)
    for (int64_t g = 0; g < groups; g++) {
        const float* x = w + g * gl;
        const float* f = F + g * gl;
        const float s = S[g], m = M ? M[g] : 0.0f;
        double sum = 0.0;
        for (int i0 = 0; i0 < gl; i0 += 64) {  // terms into a buffer first, so the compiler vectorizes their loop
            const int n = gl - i0 < 64 ? gl - i0 : 64;
            float t[64];
            for (int i = 0; i < n; i++) {
                const float xi = x[i0 + i], v0 = M ? xi - m : xi;
                float v;
                code_of(s != 0.0f ? v0 / s : 0.0f, qlo, qhi, levels, nlev, &v);
                const float d = xi - (M ? v * s + m : v * s);
                t[i] = f[i0 + i] * d * d;
            }
            float part = 0.0f;
            for (int i = 0; i < n; i++) part += t[i];
            sum += part;
        }
        total += sum;
    }
    return total;
}

}  // extern "C"
