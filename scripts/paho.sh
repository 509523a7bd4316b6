#!/usr/bin/env bash
# Runs the Eclipse Paho interoperability suites (MQTT 5 `client_test5.py`, MQTT 3.1.1
# `client_test.py`) against a built mqtt-im, the way a newcomer would: anonymous access, the
# uid taken from the client id, the embedded store in a scratch directory.
#
#   cargo build --release
#   scripts/paho.sh PAHO_CHECKOUT [MQTT_IM_BINARY]
#
# PAHO_CHECKOUT is a checkout of https://github.com/eclipse/paho.mqtt.testing (nothing of it
# is installed: it needs only Python 3). Each test runs on its own, with a time limit, so one
# that hangs cannot hide the others; the script prints one line per test and the totals.
# Set PAHO_BROKER_PORT to run the same suites against another broker already listening there
# (Mosquitto, say), for a side-by-side comparison.
set -uo pipefail

checkout=${1:?usage: paho.sh PAHO_CHECKOUT [MQTT_IM_BINARY]}
binary=${2:-target/release/mqtt-im}
suites="$checkout/interoperability"
[ -f "$suites/client_test5.py" ] || { echo "no Paho interoperability suite in $checkout" >&2; exit 2; }
per_test=${PAHO_TEST_TIMEOUT:-90}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

scratch=$(mktemp -d)
broker=""
stop_broker() {
  [ -n "$broker" ] && kill "$broker" 2>/dev/null && wait "$broker" 2>/dev/null
  rm -rf "$scratch"
}
trap stop_broker EXIT

port=${PAHO_BROKER_PORT:-}
if [ -z "$port" ]; then
  [ -x "$binary" ] || { echo "no mqtt-im binary at $binary (cargo build --release)" >&2; exit 2; }
  for attempt in 1 2 3; do
    port=$(free_port)
    metrics=$(free_port)
    cat > "$scratch/paho.toml" <<EOF
[listeners]
mqtt = "127.0.0.1:$port"
metrics = "127.0.0.1:$metrics"
[auth]
allow_anonymous = true
uid_from = "client_id"
[store]
path = "$scratch/im.db"
EOF
    "$binary" --config "$scratch/paho.toml" > "$scratch/broker.log" 2>&1 &
    broker=$!
    for _ in $(seq 50); do
      (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
      sleep 0.2
    done
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    kill "$broker" 2>/dev/null; wait "$broker" 2>/dev/null; broker=""
  done
  [ -n "$broker" ] || { echo "mqtt-im did not start:" >&2; cat "$scratch/broker.log" >&2; exit 1; }
fi

run_suite() {
  local file=$1 label=$2 passed=0 total=0
  echo "== Paho $label ($file) against 127.0.0.1:$port"
  for test in $(grep -o 'def test[A-Za-z_0-9]*' "$suites/$file" | cut -c5-); do
    total=$((total + 1))
    # The 3.1.1 suite hands its own options on to unittest: name the test to unittest
    # directly.
    if (cd "$suites" && timeout "$per_test" python3 -c '
import runpy, sys, unittest
sys.argv = sys.argv[1:]
test = sys.argv.pop()
run = unittest.main
unittest.main = lambda *a, **k: run(*a, argv=[sys.argv[0], test], **k)
runpy.run_path(sys.argv[0], run_name="__main__")
' "$file" -p "$port" "Test.$test") > "$scratch/$test.log" 2>&1; then
      passed=$((passed + 1))
      echo "pass  $test"
    else
      echo "FAIL  $test"
      grep -E '^(AssertionError|[A-Za-z]+Error)' "$scratch/$test.log" | head -2 | sed 's/^/      /'
    fi
  done
  echo "== $label: $passed of $total passed"
}

run_suite client_test5.py "MQTT 5"
run_suite client_test.py "MQTT 3.1.1"
