#!/usr/bin/env bash
# The browser chat demo (examples/web).
#   scripts/web.sh [PORT]   vendor the JavaScript libraries, then serve the page on PORT (8080)
#   scripts/web.sh setup    only vendor them, and install Chromium for the browser test
set -euo pipefail
cd "$(dirname "$0")/../examples/web"

vendor() {
  if [ ! -d node_modules ] || [ package-lock.json -nt node_modules ]; then
    npm ci --no-audit --no-fund --loglevel=error
  fi
  mkdir -p vendor
  cp node_modules/mqtt/dist/mqtt.min.js node_modules/protobufjs/dist/protobuf.min.js vendor/
  cp ../../proto/mqtt_im/v1/im.proto vendor/
}

chromium() {
  if [ -x /usr/bin/chromium ]; then return; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
}

case "${1:-8080}" in
  setup)
    vendor
    chromium
    ;;
  *)
    vendor
    echo "web demo on http://127.0.0.1:${1:-8080}/ (the broker's ws listener must be on)"
    exec python3 -m http.server "${1:-8080}" --bind 127.0.0.1
    ;;
esac
