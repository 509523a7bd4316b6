#!/usr/bin/env bash
# The TypeScript SDK (clients/typescript): install its packages from package-lock.json and
# build it (types generated from proto/, ES module for Node, a bundle for browsers).
#   scripts/sdk-ts.sh          install (when the lock file changed) and build
#   scripts/sdk-ts.sh pack     also `npm pack`, as it would be published
set -euo pipefail
cd "$(dirname "$0")/../clients/typescript"
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
npm run --silent build >/dev/null
if [ "${1:-}" = pack ]; then
  npm pack --silent --pack-destination "${TMPDIR:-/tmp}" >/dev/null
fi
