#!/usr/bin/env bash
# The yardstick for the end-to-end bench (resource-manager/benches/e2e.rs):
# Slurm (Debian's slurmctld + slurmd + munge) on this machine, given the same
# work: 1,000 one-task jobs submitted 16 at a time (jobs/s from the first
# submit to the last job's end) and one 1,000-task array (tasks/s). Slurm's
# node offers what the bench's four agents do together (64 CPUs, 128 GiB);
# every job asks for one CPU (Slurm's smallest unit) and 32 MiB.
#
#   sudo bash benches/slurm-compare.sh          # runs each figure three times
#
# Needs root (slurmd); installs the packages if they are missing. Everything
# runs on loopback from a temporary directory that is removed at the end.
set -euo pipefail

JOBS=${JOBS:-1000}
RUNS=${RUNS:-3}

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null
fi

dir=$(mktemp -d /tmp/weft-slurm.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 1
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT

mkdir -p "$dir"/{state,spool,munge,log,out}
chmod 700 "$dir/munge"
dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$dir/munge/munge.key"
munged --force --key-file "$dir/munge/munge.key" --socket "$dir/munge/sock" \
    --pid-file "$dir/munge/pid" --log-file "$dir/munge/log" --seed-file "$dir/munge/seed"
pids+=("$(cat "$dir/munge/pid")")

host=$(hostname -s)
cat > "$dir/slurm.conf" <<EOF
ClusterName=weftcmp
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
AuthInfo=socket=$dir/munge/sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
MaxJobCount=100000
MaxArraySize=100001
MinJobAge=300
ReturnToService=2
NodeName=$host NodeAddr=127.0.0.1 CPUs=64 RealMemory=131072 State=UNKNOWN
PartitionName=bench Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 100); do
    [[ -s $dir/slurmctld.pid && -s $dir/slurmd.pid ]] && break
    sleep 0.1
done
pids+=("$(cat "$dir/slurmctld.pid")" "$(cat "$dir/slurmd.pid")")
for _ in $(seq 300); do
    sinfo -h -o %t 2>/dev/null | grep -q '^idle' && break
    sleep 0.1
done
sinfo -h -o '%n %t %c %m' | sed 's/^/slurm node: /'

now_ms() { date +%s%3N; }
# Waits until no job of this run is left in the queue.
drain() {
    for _ in $(seq 9000); do
        [[ $(squeue -h -n "$1" | wc -l) -eq 0 ]] && return 0
        sleep 0.1
    done
    echo "jobs named $1 did not finish" >&2
    return 1
}

for run in $(seq "$RUNS"); do
    name="one$run"
    t0=$(now_ms)
    seq "$JOBS" | xargs -P 16 -I{} sbatch -Q -J "$name" -c 1 --mem=32M \
        -o /dev/null --wrap true
    t1=$(now_ms)
    drain "$name"
    t2=$(now_ms)
    awk -v n="$JOBS" -v s=$((t1 - t0)) -v e=$((t2 - t0)) 'BEGIN {
        printf "slurm: %d one-task jobs: all submitted in %.2f s, all finished in %.2f s: %.1f jobs/s\n",
            n, s / 1000, e / 1000, n / (e / 1000) }'

    name="arr$run"
    t0=$(now_ms)
    sbatch -Q -J "$name" -c 1 --mem=32M -o /dev/null --array=1-"$JOBS" --wrap true
    drain "$name"
    t2=$(now_ms)
    awk -v n="$JOBS" -v e=$((t2 - t0)) 'BEGIN {
        printf "slurm: one %d-task array: finished in %.2f s: %.1f tasks/s\n", n, e / 1000, n / (e / 1000) }'
done
