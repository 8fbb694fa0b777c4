#!/bin/sh
# make deb: build the Debian package with Debian's own tools and interpreter (not a pyenv
# shim) from the files git tracks, into dist/.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' sandboxd/__init__.py)
missing=""
for p in debhelper dh-python pybuild-plugin-pyproject python3-all-dev python3-setuptools gcc libc6-dev lintian fakeroot; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
fi
work="$top/build/deb"
src="$work/sandboxd-$version"
rm -rf "$work"
mkdir -p "$src" "$top/dist"
git ls-files -z | xargs -0 -I{} cp --parents {} "$src"
# Uncommitted edits count too when building by hand: copy the working tree's version of tracked files.
cp -r packaging/debian "$src/debian"
rm -rf "$src/packaging"
(cd "$src" && dpkg-buildpackage -us -uc -b)
arch=$(dpkg --print-architecture)
mv "$work"/sandboxd_"$version"_"$arch".deb "$top/dist/"
mv "$work"/sandboxd_"$version"_*.buildinfo "$work"/sandboxd_"$version"_*.changes "$top/dist/" 2>/dev/null || true
echo "built dist/sandboxd_${version}_${arch}.deb"
lintian --fail-on error,warning "$top/dist/sandboxd_${version}_${arch}.deb"
echo "lintian: no errors, no warnings"
