#!/usr/bin/env bash
# Unpacks limitador 0.14.0 as published on crates.io (checksum pinned) into
# target/rls-patched/ and widens the two `cfg(feature = "disk_storage")` gates that its Redis
# storage needs too (counter.rs `variables_for_key`, storage/keys.rs `mod bin`): with only
# `redis_storage` the published crate fails with E0433. Behaviour is unchanged.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="$root/target/rls-patched"
crate="$out/limitador-0.14.0"
sum=77e33de992fdc347850a81f1ed242cc702900a9651a2b5d044d153a2db5e2d1a
[ -f "$crate/.patched" ] && exit 0
mkdir -p "$out"
curl -sSfL -o "$out/limitador-0.14.0.crate" https://static.crates.io/crates/limitador/limitador-0.14.0.crate
echo "$sum  $out/limitador-0.14.0.crate" | sha256sum -c --quiet
rm -rf "$crate"
tar -xzf "$out/limitador-0.14.0.crate" -C "$out"
wide='#[cfg(any(feature = "disk_storage", feature = "redis_storage"))]'
sed -i "112s/.*/    $wide/" "$crate/src/counter.rs"
sed -i "199s/.*/$wide/" "$crate/src/storage/keys.rs"
grep -qF "    $wide" "$crate/src/counter.rs"
grep -qF "$wide" "$crate/src/storage/keys.rs"
touch "$crate/.patched"
