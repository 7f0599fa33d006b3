#!/usr/bin/env bash
# Builds the .deb (cargo-deb) and the .rpm (cargo-generate-rpm) into target/packages/, installing
# the packaging tools if they are missing, and runs lintian on the .deb.
#   VERSION_SUFFIX=+up1 scripts/package.sh   builds a higher version (for upgrade tests)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/deps.sh
. scripts/lib/deps.sh
out=target/packages
mkdir -p "$out"
command -v cargo-deb >/dev/null || cargo install --locked --quiet cargo-deb@^3.8
command -v cargo-generate-rpm >/dev/null || cargo install --locked --quiet cargo-generate-rpm@^0.21
cargo build --release --locked --quiet
# Test hooks (KLOIGOS_TEST_PAUSE) exist only with the test-hooks feature: never in a package.
if grep -qaF KLOIGOS_TEST_PAUSE target/release/kloigos; then
  echo "target/release/kloigos contains test hooks (KLOIGOS_TEST_PAUSE); build it without features" >&2
  exit 1
fi
version=$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["packages"][0]["version"])')${VERSION_SUFFIX:-}
deb=$(cargo deb --no-build --locked --deb-version "$version" --output "$out/" 2>&1 | tail -1)
cargo generate-rpm --output "$out/" ${VERSION_SUFFIX:+--set-metadata "version = \"${version//[+~]/.}\""} >/dev/null
if [[ ${KLOIGOS_LINTIAN:-1} == 1 ]]; then
  deps_need lintian:lintian
  # Errors fail the build; warnings are printed for a human to read.
  lintian --fail-on error --suppress-tags-from-file packaging/lintian-suppressed "$deb" || { echo "lintian found errors in $deb" >&2; exit 1; }
fi
ls -1 "$out"
