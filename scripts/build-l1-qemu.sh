#!/usr/bin/env bash
# Build Debian's QEMU as a tree for an L1 guest's initramfs: the L1
# hypervisor of the nested migration scenario (docs/nested-migration.md).
#
# Fetches qemu-system-x86 from bookworm-backports (10.x: VFIO migration with
# pre-copy), its shared libraries (the library packages of its Depends
# closure) and SeaBIOS / the option ROMs a `-machine q35 -kernel` boot reads,
# with `apt-get download` through a private sources list and lists (the
# system's apt configuration is not touched), unpacks them with `dpkg-deb
# -x`, and builds in $GUEST_DIR/l1-qemu/ (default build/guest/l1-qemu/):
#
#   l1-qemu.cpio.gz   a gzip'd newc cpio archive to append to an initramfs:
#                       /opt/qemu/bin/qemu-system-x86_64
#                       /opt/qemu/share/      firmware (pass -L /opt/qemu/share)
#                       /lib/x86_64-linux-gnu/ the libraries, under their sonames
#                       /lib64/ld-linux-x86-64.so.2
#                       /etc/l1-qemu-versions  the package versions
#   manifest.txt      every file of the archive and the package it came from
#   versions          the same as /etc/l1-qemu-versions
#
# The libraries are the ones the unpacked loader resolves for the binary
# from the unpacked packages only (`ld.so --list` with --library-path): a
# library the closure lacks fails the build with its name.
#
# Cached: rebuilt when this script or a package version changes.
#
# Options / environment:
#   --guest-dir DIR   GUEST_DIR      output parent (default build/guest)
#   --force                          rebuild even if cached
#   --quiet                          print only errors and the result
#   QEMU_VERSION                     a Debian version of qemu-system-x86
#                                    (default: the newest in bookworm-backports)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GUEST_DIR="${GUEST_DIR:-$REPO_ROOT/build/guest}"
FORCE=0
QUIET=0
while [ $# -gt 0 ]; do
    case "$1" in
        --guest-dir) GUEST_DIR="$2"; shift 2 ;;
        --force) FORCE=1; shift ;;
        --quiet) QUIET=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//;$d'; exit 0 ;;
        *) echo "build-l1-qemu.sh: unknown option: $1" >&2; exit 2 ;;
    esac
done
log() { [ "$QUIET" = 1 ] || echo "build-l1-qemu: $*" >&2; }
# shellcheck source=scripts/archive-lib.sh
. "$REPO_ROOT/scripts/archive-lib.sh"
die() { echo "build-l1-qemu: error: $*" >&2; exit 1; }

for t in apt-get apt-cache dpkg-deb cpio gzip; do
    command -v "$t" >/dev/null 2>&1 || die "'$t' is missing (scripts/build-guest-image.sh installs the tools)"
done
mkdir -p "$GUEST_DIR/l1-qemu"
DIR="$(cd "$GUEST_DIR/l1-qemu" && pwd)"
exec 8>"$DIR/.lock"
flock 8

# --- private apt configuration ---------------------------------------------------
# bookworm-backports for QEMU and SeaBIOS, bookworm (+updates, security) for
# the libraries. Backports is NotAutomatic: with Default-Release set to it,
# the candidate of a package is its backports version when it has one, as
# `apt-get install -t bookworm-backports` would choose.
APTDIR="$DIR/apt"
mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial" "$DIR/debs"
KEY=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$KEY" ] || die "no $KEY (apt-get install debian-archive-keyring)"
cat >"$APTDIR/sources.list.new" <<EOF
deb [signed-by=$KEY] http://deb.debian.org/debian bookworm-backports main
deb [signed-by=$KEY] http://deb.debian.org/debian bookworm main
deb [signed-by=$KEY] http://deb.debian.org/debian bookworm-updates main
deb [signed-by=$KEY] http://deb.debian.org/debian-security bookworm-security main
EOF
mv "$APTDIR/sources.list.new" "$APTDIR/sources.list"
APT=(-o "Dir::Etc::SourceList=$APTDIR/sources.list" -o Dir::Etc::SourceParts=/nonexistent
    -o "Dir::State::Lists=$APTDIR/lists" -o "Dir::Cache=$APTDIR/cache" -o APT::Sandbox::User=root
    -o APT::Default-Release=bookworm-backports)
UPDATED=0
apt_update() {
    log "apt-get update (private lists in $APTDIR)"
    apt-get "${APT[@]}" update -qq >&2 || die "apt-get update (bookworm, bookworm-backports) failed"
    UPDATED=1
}
ls "$APTDIR/lists/"*bookworm-backports*Packages* >/dev/null 2>&1 || apt_update
candidate() { apt-cache "${APT[@]}" policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p' | grep -v '(none)' || true; }
QEMU_VERSION="${QEMU_VERSION:-$(candidate qemu-system-x86)}"
[ -n "$QEMU_VERSION" ] && dpkg --compare-versions "$QEMU_VERSION" ge 1:8.1 \
    || die "bookworm-backports offers no qemu-system-x86 >= 8.1 (candidate: ${QEMU_VERSION:-none})"

# fetch PKG VERSION: the .deb's path, downloaded unless it is there (a list
# that went stale since the last update is refreshed once).
fetch() {
    local pkg="$1" ver="$2" f
    f="$(ls "$DIR/debs/${pkg}_"*"${ver#*:}"_*.deb 2>/dev/null | head -n 1 || true)"
    if [ -z "$f" ]; then
        log "apt-get download $pkg=$ver"
        (cd "$DIR/debs" && apt-get "${APT[@]}" download -qq "$pkg=$ver" >&2) || {
            [ "$UPDATED" = 0 ] || die "apt-get download $pkg=$ver failed"
            apt_update
            (cd "$DIR/debs" && apt-get "${APT[@]}" download -qq "$pkg=$ver" >&2) || die "apt-get download $pkg=$ver failed"
        }
        f="$(ls "$DIR/debs/${pkg}_"*"${ver#*:}"_*.deb | head -n 1)"
    fi
    echo "$f"
}
# Package names of a .deb's Depends and Pre-Depends (first alternative of
# each, without versions).
depends_of() {
    { dpkg-deb -f "$1" Pre-Depends; echo ","; dpkg-deb -f "$1" Depends; } | tr ',' '\n' \
        | sed 's/|.*//; s/(.*)//; s/:any//; s/[[:space:]]//g' | grep -v '^$' || true
}

# The packages: QEMU, its data and firmware, and the library packages of the
# Depends closure, resolved a level at a time (one apt-cache call per level).
declare -A VER=()
candidates() { # PKG...: "PKG VERSION" lines
    apt-cache "${APT[@]}" policy "$@" 2>/dev/null \
        | awk '/^[^ ].*:$/ {p = $1; sub(/:$/, "", p)} /^ *Candidate:/ && $2 != "(none)" {print p, $2}'
}
VER[qemu-system-x86]="$QEMU_VERSION"
level="qemu-system-data seabios ipxe-qemu"
next="qemu-system-x86"
while [ -n "$level$next" ]; do
    if [ -n "$level" ]; then
        # shellcheck disable=SC2086
        while read -r p v; do VER[$p]="$v"; next="$next $p"; done < <(candidates $level)
        for p in $level; do [ -n "${VER[$p]+x}" ] || die "no candidate for $p (qemu-system-x86 $QEMU_VERSION needs it)"; done
    fi
    level=""
    for pkg in $next; do
        deb="$(fetch "$pkg" "${VER[$pkg]}")"
        for d in $(depends_of "$deb"); do
            case "$d" in lib*|zlib1g) ;; *) continue ;; esac
            [ -n "${VER[$d]+x}" ] || case " $level " in *" $d "*) ;; *) level="$level $d" ;; esac
        done
    done
    next=""
done

STAMP="script=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"
for p in $(printf '%s\n' "${!VER[@]}" | sort); do STAMP="$STAMP $p=${VER[$p]}"; done
cached "$DIR" "$STAMP" "$DIR/l1-qemu.cpio.gz"

# --- unpack --------------------------------------------------------------------------
UNPACK="$DIR/unpacked"
rm -rf "$UNPACK"; mkdir -p "$UNPACK"
: >"$UNPACK/.owners"
for p in "${!VER[@]}"; do
    deb="$(fetch "$p" "${VER[$p]}")"
    dpkg-deb -x "$deb" "$UNPACK"
    dpkg-deb -c "$deb" | awk -v p="$p=${VER[$p]}" '{sub(/^\.\//,"/",$6); print $6, p}' >>"$UNPACK/.owners"
done
# A path inside the unpacked tree with its links followed inside the tree
# (an absolute target such as /lib/x86_64-linux-gnu/... is the tree's, not
# the host's).
resolve_in() {
    local p="$UNPACK/$1" t n=0
    while [ -L "$p" ] && [ $n -lt 40 ]; do
        t="$(readlink "$p")"
        case "$t" in /*) p="$UNPACK$t" ;; *) p="$(dirname "$p")/$t" ;; esac
        n=$((n + 1))
    done
    [ -f "$p" ] || die "$1 is missing or a dangling link in the unpacked packages"
    echo "$p"
}
owner() { # FILE-IN-UNPACK
    local f="${1#"$UNPACK"}"
    awk -v f="$f" '$1 == f || $1 == "/usr" f {print $2; exit}' "$UNPACK/.owners"
}
QEMU_BIN="$(resolve_in usr/bin/qemu-system-x86_64)"
LDSO="$(resolve_in lib64/ld-linux-x86-64.so.2)"
LIBPATH="$UNPACK/lib/x86_64-linux-gnu:$UNPACK/usr/lib/x86_64-linux-gnu"
# soname and resolved path of every library, from the unpacked tree only.
LIBS="$("$LDSO" --library-path "$LIBPATH" --list "$QEMU_BIN" | awk '$2 == "=>" && $1 !~ /^\// {print $1, $3}')" \
    || die "the unpacked loader cannot list the libraries of qemu-system-x86_64"
missing="$(echo "$LIBS" | awk -v u="$UNPACK" 'index($2, u) != 1 {print $1}')"
[ -z "$missing" ] || die "libraries of qemu-system-x86_64 not in its Depends closure: $(echo $missing)"

# --- the tree ----------------------------------------------------------------------
ROOT="$DIR/root"
rm -rf "$ROOT"
mkdir -p "$ROOT/opt/qemu/bin" "$ROOT/opt/qemu/share" "$ROOT/lib/x86_64-linux-gnu" "$ROOT/lib64" "$ROOT/etc"
: >"$DIR/manifest.txt.new"
add() { # SRC DEST
    cp "$1" "$ROOT/$2"
    echo "/$2 $(owner "$1")" >>"$DIR/manifest.txt.new"
}
add "$QEMU_BIN" opt/qemu/bin/qemu-system-x86_64
while read -r so path; do
    add "$(resolve_in "${path#"$UNPACK"/}")" "lib/x86_64-linux-gnu/$so"
done <<<"$LIBS"
add "$LDSO" lib64/ld-linux-x86-64.so.2
# What `-machine q35 -nodefaults -kernel` reads: SeaBIOS, the vapic option
# ROM and the fw_cfg Linux loader ROMs; efi-virtio.rom for a virtio-net NIC.
for f in usr/share/seabios/bios-256k.bin usr/share/qemu/kvmvapic.bin usr/share/qemu/linuxboot_dma.bin \
         usr/share/qemu/linuxboot.bin usr/share/qemu/multiboot_dma.bin usr/lib/ipxe/qemu/efi-virtio.rom; do
    add "$(resolve_in "$f")" "opt/qemu/share/$(basename "$f")"
done
VERSIONS="qemu-system-x86=$QEMU_VERSION seabios=${VER[seabios]} ipxe-qemu=${VER[ipxe-qemu]}"
echo "$VERSIONS" >"$ROOT/etc/l1-qemu-versions"
# The binary runs: its --version from the tree's own loader and libraries.
"$ROOT/lib64/ld-linux-x86-64.so.2" --library-path "$ROOT/lib/x86_64-linux-gnu" \
    "$ROOT/opt/qemu/bin/qemu-system-x86_64" --version >"$DIR/qemu-version.txt" \
    || die "qemu-system-x86_64 from the tree does not run: $(cat "$DIR/qemu-version.txt")"

archive "$ROOT" "$DIR/l1-qemu.cpio.gz"
mv "$DIR/manifest.txt.new" "$DIR/manifest.txt"
echo "$VERSIONS" >"$DIR/versions"
rm -rf "$UNPACK" "$ROOT"
echo "$STAMP" >"$DIR/stamp"
log "done: $DIR/l1-qemu.cpio.gz ($(stat -c %s "$DIR/l1-qemu.cpio.gz") bytes; $(head -n 1 "$DIR/qemu-version.txt"); $(wc -l <"$DIR/manifest.txt") files)"
echo "$DIR/l1-qemu.cpio.gz"
