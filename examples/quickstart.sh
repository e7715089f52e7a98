#!/usr/bin/env bash
# Weft's quickstart: builds Weft, brings up a standalone single-machine
# cluster (one `resource-manager standalone --local-agent` process), submits
# the example ML pipeline (examples/pipeline: generate -> preprocess x4 ->
# a 2-rank data-parallel training gang -> evaluate), follows it to its end,
# prints the model's accuracy, serves the model (a service of 2 replicas,
# queried through its endpoints: examples/serve-model.sh) and takes the
# cluster down.
#
# Needs the Rust toolchain and python3. As root the tasks run in cgroups;
# otherwise the node agent watches them through /proc.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

cargo build --bins
bin="${CARGO_TARGET_DIR:-$root/target}/debug"

work=$(mktemp -d -t weft-quickstart.XXXXXX)
. examples/standalone.sh

mkdir -p "$work/data"
sed -e "s|@PIPELINE@|$root/examples/pipeline|g" -e "s|@DATA@|$work/data|g" \
  examples/pipeline/pipeline.yaml >"$work/pipeline.yaml"

if "$bin/rmctl" submit -f "$work/pipeline.yaml" --wait; then
  app=$("$bin/rmctl" app list | awk 'NR > 1 { print $1 }' | tail -1)
  "$bin/rmctl" app status "$app"
  echo
  echo "pipeline accuracy: $(cat "$work/data/accuracy.txt")"
  echo
  # The trained model, served by 2 replicas and queried through their endpoints.
  RMCTL="$bin/rmctl" examples/serve-model.sh "$work/data"
else
  echo "the pipeline did not succeed; the cluster's log:" >&2
  tail -n 30 "$log" >&2
  exit 1
fi
