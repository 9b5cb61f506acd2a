//! MSI delivery through KVM GSI routing and irqfds.
//!
//! Each MSI-X vector of each function gets its own GSI and eventfd,
//! registered with KVM as an irqfd. When the guest programs or masks a
//! vector, the routing entry of its GSI is updated and the whole routing
//! table (legacy IOAPIC/PIC pins included) is handed to KVM again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use pci::{Bdf, InterruptManager, InterruptSourceGroup, MsiMessage};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

/// GSIs 0..24 are the IOAPIC pins.
const IOAPIC_PINS: u32 = 24;

#[derive(Debug, Error)]
pub enum InterruptError {
    #[error("out of GSIs for MSI routes")]
    NoGsi,
    #[error("KVM_SET_GSI_ROUTING failed: {0}")]
    SetRouting(kvm_ioctls::Error),
    #[error("KVM_IRQFD failed for GSI {gsi}: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("cannot create eventfd: {0}")]
    EventFd(std::io::Error),
}

impl From<InterruptError> for std::io::Error {
    fn from(e: InterruptError) -> Self {
        std::io::Error::other(e.to_string())
    }
}

struct Routes {
    next_gsi: u32,
    /// GSIs given back by dropped groups (VFs removed), reused first.
    free: Vec<u32>,
    msi: BTreeMap<u32, kvm_irq_routing_entry>,
}

/// Owns the VM's GSI routing table.
pub struct KvmInterruptManager {
    vm: Arc<VmFd>,
    max_gsi: u32,
    routes: Mutex<Routes>,
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_entry(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = msg.address as u32;
    e.u.msi.address_hi = (msg.address >> 32) as u32;
    e.u.msi.data = msg.data;
    e
}

impl KvmInterruptManager {
    /// Creates the manager and installs the legacy routes (IOAPIC pins
    /// 0..24, PIC lines 0..16).
    pub fn new(vm: Arc<VmFd>, max_gsi: u32) -> Result<Arc<Self>, InterruptError> {
        let m = Arc::new(KvmInterruptManager {
            vm,
            max_gsi,
            routes: Mutex::new(Routes {
                next_gsi: IOAPIC_PINS,
                free: Vec::new(),
                msi: BTreeMap::new(),
            }),
        });
        let routes = m.lock();
        m.commit(&routes)?;
        drop(routes);
        Ok(m)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        // A poisoned lock only means another thread panicked while holding
        // it; the routes themselves are always consistent.
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn commit(&self, routes: &Routes) -> Result<(), InterruptError> {
        let mut entries = Vec::with_capacity(40 + routes.msi.len());
        for pin in 0..IOAPIC_PINS {
            entries.push(irqchip_entry(pin, KVM_IRQCHIP_IOAPIC, pin));
        }
        for line in 0..16u32 {
            if line == 2 {
                continue;
            }
            let (chip, pin) = if line < 8 {
                (KVM_IRQCHIP_PIC_MASTER, line)
            } else {
                (KVM_IRQCHIP_PIC_SLAVE, line - 8)
            };
            entries.push(irqchip_entry(line, chip, pin));
        }
        entries.extend(routes.msi.values().copied());
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| InterruptError::NoGsi)?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(InterruptError::SetRouting)
    }

    fn allocate(&self, n: u16) -> Result<Vec<u32>, InterruptError> {
        let mut r = self.lock();
        let n = n as usize;
        let fresh = n.saturating_sub(r.free.len()) as u32;
        if r.next_gsi + fresh > self.max_gsi {
            return Err(InterruptError::NoGsi);
        }
        let reused = n - fresh as usize;
        let at = r.free.len() - reused;
        let mut gsis: Vec<u32> = r.free.split_off(at);
        let first = r.next_gsi;
        r.next_gsi += fresh;
        gsis.extend(first..first + fresh);
        Ok(gsis)
    }

    /// Gives GSIs back for reuse (their routes are already removed).
    fn release(&self, gsis: &[u32]) {
        self.lock().free.extend_from_slice(gsis);
    }

    fn set_route(&self, gsi: u32, route: Option<MsiMessage>) -> Result<(), InterruptError> {
        let mut r = self.lock();
        match route {
            Some(msg) => {
                r.msi.insert(gsi, msi_entry(gsi, msg));
            }
            None => {
                r.msi.remove(&gsi);
            }
        }
        self.commit(&r)
    }
}

/// The MSI-X vectors of one function.
pub struct MsiGroup {
    manager: Arc<KvmInterruptManager>,
    gsis: Vec<u32>,
    events: Vec<EventFd>,
}

impl InterruptSourceGroup for MsiGroup {
    fn trigger(&self, vector: u16) -> std::io::Result<()> {
        match self.events.get(vector as usize) {
            Some(e) => e.write(1),
            None => Err(std::io::Error::other(format!(
                "MSI-X vector {vector} out of range"
            ))),
        }
    }

    fn update(&self, vector: u16, msg: MsiMessage, masked: bool) -> std::io::Result<()> {
        let Some(gsi) = self.gsis.get(vector as usize) else {
            return Ok(());
        };
        let route = if masked { None } else { Some(msg) };
        Ok(self.manager.set_route(*gsi, route)?)
    }
}

impl Drop for MsiGroup {
    fn drop(&mut self) {
        for (gsi, e) in self.gsis.iter().zip(&self.events) {
            let _ = self.manager.vm.unregister_irqfd(e, *gsi);
            let _ = self.manager.set_route(*gsi, None);
        }
        self.manager.release(&self.gsis);
    }
}

/// The `pci::InterruptManager` the device model uses to get vectors for
/// functions, including VFs created at run time.
pub struct MsiManager(pub Arc<KvmInterruptManager>);

impl InterruptManager for MsiManager {
    fn create_group(
        &self,
        bdf: Bdf,
        vectors: u16,
    ) -> std::io::Result<Arc<dyn InterruptSourceGroup>> {
        let gsis = self.0.allocate(vectors)?;
        let mut events = Vec::with_capacity(gsis.len());
        for gsi in &gsis {
            let e = EventFd::new(libc::EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
            self.0
                .vm
                .register_irqfd(&e, *gsi)
                .map_err(|source| InterruptError::Irqfd { gsi: *gsi, source })?;
            events.push(e);
        }
        log::debug!("{bdf}: {vectors} MSI-X vectors on GSIs {:?}", gsis.first());
        Ok(Arc::new(MsiGroup {
            manager: self.0.clone(),
            gsis,
            events,
        }))
    }
}
