#!/usr/bin/env bash
# Build llama.cpp's measurement tools (llama-perplexity, llama-imatrix, llama-bench, llama-quantize, llama-server) from the
# llama.cpp sources vendored in the llama-cpp-python sdist - the same llama.cpp the bench extra installs.
# Nothing of llama.cpp is committed: sources and binaries live under $TIGHTFIT_PEER_DIR (default ~/.cache).
# Usage: bash bench/build_llama_tools.sh   -> prints the folder holding the binaries
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
DIR=${TIGHTFIT_PEER_DIR:-$HOME/.cache/tightfit/llama.cpp-$VERSION}
BIN="$DIR/build/bin"
if [ -x "$BIN/llama-perplexity" ] && [ -x "$BIN/llama-quantize" ] && [ -x "$BIN/llama-server" ]; then echo "$BIN"; exit 0; fi
mkdir -p "$DIR"
ls "$DIR"/sdist/*.tar.gz >/dev/null 2>&1 || python -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR/sdist" >&2
[ -d "$DIR/llama_cpp_python-$VERSION" ] || tar xzf "$DIR"/sdist/llama_cpp_python-"$VERSION".tar.gz -C "$DIR"
SRC="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$SRC" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_SERVER=ON $(sh "$(dirname "$0")/llama-cmake-args.sh") >&2
cmake --build "$DIR/build" -j "$(nproc)" --target llama-perplexity llama-imatrix llama-bench llama-quantize llama-server >&2
echo "$BIN"
