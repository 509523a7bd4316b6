#!/usr/bin/env bash
# A small Redis Cluster (three masters, no replicas) on free local ports, for the tests that
# need one. `scripts/redis-cluster.sh start DIR` starts it with its files in DIR and prints
# the seed URLs (comma-separated) for MQTT_IM_TEST_REDIS_CLUSTER_URL; `stop DIR` ends it.
set -euo pipefail

command=${1:?usage: redis-cluster.sh start|stop DIR}
dir=${2:?usage: redis-cluster.sh start|stop DIR}

listening() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

case "$command" in
start)
  mkdir -p "$dir"
  ports=()
  # A node also listens on its port + 10000 (the cluster bus): both must be free, and below
  # the kernel's ephemeral range, where an outgoing connection may hold the port.
  for port in $(shuf -i 20000-22700 -n 200); do
    if ! listening "$port" && ! listening $((port + 10000)); then
      ports+=("$port")
    fi
    [ "${#ports[@]}" -eq 3 ] && break
  done
  [ "${#ports[@]}" -eq 3 ] || { echo "no free ports for a Redis Cluster" >&2; exit 1; }
  # Written first, so that `stop` ends whatever started even if the rest fails.
  printf '%s\n' "${ports[@]}" > "$dir/ports"
  for port in "${ports[@]}"; do
    redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --cluster-enabled yes \
      --cluster-config-file "nodes-$port.conf" --dir "$dir" --save "" --appendonly no \
      --pidfile "$dir/redis-$port.pid" --logfile "$dir/redis-$port.log" >&2
  done
  for port in "${ports[@]}"; do
    for _ in $(seq 50); do
      redis-cli -p "$port" ping >/dev/null 2>&1 && continue 2
      sleep 0.1
    done
    echo "Redis Cluster node on port $port did not start:" >&2
    tail -5 "$dir/redis-$port.log" >&2
    exit 1
  done
  seeds=()
  for port in "${ports[@]}"; do seeds+=("127.0.0.1:$port"); done
  redis-cli --cluster create "${seeds[@]}" --cluster-replicas 0 --cluster-yes >&2
  for _ in $(seq 100); do
    redis-cli -p "${ports[0]}" cluster info | grep -q '^cluster_state:ok' && break
    sleep 0.1
  done
  (IFS=,; echo "${seeds[*]/#/redis://}")
  ;;
stop)
  [ -f "$dir/ports" ] || exit 0
  while read -r port; do
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  done < "$dir/ports"
  rm -rf "$dir"
  ;;
*)
  echo "usage: redis-cluster.sh start|stop DIR" >&2
  exit 2
  ;;
esac
