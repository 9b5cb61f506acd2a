//! The event monitor (`--event-monitor path=...|fd=...`): one JSON object
//! per line for each event the VMM and its devices report, in Cloud
//! Hypervisor's format:
//!
//! ```json
//! {"timestamp":{"secs":0,"nanos":2911},"source":"vm","event":"booted","properties":null}
//! ```
//!
//! `timestamp` is the time since the monitor was set. Events come from any
//! thread through [`event`]; without a monitor they cost one atomic load.
//! A write that fails is logged once and the monitor goes quiet: the VM
//! never waits on it for long (the sink is written under a lock, one short
//! line at a time).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

struct Monitor {
    start: Instant,
    sink: Mutex<Box<dyn Write + Send>>,
}

static MONITOR: OnceLock<Monitor> = OnceLock::new();
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Sends every later event to `sink`. Only the first call takes effect;
/// returns whether this one did.
pub fn set_monitor(sink: Box<dyn Write + Send>) -> bool {
    let set = MONITOR
        .set(Monitor {
            start: Instant::now(),
            sink: Mutex::new(sink),
        })
        .is_ok();
    if set {
        ENABLED.store(true, Ordering::Release);
    }
    set
}

/// Whether a monitor is set (to skip building properties when not).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// The line for one event (without the newline).
pub fn format_event(
    elapsed: std::time::Duration,
    source: &str,
    event: &str,
    properties: &[(&str, String)],
) -> String {
    let props = if properties.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::Value::Object(
            properties
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone())))
                .collect(),
        )
    };
    serde_json::json!({
        "timestamp": {"secs": elapsed.as_secs(), "nanos": elapsed.subsec_nanos()},
        "source": source,
        "event": event,
        "properties": props,
    })
    .to_string()
}

/// Reports an event: `source` (`vm`, `virtio-device`, `virtio-pf`, ...),
/// `event` (`booted`, `member-mode`, ...) and string properties.
pub fn event(source: &str, event: &str, properties: &[(&str, String)]) {
    if !enabled() {
        return;
    }
    let Some(m) = MONITOR.get() else { return };
    let mut line = format_event(m.start.elapsed(), source, event, properties);
    line.push('\n');
    let mut sink = m.sink.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = sink.write_all(line.as_bytes()).and_then(|_| sink.flush()) {
        ENABLED.store(false, Ordering::Release);
        eprintln!("event monitor: {e}; no more events are written");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn events_are_one_json_object_per_line_in_cloud_hypervisors_shape() {
        let line = format_event(Duration::new(3, 7), "vm", "booted", &[]);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["timestamp"]["secs"], 3);
        assert_eq!(v["timestamp"]["nanos"], 7);
        assert_eq!(v["source"], "vm");
        assert_eq!(v["event"], "booted");
        assert!(v["properties"].is_null());
        let line = format_event(
            Duration::ZERO,
            "virtio-pf",
            "vf-enable",
            &[("num_vfs", "4".into()), ("id", "0000:00:04.0".into())],
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["properties"]["num_vfs"], "4");
        assert!(!line.contains('\n'));
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The one process-wide monitor: events from many threads arrive as
    /// whole lines; a second monitor is refused.
    #[test]
    fn the_monitor_takes_whole_lines_from_many_threads() {
        event("vm", "before-the-monitor", &[]);
        let out = Shared::default();
        assert!(set_monitor(Box::new(out.clone())));
        assert!(!set_monitor(Box::new(Shared::default())));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..50 {
                        event(
                            "test",
                            "tick",
                            &[("thread", t.to_string()), ("i", i.to_string())],
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 200);
        for l in lines {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["event"], "tick");
        }
        assert!(!text.contains("before-the-monitor"));
    }
}
