#!/usr/bin/env bash
# Builds the .deb (cargo-deb) and the .rpm (cargo-generate-rpm) into target/packages/, installing
# the packaging tools if they are missing, checks that both install exactly the install tree the
# source tree mirrors (below), and runs lintian on the .deb.
#   VERSION_SUFFIX=+up1 scripts/package.sh   builds a higher version (for upgrade tests)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/deps.sh
. scripts/lib/deps.sh
out=target/packages
mkdir -p "$out"
command -v cargo-deb >/dev/null || cargo install --locked --quiet cargo-deb@^3.8
command -v cargo-generate-rpm >/dev/null || cargo install --locked --quiet cargo-generate-rpm@^0.21
cargo build --release --locked --quiet --bins
# Test hooks (KLOIGOS_TEST_PAUSE) exist only with the test-hooks feature: never in a package.
for bin in kloigos kloigos-generator; do
  if grep -qaF KLOIGOS_TEST_PAUSE "target/release/$bin"; then
    echo "target/release/$bin contains test hooks (KLOIGOS_TEST_PAUSE); build it without features" >&2
    exit 1
  fi
done
version=$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["packages"][0]["version"])')${VERSION_SUFFIX:-}
deb=$(cargo deb --no-build --locked --deb-version "$version" --output "$out/" 2>&1 | tail -1)
rpm_version=${version//[+~]/.}
cargo generate-rpm --output "$out/" ${VERSION_SUFFIX:+--set-metadata "version = \"$rpm_version\""} >/dev/null
rpm=$(ls "$out/kloigos-$rpm_version"-*.rpm)

# The install tree, from the source tree: "MODE /PATH" for every file a package must install.
# units/ -> /usr/lib/systemd/system, templates/ -> /usr/lib/kloigos/templates, packaging/usr and
# packaging/etc -> /usr and /etc; plus the two binaries and the README. In a git checkout the tree
# is what git tracks, so a stray file there (which the asset globs would package) fails the check.
tree_files() {
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -- units templates packaging/usr packaging/etc
  else
    find units templates packaging/usr packaging/etc -type f
  fi
}
expected_tree() {
  printf '%s\n' '-rwxr-xr-x /usr/bin/kloigos' \
    '-rwxr-xr-x /usr/lib/systemd/system-generators/kloigos-generator' \
    '-rwxr-xr-x /usr/lib/kloigos/ansible-inventory' \
    '-rw-r--r-- /usr/share/doc/kloigos/README.md'
  local f
  while IFS= read -r f; do
    case $f in
      units/*) echo "-rw-r--r-- /usr/lib/systemd/system/${f#units/}" ;;
      templates/*) echo "-rw-r--r-- /usr/lib/kloigos/templates/${f#templates/}" ;;
      packaging/usr/* | packaging/etc/*) echo "-rw-r--r-- /${f#packaging/}" ;;
    esac
  done < <(tree_files)
}
# fail_unless_same WHAT EXPECTED ACTUAL: both sorted lists, the difference printed on failure
fail_unless_same() {
  if ! diff -u --label "tree ($1)" --label "package ($1)" <(sort <<<"$2") <(sort <<<"$3") >&2; then
    echo "$1 does not install the install tree (units/, templates/, packaging/{usr,etc}/)" >&2
    exit 1
  fi
}
tree=$(expected_tree)
conffiles=$(tree_files | sed -n 's|^packaging/etc/|/etc/|p')
deps_need rpm:rpm
# dpkg-deb -c: "MODE OWNER SIZE DATE TIME ./PATH"; cargo-deb adds the copyright file itself.
fail_unless_same "$deb" "$tree" "$(dpkg-deb -c "$deb" | awk '$1 !~ /^d/ {print $1, substr($6, 2)}' |
  grep -vx -- '-rw-r--r-- /usr/share/doc/kloigos/copyright')"
fail_unless_same "$deb conffiles" "$conffiles" "$(dpkg-deb -I "$deb" conffiles)"
fail_unless_same "$rpm" "$tree" "$(rpm -qlpv "$rpm" 2>/dev/null | awk '{print $1, $NF}')"
fail_unless_same "$rpm config files" "$conffiles" "$(rpm -qcp "$rpm" 2>/dev/null)"

if [[ ${KLOIGOS_LINTIAN:-1} == 1 ]]; then
  deps_need lintian:lintian
  # Errors fail the build; warnings are printed for a human to read.
  lintian --fail-on error --suppress-tags-from-file packaging/lintian-suppressed "$deb" || { echo "lintian found errors in $deb" >&2; exit 1; }
fi
ls -1 "$out"
