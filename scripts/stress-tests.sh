#!/usr/bin/env bash
# Runs the integration suite repeatedly to shake out timing-dependent
# failures, keeping the output (and the daemons' debug logs) of every
# failing run.
#
#   scripts/stress-tests.sh [RUNS] [-- extra cargo test args]
#
# Run two at once from two clones to add load: the tests that lower the
# global inotify limit take a file lock, so two processes do not collide.
set -euo pipefail
runs=${1:-5}
shift || true
[[ "${1:-}" == "--" ]] && shift
out=${STRESS_OUT:-target/stress}
mkdir -p "$out"
export HASYNC_TEST_LOG=${HASYNC_TEST_LOG:-hasync=debug}
fails=0
for i in $(seq 1 "$runs"); do
  log="$out/run-$i.log"
  if cargo test --test tests "$@" >"$log" 2>&1; then
    echo "run $i: ok ($(grep -o 'finished in [0-9.]*s' "$log" | tail -1))"
    rm -f "$log"
  else
    fails=$((fails + 1))
    echo "run $i: FAILED, output kept in $log"
    grep -m3 -A3 'panicked' "$log" | cut -c1-300 || true
  fi
done
echo "$fails of $runs runs failed"
[[ $fails -eq 0 ]]
