#!/usr/bin/env bash
# Builds the Debian package: target/package/hasync_<version>_<arch>.deb with
# the binary, the systemd unit, the example config as a conffile at
# /etc/hasync/hasync.toml, man pages, shell completions, the example hooks
# and the Grafana dashboard. Needs cargo-deb (cargo install cargo-deb).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || { echo "cargo-deb is missing: cargo install cargo-deb --locked" >&2; exit 1; }
cargo build --release --locked
gen=target/package/gen
rm -rf "$gen"
target/release/hasync generate-docs --out "$gen" >/dev/null
gzip -9n "$gen"/man/*.1
cargo deb --no-build --locked --output target/package/ >/dev/null
ls -1 target/package/*.deb
