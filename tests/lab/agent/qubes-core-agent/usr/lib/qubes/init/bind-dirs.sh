#!/bin/bash
# Make chosen paths of a template-based qube persistent by bind-mounting copies kept
# under /rw/bind-dirs. Reproduces vm-systemd/bind-dirs.sh of
# QubesOS/qubes-core-agent-linux v4.2.47 (Qubes 4.2):
# - does nothing in a fully persistent qube (a template);
# - reads the bash files /usr/lib/qubes-bind-dirs.d/*.conf,
#   /etc/qubes-bind-dirs.d/*.conf and /rw/config/qubes-bind-dirs.d/*.conf, which add
#   paths to the array "binds" (for example `binds+=( '/etc/dnscrypt-proxy' )`);
# - each path has its symlinks resolved (at most 10 levels). When /rw/bind-dirs/PATH
#   exists, it is mounted on PATH, and a missing PATH is created empty first.
#   Otherwise PATH is copied to /rw/bind-dirs/PATH first. A path that exists in
#   neither place is skipped.
# With any argument the script only unmounts the paths.
#
# Left out: the legacy hook that Whonix overrides.
set -e
shopt -s nullglob dotglob

# shellcheck source=functions
. /usr/lib/qubes/init/functions

rw_dest_dir=/rw/bind-dirs
symlink_level_max=10

if is_fully_persistent; then
    echo "bind-dirs: fully persistent qube (template): nothing to bind"
    exit 0
fi

binds=()
for conf_dir in /usr/lib/qubes-bind-dirs.d /etc/qubes-bind-dirs.d /rw/config/qubes-bind-dirs.d; do
    [ -d "$conf_dir" ] || continue
    for conf_file in "$conf_dir"/*.conf; do
        # A syntax error stops the script before anything of that file runs.
        bash -n "$conf_file"
        # shellcheck source=/dev/null
        . "$conf_file"
    done
done

mkdir -p "$rw_dest_dir"

for path in "${binds[@]}"; do
    level=0
    while [ -h "$path" ] && [ "$level" -lt "$symlink_level_max" ]; do
        path=$(realpath "$path")
        level=$((level + 1))
    done
    copy="$rw_dest_dir$path"

    umount "$path" 2>/dev/null || true
    if [ -n "${1-}" ]; then
        continue
    fi

    if [ -d "$copy" ] || [ -f "$copy" ]; then
        if [ ! -e "$path" ]; then
            if [ -d "$copy" ]; then
                mkdir -p "$path"
            else
                touch "$path"
            fi
        fi
    elif [ -d "$path" ] || [ -f "$path" ]; then
        echo "bind-dirs: initializing $rw_dest_dir with $path" >&2
        cp -a --parents "$path" "$rw_dest_dir"
    else
        echo "bind-dirs: $path exists neither in the root nor under $rw_dest_dir: skipped"
        continue
    fi

    echo "bind-dirs: bind mounting $copy onto $path" >&2
    mount --bind "$copy" "$path"
done
