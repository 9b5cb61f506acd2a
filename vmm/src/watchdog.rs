//! A diagnostic watchdog: each vCPU publishes when it entered an I/O or MMIO
//! exit handler and for which address; a thread warns about any vCPU that
//! has been inside one handler for longer than [`STALL`]. A handler that
//! never returns (a device blocked on a lock) then leaves a log line naming
//! the vCPU and the address instead of a silent hang.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long one exit may take before it is reported.
pub const STALL: Duration = Duration::from_secs(5);

/// The exit a vCPU is handling now.
#[derive(Default)]
pub struct ExitSlot {
    /// Milliseconds since the watchdog's epoch plus one; 0 when idle.
    since: AtomicU64,
    addr: AtomicU64,
}

/// Per-vCPU exit slots.
pub struct ExitWatch {
    epoch: Instant,
    slots: Vec<ExitSlot>,
}

impl ExitWatch {
    pub fn new(vcpus: usize) -> Arc<Self> {
        Arc::new(ExitWatch {
            epoch: Instant::now(),
            slots: (0..vcpus).map(|_| ExitSlot::default()).collect(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// vCPU `id` starts handling an exit at `addr` (port or guest address).
    pub fn enter(&self, id: usize, addr: u64) {
        if let Some(s) = self.slots.get(id) {
            s.addr.store(addr, Ordering::Relaxed);
            s.since.store(self.now_ms(), Ordering::Release);
        }
    }

    /// vCPU `id` finished its exit.
    pub fn leave(&self, id: usize) {
        if let Some(s) = self.slots.get(id) {
            s.since.store(0, Ordering::Release);
        }
    }

    /// The vCPUs stuck in one exit for longer than `limit`: (vCPU, address,
    /// how long).
    pub fn stalled(&self, limit: Duration) -> Vec<(usize, u64, Duration)> {
        let now = self.now_ms();
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let since = s.since.load(Ordering::Acquire);
                let held = Duration::from_millis(now.saturating_sub(since));
                (since != 0 && held > limit).then(|| (i, s.addr.load(Ordering::Relaxed), held))
            })
            .collect()
    }

    /// Checks every second until `stop` and logs stalled vCPUs once per
    /// stall.
    pub fn spawn(self: &Arc<Self>, stop: Arc<AtomicBool>) {
        let me = self.clone();
        let _ = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                let mut reported: Vec<(usize, u64)> = Vec::new();
                while !stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_secs(1));
                    let now = me.stalled(STALL);
                    for (id, addr, held) in &now {
                        if !reported.contains(&(*id, *addr)) {
                            log::warn!(
                                "vCPU {id} has been handling the exit at {addr:#x} for {:.1} s (a device blocked?)",
                                held.as_secs_f64()
                            );
                        }
                    }
                    reported = now.iter().map(|(i, a, _)| (*i, *a)).collect();
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_only_long_exits() {
        let w = ExitWatch::new(2);
        w.enter(0, 0xe000_0000);
        w.enter(1, 0x3f8);
        w.leave(1);
        std::thread::sleep(Duration::from_millis(30));
        let s = w.stalled(Duration::from_millis(10));
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].0, s[0].1), (0, 0xe000_0000));
        assert!(w.stalled(Duration::from_secs(10)).is_empty());
        w.leave(0);
        assert!(w.stalled(Duration::ZERO).is_empty());
        // Out-of-range vCPU ids are ignored.
        w.enter(7, 1);
        w.leave(7);
    }
}
