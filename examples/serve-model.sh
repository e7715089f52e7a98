#!/usr/bin/env bash
# Serves the example pipeline's trained model (DATA_DIR: its data directory,
# with model.json and stats.csv) as a service of 2 replicas, waits until both
# are healthy, queries it through its endpoints (examples/serving/query.py:
# the test set, round robin) and kills it.
#
#   examples/serve-model.sh /path/to/data      (WEFT_RM names the cluster)
set -euo pipefail
rmctl=${RMCTL:-rmctl}
data=$(cd "${1:?usage: serve-model.sh DATA_DIR}" && pwd)
serving=$(cd "$(dirname "$0")/serving" && pwd)
spec=$(mktemp -t weft-serving.XXXXXX.yaml)
trap 'rm -f "$spec"' EXIT
sed -e "s|@SERVING@|$serving|g" -e "s|@DATA@|$data|g" "$serving/service.yaml" >"$spec"
id=$("$rmctl" submit -f "$spec")
echo "submitted $id (model-server, 2 replicas)"
for _ in $(seq 1 300); do
  endpoints=$("$rmctl" -o json app endpoints "$id")
  if [ "$(python3 -c 'import json, sys; print(len(json.load(sys.stdin)))' <<<"$endpoints")" = 2 ]; then
    break
  fi
  sleep 0.2
done
"$rmctl" app endpoints "$id"
status=0
DATA="$data" python3 "$serving/query.py" <<<"$endpoints" || status=$?
"$rmctl" app kill "$id" >/dev/null
exit $status
