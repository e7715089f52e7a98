# Sourced by the example scripts: brings up a standalone single-machine
# cluster (one `resource-manager standalone --local-agent` process) on a free
# loopback port and takes it down when the script exits.
#
# Needs: $bin (the binaries' dir) and $work (a scratch dir, removed at exit).
# Optional: $agent_config (the embedded agent's TOML). Sets WEFT_RM, $log and
# $cluster; returns once the local node is RUNNING, or exits 1 with the log.

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export WEFT_RM="127.0.0.1:$port"
log="$work/standalone.log"

"$bin/resource-manager" standalone --data-dir "$work/weft" --listen "$WEFT_RM" --local-agent \
  ${agent_config:+--agent-config "$agent_config"} >"$log" 2>&1 &
cluster=$!
stop() {
  kill -TERM "$cluster" 2>/dev/null || true
  wait "$cluster" 2>/dev/null || true
  rm -rf "$work"
}
trap stop EXIT

echo "standalone cluster at $WEFT_RM (log: $log)"
for _ in $(seq 1 100); do
  if ! kill -0 "$cluster" 2>/dev/null; then
    echo "the standalone cluster stopped; its log:" >&2
    cat "$log" >&2
    exit 1
  fi
  if "$bin/rmctl" --timeout 1 node list 2>/dev/null | grep -q RUNNING; then
    break
  fi
  sleep 0.2
done
"$bin/rmctl" node list
