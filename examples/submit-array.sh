#!/usr/bin/env bash
# A job array: N copies of one command, told apart by $WEFT_TASK_INDEX,
# submitted as one job and waited for (exit status: the job's).
#
#   examples/submit-array.sh 8 'echo processing shard $WEFT_TASK_INDEX'
set -euo pipefail
rmctl=${RMCTL:-rmctl}
count=${1:?usage: submit-array.sh COUNT COMMAND}
command=${2:?usage: submit-array.sh COUNT COMMAND}
id=$("$rmctl" submit --name array --instances "$count" --vcores 0.5 --memory 256MiB -- sh -c "$command")
echo "submitted $id ($count tasks)"
status=0
"$rmctl" app wait "$id" || status=$?
for ((i = 0; i < count; i++)); do
  echo "--- task $i"
  "$rmctl" app logs "$id" "run/$i"
done
exit $status
