#!/bin/bash
# Prepare /rw and mount /home and /usr/local from it, then run bind-dirs.
# Reproduces vm-systemd/mount-dirs.sh and init/setup-rw.sh of
# QubesOS/qubes-core-agent-linux v4.2.47 (Qubes 4.2): on the first boot with an
# empty /rw, /rw/config gets an executable rc.local and qubes-firewall-user-script
# that only hold comments, and /rw/usrlocal and /rw/home/<user> are created; /rw/home
# is bind-mounted on /home and /rw/usrlocal on /usr/local.
#
# The lab's /rw is a folder of the run bound by systemd-nspawn (--bind=...:/rw), not a
# block device, so this script formats, checks and resizes nothing. Without such a
# bind (/rw not a mount point) the qube has no persistent storage and the script
# only creates the folders.
# Left out: SELinux labels, /usr/local.orig and the suspend module list.
set -e

# shellcheck source=functions
. /usr/lib/qubes/init/functions

populate_rw_config() {
    mkdir /rw/config
    cat >/rw/config/rc.local <<'EOF'
#!/bin/sh
# Runs as root at every start of this qube (qubes-misc-post.service), after the
# executable /rw/config/rc.local.d/*.rc scripts.
EOF
    chmod 755 /rw/config/rc.local
    cat >/rw/config/qubes-firewall-user-script <<'EOF'
#!/bin/sh
# Runs as root when qubes-firewall starts in a qube that provides network, after
# the executable scripts in /rw/config/qubes-firewall.d.
EOF
    chmod 755 /rw/config/qubes-firewall-user-script
}

# Create /rw/home/<user> from /etc/skel for every account whose home is under /home,
# as initialize_home does in Qubes when the folder is missing.
populate_rw_home() {
    local uid gid home
    mkdir -p /rw/home
    while IFS=: read -r _ _ uid gid _ home _; do
        case $home in
        /home/?*) ;;
        *) continue ;;
        esac
        if [ ! -d "/rw/home/${home#/home/}" ]; then
            echo "mount-dirs: populating /rw/home/${home#/home/} from /etc/skel" >&2
            mkdir -p "/rw/home/${home#/home/}"
            cp -a -T /etc/skel "/rw/home/${home#/home/}"
            chown -R "$uid:$gid" "/rw/home/${home#/home/}"
            chmod 700 "/rw/home/${home#/home/}"
        fi
    done </etc/passwd
}

if ! mountpoint -q /rw; then
    echo "mount-dirs: /rw is not a mount point: this qube keeps nothing across boots" >&2
    mkdir -p /rw/config
    exit 0
fi

if [ ! -d /rw/config ]; then
    echo "mount-dirs: first boot of this qube: populating /rw/config" >&2
    populate_rw_config
fi
mkdir -p /rw/usrlocal
populate_rw_home

echo "mount-dirs: mounting /rw/home onto /home" >&2
mount --bind /rw/home /home
echo "mount-dirs: mounting /rw/usrlocal onto /usr/local" >&2
mount --bind /rw/usrlocal /usr/local

/usr/lib/qubes/init/bind-dirs.sh
