#!/usr/bin/env bash
# Build (once) and cache the llama-cpp-python wheel for the given CMAKE_ARGS; later installs reuse it.
# CPU default avoids -march=native: these VMs advertise AMX but fault on it (see README, "Building").
set -euo pipefail
py=${1:?python}
version=${2:?llama-cpp-python version}
dir=${WHEEL_DIR:?set WHEEL_DIR}
if compgen -G "$dir/llama_cpp_python-$version-*.whl" >/dev/null; then
  echo "llama-cpp-python $version: using cached wheel in $dir"
  exit 0
fi
echo "llama-cpp-python $version: building from source with CMAKE_ARGS='${CMAKE_ARGS:-}'"
echo "  (about 5 minutes on 2 cores; the wheel is cached in $dir)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
  "$py" -m pip wheel --quiet --no-deps --no-binary llama-cpp-python -w "$tmp" "llama-cpp-python==$version"
mkdir -p "$dir"
mv "$tmp"/llama_cpp_python-*.whl "$dir"/
echo "llama-cpp-python $version: wheel cached in $dir"
