#!/usr/bin/env bash
# Build (once) and cache llama.cpp's llama-server from the llama.cpp vendored in the llama-cpp-python sdist,
# so the benchmark compares against the very llama.cpp commit the appliance runs. About 5 minutes on 2 cores.
set -euo pipefail
py=${1:?python}
version=${2:?llama-cpp-python version}
dir=${SERVER_DIR:?set SERVER_DIR}
if [ -x "$dir/llama-server" ]; then
  echo "llama-server (llama-cpp-python $version sdist): using cached build in $dir"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download --quiet --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$version"
tar -xzf "$tmp"/llama_cpp_python-"$version".tar.gz -C "$tmp"
src="$tmp/llama_cpp_python-$version/vendor/llama.cpp"
echo "llama-server: building from $src with CMAKE_ARGS='${CMAKE_ARGS:-}' (cached in $dir)"
# shellcheck disable=SC2086  # CMAKE_ARGS is a list of flags
cmake -S "$src" -B "$tmp/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF ${CMAKE_ARGS:-} >"$tmp/cmake.log"
cmake --build "$tmp/build" --target llama-server -j"${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" >"$tmp/build.log"
mkdir -p "$dir"
cp -a "$tmp"/build/bin/. "$dir"/
echo "llama-server: cached in $dir (run it with LD_LIBRARY_PATH=$dir)"
