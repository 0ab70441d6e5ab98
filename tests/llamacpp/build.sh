#!/usr/bin/env bash
# Builds llama.cpp (libllama + libmtmd) from the llama-cpp-python sdist's bundled source
# (vendor/llama.cpp) and our small check program `omni-llama-check` against it.
#
#   tests/llamacpp/build.sh            # -> $LLAMACPP_DIR (default: target/llamacpp)
#   tests/llamacpp/compat.py           # then: the compatibility checks (see docs/gguf.md)
#
# Needs: python3 with pip (PYTHON, default /opt/refenv/bin/python), cmake (apt-get install cmake),
# a C++17 compiler. NOT part of CI. Re-running reuses the download and the build directory.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PYTHON="${PYTHON:-/opt/refenv/bin/python}"
OUT="${LLAMACPP_DIR:-$ROOT/target/llamacpp}"
JOBS="${JOBS:-2}"
mkdir -p "$OUT"

command -v cmake >/dev/null || { echo "cmake is required: apt-get install -y cmake" >&2; exit 1; }

# 1. The sdist (only llama-cpp-python itself from source; its build tools may come as wheels).
SDIST="$(ls "$OUT"/llama_cpp_python-*.tar.gz 2>/dev/null | head -1 || true)"
if [ -z "$SDIST" ]; then
  "$PYTHON" -m pip download --no-deps --no-binary llama-cpp-python llama-cpp-python -d "$OUT"
  SDIST="$(ls "$OUT"/llama_cpp_python-*.tar.gz | head -1)"
fi
SRC_PARENT="$OUT/src"
if [ ! -d "$SRC_PARENT" ]; then
  mkdir -p "$SRC_PARENT"
  tar xzf "$SDIST" -C "$SRC_PARENT"
fi
LLAMA="$(ls -d "$SRC_PARENT"/llama_cpp_python-*/vendor/llama.cpp | head -1)"
echo "llama.cpp source: $LLAMA ($(basename "$SDIST"))"
ln -sfn "$LLAMA" "$OUT/llama.cpp"

# 2. libllama + libmtmd only (no common, tools, server, tests, network).
cmake -S "$LLAMA" -B "$OUT/build" \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=ON \
  -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_MTMD=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_SUBPROCESS=OFF -DMTMD_VIDEO=OFF -DGGML_NATIVE=ON >"$OUT/cmake-configure.log"
cmake --build "$OUT/build" --target llama mtmd -j "$JOBS"

# 3. Our checker: loads a thinker GGUF (+ mmproj), tokenizes, decodes greedily, prints JSON.
LIBDIR="$(dirname "$(find "$OUT/build" -name 'libllama.so' | head -1)")"
MTMDDIR="$(dirname "$(find "$OUT/build" -name 'libmtmd.so' | head -1)")"
GGMLDIR="$(dirname "$(find "$OUT/build" -name 'libggml.so' | head -1)")"
g++ -std=c++17 -O2 "$ROOT/tests/llamacpp/omni_llama_check.cpp" -o "$OUT/omni-llama-check" \
  -I "$LLAMA/include" -I "$LLAMA/ggml/include" -I "$LLAMA/tools/mtmd" \
  -L "$LIBDIR" -L "$MTMDDIR" -L "$GGMLDIR" -lmtmd -lllama -lggml -lggml-base \
  -Wl,-rpath,"$LIBDIR" -Wl,-rpath,"$MTMDDIR" -Wl,-rpath,"$GGMLDIR"
echo "built $OUT/omni-llama-check"

# 4. Optionally llama-quantize (needs llama.cpp's common library), for K-quant files:
#    WITH_QUANTIZE=1 tests/llamacpp/build.sh; $OUT/build-tools/bin/llama-quantize in.gguf out.gguf Q4_K_M
if [ "${WITH_QUANTIZE:-0}" = 1 ]; then
  cmake -S "$LLAMA" -B "$OUT/build-tools" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_SUBPROCESS=OFF -DMTMD_VIDEO=OFF -DGGML_NATIVE=ON >"$OUT/cmake-configure-tools.log"
  cmake --build "$OUT/build-tools" --target llama-quantize -j "$JOBS"
  echo "built $OUT/build-tools/bin/llama-quantize"
fi
