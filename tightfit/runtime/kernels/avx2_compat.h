// The AVX-512 operations qgemm.cpp uses, carried out on AVX2 + FMA + F16C (CPUs without AVX-512: most desktop
// and laptop x86 CPUs before 2022-2023, AMD before Zen 4, and server parts without it).
//
// Included by qgemm.cpp after <immintrin.h> only when the compiler targets no AVX-512: each 512-bit vector becomes
// a pair of 256-bit halves, each mask a plain integer, and the names qgemm.cpp uses (__m512i, _mm512_*, ...) are
// macros onto the functions below, so the kernel's source stays one file and its AVX-512 build is untouched.
// Every operation gives the same bits as the AVX-512 instruction it stands for; vpdpbusd (unsigned bytes x signed
// bytes, 4 products summed into each 32-bit lane, no saturation) is exact through vpmaddubsw on the codes' two
// nibbles (a code above 127 would saturate vpmaddubsw's 16-bit pair sums), and through one vpmaddubsw where the
// caller knows its codes are below 128 (tf_dpbusd_small).
#pragma once

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define TF_AVX2 1

struct tf_vi {
    __m256i a, b;
};
struct tf_vf {
    __m256 a, b;
};
typedef uint64_t tf_m64;
typedef uint16_t tf_m16;

#define TF_AI __attribute__((always_inline)) static inline

// the masked loads: a whole vector inline; a partial one (a row's last chunk) out of line, where its copy loop
// does not swell every unrolled loop that could reach it (that tripled the build's time)
#define TF_NOINLINE __attribute__((noinline)) static
// the bytes of p under mask m (elem bytes a lane, count lanes), the rest zero
TF_NOINLINE void tf_masked_copy(void* dst, const void* src, uint64_t m, int elem, int count) {
    if ((m & (m + 1)) == 0) {  // 0..01..1, as every mask qgemm.cpp builds: one copy of the leading lanes
        const int n = m == ~0ULL ? 64 : __builtin_ctzll(~m), k = n < count ? n : count;
        memcpy(dst, src, (size_t)k * elem);
        memset((char*)dst + (size_t)k * elem, 0, (size_t)(count - k) * elem);
        return;
    }
    memset(dst, 0, (size_t)elem * count);
    for (int i = 0; i < count; i++)
        if ((m >> i) & 1) memcpy((char*)dst + i * elem, (const char*)src + i * elem, elem);
}

TF_AI tf_vi tf_loadu_si512(const void* p) {
    return {_mm256_loadu_si256((const __m256i*)p), _mm256_loadu_si256((const __m256i*)p + 1)};
}
// the first `lanes` 32-bit lanes of p, the rest zero, with AVX2's own masked loads (no fault past the lanes)
TF_AI tf_vi tf_lanes_epi32(int lanes, const void* p) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return {_mm256_maskload_epi32((const int*)p, _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), idx)),
            _mm256_maskload_epi32((const int*)p + 8, _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes - 8), idx))};
}
// a partial mask's load, out of line (inlined into every unrolled loop it doubled the build's time): a chunk's
// cb lanes of 4 bytes through vpmaskmovd, any other mask through a copy
TF_NOINLINE tf_vi tf_partial_epi8(tf_m64 m, const void* p) {
    const int n = __builtin_ctzll(~m);
    if ((m & (m + 1)) == 0 && n % 4 == 0) return tf_lanes_epi32(n / 4, p);
    alignas(32) uint8_t buf[64];
    tf_masked_copy(buf, p, m, 1, 64);
    return tf_loadu_si512(buf);
}
TF_NOINLINE tf_vi tf_partial_epi32(tf_m16 m, const void* p) {
    if ((m & (m + 1)) == 0) return tf_lanes_epi32(__builtin_ctz(~(uint32_t)m), p);
    alignas(32) int32_t buf[16];
    tf_masked_copy(buf, p, m, 4, 16);
    return tf_loadu_si512(buf);
}
TF_AI tf_vi tf_maskz_loadu_epi8(tf_m64 m, const void* p) {
    return m == ~0ULL ? tf_loadu_si512(p) : tf_partial_epi8(m, p);
}
TF_AI tf_vi tf_maskz_loadu_epi32(tf_m16 m, const void* p) {
    return m == 0xFFFF ? tf_loadu_si512(p) : tf_partial_epi32(m, p);
}
TF_AI tf_vf tf_loadu_ps(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
TF_AI tf_vf tf_load_ps(const float* p) { return {_mm256_load_ps(p), _mm256_load_ps(p + 8)}; }
TF_AI void tf_storeu_ps(float* p, tf_vf v) { _mm256_storeu_ps(p, v.a); _mm256_storeu_ps(p + 8, v.b); }
TF_AI void tf_store_ps(float* p, tf_vf v) { _mm256_store_ps(p, v.a); _mm256_store_ps(p + 8, v.b); }
TF_AI tf_vf tf_maskz_loadu_ps(tf_m16 m, const float* p) {
    if (m == 0xFFFF) return tf_loadu_ps(p);
    const tf_vi v = tf_partial_epi32(m, p);
    return {_mm256_castsi256_ps(v.a), _mm256_castsi256_ps(v.b)};
}
TF_AI void tf_storeu_si512(void* p, tf_vi v) {
    _mm256_storeu_si256((__m256i*)p, v.a);
    _mm256_storeu_si256((__m256i*)p + 1, v.b);
}
// the first k (< 16) 16-bit lanes of p, the rest zero: whole dwords through vpmaskmovd, an odd last lane on its
// own (a row's partial chunk of fp16 block scales; through memcpy and memset these calls were a fifth of the
// server's batched decode step)
TF_NOINLINE __m256i tf_prefix_epi16_256(int k, const void* p) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i v = _mm256_maskload_epi32((const int*)p, _mm256_cmpgt_epi32(_mm256_set1_epi32(k / 2), idx));
    if (k & 1) {  // element k - 1: the low half of dword k / 2
        uint16_t last;
        memcpy(&last, (const uint16_t*)p + k - 1, 2);
        v = _mm256_or_si256(v, _mm256_and_si256(_mm256_set1_epi32(last), _mm256_cmpeq_epi32(_mm256_set1_epi32(k / 2), idx)));
    }
    return v;
}
// the first k (< 16) bytes of p, the rest zero (a partial chunk's scale codes)
TF_NOINLINE __m128i tf_prefix_epi8_128(int k, const void* p) {
    const __m128i idx = _mm_setr_epi32(0, 1, 2, 3);
    __m128i v = _mm_maskload_epi32((const int*)p, _mm_cmpgt_epi32(_mm_set1_epi32(k / 4), idx));
    if (k & 3) {
        const uint8_t* s = (const uint8_t*)p + (k & ~3);
        uint32_t t = 0;
        for (int i = 0; i < (k & 3); i++) t |= (uint32_t)s[i] << (8 * i);
        v = _mm_or_si128(v, _mm_and_si128(_mm_set1_epi32((int)t), _mm_cmpeq_epi32(_mm_set1_epi32(k / 4), idx)));
    }
    return v;
}
// the 256- and 128-bit masked loads (AVX-512 VL/BW forms)
TF_AI __m256i tf_maskz_loadu_epi16_256(tf_m16 m, const void* p) {
    if (m == 0xFFFF) return _mm256_loadu_si256((const __m256i*)p);
    if ((m & (m + 1)) == 0) return tf_prefix_epi16_256(__builtin_ctz(~(uint32_t)m), p);
    alignas(32) uint16_t buf[16];
    tf_masked_copy(buf, p, m, 2, 16);
    return _mm256_load_si256((const __m256i*)buf);
}
TF_AI __m128i tf_maskz_loadu_epi8_128(tf_m16 m, const void* p) {
    if (m == 0xFFFF) return _mm_loadu_si128((const __m128i*)p);
    if ((m & (m + 1)) == 0) return tf_prefix_epi8_128(__builtin_ctz(~(uint32_t)m), p);
    alignas(16) uint8_t buf[16];
    tf_masked_copy(buf, p, m, 1, 16);
    return _mm_load_si128((const __m128i*)buf);
}

TF_AI tf_vi tf_setzero_si512() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
TF_AI tf_vf tf_setzero_ps() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
TF_AI tf_vf tf_set1_ps(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
TF_AI tf_vi tf_set1_epi8(char x) { return {_mm256_set1_epi8(x), _mm256_set1_epi8(x)}; }
TF_AI tf_vi tf_set1_epi32(int x) { return {_mm256_set1_epi32(x), _mm256_set1_epi32(x)}; }
TF_AI tf_vi tf_setr_epi32(int e0, int e1, int e2, int e3, int e4, int e5, int e6, int e7, int e8, int e9, int e10,
                          int e11, int e12, int e13, int e14, int e15) {
    return {_mm256_setr_epi32(e0, e1, e2, e3, e4, e5, e6, e7), _mm256_setr_epi32(e8, e9, e10, e11, e12, e13, e14, e15)};
}
TF_AI tf_vi tf_broadcast_i32x4(__m128i x) { return {_mm256_broadcastsi128_si256(x), _mm256_broadcastsi128_si256(x)}; }

TF_AI tf_vf tf_cvtph_ps(__m256i h) {
    return {_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1))};
}
TF_AI tf_vi tf_cvtepi8_epi32(__m128i x) { return {_mm256_cvtepi8_epi32(x), _mm256_cvtepi8_epi32(_mm_srli_si128(x, 8))}; }
TF_AI tf_vi tf_cvtepu8_epi32(__m128i x) { return {_mm256_cvtepu8_epi32(x), _mm256_cvtepu8_epi32(_mm_srli_si128(x, 8))}; }
TF_AI tf_vi tf_cvtepi16_epi32(__m256i x) {
    return {_mm256_cvtepi16_epi32(_mm256_castsi256_si128(x)), _mm256_cvtepi16_epi32(_mm256_extracti128_si256(x, 1))};
}
TF_AI tf_vf tf_cvtepi32_ps(tf_vi v) { return {_mm256_cvtepi32_ps(v.a), _mm256_cvtepi32_ps(v.b)}; }
TF_AI tf_vi tf_cvtps_epi32(tf_vf v) { return {_mm256_cvtps_epi32(v.a), _mm256_cvtps_epi32(v.b)}; }
// 16 int32 -> 16 int8 with signed saturation, in order
TF_AI __m128i tf_cvtsepi32_epi8(tf_vi v) {
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(v.a, v.b), 0xD8);  // 16 int16 in order
    return _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
}

// any 16-lane permutation of 32-bit floats: each output lane from the low or high half by bit 3 of its index
TF_AI tf_vf tf_permutexvar_ps(tf_vi idx, tf_vf v) {
    const __m256 ha = _mm256_castsi256_ps(_mm256_slli_epi32(idx.a, 28)), hb = _mm256_castsi256_ps(_mm256_slli_epi32(idx.b, 28));
    return {_mm256_blendv_ps(_mm256_permutevar8x32_ps(v.a, idx.a), _mm256_permutevar8x32_ps(v.b, idx.a), ha),
            _mm256_blendv_ps(_mm256_permutevar8x32_ps(v.a, idx.b), _mm256_permutevar8x32_ps(v.b, idx.b), hb)};
}

#define TF_F2(name, op) \
    TF_AI tf_vf name(tf_vf x, tf_vf y) { return {op(x.a, y.a), op(x.b, y.b)}; }
#define TF_I2(name, op) \
    TF_AI tf_vi name(tf_vi x, tf_vi y) { return {op(x.a, y.a), op(x.b, y.b)}; }
TF_F2(tf_mul_ps, _mm256_mul_ps)
TF_F2(tf_add_ps, _mm256_add_ps)
TF_F2(tf_sub_ps, _mm256_sub_ps)
TF_F2(tf_max_ps, _mm256_max_ps)
TF_I2(tf_and_si512, _mm256_and_si256)
TF_I2(tf_or_si512, _mm256_or_si256)
TF_I2(tf_add_epi32, _mm256_add_epi32)
TF_I2(tf_sub_epi32, _mm256_sub_epi32)
TF_I2(tf_mullo_epi32, _mm256_mullo_epi32)
TF_I2(tf_shuffle_epi8, _mm256_shuffle_epi8)  // per 128-bit lane, as vpshufb zmm
#undef TF_F2
#undef TF_I2
TF_AI tf_vf tf_fmadd_ps(tf_vf x, tf_vf y, tf_vf z) { return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)}; }
TF_AI tf_vf tf_abs_ps(tf_vf x) {
    const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    return {_mm256_and_ps(x.a, m), _mm256_and_ps(x.b, m)};
}
TF_AI tf_vi tf_srli_epi16(tf_vi x, int n) { return {_mm256_srli_epi16(x.a, n), _mm256_srli_epi16(x.b, n)}; }
TF_AI tf_vi tf_slli_epi16(tf_vi x, int n) { return {_mm256_slli_epi16(x.a, n), _mm256_slli_epi16(x.b, n)}; }
// the one ternary-logic function qgemm.cpp uses: 0xF8 = a | (b & c)
TF_AI tf_vi tf_ternarylogic_epi32(tf_vi a, tf_vi b, tf_vi c, int imm) {
    if (imm != 0xF8) __builtin_trap();
    return tf_or_si512(a, tf_and_si512(b, c));
}

TF_AI float tf_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
TF_AI float tf_reduce_add_ps(tf_vf v) { return tf_hsum8(_mm256_add_ps(v.a, v.b)); }
TF_AI float tf_reduce_max_ps(tf_vf v) {
    __m256 m = _mm256_max_ps(v.a, v.b);
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
TF_AI int tf_reduce_add_epi32(tf_vi v) {
    __m256i s = _mm256_add_epi32(v.a, v.b);
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
    return _mm_cvtsi128_si32(t);
}

// vpdpbusd: acc + the sums of 4 products u (unsigned bytes) x s (signed bytes) per 32-bit lane, exact
TF_AI __m256i tf_dpbusd256(__m256i acc, __m256i u, __m256i s) {
    const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const __m256i lo = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_and_si256(u, nib), s), ones);
    const __m256i hi = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(u, 4), nib), s), ones);
    return _mm256_add_epi32(acc, _mm256_add_epi32(lo, _mm256_slli_epi32(hi, 4)));
}
TF_AI tf_vi tf_dpbusd_epi32(tf_vi acc, tf_vi u, tf_vi s) {
    return {tf_dpbusd256(acc.a, u.a, s.a), tf_dpbusd256(acc.b, u.b, s.b)};
}
// the same for codes below 128: 2 x 127 x 128 fits vpmaddubsw's saturating 16-bit sums
TF_AI tf_vi tf_dpbusd_small(tf_vi acc, tf_vi u, tf_vi s) {
    const __m256i ones = _mm256_set1_epi16(1);
    return {_mm256_add_epi32(acc.a, _mm256_madd_epi16(_mm256_maddubs_epi16(u.a, s.a), ones)),
            _mm256_add_epi32(acc.b, _mm256_madd_epi16(_mm256_maddubs_epi16(u.b, s.b), ones))};
}
// codes below 16: the byte products' pair sums kept as int16 and summed over a chunk's 8 slices (8 x 2 x 15 x 128 =
// 30720 fits), then widened once (tf_widen_epi16), where tf_dpbusd_small widens every slice
TF_AI tf_vi tf_dpbusw_small(tf_vi acc, tf_vi u, tf_vi s) {
    return {_mm256_add_epi16(acc.a, _mm256_maddubs_epi16(u.a, s.a)), _mm256_add_epi16(acc.b, _mm256_maddubs_epi16(u.b, s.b))};
}
TF_AI tf_vi tf_widen_epi16(tf_vi v) {
    const __m256i ones = _mm256_set1_epi16(1);
    return {_mm256_madd_epi16(v.a, ones), _mm256_madd_epi16(v.b, ones)};
}

// the names qgemm.cpp is written with
#define __m512i tf_vi
#define __m512 tf_vf
#define __mmask64 tf_m64
#define __mmask16 tf_m16
#define _mm512_maskz_loadu_epi8 tf_maskz_loadu_epi8
#define _mm512_maskz_loadu_epi32 tf_maskz_loadu_epi32
#define _mm512_maskz_loadu_ps tf_maskz_loadu_ps
#define _mm512_loadu_si512 tf_loadu_si512
#define _mm512_storeu_si512 tf_storeu_si512
#define _mm512_loadu_ps tf_loadu_ps
#define _mm512_load_ps tf_load_ps
#define _mm512_storeu_ps tf_storeu_ps
#define _mm512_store_ps tf_store_ps
#define _mm256_maskz_loadu_epi16 tf_maskz_loadu_epi16_256
#define _mm_maskz_loadu_epi8 tf_maskz_loadu_epi8_128
#define _mm512_setzero_si512 tf_setzero_si512
#define _mm512_setzero_ps tf_setzero_ps
#define _mm512_set1_ps tf_set1_ps
#define _mm512_set1_epi8 tf_set1_epi8
#define _mm512_set1_epi32 tf_set1_epi32
#undef _mm512_setr_epi32  // a macro in GCC's header
#define _mm512_setr_epi32 tf_setr_epi32
#define _mm512_broadcast_i32x4 tf_broadcast_i32x4
#define _mm512_cvtph_ps tf_cvtph_ps
#define _mm512_cvtepi8_epi32 tf_cvtepi8_epi32
#define _mm512_cvtepu8_epi32 tf_cvtepu8_epi32
#define _mm512_cvtepi16_epi32 tf_cvtepi16_epi32
#define _mm512_cvtepi32_ps tf_cvtepi32_ps
#define _mm512_cvtps_epi32 tf_cvtps_epi32
#define _mm512_cvtsepi32_epi8 tf_cvtsepi32_epi8
#define _mm512_permutexvar_ps tf_permutexvar_ps
#define _mm512_mul_ps tf_mul_ps
#define _mm512_add_ps tf_add_ps
#define _mm512_sub_ps tf_sub_ps
#define _mm512_max_ps tf_max_ps
#define _mm512_fmadd_ps tf_fmadd_ps
#define _mm512_abs_ps tf_abs_ps
#define _mm512_and_si512 tf_and_si512
#define _mm512_or_si512 tf_or_si512
#define _mm512_add_epi32 tf_add_epi32
#define _mm512_sub_epi32 tf_sub_epi32
#define _mm512_mullo_epi32 tf_mullo_epi32
#define _mm512_shuffle_epi8 tf_shuffle_epi8
#define _mm512_srli_epi16 tf_srli_epi16
#define _mm512_slli_epi16 tf_slli_epi16
#define _mm512_ternarylogic_epi32 tf_ternarylogic_epi32
#define _mm512_reduce_add_ps tf_reduce_add_ps
#define _mm512_reduce_max_ps tf_reduce_max_ps
#define _mm512_reduce_add_epi32 tf_reduce_add_epi32
#define _mm512_dpbusd_epi32 tf_dpbusd_epi32
