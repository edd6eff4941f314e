// H += X^T X for bf16 X on AMX tiles, summed in fp32 (calibrate.HessianHook).
//
// torch's bf16 GEMM also multiplies on AMX, but rounds its output to bf16: summed that way the Hessian of a
// layer with massive activations came out indefinite. Here each 16 x 16 block of H is loaded into an fp32
// accumulator tile, every token's products are added to it (TDPBF16PS: bf16 products, fp32 sums) and it is
// stored back: the only rounding is fp32's, as in an fp32 GEMM, at several times its speed.
//
// Layouts (prepared by the caller): XT [n, T] (channel-major rows of T tokens) for the A tiles; XP [T/2, n, 2]
// (pairs of consecutive tokens side by side: AMX's layout for B) for the B tiles. n a multiple of 32, T of 32.
// Only the blocks on or above the diagonal are computed; the caller mirrors them.

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdint>

namespace {

struct TileConfig {
    uint8_t palette = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

void configure() {
    TileConfig c;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

}  // namespace

extern "C" {

// 0 when this process may use AMX tiles (Linux asks each process to request them), else an error code.
int gram_init() {
    const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
}

void gram_bf16(const uint16_t* XT, const uint16_t* XP, int n, int T, float* H, int threads) {
    const int panels = n / 64 + (n % 64 ? 1 : 0);
#pragma omp parallel num_threads(threads)
    {
        configure();
        // a panel of up to 64 rows of H (its A rows stay in L2 while every column block streams past)
#pragma omp for schedule(dynamic, 1)
        for (int p = 0; p < panels; p++) {
            const int r0 = p * 64, r1 = r0 + 64 < n ? r0 + 64 : n;
            for (int j = r0; j < n; j += 32) {
                for (int i = r0; i < r1; i += 32) {
                    if (j + 32 <= i) continue;  // wholly below the diagonal
                    float* c00 = H + (int64_t)i * n + j;
                    float* c01 = c00 + 16;
                    float* c10 = c00 + (int64_t)16 * n;
                    float* c11 = c10 + 16;
                    const int64_t ldc = (int64_t)n * 4;
                    _tile_loadd(0, c00, ldc);
                    _tile_loadd(1, c01, ldc);
                    _tile_loadd(2, c10, ldc);
                    _tile_loadd(3, c11, ldc);
                    for (int t = 0; t < T; t += 32) {
                        _tile_loadd(4, XT + (int64_t)i * T + t, (int64_t)T * 2);
                        _tile_loadd(5, XT + (int64_t)(i + 16) * T + t, (int64_t)T * 2);
                        _tile_loadd(6, XP + ((int64_t)(t / 2) * n + j) * 2, (int64_t)n * 4);
                        _tile_loadd(7, XP + ((int64_t)(t / 2) * n + j + 16) * 2, (int64_t)n * 4);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(1, 4, 7);
                        _tile_dpbf16ps(2, 5, 6);
                        _tile_dpbf16ps(3, 5, 7);
                    }
                    _tile_stored(0, c00, ldc);
                    _tile_stored(1, c01, ldc);
                    _tile_stored(2, c10, ldc);
                    _tile_stored(3, c11, ldc);
                }
            }
        }
        _tile_release();
    }
}

}  // extern "C"
