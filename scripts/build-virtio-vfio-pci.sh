#!/usr/bin/env bash
# Builds Linux's vfio/virtio migration driver (drivers/vfio/pci/virtio,
# virtio-vfio-pci.ko), which Debian's kernels do not enable, out of tree for
# the Debian Linux 7.x kernel that build-guest-image.sh fetched
# (bzImage-7), and unpacks that kernel's modules package, so that the inner
# guest's 7.x module set can hold it and its dependencies (vfio, vfio-pci-core,
# vfio_iommu_type1, virtio_iommu, ...).
#
#   bash scripts/build-virtio-vfio-pci.sh [--force] [--quiet]
#
# Reads $GUEST_DIR/kernel7/{release,stamp,sources.list,lists} (written by
# build-guest-image.sh's fetch_kernel7) and writes
#   $GUEST_DIR/kernel7/vfio-mod/virtio-vfio-pci.ko   the module
#   $GUEST_DIR/kernel7/modules-pkg/                  linux-modules-<release>
#   $GUEST_DIR/kernel7/vfio-mod/stamp                what they were built from
# Cached: a rerun is a no-op until the 7.x package version or this script
# changes. Nothing is installed system-wide but bookworm's libelf-dev
# (objtool's headers) when missing; the kernel source is downloaded
# (Debian's linux-source-7.N) and only the parts the build needs are
# extracted, then deleted.
#
# How (bookworm has gcc 12 and glibc 2.36; Debian's 7.x headers expect
# gcc-14 and glibc 2.38):
#  * headers, kbuild and source come from trixie-backports, unpacked with
#    dpkg-deb (their declared dependencies cannot be met on bookworm);
#  * the headers' generated config was probed with gcc-14: Kconfig is run
#    again with gcc-12 and only the compiler/assembler/linker probe symbols
#    (CONFIG_CC_*, GCC_*, AS_*, LD_*) that differ are carried over, so no
#    gcc-14-only option (-fmin-function-alignment, asm goto with outputs) is
#    used; nothing that shapes kernel data structures changes;
#  * objtool and modpost of the headers need glibc 2.38: both are rebuilt
#    from the same source;
#  * module BTF is skipped (it needs pahole >= 1.26);
#  * a Kbuild file turns CONFIG_VIRTIO_VFIO_PCI on and includes the
#    unchanged upstream Makefile.
# Measured: about 1.5 minutes on 2 cores from a fresh machine (290 MB of
# downloads, one pass of xz over the source tarball, a 5 s compile).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GUEST_DIR="${GUEST_DIR:-$REPO_ROOT/build/guest}"
K7_DIR="$GUEST_DIR/kernel7"
FORCE=0
QUIET=0
for a in "$@"; do
    case "$a" in
        --force) FORCE=1 ;;
        --quiet) QUIET=1 ;;
        *) echo "build-virtio-vfio-pci: unknown option $a" >&2; exit 2 ;;
    esac
done

log() { [ "$QUIET" = 1 ] || echo "build-virtio-vfio-pci: $*" >&2; }
die() { echo "build-virtio-vfio-pci: error: $*" >&2; exit 1; }
# Runs a command, showing its output only when it fails.
quiet() {
    local out
    if ! out="$("$@" 2>&1)"; then
        echo "$out" | tail -n 40 >&2
        die "failed: $*"
    fi
}

[ -f "$K7_DIR/release" ] && [ -f "$K7_DIR/stamp" ] \
    || die "no $K7_DIR/release or stamp: run scripts/build-guest-image.sh first"
KREL="$(cat "$K7_DIR/release")"                 # 7.3.4+deb13-amd64
VERSION="$(sed 's/^[^=]*=//' "$K7_DIR/stamp")"  # 7.3.4-1~bpo13+1
KB="${KREL%-amd64}"                             # 7.3.4+deb13
MAJMIN="$(echo "$KREL" | sed -E 's/^([0-9]+\.[0-9]+).*/\1/')"   # 7.3
[ -n "$VERSION" ] && [ "$KB" != "$KREL" ] || die "cannot parse release $KREL / version $VERSION"

OUT="$K7_DIR/vfio-mod"
MODPKG="$K7_DIR/modules-pkg"
SCRIPT_HASH="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"
STAMP="script=$SCRIPT_HASH kernel=$KREL=$VERSION"
if [ "$FORCE" = 0 ] && [ -f "$OUT/virtio-vfio-pci.ko" ] && [ -d "$MODPKG/usr/lib/modules/$KREL" ] \
    && [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$STAMP" ]; then
    log "cached: $OUT/virtio-vfio-pci.ko ($KREL)"
    exit 0
fi

T0=$(date +%s)
CC12=x86_64-linux-gnu-gcc-12
command -v "$CC12" >/dev/null || die "$CC12 not found (Debian 12's gcc-12)"
for t in make python3 xz gcc-12; do
    command -v "$t" >/dev/null || die "$t not found"
done
if [ ! -f /usr/include/gelf.h ]; then
    log "apt-get install libelf-dev (objtool)"
    quiet apt-get install -y -qq libelf-dev
fi

APT=(-o "Dir::Etc::SourceList=$K7_DIR/sources.list" -o Dir::Etc::SourceParts=/nonexistent
    -o "Dir::State::Lists=$K7_DIR/lists" -o "Dir::Cache=$K7_DIR/cache" -o APT::Sandbox::User=root)
WORK="$K7_DIR/vfio-work"
rm -rf "$WORK" "$OUT"
mkdir -p "$WORK/debs" "$K7_DIR/cache/archives/partial" "$OUT"

# --- 1. downloads ----------------------------------------------------------------
PKGS=("linux-headers-$KREL=$VERSION" "linux-headers-$KB-common=$VERSION"
    "linux-kbuild-$KB=$VERSION" "linux-source-$MAJMIN=$VERSION" "linux-modules-$KREL=$VERSION")
log "apt-get download ${PKGS[*]} (trixie-backports)"
(cd "$WORK/debs" && quiet apt-get "${APT[@]}" download "${PKGS[@]}")
deb() { ls "$WORK/debs/$1"_*.deb 2>/dev/null | head -n 1; }

# --- 2. the kernel's modules -----------------------------------------------------
log "unpacking linux-modules-$KREL"
rm -rf "$MODPKG"
mkdir -p "$MODPKG"
dpkg-deb -x "$(deb "linux-modules-$KREL")" "$MODPKG"
[ -d "$MODPKG/usr/lib/modules/$KREL" ] || die "linux-modules-$KREL has no usr/lib/modules/$KREL"

# --- 3. headers and kbuild -------------------------------------------------------
R="$WORK/root"
for p in "linux-headers-$KREL" "linux-headers-$KB-common" "linux-kbuild-$KB"; do
    f="$(deb "$p")"
    [ -n "$f" ] || die "no .deb of $p downloaded"
    dpkg-deb -x "$f" "$R"
done
K="$R/usr/src/linux-headers-$KREL"
[ -f "$K/Makefile" ] || die "no $K/Makefile in the headers package"
# The headers' Makefile names /usr/src/...: point it at this copy.
sed -i "s#/usr/src/#$R/usr/src/#g" "$K/Makefile"

# --- 4. the parts of the source the build needs ------------------------------------
S="$WORK/src"
mkdir -p "$S"
log "extracting the vfio/virtio driver, scripts, tools, include, arch/x86 and Kconfig files from linux-source-$MAJMIN"
dpkg-deb --fsys-tarfile "$(deb "linux-source-$MAJMIN")" \
    | tar -xO "./usr/src/linux-source-$MAJMIN.tar.xz" \
    | tar -xJ -C "$S" --strip-components=1 --wildcards \
        "linux-source-$MAJMIN/drivers/vfio/pci/virtio/*" \
        "linux-source-$MAJMIN/scripts/*" "linux-source-$MAJMIN/tools/*" \
        "linux-source-$MAJMIN/*Kconfig*" \
        "linux-source-$MAJMIN/include/*" "linux-source-$MAJMIN/arch/x86/*" \
    || die "extracting linux-source-$MAJMIN failed"
[ -f "$S/drivers/vfio/pci/virtio/main.c" ] || die "no drivers/vfio/pci/virtio in linux-source-$MAJMIN"

# --- 5. the configuration as gcc-12 sees it ----------------------------------------
log "re-probing the compiler symbols of the configuration with gcc-12"
cp "$K/.config" "$WORK/config.gcc12"
# The pahole version Debian built with (only compared by Kconfig).
PAHOLE_VERSION="$(sed -n 's/^CONFIG_PAHOLE_VERSION=//p' "$K/.config")"
( cd "$WORK" && env srctree="$S" ARCH=x86 SRCARCH=x86 SUBARCH=x86 KERNELVERSION="${KREL%%+*}" \
    CC=$CC12 HOSTCC=gcc-12 LD=x86_64-linux-gnu-ld NM=nm OBJCOPY=objcopy AR=ar \
    CLANG_FLAGS= RUSTC=false BINDGEN=false PYTHON3=python3 PAHOLE_VERSION="$PAHOLE_VERSION" \
    CC_VERSION_TEXT="$($CC12 --version | head -n 1)" RUSTC_VERSION_TEXT= \
    KCONFIG_CONFIG=config.gcc12 \
    "$R/usr/lib/linux-kbuild-$KB/scripts/kconfig/conf" --olddefconfig "$S/Kconfig" >/dev/null ) \
    || die "kconfig with gcc-12 failed"
python3 - "$K/.config" "$WORK/config.gcc12" "$K/include/config/auto.conf" \
    "$K/include/generated/autoconf.h" "$QUIET" <<'EOF' >&2
import re, sys
debian, gcc12, auto_conf, auto_h, quiet = sys.argv[1:6]
quiet = quiet == "1"
probe = re.compile(r'CONFIG_(CC_|GCC_|AS_|LD_)')
def values(path):
    out = {}
    for line in open(path):
        m = re.match(r'(CONFIG_\w+)=(.*)', line.strip())
        if m:
            out[m[1]] = m[2]
    return out
a, b = values(debian), values(gcc12)
changed = {k: b.get(k) for k in sorted(set(a) | set(b)) if probe.match(k) and a.get(k) != b.get(k)}
for k, v in changed.items():
    if not quiet:
        print(f'build-virtio-vfio-pci:   {k}: {a.get(k)} -> {v}')
keep = [l for l in open(auto_conf) if not any(l.startswith(k + '=') for k in changed)]
keep += [f'{k}={v.strip(chr(34))}\n' for k, v in changed.items() if v is not None]
open(auto_conf, 'w').writelines(keep)
def define(k, v):
    if v == 'y':
        return f'#define {k} 1\n'
    if v == 'm':
        return f'#define {k}_MODULE 1\n'
    return f'#define {k} {v}\n'
names = set(changed) | {k + '_MODULE' for k in changed}
keep = [l for l in open(auto_h) if not (l.startswith('#define ') and l.split()[1] in names)]
keep += [define(k, v) for k, v in changed.items() if v is not None]
open(auto_h, 'w').writelines(keep)
EOF

# --- 6. objtool and modpost for this glibc -----------------------------------------
log "building objtool and modpost"
quiet make -s -C "$S/tools/objtool" -j"$(nproc)"
quiet make -s -C "$K" M="$S/scripts/mod" CC=$CC12 HOSTCC=gcc-12 \
    HOSTCFLAGS="-I$S/scripts/include" objtool="$S/tools/objtool/objtool" \
    CONFIG_DEBUG_INFO_BTF_MODULES= MODPOST=/bin/true
[ -x "$S/tools/objtool/objtool" ] && [ -x "$S/scripts/mod/modpost" ] || die "objtool or modpost missing"

# --- 7. the module -----------------------------------------------------------------
M="$WORK/mod"
mkdir -p "$M"
cp "$S"/drivers/vfio/pci/virtio/{Makefile,*.c,*.h} "$M/"
cat >"$M/Kbuild" <<'EOF'
# Debian leaves CONFIG_VIRTIO_VFIO_PCI unset: turn it (and its legacy I/O
# part, which the C code tests with #ifdef) on, then use the upstream
# Makefile as it is.
CONFIG_VIRTIO_VFIO_PCI := m
CONFIG_VIRTIO_VFIO_PCI_ADMIN_LEGACY := y
ccflags-y += -DCONFIG_VIRTIO_VFIO_PCI_ADMIN_LEGACY=1
include $(src)/Makefile
EOF
log "compiling virtio-vfio-pci.ko"
quiet make -C "$K" M="$M" CC=$CC12 HOSTCC=gcc-12 \
    objtool="$S/tools/objtool/objtool" MODPOST="$S/scripts/mod/modpost" \
    CONFIG_DEBUG_INFO_BTF_MODULES= -j"$(nproc)" modules
[ -f "$M/virtio-vfio-pci.ko" ] || die "the build made no virtio-vfio-pci.ko"
vermagic="$(tr '\0' '\n' <"$M/virtio-vfio-pci.ko" | sed -n 's/^vermagic=//p' | head -n 1)"
case "$vermagic" in
    "$KREL "*) ;;
    *) die "virtio-vfio-pci.ko has vermagic '$vermagic', the kernel is $KREL" ;;
esac
# Without its debug information (2 MB -> a tenth of that in the initramfs).
strip --strip-debug -o "$OUT/virtio-vfio-pci.ko" "$M/virtio-vfio-pci.ko" || die "strip of virtio-vfio-pci.ko failed"
rm -rf "$WORK"
echo "$STAMP" >"$OUT/stamp"
log "done in $(( $(date +%s) - T0 )) s: $OUT/virtio-vfio-pci.ko (vermagic $vermagic)"
