#!/usr/bin/env python3
"""Prints the CMAKE_ARGS for building llama-cpp-python's CPU backend on this machine (used by the Makefile).

On x86-64 Linux the instruction sets are taken from the CPU's own feature flags (/proc/cpuinfo), one GGML
option per flag, with ``GGML_NATIVE=OFF`` so that the compiler does not add anything else by itself. AMX is
always off: on the project's Intel machines the CPU advertises AMX and the kernel grants the tile permission,
yet the AMX matmul faults (SIGILL on ``tilezero``) in llama.cpp's worker threads (docs/gguf.md). Elsewhere
(ARM, macOS, no /proc/cpuinfo) the native build is used, with AMX off too. Needs only the standard library.
"""
import platform
from pathlib import Path

# /proc/cpuinfo flag -> GGML cmake option (ggml/CMakeLists.txt of the vendored llama.cpp)
FLAGS = {
    "sse4_2": "GGML_SSE42", "avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C",
    "bmi2": "GGML_BMI2", "avx_vnni": "GGML_AVX_VNNI", "avx512f": "GGML_AVX512", "avx512vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI", "avx512_bf16": "GGML_AVX512_BF16",
}
AMX_OFF = ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def cmake_args() -> str:
    flags = cpu_flags()
    if platform.machine().lower() not in ("x86_64", "amd64") or flags is None:
        return " ".join(["-DGGML_NATIVE=ON"] + AMX_OFF)
    opts = [f"-D{opt}={'ON' if flag in flags else 'OFF'}" for flag, opt in FLAGS.items()]
    return " ".join(["-DGGML_NATIVE=OFF"] + opts + AMX_OFF)


if __name__ == "__main__":
    print(cmake_args())
