//! What each vCPU is doing, for diagnostics: each vCPU publishes when it
//! entered KVM_RUN, when it entered an I/O or MMIO exit handler and for
//! which address, and counts its exits. A watchdog thread warns about any
//! vCPU that has been inside one handler for longer than [`STALL`] (a
//! handler that never returns, say a device blocked on a lock, leaves a log
//! line naming the vCPU and the address instead of a silent hang), and the
//! state dump ([`crate::dump`]) reads the same slots.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long one exit may take before it is reported.
pub const STALL: Duration = Duration::from_secs(5);

/// Kinds of exit a vCPU handles in userspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    PioIn = 1,
    PioOut = 2,
    MmioRead = 3,
    MmioWrite = 4,
    Other = 5,
}

impl ExitKind {
    fn from_u64(v: u64) -> Option<Self> {
        Some(match v {
            1 => ExitKind::PioIn,
            2 => ExitKind::PioOut,
            3 => ExitKind::MmioRead,
            4 => ExitKind::MmioWrite,
            5 => ExitKind::Other,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            ExitKind::PioIn => "port read",
            ExitKind::PioOut => "port write",
            ExitKind::MmioRead => "MMIO read",
            ExitKind::MmioWrite => "MMIO write",
            ExitKind::Other => "other exit",
        }
    }
}

/// What one vCPU is doing now.
#[derive(Default)]
pub struct ExitSlot {
    /// Milliseconds since the watchdog's epoch plus one when the handler
    /// was entered; 0 when not in a handler.
    since: AtomicU64,
    addr: AtomicU64,
    kind: AtomicU64,
    /// Milliseconds since the epoch plus one when KVM_RUN was entered; 0
    /// when the thread is outside KVM_RUN.
    in_guest_since: AtomicU64,
    exits: AtomicU64,
}

/// Per-vCPU slots.
pub struct ExitWatch {
    epoch: Instant,
    slots: Vec<ExitSlot>,
}

/// A vCPU's activity as the dump reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Activity {
    /// Inside KVM_RUN (running guest code or halted in the kernel).
    InGuest { for_: Duration },
    /// Inside an exit handler.
    Handling {
        kind: ExitKind,
        addr: u64,
        for_: Duration,
    },
    /// Neither (between exits, stopping, or not started).
    Outside,
}

/// A vCPU's activity, exit count and last userspace exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuActivity {
    pub now: Activity,
    pub exits: u64,
    pub last: Option<(ExitKind, u64)>,
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

    /// vCPU `id` enters KVM_RUN.
    pub fn run_enter(&self, id: usize) {
        if let Some(s) = self.slots.get(id) {
            s.in_guest_since.store(self.now_ms(), Ordering::Release);
        }
    }

    /// vCPU `id` left KVM_RUN.
    pub fn run_leave(&self, id: usize) {
        if let Some(s) = self.slots.get(id) {
            s.in_guest_since.store(0, Ordering::Release);
            s.exits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// vCPU `id` starts handling an exit of `kind` at `addr` (port or
    /// guest address).
    pub fn enter(&self, id: usize, kind: ExitKind, addr: u64) {
        if let Some(s) = self.slots.get(id) {
            s.addr.store(addr, Ordering::Relaxed);
            s.kind.store(kind as u64, Ordering::Relaxed);
            s.since.store(self.now_ms(), Ordering::Release);
        }
    }

    /// vCPU `id` finished its exit.
    pub fn leave(&self, id: usize) {
        if let Some(s) = self.slots.get(id) {
            s.since.store(0, Ordering::Release);
        }
    }

    /// What vCPU `id` is doing now, its exit count and its last exit (kind
    /// and address).
    pub fn activity(&self, id: usize) -> Option<VcpuActivity> {
        let s = self.slots.get(id)?;
        let now = self.now_ms();
        let since = s.since.load(Ordering::Acquire);
        let guest = s.in_guest_since.load(Ordering::Acquire);
        let kind = ExitKind::from_u64(s.kind.load(Ordering::Relaxed));
        let addr = s.addr.load(Ordering::Relaxed);
        let act = if since != 0 {
            Activity::Handling {
                kind: kind.unwrap_or(ExitKind::Other),
                addr,
                for_: Duration::from_millis(now.saturating_sub(since)),
            }
        } else if guest != 0 {
            Activity::InGuest {
                for_: Duration::from_millis(now.saturating_sub(guest)),
            }
        } else {
            Activity::Outside
        };
        Some(VcpuActivity {
            now: act,
            exits: s.exits.load(Ordering::Relaxed),
            last: kind.map(|k| (k, addr)),
        })
    }

    /// One line describing vCPU `id`'s activity.
    pub fn describe(&self, id: usize) -> String {
        let Some(VcpuActivity {
            now: act,
            exits,
            last,
        }) = self.activity(id)
        else {
            return "no such vCPU".into();
        };
        let last = match last {
            Some((k, a)) => format!("{} {a:#x}", k.name()),
            None => "none".into(),
        };
        let what = match act {
            Activity::InGuest { for_ } => format!("in KVM_RUN for {:.3} s", for_.as_secs_f64()),
            Activity::Handling { kind, addr, for_ } => format!(
                "handling a {} at {addr:#x} for {:.3} s",
                kind.name(),
                for_.as_secs_f64()
            ),
            Activity::Outside => "outside KVM_RUN".into(),
        };
        format!("{what}; {exits} exits, last userspace exit: {last}")
    }

    /// The vCPUs stuck in one exit for longer than `limit`: (vCPU, address,
    /// how long).
    pub fn stalled(&self, limit: Duration) -> Vec<(usize, u64, Duration)> {
        (0..self.slots.len())
            .filter_map(|i| match self.activity(i).map(|a| a.now) {
                Some(Activity::Handling { addr, for_, .. }) if for_ > limit => {
                    Some((i, addr, for_))
                }
                _ => None,
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
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Watchdog);
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
        w.enter(0, ExitKind::MmioWrite, 0xe000_0000);
        w.enter(1, ExitKind::PioOut, 0x3f8);
        w.leave(1);
        std::thread::sleep(Duration::from_millis(30));
        let s = w.stalled(Duration::from_millis(10));
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].0, s[0].1), (0, 0xe000_0000));
        assert!(w.stalled(Duration::from_secs(10)).is_empty());
        w.leave(0);
        assert!(w.stalled(Duration::ZERO).is_empty());
        // Out-of-range vCPU ids are ignored.
        w.enter(7, ExitKind::Other, 1);
        w.leave(7);
        assert!(w.activity(7).is_none());
    }

    #[test]
    fn activity_follows_run_and_handlers() {
        let w = ExitWatch::new(1);
        assert_eq!(w.activity(0).unwrap().now, Activity::Outside);
        w.run_enter(0);
        assert!(matches!(
            w.activity(0).unwrap().now,
            Activity::InGuest { .. }
        ));
        assert!(w.describe(0).starts_with("in KVM_RUN"), "{}", w.describe(0));
        w.run_leave(0);
        w.enter(0, ExitKind::MmioRead, 0xc000_1000);
        let a = w.activity(0).unwrap();
        let (act, exits, last) = (a.now, a.exits, a.last);
        assert!(matches!(
            act,
            Activity::Handling {
                kind: ExitKind::MmioRead,
                addr: 0xc000_1000,
                ..
            }
        ));
        assert_eq!(exits, 1);
        assert_eq!(last, Some((ExitKind::MmioRead, 0xc000_1000)));
        assert!(w.describe(0).contains("MMIO read at 0xc0001000"));
        w.leave(0);
        assert_eq!(w.activity(0).unwrap().now, Activity::Outside);
        assert!(w
            .describe(0)
            .contains("last userspace exit: MMIO read 0xc0001000"));
    }
}
