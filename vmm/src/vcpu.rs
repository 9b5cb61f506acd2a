//! vCPU threads: configuration for boot and the KVM_RUN loop.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{kvm_lapic_state, kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use thiserror::Error;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::arch::kvm_state::{KvmStateError, VcpuState};
use crate::arch::{boot, cpuid};
use crate::pause::PauseGate;
use crate::platform::Platform;
use crate::watchdog::{ExitKind, ExitWatch};

#[derive(Debug, Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {id}: {source}")]
    Create { id: u8, source: kvm_ioctls::Error },
    #[error("cannot read KVM's supported CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("cannot configure vCPU {id} ({what}): {source}")]
    Configure {
        id: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot register the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("cannot spawn vCPU thread: {0}")]
    Spawn(std::io::Error),
}

/// The signal used to kick a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler of the kick signal, so that the signal only
/// interrupts KVM_RUN with EINTR.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::Signal)
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_TPR: usize = 0x80;
const APIC_SVR: usize = 0xf0;
const APIC_ISR: usize = 0x100;
const APIC_IRR: usize = 0x200;
const APIC_LVTT: usize = 0x320;
const APIC_TMICT: usize = 0x380;
const APIC_TMCCT: usize = 0x390;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = &l.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *b as _;
    }
}

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// One vCPU before it runs.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    /// The MSRs a snapshot saves.
    msr_indices: Arc<Vec<u32>>,
}

impl Vcpu {
    /// Creates vCPU `id` of `count` and gives it its CPUID and local APIC
    /// LINT setup; the boot vCPU also gets the 64-bit entry state.
    pub fn new(
        kvm: &Kvm,
        vm: &VmFd,
        id: u8,
        count: u8,
        entry: Option<boot::EntryPoint>,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(id as u64)
            .map_err(|source| VcpuError::Create { id, source })?;
        let cfg = |what: &'static str| move |source| VcpuError::Configure { id, what, source };
        let mut cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(VcpuError::SupportedCpuid)?;
        if id == 0 {
            for e in cpuid
                .as_slice()
                .iter()
                .filter(|e| matches!(e.function, 1 | 7 | 0xd))
            {
                log::debug!(
                    "CPUID {:#x}.{}: eax={:#x} ebx={:#x} ecx={:#x} edx={:#x}",
                    e.function,
                    e.index,
                    e.eax,
                    e.ebx,
                    e.ecx,
                    e.edx
                );
            }
        }
        cpuid::adjust(&mut cpuid, id, count);
        fd.set_cpuid2(&cpuid).map_err(cfg("CPUID"))?;
        if let Some(xcr0) = cpuid::initial_xcr0(&cpuid) {
            let mut xcrs = kvm_bindings::kvm_xcrs {
                nr_xcrs: 1,
                ..Default::default()
            };
            xcrs.xcrs[0].xcr = 0;
            xcrs.xcrs[0].value = xcr0;
            fd.set_xcrs(&xcrs).map_err(cfg("XCR0"))?;
        }

        let mut lapic = fd.get_lapic().map_err(cfg("get LAPIC"))?;
        let lvt0 = lapic_reg(&lapic, APIC_LVT0);
        set_lapic_reg(
            &mut lapic,
            APIC_LVT0,
            set_delivery_mode(lvt0, APIC_MODE_EXTINT),
        );
        let lvt1 = lapic_reg(&lapic, APIC_LVT1);
        set_lapic_reg(
            &mut lapic,
            APIC_LVT1,
            set_delivery_mode(lvt1, APIC_MODE_NMI),
        );
        fd.set_lapic(&lapic).map_err(cfg("set LAPIC"))?;

        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: 1,
            ..Default::default()
        }])
        .map_err(|_| VcpuError::Configure {
            id,
            what: "MSR list",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        fd.set_msrs(&msrs).map_err(cfg("MSRs"))?;

        if let Some(entry) = entry {
            let sregs = fd.get_sregs().map_err(cfg("get sregs"))?;
            fd.set_sregs(&boot::boot_sregs(sregs))
                .map_err(cfg("set sregs"))?;
            fd.set_regs(&boot::boot_regs(entry))
                .map_err(cfg("set regs"))?;
            fd.set_fpu(&boot::boot_fpu()).map_err(cfg("set FPU"))?;
        }
        Ok(Vcpu {
            id,
            fd,
            msr_indices: Arc::new(Vec::new()),
        })
    }

    /// The MSRs a snapshot of this vCPU saves (KVM's index list).
    pub fn set_msr_indices(&mut self, indices: Arc<Vec<u32>>) {
        self.msr_indices = indices;
    }

    /// Puts a saved state into this vCPU before it first runs (from the
    /// thread that created it).
    pub fn restore(&self, state: &VcpuState) -> Result<(), KvmStateError> {
        state.restore(&self.fd)
    }

    /// Runs the vCPU on its own thread until `stop` is set (the thread is
    /// kicked with [`kick_signal`]) or the guest powers off, resets or fails.
    /// While `gate` is closed (the VM paused) the thread parks before it
    /// enters KVM_RUN again.
    pub fn spawn(
        self,
        platform: Arc<Platform>,
        watch: Arc<ExitWatch>,
        report: Arc<VcpuReport>,
        stop: Arc<AtomicBool>,
        gate: Arc<PauseGate>,
    ) -> Result<JoinHandle<()>, VcpuError> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Vcpu);
                self.run(&platform, &watch, &report, &stop, &gate)
            })
            .map_err(VcpuError::Spawn)
    }

    fn run(
        mut self,
        platform: &Platform,
        watch: &ExitWatch,
        report: &VcpuReport,
        stop: &AtomicBool,
        gate: &PauseGate,
    ) {
        let id = self.id as usize;
        let mut answered = 0u64;
        let mut saved = 0u64;
        while !stop.load(Ordering::Acquire) {
            let fd = &self.fd;
            let (vcpu_id, msrs) = (self.id, &self.msr_indices);
            let mut answer = || {
                let wanted = report.requested.load(Ordering::Acquire);
                if wanted != answered {
                    report.answer(wanted, describe_vcpu(fd));
                    answered = wanted;
                }
                let wanted = report.save_requested.load(Ordering::Acquire);
                if wanted != saved {
                    let state = VcpuState::save(vcpu_id, fd, msrs).map_err(|e| e.to_string());
                    report.save_answer(wanted, state);
                    saved = wanted;
                }
            };
            answer();
            // Paused: parked here (still answering dumps) until resumed.
            if gate.park(stop, &mut answer) && stop.load(Ordering::Acquire) {
                break;
            }
            watch.run_enter(id);
            let exit = self.fd.run();
            watch.run_leave(id);
            match exit {
                Ok(VcpuExit::IoIn(port, data)) => {
                    watch.enter(id, ExitKind::PioIn, port as u64);
                    platform.pio_read(port, data);
                    watch.leave(id);
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    watch.enter(id, ExitKind::PioOut, port as u64);
                    platform.pio_write(port, data);
                    watch.leave(id);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    watch.enter(id, ExitKind::MmioRead, addr);
                    platform.mmio_read(addr, data);
                    watch.leave(id);
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    watch.enter(id, ExitKind::MmioWrite, addr);
                    platform.mmio_write(addr, data);
                    watch.leave(id);
                }
                Ok(VcpuExit::Hlt) => {}
                Ok(VcpuExit::Shutdown) => {
                    log::info!(
                        "vCPU {}: triple fault or shutdown: treating as reset",
                        self.id
                    );
                    platform.request_exit(crate::platform::ExitReason::Reset);
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    log::info!("vCPU {}: system event {kind}", self.id);
                    platform.request_exit(crate::platform::ExitReason::Reset);
                }
                Ok(VcpuExit::InternalError) => {
                    platform.request_exit(crate::platform::ExitReason::Error(format!(
                        "vCPU {}: KVM internal error",
                        self.id
                    )));
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    platform.request_exit(crate::platform::ExitReason::Error(format!(
                        "vCPU {}: KVM entry failure, reason {reason:#x} on host CPU {cpu}",
                        self.id
                    )));
                }
                Ok(other) => {
                    platform.request_exit(crate::platform::ExitReason::Error(format!(
                        "vCPU {}: unexpected exit {other:?}",
                        self.id
                    )));
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    platform.request_exit(crate::platform::ExitReason::Error(format!(
                        "vCPU {}: KVM_RUN failed: {e}",
                        self.id
                    )));
                }
            }
            if platform.exit_requested() {
                break;
            }
        }
    }
}

/// A request for a vCPU's state, answered by the vCPU thread itself (only
/// it may issue ioctls on its file descriptor while it runs): the dump bumps
/// `requested` and kicks the thread out of KVM_RUN; the thread answers
/// before it enters KVM_RUN again.
///
/// A snapshot asks the same way for the vCPU's [`VcpuState`]; a paused
/// vCPU answers from where it is parked.
#[derive(Default)]
pub struct VcpuReport {
    requested: AtomicU64,
    answer: Mutex<Option<(u64, String)>>,
    save_requested: AtomicU64,
    saved: Mutex<Option<(u64, Result<VcpuState, String>)>>,
}

impl VcpuReport {
    /// Asks for a new report; returns its number.
    pub fn request(&self) -> u64 {
        self.requested.fetch_add(1, Ordering::AcqRel) + 1
    }

    fn answer(&self, n: u64, text: String) {
        *self.answer.lock().unwrap_or_else(|e| e.into_inner()) = Some((n, text));
    }

    /// Asks for the vCPU's state; returns the request's number.
    pub fn request_save(&self) -> u64 {
        self.save_requested.fetch_add(1, Ordering::AcqRel) + 1
    }

    fn save_answer(&self, n: u64, state: Result<VcpuState, String>) {
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some((n, state));
    }

    /// The state saved for request `n`, if the vCPU gave it (taken).
    pub fn take_saved(&self, n: u64) -> Option<Result<VcpuState, String>> {
        let mut a = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        match &*a {
            Some((got, _)) if *got >= n => a.take().map(|(_, s)| s),
            _ => None,
        }
    }

    /// The answer to request `n`, if the vCPU gave it.
    pub fn answered(&self, n: u64) -> Option<String> {
        let a = self.answer.lock().unwrap_or_else(|e| e.into_inner());
        match &*a {
            Some((got, text)) if *got >= n => Some(text.clone()),
            _ => None,
        }
    }
}

/// The vCPU's registers, pending events, MP state and local APIC as the
/// dump shows them (each item `name=value`; unreadable items say why).
fn describe_vcpu(fd: &VcpuFd) -> String {
    let mut out = Vec::new();
    match fd.get_regs() {
        Ok(r) => out.push(format!(
            "rip={:#x} rflags={:#x} (IF={}) rsp={:#x} rax={:#x} rcx={:#x} rdx={:#x}",
            r.rip,
            r.rflags,
            (r.rflags >> 9) & 1,
            r.rsp,
            r.rax,
            r.rcx,
            r.rdx
        )),
        Err(e) => out.push(format!("regs: {e}")),
    }
    match fd.get_sregs() {
        Ok(s) => out.push(format!(
            "cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
            s.cr0, s.cr3, s.cr4, s.efer, s.cs.selector
        )),
        Err(e) => out.push(format!("sregs: {e}")),
    }
    match fd.get_mp_state() {
        Ok(m) => out.push(format!(
            "mp_state={}",
            match m.mp_state {
                0 => "RUNNABLE".to_string(),
                1 => "UNINITIALIZED".to_string(),
                2 => "INIT_RECEIVED".to_string(),
                3 => "HALTED".to_string(),
                4 => "SIPI_RECEIVED".to_string(),
                n => n.to_string(),
            }
        )),
        Err(e) => out.push(format!("mp_state: {e}")),
    }
    match fd.get_vcpu_events() {
        Ok(ev) => out.push(format!(
            "events: exception(injected={} pending={} nr={}) interrupt(injected={} nr={} shadow={}) nmi(injected={} pending={} masked={})",
            ev.exception.injected,
            ev.exception.pending,
            ev.exception.nr,
            ev.interrupt.injected,
            ev.interrupt.nr,
            ev.interrupt.shadow,
            ev.nmi.injected,
            ev.nmi.pending,
            ev.nmi.masked
        )),
        Err(e) => out.push(format!("events: {e}")),
    }
    match fd.get_lapic() {
        Ok(l) => {
            let highest = |base: usize| {
                (0..8)
                    .rev()
                    .find_map(|i| {
                        let w = lapic_reg(&l, base + 0x10 * i);
                        (w != 0).then(|| i as u32 * 32 + 31 - w.leading_zeros())
                    })
                    .map_or("none".to_string(), |v| v.to_string())
            };
            out.push(format!(
                "lapic: tpr={:#x} isr_highest={} irr_highest={} lvtt={:#x} tmict={:#x} tmcct={:#x} svr={:#x}",
                lapic_reg(&l, APIC_TPR),
                highest(APIC_ISR),
                highest(APIC_IRR),
                lapic_reg(&l, APIC_LVTT),
                lapic_reg(&l, APIC_TMICT),
                lapic_reg(&l, APIC_TMCCT),
                lapic_reg(&l, APIC_SVR)
            ));
        }
        Err(e) => out.push(format!("lapic: {e}")),
    }
    let mut msrs = Msrs::from_entries(&[
        kvm_msr_entry {
            index: MSR_IA32_TSC,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_IA32_TSC_DEADLINE,
            ..Default::default()
        },
    ])
    .ok();
    if let Some(m) = msrs.as_mut() {
        match fd.get_msrs(m) {
            Ok(2) => {
                let e = m.as_slice();
                out.push(format!("tsc={} tsc_deadline={}", e[0].data, e[1].data));
            }
            Ok(n) => out.push(format!("msrs: read {n} of 2")),
            Err(e) => out.push(format!("msrs: {e}")),
        }
    }
    out.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_delivery_modes() {
        assert_eq!(
            set_delivery_mode(0x0001_0000, APIC_MODE_EXTINT),
            0x0001_0700
        );
        assert_eq!(set_delivery_mode(0x0000_0700, APIC_MODE_NMI), 0x0000_0400);
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT0, 0xdead_beef);
        assert_eq!(lapic_reg(&l, APIC_LVT0), 0xdead_beef);
    }
}
