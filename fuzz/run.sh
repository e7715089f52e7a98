#!/usr/bin/env bash
# Runs every fuzz target for N seconds (default 30) from its seeds and its
# kept corpus, and prints each one's figures; stops at the first fault,
# whose input libFuzzer leaves under fuzz/artifacts/<target>/ (copy it to
# fuzz/regressions/<target>/ once fixed: the test suite replays those).
# Needs cargo-fuzz (`cargo install cargo-fuzz`); runs on the stable
# toolchain: no sanitizer (Rust code), the checks are the targets' own
# assertions, and libFuzzer's limits on memory (2 GiB) and time per input.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-30}"
cargo fuzz build -s none -O
mkdir -p logs
for t in spec commands snapshot requests; do
  mkdir -p "corpus/$t"
  rc=0
  cargo fuzz run -s none -O "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    >"logs/$t.log" 2>&1 || rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "logs/$t.log")
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "logs/$t.log")
  echo "$t: ${runs:-?} runs in ${secs}s, peak RSS ${rss:-?} MiB, exit $rc"
  if [ "$rc" != 0 ]; then
    tail -40 "logs/$t.log" >&2
    echo "fuzz target $t failed (exit $rc): fuzz/logs/$t.log, input under fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
