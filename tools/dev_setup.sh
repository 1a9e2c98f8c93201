#!/usr/bin/env bash
# The development set-up behind `make run`: serve the default real Qwen3-VL when it can be pulled (or was
# pulled before into models/real), else the random-weight smoke-test pair, and (re)create dev/ with
# `qwen-appliance init` whenever the chosen model changes. Set QWEN_APPLIANCE_PULL=0 to never try the hub.
set -euo pipefail
py=$1 dev=$2 tiny=$3 real=$4
model=$(realpath "$tiny/tiny-qwen3vl-q8_0.gguf")
mmproj=$(realpath "$tiny/tiny-qwen3vl-mmproj.gguf")
if [ "${QWEN_APPLIANCE_PULL:-1}" != 0 ]; then
  if out=$("$py" -m appliance model pull --models-dir "$real" 2>&1); then
    model=$(printf '%s\n' "$out" | sed -n 's/^path = "\(.*\)"$/\1/p' | head -n 1)
    mmproj=$(printf '%s\n' "$out" | sed -n 's/^mmproj = "\(.*\)"$/\1/p' | head -n 1)
    echo "make run: serving the real model $model"
  else
    echo "make run: no real model could be pulled: $(printf '%s\n' "$out" | tail -n 1 | cut -c1-160)..."
    echo "make run: serving the random-weight SMOKE-TEST model instead. Offline, import a real one with"
    echo "          .venv/bin/qwen-appliance model import --models-dir $real MODEL.gguf MMPROJ.gguf"
  fi
fi
# Same files, and for the smoke-test pair (regenerated when its generator changes) the same digests: keep dev/.
pinned() { [[ "$1" != "$(realpath "$tiny")"/* ]] || grep -qF "$2 = \"$(sha256sum "$1" | cut -d' ' -f1)\"" "$dev/policy.toml"; }
if [ -f "$dev/policy.toml" ] && grep -qF "path = \"$model\"" "$dev/policy.toml" \
    && grep -qF "mmproj = \"$mmproj\"" "$dev/policy.toml" \
    && pinned "$model" sha256 && pinned "$mmproj" mmproj_sha256; then
  exit 0
fi
force=()
[ -f "$dev/policy.toml" ] && force=(--force) && echo "make run: model changed; re-creating $dev/"
"$py" -m appliance init "$dev" --listen 127.0.0.1:8443 --client dev-client "${force[@]}" \
  --model "$model" --mmproj "$mmproj" --token-file "$dev/clients/dev-client/token"
