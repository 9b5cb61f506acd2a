# Shared by scripts/build-l1-qemu.sh and scripts/build-l2-state.sh (sourced):
# the cache check and the archive both end with. Each script defines log().

# cached DIR STAMP FILE: when DIR/stamp holds STAMP and FILE exists (and
# --force was not given: FORCE=0), print FILE and exit the script.
cached() {
    if [ "${FORCE:-0}" = 0 ] && [ -f "$1/stamp" ] && [ "$(cat "$1/stamp")" = "$2" ] && [ -f "$3" ]; then
        log "up to date: $3"
        echo "$3"
        exit 0
    fi
    rm -f "$1/stamp"
}

# archive ROOT OUT: the tree ROOT as a gzip'd newc cpio archive OUT (owner
# root, sorted, reproducible), written atomically.
archive() {
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) \
        | gzip -6n >"$2.new"
    mv "$2.new" "$2"
}
