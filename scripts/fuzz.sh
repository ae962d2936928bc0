#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 60) from the
# checked-in seed corpus (fuzz/corpus/<target>, read only); what the fuzzer
# finds goes to a scratch corpus under fuzz/corpus-run/ (git-ignored). A
# crash stops the script with the reproducer under fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
cargo +nightly fuzz build
for t in "${targets[@]}"; do
    mkdir -p "corpus-run/$t"
    echo "== fuzzing $t for ${secs}s"
    log=$(mktemp)
    # -rss_limit_mb: a decoder must never allocate what the input cannot back.
    set +e
    cargo +nightly fuzz run "$t" "corpus-run/$t" "corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=512 -print_final_stats=1 >"$log" 2>&1
    status=$?
    set -e
    grep -E "^stat::(number_of_executed_units|peak_rss_mb)" "$log" || true
    if [ "$status" -ne 0 ]; then
        tail -40 "$log"
        rm -f "$log"
        echo "fuzz target $t failed (exit $status); reproducer in fuzz/artifacts/$t/"
        exit "$status"
    fi
    rm -f "$log"
done
echo "all ${#targets[@]} targets ran ${secs}s each without a failure"
