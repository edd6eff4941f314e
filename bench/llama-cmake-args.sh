#!/bin/sh
# The CMake flags llama.cpp (llama-cpp-python, and bench/build_llama_tools.sh) is built with here: this CPU's
# vector extensions named one by one instead of GGML_NATIVE, which would also compile in the AMX matmul that
# crashes (ggml_backend_amx_mul_mat) on AMX Xeons. AVX-512 only where the CPU has it: an AVX-512 build dies
# with an illegal instruction on AVX2-only CPUs.
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
has() { case " $flags " in *" $1 "*) return 0 ;; esac; return 1; }
out="-DGGML_NATIVE=OFF"
for f in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2; do
    if has "${f%%:*}"; then out="$out -DGGML_${f##*:}=ON"; else out="$out -DGGML_${f##*:}=OFF"; fi
done
if has avx512f && has avx512bw; then
    out="$out -DGGML_AVX512=ON"
    for f in avx512_vnni:AVX512_VNNI avx512_vbmi:AVX512_VBMI avx512_bf16:AVX512_BF16; do
        if has "${f%%:*}"; then out="$out -DGGML_${f##*:}=ON"; fi
    done
else
    out="$out -DGGML_AVX512=OFF"
fi
echo "$out"
