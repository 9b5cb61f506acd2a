#!/usr/bin/env bash
# Build the guest images used by the real-guest tests, the benchmark and the demo.
#
# Fetches Debian's 6.12 kernel package and busybox-static with `apt-get
# download`, unpacks them with `dpkg-deb -x` and builds, in build/guest/ (or
# $GUEST_DIR):
#
#   bzImage             the guest kernel (used for the inner guest, and for the
#                       outer QEMU TCG host VM when the host has no hardware KVM)
#   inner-base.cpio.gz  busybox + inner modules + /init. /init loads the modules,
#                       prints "@@CH-TEST:INIT@@", runs /scenario.sh if present,
#                       prints "@@CH-TEST:SCENARIO-EXIT=<rc>@@" and powers off.
#                       The test runner appends a second (uncompressed) cpio
#                       archive with /scenario.sh; Linux unpacks both.
#   outer-base.cpio.gz  busybox + kvm/kvm-amd/virtio_blk (with dependencies) +
#                       the outer /init (see the runner in tests/src/ for the
#                       protocol). The runner appends the VMM, its libraries,
#                       the inner kernel/initramfs and the scenario files.
#   bzImage-7           Debian's newest Linux 7.x (trixie-backports) for the
#                       inner guest only. The inner initramfs carries a second
#                       module set for it in /lib/modules/7/ (INNER_MODULES_7:
#                       Debian's modules plus virtio-vfio-pci, which
#                       scripts/build-virtio-vfio-pci.sh builds out of tree);
#                       /init loads the set whose release is the running
#                       kernel's ("@@CH-TEST:MODULES-SKIPPED=<release>@@" if
#                       none is).
#   l2-base.cpio.gz     the nested migration scenario's L2 initramfs base:
#                       busybox, virtio_blk (6.12) and the inner /init
#                       (L2_MODULES; the test appends the workload).
#   info                key=value lines: kernel version, module load orders.
#
# Cached: everything is rebuilt only when an input changes (this script, the
# kernel or busybox package version, the module lists).
#
# Options / environment:
#   --inner-modules "a b"   INNER_MODULES   modules for the inner guest
#                                           (default: virtio_blk pci-pf-stub
#                                           button evdev virtio_iommu vfio-pci
#                                           vfio_iommu_type1)
#   --outer-modules "a b"   OUTER_MODULES   modules for the outer host VM
#                                           (default: kvm kvm-amd virtio_blk)
#   --kernel-package NAME   KERNEL_PACKAGE  force a kernel package name
#   --guest-dir DIR         GUEST_DIR       output directory
#   --force                                 rebuild even if cached
#   --quiet                                 print only errors and the result
# Dependencies of the listed modules are added automatically (from each
# module's `depends=` in .modinfo), and modules are loaded in dependency order.
#
# Needs root for apt-get install of missing tools (xz-utils, cpio, zstd,
# qemu-system-x86 for the outer VM). Runs `apt-get update` once if apt knows
# no 6.12 kernel package.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GUEST_DIR="${GUEST_DIR:-$REPO_ROOT/build/guest}"
# virtio_iommu and vfio-pci: for the VMM's iommu=on functions (a guest
# without a virtio-iommu loads them and they stay idle).
INNER_MODULES="${INNER_MODULES:-virtio_blk pci-pf-stub button evdev virtio_iommu vfio-pci vfio_iommu_type1}"
# The 7.x set: the same, plus Linux's vfio/virtio migration driver.
INNER_MODULES_7="${INNER_MODULES_7:-virtio_blk pci-pf-stub button evdev virtio_iommu vfio-pci vfio_iommu_type1 virtio_vfio_pci}"
# The nested scenario's L2 (Debian's 6.12 under QEMU TCG inside L1, where
# every module costs seconds): its disk's driver only.
L2_MODULES="${L2_MODULES:-virtio_blk}"
OUTER_MODULES="${OUTER_MODULES:-kvm kvm-amd virtio_blk}"
KERNEL_PACKAGE="${KERNEL_PACKAGE:-}"
FORCE=0
QUIET=0

while [ $# -gt 0 ]; do
    case "$1" in
        --inner-modules) INNER_MODULES="$2"; shift 2 ;;
        --outer-modules) OUTER_MODULES="$2"; shift 2 ;;
        --kernel-package) KERNEL_PACKAGE="$2"; shift 2 ;;
        --guest-dir) GUEST_DIR="$2"; shift 2 ;;
        --force) FORCE=1; shift ;;
        --quiet) QUIET=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//;$d'; exit 0 ;;
        *) echo "build-guest-image.sh: unknown option: $1" >&2; exit 2 ;;
    esac
done

log() { [ "$QUIET" = 1 ] || echo "build-guest-image: $*" >&2; }
die() { echo "build-guest-image: error: $*" >&2; exit 1; }

mkdir -p "$GUEST_DIR"
GUEST_DIR="$(cd "$GUEST_DIR" && pwd)"
# One builder at a time (tests running in parallel all call this script).
exec 9>"$GUEST_DIR/.lock"
flock 9

export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed"
        APT_UPDATED=1
    fi
}

# Tools: command -> Debian package.
need_tool() {
    local cmd="$1" pkg="$2"
    if ! command -v "$cmd" >/dev/null 2>&1; then
        [ "$(id -u)" = 0 ] || die "'$cmd' is missing and not running as root: apt-get install $pkg"
        log "installing $pkg (for $cmd)"
        if ! apt-get install -y -qq --no-install-recommends "$pkg" >&2; then
            apt_update_once
            apt-get install -y -qq --no-install-recommends "$pkg" >&2 || die "apt-get install $pkg failed"
        fi
    fi
}
need_tool dpkg-deb dpkg
need_tool xz xz-utils
need_tool zstd zstd
need_tool cpio cpio
need_tool gzip gzip
# Only needed when the host has no hardware KVM, but cheap and expected by the
# runner's nested path: install it here so that a fresh machine needs one step.
need_tool qemu-system-x86_64 qemu-system-x86

# --- Pick the packages -------------------------------------------------------
newest_kernel_package() {
    apt-cache pkgnames linux-image-6.12. 2>/dev/null \
        | grep -E '^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$' \
        | sort -V | tail -n 1 || true
}
if [ -z "$KERNEL_PACKAGE" ]; then
    KERNEL_PACKAGE="$(newest_kernel_package)"
    if [ -z "$KERNEL_PACKAGE" ]; then
        apt_update_once
        KERNEL_PACKAGE="$(newest_kernel_package)"
    fi
    [ -n "$KERNEL_PACKAGE" ] || die "apt-cache lists no linux-image-6.12.*+deb12-amd64-unsigned package"
fi
package_version() { apt-cache show --no-all-versions "$1" 2>/dev/null | sed -n 's/^Version: //p' | head -n 1; }
KERNEL_PKG_VERSION="$(package_version "$KERNEL_PACKAGE")"
if [ -z "$KERNEL_PKG_VERSION" ]; then
    apt_update_once
    KERNEL_PKG_VERSION="$(package_version "$KERNEL_PACKAGE")"
fi
[ -n "$KERNEL_PKG_VERSION" ] || die "apt-cache knows no package $KERNEL_PACKAGE"
BUSYBOX_VERSION="$(package_version busybox-static)"
if [ -z "$BUSYBOX_VERSION" ]; then
    apt_update_once
    BUSYBOX_VERSION="$(package_version busybox-static)"
fi
[ -n "$BUSYBOX_VERSION" ] || die "apt-cache knows no package busybox-static"
KREL="${KERNEL_PACKAGE#linux-image-}"
KREL="${KREL%-unsigned}"

# --- Linux 7.x from trixie-backports --------------------------------------------
# apt reads trixie-backports from a sources file and lists of its own, so the
# system's sources and caches stay as they are. The lists are fetched once
# (and again with --force); the kernel is re-fetched when the newest 7.x
# version they name changes.
K7_DIR="$GUEST_DIR/kernel7"
K7_APT=(-o "Dir::Etc::SourceList=$K7_DIR/sources.list" -o Dir::Etc::SourceParts=/nonexistent
    -o "Dir::State::Lists=$K7_DIR/lists" -o "Dir::Cache=$K7_DIR/cache" -o APT::Sandbox::User=root)
fetch_kernel7() {
    mkdir -p "$K7_DIR/lists/partial" "$K7_DIR/cache/archives/partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main" \
        >"$K7_DIR/sources.list"
    if [ "$FORCE" = 1 ] || ! ls "$K7_DIR/lists/"*Packages* >/dev/null 2>&1; then
        log "apt-get update (trixie-backports, own lists in $K7_DIR)"
        apt-get "${K7_APT[@]}" update -qq >&2 || die "apt-get update of trixie-backports failed"
    fi
    local pkg version file
    pkg="$(apt-cache "${K7_APT[@]}" pkgnames linux-binary-7. 2>/dev/null \
        | grep -E '^linux-binary-7\.[0-9]+\.[0-9]+\+deb13-amd64$' | sort -V | tail -n 1 || true)"
    [ -n "$pkg" ] || die "trixie-backports lists no linux-binary-7.*+deb13-amd64 package"
    version="$(apt-cache "${K7_APT[@]}" show --no-all-versions "$pkg" 2>/dev/null | sed -n 's/^Version: //p' | head -n 1)"
    if [ -f "$GUEST_DIR/bzImage-7" ] && [ "$(cat "$K7_DIR/stamp" 2>/dev/null)" = "$pkg=$version" ]; then
        return 0
    fi
    log "apt-get download $pkg=$version (trixie-backports)"
    rm -rf "$K7_DIR/deb" "$K7_DIR/x"
    mkdir -p "$K7_DIR/deb"
    (cd "$K7_DIR/deb" && apt-get "${K7_APT[@]}" download -qq "$pkg=$version" >&2) \
        || die "apt-get download $pkg failed"
    file="$(ls "$K7_DIR/deb/"*.deb | head -n 1)"
    dpkg-deb -x "$file" "$K7_DIR/x"
    local release="${pkg#linux-binary-}" vmlinuz
    vmlinuz="$(ls "$K7_DIR/x/usr/lib/modules/$release/vmlinuz" "$K7_DIR/x/boot/vmlinuz-$release" 2>/dev/null | head -n 1 || true)"
    [ -n "$vmlinuz" ] || die "no vmlinuz for $release in $file"
    cp "$vmlinuz" "$GUEST_DIR/bzImage-7.tmp"
    mv "$GUEST_DIR/bzImage-7.tmp" "$GUEST_DIR/bzImage-7"
    echo "$release" >"$K7_DIR/release"
    echo "$pkg=$version" >"$K7_DIR/stamp"
    rm -rf "$K7_DIR/deb" "$K7_DIR/x"
}
fetch_kernel7
# virtio-vfio-pci for that kernel, and its modules package (cached).
GUEST_DIR="$GUEST_DIR" bash "$REPO_ROOT/scripts/build-virtio-vfio-pci.sh" \
    $( [ "$FORCE" = 1 ] && echo --force ) $( [ "$QUIET" = 1 ] && echo --quiet ) \
    || die "building virtio-vfio-pci for Linux $(cat "$K7_DIR/release") failed"
K7_STAMP="$(cat "$K7_DIR/vfio-mod/stamp")"

# --- Cache check ---------------------------------------------------------------
SCRIPT_HASH="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"
STAMP="script=$SCRIPT_HASH kernel=$KERNEL_PACKAGE=$KERNEL_PKG_VERSION busybox=$BUSYBOX_VERSION inner=[$INNER_MODULES] inner7=[$INNER_MODULES_7] l2=[$L2_MODULES] k7=[$K7_STAMP] outer=[$OUTER_MODULES]"
if [ "$FORCE" = 0 ] && [ -f "$GUEST_DIR/stamp" ] && [ "$(cat "$GUEST_DIR/stamp")" = "$STAMP" ] \
    && [ -f "$GUEST_DIR/bzImage" ] && [ -f "$GUEST_DIR/bzImage-7" ] && [ -f "$GUEST_DIR/inner-base.cpio.gz" ] \
    && [ -f "$GUEST_DIR/outer-base.cpio.gz" ] && [ -f "$GUEST_DIR/l2-base.cpio.gz" ]; then
    log "up to date: $GUEST_DIR ($KERNEL_PACKAGE)"
    echo "$GUEST_DIR"
    exit 0
fi
rm -f "$GUEST_DIR/stamp"

# --- Download and unpack -------------------------------------------------------
DEB_DIR="$GUEST_DIR/debs"
mkdir -p "$DEB_DIR"
fetch_deb() {
    local pkg="$1" version="$2" file
    # apt-get download names the file PKG_VERSION_ARCH.deb with ':' escaped.
    file="$(ls "$DEB_DIR/${pkg}_"*"${version#*:}"_*.deb 2>/dev/null | head -n 1 || true)"
    if [ -z "$file" ]; then
        log "apt-get download $pkg=$version"
        rm -f "$DEB_DIR/${pkg}_"*.deb
        (cd "$DEB_DIR" && apt-get download -qq -o APT::Sandbox::User=root "$pkg=$version" >&2) \
            || { apt_update_once; (cd "$DEB_DIR" && apt-get download -qq -o APT::Sandbox::User=root "$pkg=$version" >&2); } \
            || die "apt-get download $pkg failed"
        file="$(ls "$DEB_DIR/${pkg}_"*.deb | head -n 1)"
    fi
    echo "$file"
}
KERNEL_DEB="$(fetch_deb "$KERNEL_PACKAGE" "$KERNEL_PKG_VERSION")"
BUSYBOX_DEB="$(fetch_deb busybox-static "$BUSYBOX_VERSION")"
# Drop packages of earlier versions.
for f in "$DEB_DIR"/*.deb; do
    [ "$f" = "$KERNEL_DEB" ] || [ "$f" = "$BUSYBOX_DEB" ] || rm -f "$f"
done

unpack() {
    local deb="$1" dest="$2"
    if [ ! -f "$dest/.unpacked" ] || [ "$(cat "$dest/.unpacked")" != "$(basename "$deb")" ]; then
        log "unpacking $(basename "$deb")"
        rm -rf "$dest"
        mkdir -p "$dest"
        dpkg-deb -x "$deb" "$dest"
        basename "$deb" >"$dest/.unpacked"
    fi
}
unpack "$KERNEL_DEB" "$GUEST_DIR/kernel-pkg"
unpack "$BUSYBOX_DEB" "$GUEST_DIR/busybox-pkg"

KPKG="$GUEST_DIR/kernel-pkg"
BZIMAGE="$KPKG/boot/vmlinuz-$KREL"
[ -f "$BZIMAGE" ] || die "no $BZIMAGE in $KERNEL_DEB"
MODDIR="$KPKG/lib/modules/$KREL"
[ -d "$MODDIR" ] || die "no module directory $MODDIR in $KERNEL_DEB"
BUSYBOX="$GUEST_DIR/busybox-pkg/bin/busybox"
[ -x "$BUSYBOX" ] || die "no static busybox in $BUSYBOX_DEB"

# --- Modules -------------------------------------------------------------------
# One module set at a time: use_module_set RELEASE MODDIR CACHE sets the
# index MOD_PATH (module name with '-' as '_' -> compressed file), the
# decompression cache KO_CACHE and KREL, the release every module installed
# from it must carry in its vermagic.
declare -A MOD_PATH=()
use_module_set() {
    local f b
    KREL="$1"
    MOD_PATH=()
    while IFS= read -r -d '' f; do
        b="$(basename "$f")"
        b="${b%.xz}"; b="${b%.zst}"; b="${b%.gz}"; b="${b%.ko}"
        MOD_PATH["${b//-/_}"]="$f"
    done < <(find "$2" -name '*.ko*' -print0)
    [ "${#MOD_PATH[@]}" -gt 0 ] || die "no modules found under $2"
    KO_CACHE="$3"
    mkdir -p "$KO_CACHE"
}
# Decompressed modules, per kernel package (older kernels' are dropped).
KREL6="$KREL"
KO_CACHE6="$GUEST_DIR/ko/$(basename "$KERNEL_DEB" .deb)"
use_module_set "$KREL6" "$MODDIR" "$KO_CACHE6"
find "$GUEST_DIR/ko" -mindepth 1 -maxdepth 1 ! -path "$KO_CACHE6" -exec rm -rf {} +
# Decompressed .ko for a module name (cached).
module_ko() {
    local name="${1//-/_}" src out
    src="${MOD_PATH[$name]:-}"
    [ -n "$src" ] || die "module '$1' is not among Linux $KREL's modules (is it built in? then drop it from the list)"
    out="$KO_CACHE/$name.ko"
    # A cached module of another release is dropped and decompressed again.
    if [ -f "$out" ] && [ "$(ko_vermagic "$out")" != "$KREL" ]; then rm -f "$out"; fi
    if [ ! -f "$out" ]; then
        case "$src" in
            *.ko.xz) xz -dc "$src" >"$out.tmp" ;;
            *.ko.zst) zstd -qdc "$src" >"$out.tmp" ;;
            *.ko.gz) gzip -dc "$src" >"$out.tmp" ;;
            *.ko) cp "$src" "$out.tmp" ;;
            *) die "unknown module compression: $src" ;;
        esac
        # A module of another release would fail to load in the guest
        # ("invalid module format"): refuse it here instead.
        [ "$(ko_vermagic "$out.tmp")" = "$KREL" ] \
            || die "$src is built for '$(ko_vermagic "$out.tmp")', not for $KREL"
        mv "$out.tmp" "$out"
    fi
    echo "$out"
}
# The kernel release in a module's vermagic (its first word).
ko_vermagic() {
    local v
    v="$(tr '\0' '\n' <"$1" | sed -n 's/^vermagic=//p' | head -n 1)"
    echo "${v%% *}"
}
# The `depends=` field of a module, read from its .modinfo section: modinfo(8)
# when kmod is installed, else the NUL-separated strings of the .ko itself.
module_depends() {
    local ko
    ko="$(module_ko "$1")"
    if command -v modinfo >/dev/null 2>&1; then
        modinfo -F depends "$ko"
    else
        tr '\0' '\n' <"$ko" | sed -n 's/^depends=//p' | head -n 1
    fi
}
# Appends to ORDER the module and its dependencies, dependencies first.
declare -A VISITING=() DONE=()
ORDER=()
resolve() {
    local name="${1//-/_}" deps d
    [ -z "${DONE[$name]:-}" ] || return 0
    [ -z "${VISITING[$name]:-}" ] || die "module dependency cycle at $name"
    VISITING[$name]=1
    deps="$(module_depends "$name")"
    for d in ${deps//,/ }; do
        resolve "$d"
    done
    DONE[$name]=1
    ORDER+=("$name")
}
resolve_list() {
    VISITING=(); DONE=(); ORDER=()
    local m
    for m in $1; do resolve "$m"; done
}

# --- initramfs trees -------------------------------------------------------------
install_busybox() {
    local root="$1" applet
    mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin" "$root/dev" "$root/proc" \
        "$root/sys" "$root/tmp" "$root/run" "$root/etc" "$root/root" "$root/lib/modules"
    cp "$BUSYBOX" "$root/bin/busybox"
    for applet in $("$BUSYBOX" --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
    done
    # Device nodes for before devtmpfs is mounted (cpio -R keeps them).
    echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
}
# install_modules ROOT LIST [SUBDIR]: the modules of LIST and their
# dependencies into ROOT/lib/modules[/SUBDIR], with `order` (load order) and
# `release` (the kernel they are for: $KREL).
install_modules() {
    local root="$1" list="$2" dir="$1/lib/modules${3:+/$3}" m
    mkdir -p "$dir"
    resolve_list "$list"
    : >"$dir/order"
    echo "$KREL" >"$dir/release"
    for m in "${ORDER[@]}"; do
        cp "$(module_ko "$m")" "$dir/$m.ko"
        echo "$m" >>"$dir/order"
    done
    echo "${ORDER[*]}"
}
make_cpio() {
    local root="$1" out="$2"
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) \
        | gzip -9n >"$out.tmp"
    mv "$out.tmp" "$out"
}

# Shared /init prologue.
INIT_PROLOGUE='#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t tmpfs tmpfs /tmp
load_modules() {
    # A module set is built for one kernel release: load the one whose
    # release is that of the running kernel (6.12 in /lib/modules, 7.x in
    # /lib/modules/7).
    d=""
    for s in /lib/modules /lib/modules/7; do
        [ "$(uname -r)" = "$(cat $s/release 2>/dev/null)" ] && d=$s
    done
    if [ -z "$d" ]; then
        echo "@@CH-TEST:MODULES-SKIPPED=$(uname -r)@@"
        return 0
    fi
    for m in $(cat $d/order); do
        # Parameters from /lib/modules/params ("module param=value ...").
        args="$(sed -n "s/^$m //p" /lib/modules/params 2>/dev/null)"
        if ! insmod $d/$m.ko $args 2>/tmp/insmod.err; then
            # Already loaded (built in or loaded as a dependency) is fine.
            grep -q "File exists" /tmp/insmod.err || { echo "@@CH-TEST:MODULE-FAILED=$m@@"; cat /tmp/insmod.err; }
        fi
    done
}
'

INNER_INIT="$INIT_PROLOGUE"'
load_modules
echo "@@CH-TEST:INIT@@"
rc=0
if [ -f /scenario.sh ]; then
    sh /scenario.sh
    rc=$?
fi
echo "@@CH-TEST:SCENARIO-EXIT=$rc@@"
sync
poweroff -f
# poweroff -f does not return; if it does, stop here (panic=-1 reboots).
sleep 5
exit 1
'

# The outer init: see tests/src/nested.rs for the other side of the protocol.
#   /scenario/            files shipped in the initramfs (VMM args, kernel, initrd)
#   /scenario.files       lines "SERIAL NAME SIZE": a file carried on the outer
#                         virtio-blk disk whose serial is SERIAL; copied into
#                         /scenario/NAME before the run and back after it
#   /scenario.args        VMM arguments, one per line
#   /vmm/cloud-hypervisor the VMM (libraries in /lib, /lib64)
#   /vmm/ch-remote        with /scenario.during: run beside the VMM
#   /scenario.launcher    a tool in /vmm that starts the VMM, and its
#                         arguments (one per line; the VMM and its own follow)
OUTER_INIT="$INIT_PROLOGUE"'
fail() { echo "@@CH-TEST:OUTER-ERROR=$*@@"; sync; poweroff -f; sleep 5; exit 1; }
echo "@@CH-TEST:OUTER-INIT@@"
load_modules
[ -c /dev/kvm ] || fail "no /dev/kvm after loading kvm modules"
echo "@@CH-TEST:OUTER-KVM=$(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null || echo none)@@"
for p in vgif avic vls nested; do echo "@@CH-TEST:OUTER-KVM-$p=$(cat /sys/module/kvm_amd/parameters/$p 2>/dev/null)@@"; done
mkdir -p /scenario
if [ -f /scenario.files ]; then
    while read -r serial name size; do
        dev=""
        for b in /sys/block/vd*; do
            [ -e "$b/serial" ] || continue
            if [ "$(cat $b/serial)" = "$serial" ]; then dev=/dev/${b##*/}; fi
        done
        [ -n "$dev" ] || fail "no disk with serial $serial for $name"
        mkdir -p "$(dirname "/scenario/$name")"
        head -c "$size" "$dev" >"/scenario/$name" || fail "cannot copy $dev to $name"
        echo "$dev" >"/tmp/dev.$serial"
    done </scenario.files
fi
if [ -f /scenario.selfcheck ]; then
    echo "@@CH-TEST:OUTER-SELFCHECK@@"
    sh /scenario.selfcheck
fi
if [ -x /vmm/cloud-hypervisor ]; then
    set --
    # A launcher (Scenario::launcher: its path and arguments, one per line)
    # starts the VMM; it ends by executing it, so $! is the pid of the VMM.
    if [ -f /scenario.launcher ]; then
        while IFS= read -r a; do set -- "$@" "$a"; done </scenario.launcher
    fi
    set -- "$@" /vmm/cloud-hypervisor
    if [ -f /scenario.args ]; then
        while IFS= read -r a; do set -- "$@" "$a"; done </scenario.args
    fi
    cd /scenario
    echo "@@CH-TEST:VMM-START@@"
    "$@" </dev/null &
    vmm=$!
    # A script beside the VMM (the API tests): ch-remote on its PATH.
    during=""
    if [ -f /scenario.during ]; then
        ( PATH=/vmm:$PATH sh /scenario.during </dev/null ) &
        during=$!
    fi
    # Requests from the test runner on the console: "dump" sends the VMM
    # SIGUSR1 (it prints its state dump). No echo, so a request does not
    # land in the middle of the guests output.
    stty -echo </dev/console 2>/dev/null
    ( while read -r req; do
        case "$req" in
            *dump*) kill -USR1 $vmm 2>/dev/null && echo "@@CH-TEST:DUMP-REQUESTED@@" ;;
        esac
      done ) </dev/console &
    reader=$!
    wait $vmm
    rc=$?
    kill $reader 2>/dev/null
    if [ -n "$during" ] && [ -f /scenario.during-waits ]; then
        # The script runs more VMMs itself: the run ends with it.
        wait $during
        during=""
    fi
    if [ -n "$during" ]; then
        # Its last words, then it goes (as in direct mode: 2 s).
        n=0; while kill -0 $during 2>/dev/null && [ $n -lt 20 ]; do sleep 0.1; n=$((n + 1)); done
        kill $during 2>/dev/null
    fi
    cd /
    echo
    echo "@@CH-TEST:VMM-EXIT=$rc@@"
fi
if [ -f /scenario.files ]; then
    while read -r serial name size; do
        dev="$(cat /tmp/dev.$serial)"
        dd if="/scenario/$name" of="$dev" bs=65536 conv=notrunc,fsync 2>/dev/null \
            || echo "@@CH-TEST:OUTER-ERROR=cannot copy $name back to $dev@@"
    done </scenario.files
fi
sync
echo "@@CH-TEST:OUTER-DONE@@"
poweroff -f
sleep 5
exit 1
'

WORK="$GUEST_DIR/work"
rm -rf "$WORK"
mkdir -p "$WORK/inner" "$WORK/outer"

log "building inner initramfs (modules: $INNER_MODULES)"
install_busybox "$WORK/inner"
INNER_ORDER="$(install_modules "$WORK/inner" "$INNER_MODULES")"
# The guest has no interrupt remapping: VFIO's type1 backend refuses to
# attach a group unless told that MSIs cannot be isolated anyway.
echo "vfio_iommu_type1 allow_unsafe_interrupts=1" >"$WORK/inner/lib/modules/params"
# The 7.x set: the same functions over Debian's 7.x modules, with the
# out-of-tree virtio-vfio-pci added to the index.
KREL7="$(cat "$K7_DIR/release")"
rm -rf "$GUEST_DIR/ko7"
use_module_set "$KREL7" "$K7_DIR/modules-pkg/usr/lib/modules/$KREL7" "$GUEST_DIR/ko7/$KREL7"
MOD_PATH[virtio_vfio_pci]="$K7_DIR/vfio-mod/virtio-vfio-pci.ko"
INNER_ORDER_7="$(install_modules "$WORK/inner" "$INNER_MODULES_7" 7)"
use_module_set "$KREL6" "$MODDIR" "$KO_CACHE6"
printf '%s' "$INNER_INIT" >"$WORK/inner/init"
chmod 755 "$WORK/inner/init"
make_cpio "$WORK/inner" "$GUEST_DIR/inner-base.cpio.gz"

log "building L2 initramfs (modules: $L2_MODULES)"
mkdir -p "$WORK/l2"
install_busybox "$WORK/l2"
L2_ORDER="$(install_modules "$WORK/l2" "$L2_MODULES")"
printf '%s' "$INNER_INIT" >"$WORK/l2/init"
chmod 755 "$WORK/l2/init"
make_cpio "$WORK/l2" "$GUEST_DIR/l2-base.cpio.gz"

log "building outer initramfs (modules: $OUTER_MODULES)"
install_busybox "$WORK/outer"
OUTER_ORDER="$(install_modules "$WORK/outer" "$OUTER_MODULES")"
# kvm_amd without virtual GIF: KVM then tracks the inner guest's GIF itself
# instead of reading V_GIF back from the VMCB that QEMU TCG's SVM emulation
# writes. A boot that hung before /init (outer soft lockup, the timer
# interrupt pending in IRR with IF=1 and never injected) points at that
# path; see docs/testing.md.
echo "kvm_amd vgif=0" >"$WORK/outer/lib/modules/params"
mkdir -p "$WORK/outer/vmm" "$WORK/outer/lib64" "$WORK/outer/lib/x86_64-linux-gnu"
printf '%s' "$OUTER_INIT" >"$WORK/outer/init"
chmod 755 "$WORK/outer/init"
make_cpio "$WORK/outer" "$GUEST_DIR/outer-base.cpio.gz"

cp "$BZIMAGE" "$GUEST_DIR/bzImage.tmp"
mv "$GUEST_DIR/bzImage.tmp" "$GUEST_DIR/bzImage"
cat >"$GUEST_DIR/info" <<EOF
kernel_package=$KERNEL_PACKAGE
kernel_version=$KERNEL_PKG_VERSION
kernel_release=$KREL
busybox_version=$BUSYBOX_VERSION
inner_modules=$INNER_ORDER
inner_modules_7=$INNER_ORDER_7
l2_modules=$L2_ORDER
outer_modules=$OUTER_ORDER
EOF
rm -rf "$WORK"
echo "$STAMP" >"$GUEST_DIR/stamp"
log "done: $GUEST_DIR (kernel $KREL; inner modules: $INNER_ORDER; 7.x inner modules: $INNER_ORDER_7; outer modules: $OUTER_ORDER)"
echo "$GUEST_DIR"
