//! The pause gate: where vCPU threads and the device thread wait while the
//! VM is paused.
//!
//! The main thread closes the gate, kicks the threads (a vCPU out of
//! KVM_RUN; the device thread through its epoll), and waits until each has
//! parked; it opens the gate to resume. A parked thread still answers
//! (`poll` runs every [`PARK_POLL`]) and leaves when its stop flag is set,
//! so a paused VM can be dumped and shut down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How often a parked thread looks at its stop flag and runs its `poll`.
pub const PARK_POLL: Duration = Duration::from_millis(20);

#[derive(Default)]
struct State {
    closed: bool,
    parked: usize,
    /// Bumped on every resume, so a thread that parked for one pause does
    /// not park again for the same one.
    epoch: u64,
}

/// See the module documentation.
#[derive(Default)]
pub struct PauseGate {
    state: Mutex<State>,
    cv: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PauseGate {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the gate is closed (the VM paused or pausing).
    pub fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    /// Closes the gate: threads park at their next [`PauseGate::park`].
    pub fn close(&self) {
        lock(&self.state).closed = true;
    }

    /// Waits up to `limit` until `n` threads have parked, calling `kick`
    /// every few milliseconds meanwhile (to get them out of whatever they
    /// wait in). Returns whether they all did.
    pub fn wait_parked(&self, n: usize, limit: Duration, mut kick: impl FnMut()) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if lock(&self.state).parked >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            kick();
            let g = lock(&self.state);
            let _ = self.cv.wait_timeout(g, Duration::from_millis(5));
        }
    }

    /// Opens the gate: parked threads go on.
    pub fn open(&self) {
        let mut s = lock(&self.state);
        s.closed = false;
        s.epoch += 1;
        self.cv.notify_all();
    }

    /// How many threads are parked now.
    pub fn parked(&self) -> usize {
        lock(&self.state).parked
    }

    /// A thread's check point: if the gate is closed, counts the thread as
    /// parked and waits until it opens or `stop` is set, running `poll`
    /// every [`PARK_POLL`]. Returns whether it parked.
    pub fn park(&self, stop: &AtomicBool, mut poll: impl FnMut()) -> bool {
        let mut s = lock(&self.state);
        if !s.closed {
            return false;
        }
        let epoch = s.epoch;
        s.parked += 1;
        self.cv.notify_all();
        while s.closed && s.epoch == epoch && !stop.load(Ordering::Acquire) {
            drop(s);
            poll();
            s = lock(&self.state);
            if !(s.closed && s.epoch == epoch) {
                break;
            }
            s = self
                .cv
                .wait_timeout(s, PARK_POLL)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        s.parked -= 1;
        self.cv.notify_all();
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    use super::*;

    /// Threads that count while the gate is open.
    fn workers(
        gate: &Arc<PauseGate>,
        stop: &Arc<AtomicBool>,
        n: usize,
    ) -> (Vec<Arc<AtomicU64>>, Vec<std::thread::JoinHandle<()>>) {
        let mut counters = Vec::new();
        let mut handles = Vec::new();
        for _ in 0..n {
            let c = Arc::new(AtomicU64::new(0));
            let (g, s, c2) = (gate.clone(), stop.clone(), c.clone());
            handles.push(std::thread::spawn(move || {
                while !s.load(Ordering::Acquire) {
                    g.park(&s, || {});
                    c2.fetch_add(1, Ordering::AcqRel);
                    std::thread::sleep(Duration::from_millis(1));
                }
            }));
            counters.push(c);
        }
        (counters, handles)
    }

    #[test]
    fn closed_gate_parks_every_thread_and_open_releases_them() {
        let gate = Arc::new(PauseGate::new());
        let stop = Arc::new(AtomicBool::new(false));
        let (counters, handles) = workers(&gate, &stop, 3);
        for _ in 0..3 {
            gate.close();
            assert!(gate.wait_parked(3, Duration::from_secs(10), || {}));
            let before: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Acquire)).collect();
            std::thread::sleep(Duration::from_millis(50));
            let after: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Acquire)).collect();
            assert_eq!(before, after, "a parked thread went on working");
            gate.open();
            let t = Instant::now();
            while gate.parked() > 0 {
                assert!(t.elapsed() < Duration::from_secs(10));
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(20));
            let moved = counters
                .iter()
                .zip(&after)
                .all(|(c, a)| c.load(Ordering::Acquire) > *a);
            assert!(moved, "a thread stayed parked after the gate opened");
        }
        stop.store(true, Ordering::Release);
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn a_parked_thread_polls_and_leaves_on_stop() {
        let gate = Arc::new(PauseGate::new());
        let stop = Arc::new(AtomicBool::new(false));
        let polls = Arc::new(AtomicU64::new(0));
        gate.close();
        let (g, s, p) = (gate.clone(), stop.clone(), polls.clone());
        let h = std::thread::spawn(move || {
            g.park(&s, || {
                p.fetch_add(1, Ordering::AcqRel);
            })
        });
        assert!(gate.wait_parked(1, Duration::from_secs(10), || {}));
        let t = Instant::now();
        while polls.load(Ordering::Acquire) < 2 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no poll while parked"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Release);
        assert!(h.join().unwrap(), "it parked");
        assert_eq!(gate.parked(), 0);
        // An open gate does not park.
        gate.open();
        assert!(!gate.park(&stop, || {}));
    }

    #[test]
    fn wait_parked_gives_up_and_kicks_meanwhile() {
        let gate = PauseGate::new();
        gate.close();
        let mut kicks = 0;
        assert!(!gate.wait_parked(1, Duration::from_millis(50), || kicks += 1));
        assert!(kicks > 1);
    }
}
