#!/usr/bin/env bash
# Long simulator runs: the four deterministic simulators (the failover
# core's, the replica group commit's, the replication data path's, and the
# queue push's),
# ROUNDS rounds of SEEDS seeds each, every round on fresh seeds. A violation
# stops the loop and prints the replay command. The data-path simulator is
# slower per seed; it runs SEEDS/20 seeds a round.
#
#   scripts/sim.sh [ROUNDS] [SEEDS]      (defaults: 10 rounds of 100000)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-10}
seeds=${2:-100000}
cargo test --release --test tests --no-run >/dev/null 2>&1
for ((r = 0; r < rounds; r++)); do
    first=$((r * seeds))
    echo "== round $((r + 1))/$rounds: seeds $first..$((first + seeds))"
    HASYNC_SIM_FIRST=$first HASYNC_SIM_SEEDS=$seeds HASYNC_COMMIT_SIM_SEEDS=$seeds \
        HASYNC_DATA_SIM_SEEDS=$((seeds / 20)) HASYNC_QUEUE_SIM_SEEDS=$seeds \
        cargo test --release --test tests -- --exact \
        suite::failover_props::sim_seeds suite::failover_props::commit_sim_seeds \
        suite::failover_props::data_sim_seeds suite::failover_props::queue_sim_seeds \
        --nocapture 2>&1 | grep -E "seeds:|panicked|replay with|^test result"
    [ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
done
