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

/// The KVM operations interrupt routing needs: the real VM, or a fake in
/// unit tests.
pub trait IrqChip: Send + Sync {
    fn set_gsi_routing(&self, table: &KvmIrqRouting) -> Result<(), kvm_ioctls::Error>;
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error>;
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error>;
}

impl IrqChip for VmFd {
    fn set_gsi_routing(&self, table: &KvmIrqRouting) -> Result<(), kvm_ioctls::Error> {
        VmFd::set_gsi_routing(self, table)
    }
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        VmFd::register_irqfd(self, fd, gsi)
    }
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        VmFd::unregister_irqfd(self, fd, gsi)
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
    vm: Arc<dyn IrqChip>,
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
    pub fn new(vm: Arc<dyn IrqChip>, max_gsi: u32) -> Result<Arc<Self>, InterruptError> {
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

    /// Removes the routes of `gsis` and gives the GSIs back for reuse.
    fn release(&self, gsis: &[u32]) {
        let mut r = self.lock();
        let had_routes = gsis.iter().any(|g| r.msi.contains_key(g));
        for g in gsis {
            r.msi.remove(g);
        }
        r.free.extend_from_slice(gsis);
        if had_routes {
            if let Err(e) = self.commit(&r) {
                log::warn!("removing MSI routes: {e}");
            }
        }
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
    /// Unregisters the irqfds registered so far (all of them, or those
    /// before a failure part way through [`MsiManager::create_group`]),
    /// removes the routes and gives every GSI back.
    fn drop(&mut self) {
        for (gsi, e) in self.gsis.iter().zip(&self.events) {
            let _ = self.manager.vm.unregister_irqfd(e, *gsi);
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
        // Built up in place: on an error part way, dropping the group
        // undoes what was done (irqfds registered, GSIs allocated).
        let mut group = MsiGroup {
            manager: self.0.clone(),
            events: Vec::with_capacity(gsis.len()),
            gsis,
        };
        for i in 0..group.gsis.len() {
            let gsi = group.gsis[i];
            let e = EventFd::new(libc::EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
            self.0
                .vm
                .register_irqfd(&e, gsi)
                .map_err(|source| InterruptError::Irqfd { gsi, source })?;
            group.events.push(e);
        }
        log::debug!(
            "{bdf}: {vectors} MSI-X vectors on GSIs {:?}",
            group.gsis.first()
        );
        Ok(Arc::new(group))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::os::fd::AsRawFd;

    /// A fake VM: records routes and irqfds; can fail the Nth irqfd
    /// registration.
    #[derive(Default)]
    struct FakeChip {
        irqfds: Mutex<BTreeSet<(i32, u32)>>,
        routes: Mutex<Vec<kvm_irq_routing_entry>>,
        registrations: Mutex<usize>,
        fail_at: Option<usize>,
    }

    impl IrqChip for FakeChip {
        fn set_gsi_routing(&self, table: &KvmIrqRouting) -> Result<(), kvm_ioctls::Error> {
            *self.routes.lock().unwrap() = table.as_slice().to_vec();
            Ok(())
        }
        fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
            let mut n = self.registrations.lock().unwrap();
            *n += 1;
            if Some(*n) == self.fail_at {
                return Err(kvm_ioctls::Error::new(libc::ENOSPC));
            }
            self.irqfds.lock().unwrap().insert((fd.as_raw_fd(), gsi));
            Ok(())
        }
        fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
            self.irqfds.lock().unwrap().remove(&(fd.as_raw_fd(), gsi));
            Ok(())
        }
    }

    fn msi_routes(chip: &FakeChip) -> Vec<u32> {
        chip.routes
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.type_ == KVM_IRQ_ROUTING_MSI)
            .map(|e| e.gsi)
            .collect()
    }

    fn msg(n: u32) -> MsiMessage {
        MsiMessage {
            address: 0xfee0_0000,
            data: n,
        }
    }

    #[test]
    fn a_failed_group_gives_back_everything() {
        let chip = Arc::new(FakeChip {
            fail_at: Some(3),
            ..Default::default()
        });
        let m = MsiManager(KvmInterruptManager::new(chip.clone(), 100).unwrap());
        let err = m
            .create_group(Bdf::new(0, 3, 0), 4)
            .err()
            .expect("must fail");
        assert!(
            err.to_string().contains("KVM_IRQFD failed for GSI 26"),
            "{err}"
        );
        assert!(chip.irqfds.lock().unwrap().is_empty(), "irqfds leaked");
        // The same four GSIs come back: none was lost.
        let g = m.0.allocate(4).unwrap();
        let set: BTreeSet<u32> = g.iter().copied().collect();
        assert_eq!(set, (24..28).collect());
        assert_eq!(m.0.lock().next_gsi, 28);
    }

    #[test]
    fn gsis_of_dropped_groups_are_reused_and_routes_removed() {
        let chip = Arc::new(FakeChip::default());
        let m = MsiManager(KvmInterruptManager::new(chip.clone(), 40).unwrap());
        // Legacy routes only, at first.
        assert!(msi_routes(&chip).is_empty());
        assert!(chip.routes.lock().unwrap().len() >= 24);
        for cycle in 0..100 {
            let a = m.create_group(Bdf::new(0, 3, 0), 8).unwrap();
            let b = m.create_group(Bdf::new(0, 3, 1), 8).unwrap();
            a.update(0, msg(1), false).unwrap();
            b.update(7, msg(2), false).unwrap();
            a.update(1, msg(3), true).unwrap();
            assert_eq!(msi_routes(&chip).len(), 2, "cycle {cycle}");
            assert_eq!(chip.irqfds.lock().unwrap().len(), 16);
            a.trigger(0).unwrap();
            assert!(a.trigger(8).is_err(), "vector out of range");
            drop(a);
            drop(b);
            assert!(msi_routes(&chip).is_empty(), "routes left after drop");
            assert!(chip.irqfds.lock().unwrap().is_empty());
        }
        // 100 cycles of 16 vectors fit in 16 GSIs (24..40).
        assert_eq!(m.0.lock().next_gsi, 40);
        assert!(
            m.create_group(Bdf::new(0, 4, 0), 17).is_err(),
            "out of GSIs"
        );
    }
}
