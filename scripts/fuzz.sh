#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 30 s each): the protobuf decoding of
# every inbound type, and arbitrary bytes after CONNECT through a real mqtt-im.
# Needs the nightly toolchain (cargo-fuzz instruments with nightly-only flags); installs
# cargo-fuzz if it is missing. Usage: scripts/fuzz.sh [seconds per target]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-30}"
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz: the nightly toolchain is required (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
for target in decode_inbound packet_path; do
  echo "fuzz: $target for ${seconds}s"
  mkdir -p "corpus/$target"
  cargo +nightly fuzz run "$target" --sanitizer none -- \
    -max_total_time="$seconds" -max_len=4096 -print_final_stats=1 2>&1 \
    | grep -v "rumqttd::server::broker" | tail -n 25
done
