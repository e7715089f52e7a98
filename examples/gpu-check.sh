#!/usr/bin/env bash
# Checks a GPU node end to end: brings up a standalone cluster whose local
# agent finds its GPUs through NVML, shows what it found, and runs three jobs
# through the resource manager with PyTorch:
#   1. one whole GPU: the task sees exactly that device (by UUID) and runs a
#      bf16 matrix product on it;
#   2. two shares of one GPU (gpus: 0.5, gpu_memory: 20GiB each) started as a
#      gang, so both hold device memory at once on the same device;
#   3. a share that allocates past its gpu_memory quota: killed by the agent
#      (OverGpuMemoryQuota, exit -106) with the amount NVML reported, and
#      the job FAILED with that reason;
#   4. a task given no GPU opens the node's /dev/nvidiaN device files: denied
#      by the devices controller (cgroup v1) or the BPF device filter (v2),
#      while the whole-GPU task of job 1 opened its own.
# Exits non-zero if any of that does not hold.
#
# Needs the NVIDIA driver and a python3 with PyTorch. Binaries: $WEFT_BIN
# (default: target/debug, built here with cargo).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
if [ -z "${WEFT_BIN:-}" ]; then
  cargo build --bins
  WEFT_BIN="${CARGO_TARGET_DIR:-$root/target}/debug"
fi
bin=$WEFT_BIN

work=$(mktemp -d -t weft-gpu-check.XXXXXX)
cat >"$work/agent.toml" <<EOF
[gpu]
probe = "${WEFT_GPU_PROBE:-nvml}"
EOF
if [ -n "${WEFT_GPU_FAKE:-}" ]; then cat "$WEFT_GPU_FAKE" >>"$work/agent.toml"; fi
agent_config="$work/agent.toml"
. examples/standalone.sh
fail() {
  echo "gpu-check FAILED: $*" >&2
  tail -n 20 "$log" >&2
  exit 1
}

node=$("$bin/rmctl" node list | awk 'NR > 1 { print $1; exit }')
"$bin/rmctl" node status "$node"
gpus=$("$bin/rmctl" -o json node status "$node" | python3 -c 'import json, sys; print(len(json.load(sys.stdin)["gpus"]))')
[ "$gpus" -ge 1 ] || fail "the agent found no GPU"
grep -m1 -i "gpu\|nvml" "$log" || true

cat >"$work/whole.py" <<'EOF'
import os, subprocess, sys, time, torch
print("CUDA_VISIBLE_DEVICES", os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "opendev.py")], check=True)
assert torch.cuda.device_count() == 1, torch.cuda.device_count()
print("device", torch.cuda.get_device_name(0), flush=True)
n = 8192
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ b
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(10):
    a @ b
torch.cuda.synchronize()
dt = (time.perf_counter() - t) / 10
print(f"bf16 {n}^3 matmul: {2 * n**3 / dt / 1e12:.0f} TFLOP/s", flush=True)
EOF
cat >"$work/opendev.py" <<'EOF'
import glob, os
for path in sorted(glob.glob("/dev/nvidia[0-9]*")):
    try:
        os.close(os.open(path, os.O_RDWR))
        print("opened", path, flush=True)
    except OSError as e:
        print("denied" if e.errno in (1, 13) else "error", path, e.strerror, flush=True)
EOF
cat >"$work/share.py" <<'EOF'
import os, time, torch
x = torch.empty(8 << 30, dtype=torch.uint8, device="cuda")
x.fill_(1)
torch.cuda.synchronize()
free, total = torch.cuda.mem_get_info()
print("CUDA_VISIBLE_DEVICES", os.environ["CUDA_VISIBLE_DEVICES"],
      f"holding 8 GiB; device free {free >> 30} of {total >> 30} GiB", flush=True)
time.sleep(8)
EOF
cat >"$work/hog.py" <<'EOF'
import time, torch
x = torch.empty(6 << 30, dtype=torch.uint8, device="cuda")
x.fill_(1)
torch.cuda.synchronize()
print("allocated 6 GiB", flush=True)
time.sleep(60)
print("still alive after 60 s", flush=True)
EOF
cat >"$work/gpu.yaml" <<EOF
name: gpu-check
stages:
  - name: whole
    instances: 1
    command: python3 $work/whole.py
    resources: { vcores: 2, memory: 8GiB, gpus: 1 }
  - name: shares
    after: [whole]
    gang: true
    instances: 2
    command: python3 $work/share.py
    resources: { vcores: 1, memory: 4GiB, gpus: 0.5, gpu_memory: 20GiB }
EOF
cat >"$work/hog.yaml" <<EOF
name: gpu-hog
stages:
  - name: hog
    instances: 1
    command: python3 $work/hog.py
    resources: { vcores: 1, memory: 4GiB, gpus: 0.25, gpu_memory: 2GiB }
EOF

t0=$(date +%s.%N)
app=$("$bin/rmctl" submit -f "$work/gpu.yaml")
app=${app#submitted }
# While the two shares run, the node shows the device shared.
for _ in $(seq 1 600); do
  if "$bin/rmctl" node status "$node" | grep -q "containers 2"; then
    "$bin/rmctl" node status "$node"
    break
  fi
  "$bin/rmctl" app status "$app" | grep -q "RUNNING\|PENDING\|ACCEPTED" || break
  sleep 0.1
done
if ! "$bin/rmctl" app wait "$app"; then
  "$bin/rmctl" app status "$app" || true
  for t in whole/0 shares/0 shares/1; do "$bin/rmctl" app logs "$app" "$t" --stderr 2>/dev/null | tail -n 5 || true; done
  fail "the GPU job did not succeed"
fi
echo "gpu-check job: $(python3 -c "import time; print(round(time.time() - $t0, 1))") s from submit to SUCCEEDED"
"$bin/rmctl" app status "$app"
for t in whole/0 shares/0 shares/1; do
  echo "--- $t"
  "$bin/rmctl" app logs "$app" "$t"
done
uuid=$("$bin/rmctl" app logs "$app" whole/0 | awk '/^CUDA_VISIBLE_DEVICES/ { print $2 }')
case "$uuid" in GPU-*) ;; *) fail "whole/0 saw CUDA_VISIBLE_DEVICES=$uuid, not one UUID" ;; esac
for t in shares/0 shares/1; do
  "$bin/rmctl" app logs "$app" "$t" | grep -q "holding 8 GiB" || fail "$t did not hold its memory"
done

if "$bin/rmctl" submit -f "$work/hog.yaml" --wait; then
  fail "a share past its gpu_memory quota succeeded"
fi
hog=$("$bin/rmctl" app list | awk 'NR > 1 { print $1 }' | tail -1)
"$bin/rmctl" app status "$hog"
"$bin/rmctl" -o json app status "$hog" >"$work/hog.json"
grep -q "over its GPU memory quota" "$work/hog.json" || fail "the hog's status names no GPU-memory kill"
"$bin/rmctl" app logs "$hog" hog/0 || true
# 4. A task without GPUs and the node's device files.
isolation=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -m1 -o 'isolation=.*' || true)
echo "agent: $isolation"
"$bin/rmctl" app logs "$app" whole/0 | grep -q "^opened /dev/nvidia" || fail "whole/0 could not open its own GPU's device file"
nogpu=$("$bin/rmctl" submit --name gpu-nodev -- python3 "$work/opendev.py")
nogpu=${nogpu#submitted }
"$bin/rmctl" app wait "$nogpu" || fail "the GPU-less task did not succeed"
"$bin/rmctl" app logs "$nogpu" run/0 | tee "$work/nodev.txt"
grep -q . "$work/nodev.txt" || fail "the GPU-less task listed no /dev/nvidiaN"
case "$isolation" in
  *"devices: not filtered"* | *procfs*)
    echo "gpu-check: device files NOT isolated on this node ($isolation)"
    ;;
  *)
    if grep -qv "^denied" "$work/nodev.txt"; then fail "a task given no GPU opened a GPU's device file"; fi
    echo "gpu-check: a task given no GPU was denied every /dev/nvidiaN"
    ;;
esac
echo "gpu-check: passed"
