//! Checks of the real-guest runner itself, with a shell script standing in
//! for the VMM. In nested mode these boot the outer QEMU TCG host VM for real
//! (kvm + kvm_amd loaded, /dev/kvm present) and pass today, before the VMM
//! can boot anything; in direct mode the stand-in runs on the host.

use std::path::PathBuf;
use std::time::Duration;

use tests::pattern::pattern;
use tests::{Error, Mode, Runner, Scenario};

/// Writes a stand-in VMM script and returns a runner that uses it.
fn fake_vmm(name: &str, body: &str) -> Runner {
    let dir = tests::host::runs_dir().join("fake-vmm");
    std::fs::create_dir_all(&dir).unwrap();
    let path: PathBuf = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    Runner::with_vmm(&path).unwrap_or_else(|e| panic!("cannot set up the runner: {e}"))
}

#[test]
fn kvm_is_usable_where_the_vmm_runs() {
    let runner = fake_vmm(
        "kvm-check.sh",
        r#"if [ -c /dev/kvm ]; then echo "@@FAKE:KVM=present@@"; else echo "@@FAKE:KVM=absent@@"; fi
for m in kvm_amd kvm_intel; do
  [ -d /sys/module/$m ] && echo "@@FAKE:MODULE=$m@@"
done
exit 0"#,
    );
    let out = tests::run(&runner, &Scenario::new("harness-kvm"));
    eprintln!("{}", out.serial());
    assert_eq!(out.vmm_exit, 0, "{}", out.summary());
    assert_eq!(
        out.marker("FAKE:KVM").as_deref(),
        Some("present"),
        "{}",
        out.summary()
    );
    if runner.mode() != Mode::QemuReference {
        // Direct needs hardware KVM on the host; nested loads kvm_amd in the
        // outer VM. Either way a hardware KVM module backs /dev/kvm.
        assert!(
            out.marker("FAKE:MODULE").is_some(),
            "no kvm_amd/kvm_intel where the VMM runs\n{}",
            out.summary()
        );
    }
    if runner.mode() == Mode::Nested {
        assert_eq!(
            out.marker("CH-TEST:OUTER-KVM").as_deref(),
            Some("Y"),
            "kvm_amd without nested paging\n{}",
            out.summary()
        );
        assert!(
            out.time_to_exit() < Duration::from_secs(60),
            "{:?}",
            out.time_to_exit()
        );
    }
}

#[test]
fn arguments_and_files_travel_both_ways() {
    // The stand-in checks its arguments, the kernel/initrd it was handed and
    // the disk contents, then writes into both files.
    let runner = fake_vmm(
        "files.sh",
        r#"n=0
for a in "$@"; do n=$((n+1)); echo "@@FAKE:ARG$n=$a@@"; done
[ -s guest-bzImage ] && [ -s guest-initrd ] && echo "@@FAKE:KERNEL=ok@@"
cmp disk.img expected.img && echo "@@FAKE:DISK=same@@"
echo "@@FAKE:NOTE=$(cat sub/note.txt)@@"
printf 'written-by-vmm' | dd of=disk.img bs=1 seek=4096 conv=notrunc 2>/dev/null
printf 'NOTE' | dd of=sub/note.txt bs=1 conv=notrunc 2>/dev/null
exit 0"#,
    );
    let disk = pattern(7, 64 * 1024);
    let note = b"note: odd sized file\n".to_vec();
    let scenario = Scenario::new("harness-files")
        .args(["--disk", "path=disk.img"])
        .cmdline("console=ttyS0 with  spaces and 'quotes' \"too\"")
        .file("disk.img", disk.clone())
        .file("expected.img", disk.clone())
        .file("sub/note.txt", note.clone());
    let out = tests::run(&runner, &scenario);
    assert_eq!(out.vmm_exit, 0, "{}", out.summary());
    let args = out.markers("FAKE:ARG1");
    assert_eq!(args, vec!["--kernel".to_string()], "{}", out.summary());
    let all: Vec<String> = (1..=20)
        .filter_map(|i| out.marker(&format!("FAKE:ARG{i}")))
        .collect();
    assert_eq!(all, scenario.full_args(), "{}", out.summary());
    assert_eq!(out.marker("FAKE:KERNEL").as_deref(), Some("ok"));
    assert_eq!(
        out.marker("FAKE:DISK").as_deref(),
        Some("same"),
        "{}",
        out.summary()
    );
    assert_eq!(
        out.marker("FAKE:NOTE").as_deref(),
        Some("note: odd sized file")
    );

    let mut expected = disk.clone();
    expected[4096..4096 + 14].copy_from_slice(b"written-by-vmm");
    let back = out.read_file("disk.img").unwrap();
    assert_eq!(back.len(), expected.len());
    assert!(back == expected, "disk.img did not come back as written");
    let mut expected_note = note.clone();
    expected_note[..4].copy_from_slice(b"NOTE");
    assert_eq!(
        String::from_utf8_lossy(&out.read_file("sub/note.txt").unwrap()),
        String::from_utf8_lossy(&expected_note)
    );
}

#[test]
fn exit_status_is_reported() {
    let runner = fake_vmm("exit7.sh", "echo failing on purpose; exit 7");
    let out = tests::run(&runner, &Scenario::new("harness-exit"));
    assert_eq!(out.vmm_exit, 7, "{}", out.summary());
    assert!(out.serial().contains("failing on purpose"));
}

#[test]
fn a_hung_vmm_times_out_with_its_output() {
    let runner = fake_vmm("hang.sh", "echo '@@FAKE:HANGING@@'; exec sleep 1000");
    let limit = match runner.mode() {
        Mode::Direct => Duration::from_secs(3),
        _ => Duration::from_secs(40),
    };
    let scenario = Scenario::new("harness-hang").timeout(limit);
    let started = std::time::Instant::now();
    match runner.run(&scenario) {
        Err(Error::Timeout { tail, limit: l, .. }) => {
            assert_eq!(l, limit);
            assert!(tail.contains("@@FAKE:HANGING@@"), "tail: {tail}");
            let msg = Error::Timeout {
                what: "x".into(),
                limit,
                tail,
            }
            .to_string();
            assert!(msg.contains("did not finish within"));
        }
        Err(e) => panic!("expected a timeout, got: {e}"),
        Ok(out) => panic!("expected a timeout, got a result:\n{}", out.summary()),
    }
    assert!(started.elapsed() < limit + Duration::from_secs(20));
}

/// A VMM that stops making progress (here: never boots the guest) is
/// caught by the guest-boot step's own deadline, not the run's overall
/// limit; the runner asks it for its state dump (SIGUSR1, through the
/// outer VM's console in nested mode) and the error carries the dump.
#[test]
fn a_stalled_vmm_is_caught_by_its_step_and_dumped() {
    let runner = fake_vmm(
        "stall.sh",
        r#"trap 'echo "@@CH-DUMP:BEGIN=1@@"; echo "fake-vcpu: parked at the test"; echo "@@CH-DUMP:END=1@@"' USR1
echo '@@FAKE:WAITING@@'
while true; do sleep 0.2; done"#,
    );
    let boot = Duration::from_secs(4);
    let scenario = Scenario::new("harness-stall").boot_limit(boot);
    let started = std::time::Instant::now();
    match runner.run(&scenario) {
        Err(Error::Stalled {
            overdue,
            dump,
            tail,
            ..
        }) => {
            assert!(overdue.contains("'guest boot'"), "{overdue}");
            assert!(
                dump.contains("fake-vcpu: parked at the test"),
                "no dump:\n{dump}\ntail:\n{tail}"
            );
            assert!(tail.contains("@@FAKE:WAITING@@"), "tail: {tail}");
        }
        Err(e) => panic!("expected a stall, got: {e}"),
        Ok(out) => panic!("expected a stall, got a result:\n{}", out.summary()),
    }
    // Outer boot (nested) + the boot step + the dump, far below the
    // overall limit.
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "took {:?}",
        started.elapsed()
    );
}
