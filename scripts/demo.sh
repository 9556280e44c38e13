#!/usr/bin/env bash
# The main job: build the `nbd` command, start an nbdkit export on a private Unix
# socket, inspect it with `nbd info`, copy a file in and back out with `nbd copy`,
# check the bytes, and stop the server.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/scripts/install-deps.sh"
cargo build --release -p nbd-cli --manifest-path "$here/Cargo.toml"
nbd="$here/target/release/nbd"
work=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
nbdkit --exit-with-parent -f -U "$work/nbd.sock" memory 64M &
server=$!
for _ in $(seq 50); do [ -S "$work/nbd.sock" ] && break; sleep 0.1; done
uri="nbd+unix:///?socket=$work/nbd.sock"
"$nbd" info "$uri"
head -c 16M /dev/urandom > "$work/in.img"
"$nbd" copy --flush "$work/in.img" "$uri"
"$nbd" copy "$uri" "$work/out.img"
cmp <(head -c 16M "$work/out.img") "$work/in.img"
echo "demo: 16 MiB copied into the export and back, identical"
