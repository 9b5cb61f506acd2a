#!/bin/sh
# qmp PORT [COMMAND-JSON]...: a QMP client made of busybox nc (TCP only:
# busybox nc has no unix sockets).  Waits for the greeting, sends
# qmp_capabilities and then each COMMAND, waiting for each reply
# ("return" or "error" line) before the next; prints everything received.
# QMP_HOST (default 127.0.0.1), QMP_TIMEOUT (seconds per reply, default 60).
port="$1"; shift
host="${QMP_HOST:-127.0.0.1}"
limit=$(( ${QMP_TIMEOUT:-60} * 10 ))
d=$(mktemp -d /tmp/qmp.XXXXXX) || exit 1
mkfifo "$d/in"
nc "$host" "$port" <"$d/in" >"$d/out" &
nc_pid=$!
exec 3>"$d/in"          # keeps nc's stdin open until we are done
rc=0
waitfor() { # PATTERN COUNT
    n=0
    while [ "$(grep -c "$1" "$d/out")" -lt "$2" ]; do
        n=$((n + 1))
        if [ $n -gt $limit ] || ! kill -0 $nc_pid 2>/dev/null; then
            echo "qmp: no reply ($1 #$2) from $host:$port" >&2; rc=1; return 1
        fi
        sleep 0.1
    done
}
replies=0
send() {
    echo "$1" >&3
    replies=$((replies + 1))
    waitfor '"return"\|"error"' $replies
}
if waitfor '"QMP"' 1; then
    send '{"execute":"qmp_capabilities"}'
    for c in "$@"; do
        [ $rc = 0 ] || break
        send "$c"
    done
fi
exec 3>&-               # EOF: nc shuts its write side, QEMU closes, nc exits
n=0; while kill -0 $nc_pid 2>/dev/null && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
kill $nc_pid 2>/dev/null
cat "$d/out"
grep -q '"error"' "$d/out" && rc=1
rm -rf "$d"
exit $rc
