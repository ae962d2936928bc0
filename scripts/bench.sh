#!/usr/bin/env bash
# hasync benchmark: hasync pair vs rsync (daemon, with and without --fsync),
# cp -a + sync and lsyncd, on one generated Maildir fixture, in one run.
#
#   scripts/bench.sh            full run (20,000 messages, 3 repetitions; ~10 min on 2 cores)
#   scripts/bench.sh --quick    smoke run (2,000 messages, 1 repetition; < 2 min)
#   scripts/bench.sh --keep     keep target/bench/run-<timestamp>/ for inspection
#   scripts/bench.sh --wait     first wait for a running bench and until 5 min have passed since
#                               the last run's cleanup
#
# Leave 5 minutes between runs (or pass --wait): the cleanup deletes a few
# hundred thousand files, and ext4 then skips the freed inodes for up to 5 min
# when creating files, which makes every copy (hasync and peers) slower.
# Extra options after `--` go to scripts/bench/run.py (e.g. `-- --messages 5000 --reps 2`,
# `-- --perf 1` for CPU profiles in a quick run; see `python3 scripts/bench/run.py --help`).
# Writes target/bench/report.json, report.md, report.svg (and raw.json); full runs
# also profile an extra initial sync and queue push with perf (profile-*.txt).
# Needs: root or the packages below already installed (rsync; lsyncd optional),
# python3 (stdlib only), cargo.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

QUICK=0
KEEP=0
WAIT=0
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --keep) KEEP=1 ;;
        --wait) WAIT=1 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "bench.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
T_START=$(date +%s)

# ---------------------------------------------------------------- packages
have() { command -v "$1" >/dev/null 2>&1; }
LSYNCD_REASON=""
MISSING=()
have rsync || MISSING+=(rsync)
have lsyncd || MISSING+=(lsyncd)
have findmnt || MISSING+=(util-linux)
if [ ${#MISSING[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && have apt-get; then
        say "installing: ${MISSING[*]}"
        apt-get update -qq >/dev/null 2>&1 || say "apt-get update failed; trying the install anyway"
        for pkg in "${MISSING[@]}"; do
            if [ "$pkg" = lsyncd ] && ! apt-cache policy lsyncd 2>/dev/null | grep -q 'Candidate: [0-9]'; then
                LSYNCD_REASON="no lsyncd package available from the configured apt sources (apt-cache policy lsyncd: no candidate)"
                continue
            fi
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null 2>&1 \
                || say "apt-get install $pkg failed"
        done
    fi
fi
if ! have rsync; then
    echo "bench.sh: rsync is required and missing: run 'apt-get install -y rsync' as root" >&2
    exit 1
fi
for tool in python3 cargo sync cp; do
    have "$tool" || { echo "bench.sh: $tool is required and missing" >&2; exit 1; }
done
if ! have lsyncd && [ -z "$LSYNCD_REASON" ]; then
    if [ "$(id -u)" != 0 ]; then
        LSYNCD_REASON="lsyncd is not installed and bench.sh is not root (install it with 'apt-get install -y lsyncd')"
    else
        LSYNCD_REASON="'apt-get install -y lsyncd' failed (see apt-get output)"
    fi
fi

# ---------------------------------------------------------------- build
say "cargo build --release"
T_BUILD=$(date +%s)
cargo build --release --quiet
EXE="$ROOT/target/release/hasync"
say "build took $(( $(date +%s) - T_BUILD ))s"

# ---------------------------------------------------------------- run dir
OUT="$ROOT/target/bench"
mkdir -p "$OUT"
# One run at a time: two runs measure each other (and write the same reports).
exec 9>"$OUT/.lock"
if ! flock -n 9; then
    if [ "$WAIT" = 1 ]; then
        say "another scripts/bench.sh is running; waiting for it to finish (--wait)"
        flock 9
    else
        echo "bench.sh: another scripts/bench.sh is running on this checkout ($OUT/.lock);" \
            "running two at once measures each other. Wait for it, or pass --wait." >&2
        exit 1
    fi
fi
# Conditions that make the disk slow (see the header): a recent cleanup, and
# leftover run directories (not deleted here: deleting them now is the trap).
CLEANUP_AGO=-1
if [ -f "$OUT/.last-cleanup" ]; then
    CLEANUP_AGO=$(( $(date +%s) - $(cat "$OUT/.last-cleanup") ))
    if [ "$CLEANUP_AGO" -lt 300 ]; then
        if [ "$WAIT" = 1 ]; then
            say "waiting $(( 300 - CLEANUP_AGO ))s: the last run deleted its files ${CLEANUP_AGO}s ago"
            sleep $(( 300 - CLEANUP_AGO ))
            CLEANUP_AGO=300
        else
            say "WARNING: the last run deleted its files ${CLEANUP_AGO}s ago; file creation on ext4 is slower" \
                "for up to 5 min after mass deletes: figures will be pessimistic (use --wait)"
        fi
    fi
fi
LEFTOVER=$(find "$OUT" -maxdepth 1 -name 'run-*' -type d | wc -l)
if [ "$LEFTOVER" -gt 0 ]; then
    say "note: $LEFTOVER old run director(y/ies) in $OUT (kept with --keep or from a killed run); delete them" \
        "yourself and wait 5 min before a run that is to be quoted"
fi
RUN="$OUT/run-$(date +%Y%m%d-%H%M%S)-$$"
mkdir -p "$RUN"

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    # end the processes this run started, by pid, checking each is still ours
    if [ -f "$RUN/pids" ]; then
        while read -r pid; do
            [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || continue
            if tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qE 'hasync|rsync|lsyncd'; then
                kill -9 "$pid" 2>/dev/null || true
            fi
        done < "$RUN/pids"
    fi
    if [ "$KEEP" = 1 ]; then
        say "kept $RUN"
    else
        say "deleting $RUN"
        rm -rf "$RUN"
        date +%s > "$OUT/.last-cleanup"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ARGS=(--exe "$EXE" --run-dir "$RUN" --out "$OUT" --last-cleanup-s "$CLEANUP_AGO" --leftover-runs "$LEFTOVER")
[ "$QUICK" = 1 ] && ARGS+=(--quick)
[ -n "$LSYNCD_REASON" ] && ARGS+=(--lsyncd-reason "$LSYNCD_REASON")

T_BENCH=$(date +%s)
python3 "$ROOT/scripts/bench/run.py" "${ARGS[@]}" "${EXTRA[@]}"
python3 "$ROOT/scripts/bench/report.py" "$OUT"
say "measurements took $(( $(date +%s) - T_BENCH ))s (total with build: $(( $(date +%s) - T_START ))s)"
echo
cat "$OUT/report.md"
