# L2's workload (its /scenario.sh): checksummed writes and direct read-backs
# on its only disk, the VF, one 4 KiB block at a time, until the VM ends
# (`vpfctl disk-pattern`, vpfctl/src/disk.rs). Block BLK of write SEQ holds
# "seq=SEQ blk=BLK\n" repeated (4096 bytes). Log lines on the console, two
# per write:
#   W SEQ BLK SUM              before the write
#   OK SEQ                     the block read back (O_DIRECT) matches
#   BAD SEQ BLK SUM            it does not (the checksum read back)
#   ERR SEQ write|read WHY     the I/O failed
BLOCKS=32
# The disk comes by hot-plug when L2 was restored from its saved state
# (scripts/build-l2-state.sh saves it here): wait for it.
# Kernel messages up to info level on the console: the hot-plug and the
# probe of the VF show with their times.
echo 7 >/proc/sys/kernel/printk
echo "L2 WAITING-FOR-DISK"
n=0
until [ -e /sys/block/vda ]; do
    n=$((n + 1))
    if [ $n -gt 600 ]; then
        echo "L2 NODISK $(ls /sys/block)"
        exit 1
    fi
    sleep 1
done
dev=/dev/vda
echo "L2 DISK $dev sectors=$(cat /sys/block/vda/size) pci=$(basename "$(readlink /sys/block/vda/device/..)")"
# vpfctl's disk-pattern: a process per write would cost seconds here.
exec vpfctl disk-pattern --dev $dev --blocks $BLOCKS --block-size 4096
