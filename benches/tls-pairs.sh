#!/usr/bin/env bash
# Mutual TLS's cost in jobs/s: N interleaved pairs of the e2e bench's 1,000
# one-task jobs, plaintext then TLS (same build, same machine), printing each
# run's jobs/s and CPU per job, then min / median / max of each and of the
# pairs' ratios. Needs the release binaries (cargo build --release
# --workspace --bins) and root for cgroups.
#
#   bash benches/tls-pairs.sh 10
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-8}
out=$(mktemp -d -t weft-tls-pairs.XXXXXX)
cargo bench -p weft-resource-manager --bench e2e --no-run >/dev/null 2>&1
for i in $(seq 1 "$n"); do
  for mode in plain tls; do
    env WEFT_BENCH_ONLY=jobs $([ $mode = tls ] && echo WEFT_BENCH_TLS=1) \
      cargo bench -q -p weft-resource-manager --bench e2e 2>/dev/null >"$out/$mode-$i.txt"
    jobs=$(grep -o '[0-9.]* jobs/s' "$out/$mode-$i.txt" | cut -d' ' -f1)
    cpu=$(grep -o '([0-9.]* ms per job)' "$out/$mode-$i.txt" | tr -d '(' | cut -d' ' -f1)
    echo "pair $i $mode: $jobs jobs/s, $cpu ms CPU per job"
    echo "$i $mode $jobs $cpu" >>"$out/all"
  done
done
python3 - "$out/all" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
by = {m: [(int(i), float(j), float(c)) for i, mm, j, c in rows if mm == m] for m in ("plain", "tls")}
def mmm(v):
    v = sorted(v)
    return f"{v[0]:.1f} / {statistics.median(v):.1f} / {v[-1]:.1f}"
for m in ("plain", "tls"):
    print(f"{m}: jobs/s min/median/max {mmm([j for _, j, _ in by[m]])}; CPU per job {mmm([c for _, _, c in by[m]])} ms")
ratios = [t[1] / p[1] for p, t in zip(by["plain"], by["tls"])]
print(f"TLS / plaintext per pair: min {min(ratios):.2f}, median {statistics.median(ratios):.2f}, max {max(ratios):.2f} ({' '.join(f'{r:.2f}' for r in ratios)})")
PY
rm -rf "$out"
