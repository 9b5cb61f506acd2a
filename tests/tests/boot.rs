//! Real Debian 6.12 guests booted by `cloud-hypervisor`, directly on hardware
//! KVM or nested in a QEMU TCG host VM (see the `tests` crate docs). Each test
//! asserts what the guest reports between `@@T:KEY=VALUE@@` markers.

use std::time::Duration;
use tests::checks::{boot, marker};
use tests::pattern::pattern;

use tests::{RunOutput, Scenario};

const MIB: usize = 1024 * 1024;

#[test]
fn boots_to_init_and_powers_off() {
    let out = boot(Scenario::new("boot-poweroff").script(
        r#"echo "@@T:KERNEL=$(uname -r)@@"
echo "@@T:PID1=$(cat /proc/1/comm)@@""#,
    ));
    assert!(
        marker(&out, "KERNEL").starts_with("6.12."),
        "{}",
        out.summary()
    );
    assert_eq!(marker(&out, "PID1"), "init");
}

#[test]
fn two_vcpus_are_online() {
    let out = boot(
        Scenario::new("two-vcpus")
            .args(["--cpus", "boot=2"])
            .script(
                r#"echo "@@T:ONLINE=$(cat /sys/devices/system/cpu/online)@@"
echo "@@T:PROCESSORS=$(grep -c '^processor' /proc/cpuinfo)@@""#,
            ),
    );
    assert_eq!(marker(&out, "ONLINE"), "0-1", "{}", out.summary());
    assert_eq!(marker(&out, "PROCESSORS"), "2", "{}", out.summary());
}

/// Prints, for the virtio-blk PCI function, its address, configuration space
/// size, driver, virtio device name and MSI vectors; then reads the whole
/// disk with O_DIRECT so that its request queue interrupts; then prints the
/// virtio lines of /proc/interrupts.
const PCI_SCRIPT: &str = r#"for d in /sys/bus/pci/devices/*; do
  id="$(cat $d/vendor):$(cat $d/device)"
  echo "@@T:PCI=${d##*/} $id@@"
  [ "$id" = "0x1af4:0x1042" ] || continue
  echo "@@T:BLK=${d##*/}@@"
  echo "@@T:CONFIG-SIZE=$(wc -c < $d/config)@@"
  echo "@@T:DRIVER=$(basename "$(readlink $d/driver)")@@"
  echo "@@T:MSI-VECTORS=$(ls $d/msi_irqs 2>/dev/null | wc -l)@@"
  for v in $d/virtio*; do [ -d "$v" ] && echo "@@T:VIRTIO=${v##*/}@@"; done
done
dd if=/dev/vda of=/dev/null bs=65536 iflag=direct 2>/dev/null
echo "@@T:DIRECT-READ=$?@@"
grep virtio /proc/interrupts | while read -r line; do echo "@@T:IRQ=$line@@"; done
"#;

/// (name, total count over all CPUs, whole line) of /proc/interrupts lines.
fn irq_lines(out: &RunOutput) -> Vec<(String, u64, String)> {
    out.markers("T:IRQ")
        .into_iter()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let counts: Vec<u64> = fields
                .iter()
                .skip(1)
                .map_while(|f| f.parse::<u64>().ok())
                .collect();
            let name = fields.last().copied().unwrap_or("").to_string();
            (name, counts.iter().sum(), line)
        })
        .collect()
}

#[test]
fn virtio_blk_is_a_modern_pci_function_with_msix() {
    let out = boot(
        Scenario::new("virtio-blk-pci")
            .args(["--disk", "path=disk.img"])
            .file("disk.img", vec![0u8; 8 * MIB])
            .script(PCI_SCRIPT),
    );
    let blk = out.markers("T:BLK");
    assert_eq!(
        blk.len(),
        1,
        "expected exactly one 1af4:1042 function, PCI devices: {:?}\n{}",
        out.markers("T:PCI"),
        out.summary()
    );
    assert_eq!(
        marker(&out, "CONFIG-SIZE"),
        "4096",
        "configuration space is not 4 KiB (no PCI Express capability or no ECAM?)\n{}",
        out.summary()
    );
    assert_eq!(marker(&out, "DRIVER"), "virtio-pci", "{}", out.summary());
    let msi: usize = marker(&out, "MSI-VECTORS").parse().unwrap();
    assert!(
        msi >= 2,
        "expected MSI-X vectors for config + request queue, got {msi}\n{}",
        out.summary()
    );
    assert_eq!(marker(&out, "DIRECT-READ"), "0", "{}", out.summary());

    let virtio = marker(&out, "VIRTIO");
    let irqs = irq_lines(&out);
    let mine: Vec<_> = irqs
        .iter()
        .filter(|(name, _, _)| name.starts_with(&format!("{virtio}-")))
        .collect();
    assert!(
        mine.iter()
            .any(|(n, _, _)| *n == format!("{virtio}-config")),
        "no {virtio}-config vector in /proc/interrupts: {irqs:?}\n{}",
        out.summary()
    );
    let queues: Vec<_> = mine
        .iter()
        .filter(|(n, _, _)| n.starts_with(&format!("{virtio}-req.")))
        .collect();
    assert!(
        !queues.is_empty(),
        "no {virtio}-req.N vector in /proc/interrupts: {irqs:?}\n{}",
        out.summary()
    );
    for (_, _, line) in &mine {
        assert!(
            line.contains("MSI"),
            "vector not delivered as MSI-X: {line}\n{}",
            out.summary()
        );
    }
    let total: u64 = queues.iter().map(|(_, c, _)| c).sum();
    assert!(
        total > 0,
        "request queue vectors counted no interrupts after reading 8 MiB: {queues:?}\n{}",
        out.summary()
    );
}

#[test]
fn disk_data_survives_both_directions() {
    // Host pattern in the first MiB; the guest writes its pattern at 2 MiB.
    let host_pattern = pattern(1, MIB);
    let guest_pattern = pattern(2, MIB);
    let mut disk = vec![0u8; 4 * MIB];
    disk[..MIB].copy_from_slice(&host_pattern);
    let out = boot(
        Scenario::new("disk-data")
            .args(["--disk", "path=disk.img"])
            .file("disk.img", disk.clone())
            .guest_file("expected-host.bin", host_pattern.clone())
            .guest_file("guest-pattern.bin", guest_pattern.clone())
            .script(
                r#"if dd if=/dev/vda bs=65536 count=16 2>/dev/null | cmp - /expected-host.bin; then
  echo "@@T:HOST-PATTERN=intact@@"
else
  echo "@@T:HOST-PATTERN=differs@@"
fi
dd if=/guest-pattern.bin of=/dev/vda bs=65536 seek=32 conv=fsync 2>/dev/null
echo "@@T:WRITE=$?@@"
sync
echo 3 > /proc/sys/vm/drop_caches
if dd if=/dev/vda bs=65536 skip=32 count=16 2>/dev/null | cmp - /guest-pattern.bin; then
  echo "@@T:READBACK=intact@@"
else
  echo "@@T:READBACK=differs@@"
fi
"#,
            ),
    );
    assert_eq!(
        marker(&out, "HOST-PATTERN"),
        "intact",
        "the guest read something else than the host wrote\n{}",
        out.summary()
    );
    assert_eq!(marker(&out, "WRITE"), "0", "{}", out.summary());
    assert_eq!(marker(&out, "READBACK"), "intact", "{}", out.summary());

    let after = out.read_file("disk.img").unwrap();
    assert_eq!(after.len(), disk.len(), "the disk file changed size");
    assert!(
        after[..MIB] == host_pattern[..],
        "the host pattern was altered"
    );
    assert!(
        after[MIB..2 * MIB].iter().all(|&b| b == 0),
        "bytes the guest never wrote changed"
    );
    let found = &after[2 * MIB..3 * MIB];
    let first_bad = found.iter().zip(&guest_pattern).position(|(a, b)| a != b);
    assert!(
        first_bad.is_none(),
        "the guest's pattern is not in the file after the VMM exited (first difference at byte {:?} of the 1 MiB written at 2 MiB)",
        first_bad
    );
    assert!(after[3 * MIB..].iter().all(|&b| b == 0));
}

#[test]
fn readonly_disk_refuses_writes() {
    let contents = pattern(3, MIB);
    let out = boot(
        Scenario::new("disk-readonly")
            .args(["--disk", "path=ro.img,readonly=on"])
            .file("ro.img", contents.clone())
            .guest_file("expected.bin", contents.clone())
            .script(
                r#"echo "@@T:RO=$(cat /sys/block/vda/ro)@@"
if dd if=/dev/vda bs=65536 2>/dev/null | cmp - /expected.bin; then echo "@@T:READ=intact@@"; else echo "@@T:READ=differs@@"; fi
if dd if=/dev/zero of=/dev/vda bs=4096 count=16 conv=fsync 2>/tmp/dd.err; then
  echo "@@T:WRITE=accepted@@"
else
  echo "@@T:WRITE=refused@@"
fi
cat /tmp/dd.err
"#,
            ),
    );
    assert_eq!(marker(&out, "READ"), "intact", "{}", out.summary());
    assert_eq!(
        marker(&out, "RO"),
        "1",
        "the guest does not see the disk as read-only (VIRTIO_BLK_F_RO)\n{}",
        out.summary()
    );
    assert_eq!(
        marker(&out, "WRITE"),
        "refused",
        "a write to a readonly=on disk succeeded\n{}",
        out.summary()
    );
    assert!(
        out.read_file("ro.img").unwrap() == contents,
        "the readonly=on disk file was modified"
    );
}

/// A backing file on a host filesystem that runs out of space: the guest's
/// writes past the room fail with an I/O error (VIRTIO_BLK_S_IOERR, which
/// Linux logs as "I/O error, dev vda"), reads still work, the other disk is
/// untouched and works, and the VMM powers off normally.
#[test]
fn a_backing_file_out_of_space_gives_the_guest_io_errors_and_nothing_else() {
    let other = pattern(5, MIB);
    let out = boot(
        Scenario::new("disk-enospc")
            .full_disk("small/full.img", 8 * MIB as u64, 256 * 1024)
            .args(["--disk", "path=small/full.img", "--disk", "path=other.img"])
            .file("other.img", vec![0u8; 2 * MIB])
            .guest_file("other.bin", other.clone())
            .script(
                r#"dd if=/dev/urandom of=/tmp/big bs=65536 count=32 2>/dev/null
if dd if=/tmp/big of=/dev/vda bs=65536 conv=fsync 2>/tmp/dd.err; then
  echo "@@T:FULL-WRITE=accepted@@"
else
  echo "@@T:FULL-WRITE=failed@@"
fi
cat /tmp/dd.err
echo "@@T:IOERR-LOGGED=$(dmesg | grep -c 'I/O error, dev vda')@@"
echo 3 > /proc/sys/vm/drop_caches
if dd if=/dev/vda of=/dev/null bs=65536 count=128 2>/dev/null; then echo "@@T:FULL-READ=ok@@"; else echo "@@T:FULL-READ=failed@@"; fi
dd if=/other.bin of=/dev/vdb bs=65536 conv=fsync 2>/dev/null
echo "@@T:OTHER-WRITE=$?@@"
"#,
            ),
    );
    assert_eq!(
        marker(&out, "FULL-WRITE"),
        "failed",
        "writing 2 MiB to a disk with 256 KiB of room succeeded\n{}",
        out.summary()
    );
    let logged: u32 = marker(&out, "IOERR-LOGGED").parse().unwrap_or(0);
    assert!(
        logged > 0,
        "the guest kernel logged no I/O error for vda\n{}",
        out.summary()
    );
    assert_eq!(marker(&out, "FULL-READ"), "ok", "{}", out.summary());
    assert_eq!(marker(&out, "OTHER-WRITE"), "0", "{}", out.summary());
    assert_eq!(out.vmm_exit, 0, "{}", out.summary());
    let after = out.read_file("other.img").unwrap();
    assert!(after[..MIB] == other[..], "the other disk lost the write");
}

/// `dmesg | grep -i 'ACPI.*\(error\|bug\)'` must be empty, but for the line
/// every x86 kernel prints ("PCI: Using host bridge windows from ACPI; if
/// necessary, use "pci=nocrs" and report a bug"), which is not an error.
#[test]
fn no_acpi_errors_in_kernel_log() {
    let out = boot(Scenario::new("acpi-log").script(
        r#"dmesg > /tmp/dmesg
echo "@@T:ACPI-LINES=$(grep -c 'ACPI' /tmp/dmesg)@@"
grep 'ACPI' /tmp/dmesg | while read -r l; do echo "@@T:ACPI=$l@@"; done
grep -i 'ACPI.*\(error\|bug\)' /tmp/dmesg | grep -v 'Using host bridge windows from ACPI' | while read -r l; do echo "@@T:ACPI-ERROR=$l@@"; done
echo "@@T:DONE=1@@"
"#,
    ));
    assert_eq!(marker(&out, "DONE"), "1");
    let lines: usize = marker(&out, "ACPI-LINES").parse().unwrap();
    assert!(
        lines > 0,
        "the kernel log never mentions ACPI: were the tables found?\n{}",
        out.summary()
    );
    let errors = out.markers("T:ACPI-ERROR");
    assert!(
        errors.is_empty(),
        "ACPI errors in the guest kernel log:\n{}\n{}",
        errors.join("\n"),
        out.summary()
    );
}

/// `reboot -f` (the ACPI reset register) ends the VMM with status 0, as a
/// power off does.
#[test]
fn guest_reboot_ends_the_vmm_with_status_0() {
    let out = tests::run(
        tests::checks::shared_runner(),
        &Scenario::new("reboot").script(
            r#"echo "@@T:REBOOTING=yes@@"
reboot -f
sleep 30
echo "@@T:STILL-RUNNING=yes@@""#,
        ),
    );
    assert_eq!(marker(&out, "REBOOTING"), "yes", "{}", out.summary());
    assert!(
        out.marker("T:STILL-RUNNING").is_none(),
        "reboot -f returned\n{}",
        out.summary()
    );
    assert_eq!(out.scenario_exit(), None, "{}", out.summary());
    assert_eq!(out.vmm_exit, 0, "{}", out.summary());
}

/// The VMM's state dump, collected by the runner when a step is overdue:
/// the guest (2 vCPUs, a disk doing I/O) stops printing markers in the
/// middle of its script, the step's deadline expires, and the error
/// carries the real VMM's dump: every vCPU's activity and registers, the
/// device thread, and the virtio-blk function with its queue indices.
#[test]
fn an_overdue_step_fails_fast_with_the_vmm_state_dump() {
    let runner = tests::checks::shared_runner();
    let scenario = Scenario::new("stall-dump")
        .args(["--cpus", "boot=2", "--disk", "path=disk.img"])
        .file("disk.img", vec![0u8; MIB])
        .step("read", "@@T:READ=", Duration::from_secs(60))
        .step("never", "@@T:NEVER@@", Duration::from_secs(5))
        .script(
            r#"dd if=/dev/vda of=/dev/null bs=4096 iflag=direct 2>/dev/null
echo "@@T:READ=$?@@"
sleep 600"#,
        );
    let started = std::time::Instant::now();
    match runner.run(&scenario) {
        Err(tests::Error::Stalled { overdue, dump, .. }) => {
            assert!(overdue.contains("'never'"), "{overdue}");
            for want in [
                "vCPU 0: ",
                "vCPU 1: ",
                "vCPU 0 state: rip=",
                "vCPU 1 state: rip=",
                "mp_state=",
                "lapic: tpr=",
                "device thread: ",
                "00:02.0: status=0x0f",
                "queue 0: size=",
                "@@CH-DUMP:END=",
            ] {
                assert!(dump.contains(want), "no {want:?} in the dump:\n{dump}");
            }
        }
        Err(e) => panic!("expected a stall with a dump, got: {e}"),
        Ok(out) => panic!("expected a stall, got a result:\n{}", out.summary()),
    }
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "took {:?}",
        started.elapsed()
    );
}

/// Prints the kernel release, the kernel's XSAVE summary line and every
/// warning in the kernel log.
const XSAVE_SCRIPT: &str = r#"echo "@@T:KERNEL=$(uname -r)@@"
echo "@@T:XSTATE=$(dmesg | grep -o 'x86/fpu: Enabled xstate features.*' | head -n 1)@@"
dmesg | grep -E 'WARNING:|XSAVE consistency|XSAVE disabled' | while read -r line; do echo "@@T:WARN=$line@@"; done
true"#;

/// The XSAVE layout the guest finds in CPUID leaf 0xD agrees with the size
/// KVM reports for the XCR0 it holds: the kernel enables XSAVE with no
/// warning (before the VMM set the vCPU's initial XCR0, nested KVM's copy
/// stayed at x87 only and the kernel warned and turned XSAVE off).
fn assert_xsave_consistent(out: &RunOutput) {
    let xstate = marker(out, "XSTATE");
    assert!(
        xstate.contains("context size is"),
        "the kernel did not enable XSAVE: {xstate:?}\n{}",
        out.summary()
    );
    let warnings = out.markers("T:WARN");
    assert!(
        warnings.is_empty(),
        "the kernel warned: {warnings:#?}\n{}",
        out.summary()
    );
}

#[test]
fn xsave_state_is_consistent_for_linux_6_12() {
    let out = boot(Scenario::new("xsave-6-12").script(XSAVE_SCRIPT));
    assert!(marker(&out, "KERNEL").starts_with("6.12."));
    assert_xsave_consistent(&out);
}

/// Debian's Linux 7.x (trixie-backports) boots to /init: it panicked in
/// `fpu__init_system` on the inconsistent XSAVE sizes (issue 12). Its own
/// module set loads, the out-of-tree virtio_vfio_pci included (a module
/// that failed to load fails `boot`).
#[test]
fn linux_7_boots_with_xsave_and_its_modules() {
    let images = tests::host::guest_images().unwrap_or_else(|e| panic!("{e}"));
    let script = format!(
        "{XSAVE_SCRIPT}\necho \"@@T:MODULES=$(cut -d' ' -f1 /proc/modules | sort | tr '\\n' ' ')@@\"\n"
    );
    let out = boot(
        Scenario::new("xsave-7")
            .guest_kernel(&images.bzimage7)
            .script(&script),
    );
    let kernel = marker(&out, "KERNEL");
    assert!(
        kernel.starts_with("7."),
        "kernel {kernel}\n{}",
        out.summary()
    );
    assert_eq!(
        out.marker("CH-TEST:MODULES-SKIPPED"),
        None,
        "{}",
        out.summary()
    );
    let modules = marker(&out, "MODULES");
    for m in [
        "virtio_vfio_pci",
        "vfio_pci_core",
        "virtio_iommu",
        "virtio_blk",
    ] {
        assert!(
            modules.split_whitespace().any(|x| x == m),
            "{m} not loaded: {modules}\n{}",
            out.summary()
        );
    }
    assert_xsave_consistent(&out);
}
