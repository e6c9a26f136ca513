#!/usr/bin/env bash
# Build llama.cpp's `llama-mtmd-cli` from the exact llama.cpp that the installed
# llama-cpp-python vendors, once, into benchmarks/.cache/ (gitignored).
#
#   bash benchmarks/build_mtmd_cli.sh            # uses the venv's python (or $PYTHON)
#   nice -n 15 bash benchmarks/build_mtmd_cli.sh # on a machine someone else is using
#
# Steps: `pip download --no-deps --no-binary :all: llama-cpp-python==<installed version>`
# into the cache, unpack it, configure vendor/llama.cpp with CMake (no curl, no server, no
# tests) and build only the llama-mtmd-cli target. Prints the binary's path at the end;
# benchmarks/run.py finds it there by itself. Re-running is a no-op once the binary exists
# (FORCE=1 rebuilds). JOBS (default 2) sets the build parallelism.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
    if [[ -x "$ROOT/../venv/bin/python" ]]; then PYTHON="$ROOT/../venv/bin/python"
    elif [[ -n "${VIRTUAL_ENV:-}" ]]; then PYTHON="$VIRTUAL_ENV/bin/python"
    else PYTHON="python3"; fi
fi
JOBS="${JOBS:-2}"

VERSION="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
CACHE="$HERE/.cache"
SRC_ROOT="$CACHE/llama_cpp_python-$VERSION"
BUILD="$CACHE/build-$VERSION"
BIN="$BUILD/bin/llama-mtmd-cli"

if [[ -x "$BIN" && -z "${FORCE:-}" ]]; then
    echo "llama-mtmd-cli already built: $BIN"
    exit 0
fi
mkdir -p "$CACHE"

if [[ ! -d "$SRC_ROOT/vendor/llama.cpp" ]]; then
    echo "downloading the llama-cpp-python $VERSION sdist..."
    "$PYTHON" -m pip download --no-deps --no-binary :all: --dest "$CACHE" \
        "llama-cpp-python==$VERSION"
    SDIST="$(ls "$CACHE"/llama_cpp_python-"$VERSION".tar.gz)"
    tar -xzf "$SDIST" -C "$CACHE"
fi
LLAMA_SRC="$SRC_ROOT/vendor/llama.cpp"
[[ -f "$LLAMA_SRC/tools/mtmd/mtmd-cli.cpp" ]] || {
    echo "error: $LLAMA_SRC has no tools/mtmd/mtmd-cli.cpp" >&2; exit 1; }

echo "configuring $LLAMA_SRC -> $BUILD"
# Release build with llama.cpp's defaults (GGML_NATIVE=ON: the same CPU features a
# from-source llama-cpp-python build gets on this machine).
cmake -S "$LLAMA_SRC" -B "$BUILD" -G "Unix Makefiles" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_TOOLS=ON \
    >"$CACHE/cmake-configure.log" 2>&1 || {
        tail -40 "$CACHE/cmake-configure.log" >&2; exit 1; }

echo "building llama-mtmd-cli with $JOBS jobs (several minutes)..."
cmake --build "$BUILD" --target llama-mtmd-cli -j "$JOBS" >"$CACHE/cmake-build.log" 2>&1 || {
    tail -40 "$CACHE/cmake-build.log" >&2; exit 1; }

[[ -x "$BIN" ]] || { echo "error: build finished but $BIN is missing" >&2; exit 1; }
echo "built: $BIN"
