#!/usr/bin/env bash
# The browser chat demo (examples/web), built on the TypeScript SDK.
#   scripts/web.sh [PORT]   build the SDK, vendor its browser bundle, then serve the page on PORT (8080)
#   scripts/web.sh setup    only build and vendor it, and install what the browser test needs
#                           (playwright-core from package-lock.json, Debian's Chromium)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/../examples/web"

vendor() {
  "$here/sdk-ts.sh"
  mkdir -p vendor
  cp ../../clients/typescript/dist/browser.js vendor/mqtt-im-client.js
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
    if [ ! -d node_modules ] || [ package-lock.json -nt node_modules ]; then
      npm ci --no-audit --no-fund --loglevel=error
    fi
    chromium
    ;;
  *)
    vendor
    echo "web demo on http://127.0.0.1:${1:-8080}/ (the broker's ws listener must be on)"
    exec python3 -m http.server "${1:-8080}" --bind 127.0.0.1
    ;;
esac
