//! The KVM state of an x86-64 vCPU and of the VM (in-kernel irqchip and
//! clock): what a snapshot saves and a restore puts back, and the order
//! KVM needs.

use kvm_bindings::{
    kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum KvmStateError {
    #[error("cannot read {what}: {source}")]
    Get {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot set {what}: {source}")]
    Set {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM set {set} of {total} MSRs (the first refused: {first_refused:#x})")]
    Msrs {
        set: usize,
        total: usize,
        first_refused: u32,
    },
    #[error("cannot build an MSR list: {0}")]
    MsrList(String),
}

/// Everything KVM holds of one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state (legacy 4 KiB XSAVE area).
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
}

/// How many MSRs one KVM_GET_MSRS asks for.
const MSR_BATCH: usize = 64;

/// The MSRs KVM can save and restore for this host (`KVM_GET_MSR_INDEX_LIST`).
pub fn msr_index_list(kvm: &Kvm) -> Result<Vec<u32>, KvmStateError> {
    kvm.get_msr_index_list()
        .map(|l| l.as_slice().to_vec())
        .map_err(|source| KvmStateError::Get {
            what: "the MSR index list",
            source,
        })
}

fn msrs_of(entries: &[kvm_msr_entry]) -> Result<Msrs, KvmStateError> {
    Msrs::from_entries(entries).map_err(|e| KvmStateError::MsrList(format!("{e:?}")))
}

/// Reads every MSR of `indices` that this vCPU has: KVM stops a batch at
/// the first MSR it cannot read, which is left out.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, KvmStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msrs_of(&entries)?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|source| KvmStateError::Get {
                what: "MSRs",
                source,
            })?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // Skip the one that failed, if the batch stopped early.
        let consumed = if n < batch.len() { n + 1 } else { n };
        rest = &rest[consumed..];
    }
    Ok(out)
}

impl VcpuState {
    /// Reads the state of vCPU `id`. Call from the vCPU's own thread while
    /// it is out of KVM_RUN.
    pub fn save(id: u8, fd: &VcpuFd, msr_indices: &[u32]) -> Result<Self, KvmStateError> {
        let get = |what: &'static str| move |source| KvmStateError::Get { what, source };
        // Events and MP state first: reading them settles what KVM holds
        // pending (as the kernel documents for migration).
        let mp_state = fd.get_mp_state().map_err(get("MP state"))?;
        let events = fd.get_vcpu_events().map_err(get("vCPU events"))?;
        Ok(VcpuState {
            id,
            regs: fd.get_regs().map_err(get("registers"))?,
            sregs: fd.get_sregs().map_err(get("special registers"))?,
            xsave: fd.get_xsave().map_err(get("XSAVE state"))?,
            xcrs: fd.get_xcrs().map_err(get("XCRs"))?,
            debugregs: fd.get_debug_regs().map_err(get("debug registers"))?,
            lapic: fd.get_lapic().map_err(get("local APIC"))?,
            msrs: read_msrs(fd, msr_indices)?,
            events,
            mp_state,
        })
    }

    /// Puts the state into a freshly created vCPU (CPUID already set), in
    /// the order KVM needs: special registers (APIC base) before the local
    /// APIC, the local APIC before the MSRs (TSC deadline), events last.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), KvmStateError> {
        let set = |what: &'static str| move |source| KvmStateError::Set { what, source };
        fd.set_mp_state(self.mp_state).map_err(set("MP state"))?;
        fd.set_regs(&self.regs).map_err(set("registers"))?;
        fd.set_sregs(&self.sregs)
            .map_err(set("special registers"))?;
        // SAFETY: this VMM never enables KVM_CAP_XSAVE2, so KVM_SET_XSAVE
        // reads exactly the size of `kvm_xsave`, which `self.xsave` is.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(set("XSAVE state"))?;
        fd.set_xcrs(&self.xcrs).map_err(set("XCRs"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(set("debug registers"))?;
        fd.set_lapic(&self.lapic).map_err(set("local APIC"))?;
        let msrs = msrs_of(&self.msrs)?;
        let n = fd.set_msrs(&msrs).map_err(set("MSRs"))?;
        if n != self.msrs.len() {
            return Err(KvmStateError::Msrs {
                set: n,
                total: self.msrs.len(),
                first_refused: self.msrs[n].index,
            });
        }
        fd.set_vcpu_events(&self.events)
            .map_err(set("vCPU events"))?;
        Ok(())
    }
}

/// The VM's in-kernel irqchip: both PICs and the IOAPIC.
#[derive(Serialize, Deserialize)]
pub struct IrqchipState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

impl IrqchipState {
    pub fn save(vm: &VmFd) -> Result<Self, KvmStateError> {
        let get = |chip_id| -> Result<kvm_irqchip, KvmStateError> {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut c)
                .map_err(|source| KvmStateError::Get {
                    what: "the irqchip",
                    source,
                })?;
            Ok(c)
        };
        Ok(IrqchipState {
            pic_master: get(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get(KVM_IRQCHIP_IOAPIC)?,
        })
    }

    pub fn restore(&self, vm: &VmFd) -> Result<(), KvmStateError> {
        for c in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(c).map_err(|source| KvmStateError::Set {
                what: "the irqchip",
                source,
            })?;
        }
        Ok(())
    }
}
