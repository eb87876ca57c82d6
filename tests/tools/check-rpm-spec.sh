#!/bin/sh
# Check the RPM spec: fill in the placeholders that Qubes' builder fills in, parse it
# with rpmspec, then build the package from the working tree with rpmbuild, which
# fails when %files and the tree of `make install` differ. Needs the Debian package rpm.
set -eu
cd "$(dirname "$0")/../.."

spec_in=rpm_spec/qubes-mgmt-salt-dom0-sysdns.spec.in
name=$(sed -n 's/^package-name: *//p' FORMULA)
version=$(sed -n 's/^version: *//p' FORMULA)
if [ -z "$name" ] || [ -z "$version" ]; then
    echo "FORMULA has no package-name or version line" >&2
    exit 1
fi

spec_name=$(sed -n 's/^Name: *//p' "$spec_in")
if [ "$spec_name" != "$name" ]; then
    echo "$spec_in: Name is '$spec_name' but FORMULA package-name is '$name'; make them equal" >&2
    exit 1
fi

topdir=$(mktemp -d)
trap 'rm -rf "$topdir"' EXIT
mkdir -p "$topdir/SOURCES" "$topdir/SPECS" "$topdir/src/$name-$version"

spec="$topdir/SPECS/$name.spec"
changelog="* $(LC_ALL=C date -u '+%a %b %d %Y') CI <ci@localhost> - $version-1\n- Check build"
sed -e "s/@VERSION@/$version/" -e "s/@CHANGELOG@/$changelog/" \
    "$spec_in" > "$spec"
rpmspec -P "$spec" > /dev/null

# The source tarball holds what `make install` reads, as Qubes' builder would pack it.
files=$(sed -n 's/^formula-files: *//p' FORMULA)
# shellcheck disable=SC2086 # $files is FORMULA's space-separated list of paths
tar -c --exclude=__pycache__ Makefile FORMULA etc $files \
    | tar -x -C "$topdir/src/$name-$version"
tar -c -z -f "$topdir/SOURCES/$name-$version.tar.gz" -C "$topdir/src" "$name-$version"

# --nodeps: the Debian host has no RPM database holding make, the BuildRequires.
rpmbuild --quiet --nodeps --define "_topdir $topdir" -bb "$spec"
rpm -qlp "$topdir"/RPMS/noarch/*.rpm | grep -q '^/etc/salt/minion.d/sysdns-formula.conf$'
echo "rpm spec: parsed and built $(basename "$topdir"/RPMS/noarch/*.rpm)"
