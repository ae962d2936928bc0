#!/usr/bin/env bash
# Builds the Debian package: target/package/hasync_<version>_<arch>.deb with
# the binary, the systemd unit, the example config as a conffile at
# /etc/hasync/hasync.toml, man pages, shell completions, the example hooks
# and the Grafana dashboard. Needs cargo-deb (cargo install cargo-deb).
# HASYNC_PACKAGE_BIN=path packages that binary instead of building the
# release one (the package test uses the binary under test).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || { echo "cargo-deb is missing: cargo install cargo-deb --locked" >&2; exit 1; }
bin=${HASYNC_PACKAGE_BIN:-}
if [ -z "$bin" ]; then
    cargo build --release --locked
    bin=target/release/hasync
fi
out=target/package
rm -rf "$out/gen" "$out/bin"
mkdir -p "$out/bin"
cp "$bin" "$out/bin/hasync"
# Debug info stays in the build tree; the package ships a stripped binary.
strip --strip-debug "$out/bin/hasync"
"$out/bin/hasync" generate-docs --out "$out/gen" >/dev/null
gzip -9n "$out"/gen/man/*.1
rm -f "$out"/*.deb
cargo deb --no-build --locked --output "$out/" >/dev/null
ls -1 "$out"/*.deb
