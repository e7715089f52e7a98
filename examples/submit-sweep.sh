#!/usr/bin/env bash
# A hyper-parameter sweep as batch work is scripted: one job per learning
# rate, all submitted at once, then waited for; each job's result is
# collected from its log and the best one printed.
#
#   WEFT_RM=127.0.0.1:7100 examples/submit-sweep.sh 0.05 0.1 0.5 1.0
#
# Needs rmctl on PATH (or RMCTL=path/to/rmctl) and python3 on the nodes.
set -euo pipefail
rmctl=${RMCTL:-rmctl}
if [ $# -gt 0 ]; then rates=("$@"); else rates=(0.05 0.1 0.5 1.0); fi

declare -A job
for rate in "${rates[@]}"; do
  # A toy objective: the loss after 50 gradient steps on (x - 3)^2.
  job[$rate]=$("$rmctl" submit --name "sweep-lr-$rate" --vcores 0.5 --memory 128MiB -- \
    python3 -c "x = 0.0
for _ in range(50): x -= $rate * 2 * (x - 3)
print(f'loss {(x - 3) ** 2:.6g}')")
  echo "learning rate $rate: ${job[$rate]}"
done

failed=0
for rate in "${rates[@]}"; do
  if ! "$rmctl" app wait "${job[$rate]}" >/dev/null; then
    echo "learning rate $rate: job ${job[$rate]} failed" >&2
    failed=1
  fi
done

results=""
for rate in "${rates[@]}"; do
  loss=$("$rmctl" app logs "${job[$rate]}" run/0 | awk '/^loss/ { print $2 }')
  echo "learning rate $rate -> loss ${loss:-?}"
  [ -z "$loss" ] || results+="$loss $rate"$'\n'
done
printf '%s' "$results" | sort -g | awk 'NR == 1 { print "best learning rate: " $2 " (loss " $1 ")" }'
exit $failed
