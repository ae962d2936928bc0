#!/usr/bin/env bash
# kill -9 of the primary at N random moments (half during an initial sync,
# half during live Maildir traffic), each followed by its rejoin; prints
# every run and the totals: conflicts kept, false conflicts, lost messages,
# duplicates, stray files in the live trees (all but the first must be 0).
#
#   scripts/kill-loop.sh [N] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-24}
seed=${2:-}
export HASYNC_KILL_LOOPS="$n"
[ -n "$seed" ] && export HASYNC_KILL_SEED="$seed"
cargo test --release --test tests kill9_at_random -- --nocapture 2>&1 |
    grep -E "^(kill loop|initial sync:|live traffic:|run [0-9]+ of seed|test result)"
