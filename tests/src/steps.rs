//! Per-step deadlines of a real-guest run.
//!
//! A run is a sequence of steps, each ended by a marker line (outer VM
//! booted, guest reached /init, each step of the scenario script, script
//! done, VMM exited, ...). Each step has its own time limit, counted from
//! the end of the previous step, taken from measured times with a wide
//! margin: a hang is noticed within one step's limit instead of at the end
//! of a long overall one. A marker that arrives before the ones expected
//! first skips them (a script that failed early does not print its later
//! steps, and that is for the test's assertions to judge, not a hang).

use std::time::Duration;

/// One step: it ends when a line containing `marker` arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// What the step is, for messages ("guest boot", "migration", ...).
    pub name: String,
    /// Text of the line that ends it. Empty: the step ends only when the
    /// process exits (the last step of a direct run).
    pub marker: String,
    /// Longest time the step may take.
    pub limit: Duration,
}

impl Step {
    pub fn new(name: &str, marker: &str, limit: Duration) -> Self {
        Step {
            name: name.to_string(),
            marker: marker.to_string(),
            limit,
        }
    }
}

/// A step that did not end in time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overdue {
    pub step: String,
    pub marker: String,
    pub limit: Duration,
    /// The step before it (or "start").
    pub after: String,
    /// When that step ended, from the start of the run.
    pub after_at: Duration,
}

impl std::fmt::Display for Overdue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "step '{}' (waiting for {:?}) did not end within {:.0} s of '{}' (which ended at {:.1} s)",
            self.step,
            self.marker,
            self.limit.as_secs_f64(),
            self.after,
            self.after_at.as_secs_f64()
        )
    }
}

/// Follows the output of a run through its steps.
#[derive(Clone, Debug)]
pub struct StepTracker {
    steps: Vec<Step>,
    /// When each step ended (index-aligned with `steps`; `None` if not,
    /// or skipped).
    ended: Vec<Option<Duration>>,
    next: usize,
    last_at: Duration,
}

impl StepTracker {
    pub fn new(steps: Vec<Step>) -> Self {
        let n = steps.len();
        StepTracker {
            steps,
            ended: vec![None; n],
            next: 0,
            last_at: Duration::ZERO,
        }
    }

    /// A line arrived at `at` (from the start of the run).
    pub fn line(&mut self, at: Duration, text: &str) {
        let found = self.steps[self.next..]
            .iter()
            .position(|s| !s.marker.is_empty() && text.contains(&s.marker));
        if let Some(k) = found {
            let i = self.next + k;
            self.ended[i] = Some(at);
            self.next = i + 1;
            self.last_at = at;
        }
    }

    /// The step that should have ended by `now` and has not.
    pub fn overdue(&self, now: Duration) -> Option<Overdue> {
        let step = self.steps.get(self.next)?;
        if now.saturating_sub(self.last_at) <= step.limit {
            return None;
        }
        let after = match self.next.checked_sub(1) {
            Some(i) => self.steps[i].name.clone(),
            None => "start".to_string(),
        };
        Some(Overdue {
            step: step.name.clone(),
            marker: step.marker.clone(),
            limit: step.limit,
            after,
            after_at: self.last_at,
        })
    }

    /// How long each step that ended took (name, duration).
    pub fn timings(&self) -> Vec<(String, Duration)> {
        let mut prev = Duration::ZERO;
        let mut out = Vec::new();
        for (s, e) in self.steps.iter().zip(&self.ended) {
            if let Some(at) = e {
                out.push((s.name.clone(), at.saturating_sub(prev)));
                prev = *at;
            }
        }
        out
    }

    /// The sum of every step's limit: the longest a run that keeps making
    /// progress may take.
    pub fn total_limit(&self) -> Duration {
        self.steps.iter().map(|s| s.limit).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn tracker() -> StepTracker {
        StepTracker::new(vec![
            Step::new("boot", "@@INIT@@", s(10)),
            Step::new("one", "@@ONE@@", s(5)),
            Step::new("two", "@@TWO@@", s(5)),
            Step::new("exit", "", s(3)),
        ])
    }

    #[test]
    fn each_step_has_its_own_deadline() {
        let mut t = tracker();
        assert_eq!(t.total_limit(), s(23));
        assert!(t.overdue(s(10)).is_none());
        let o = t.overdue(s(11)).unwrap();
        assert_eq!((o.step.as_str(), o.after.as_str()), ("boot", "start"));
        t.line(s(8), "[ 1.0] @@INIT@@");
        // The next step's limit counts from the end of boot.
        assert!(t.overdue(s(13)).is_none());
        let o = t.overdue(s(14)).unwrap();
        assert_eq!(o.step, "one");
        assert_eq!(o.after_at, s(8));
        assert!(o.to_string().contains("'one'"), "{o}");
        t.line(s(9), "@@ONE@@");
        t.line(s(12), "@@TWO@@");
        // The process-exit step never matches a line.
        t.line(s(13), "");
        assert_eq!(t.overdue(s(15)), None);
        assert_eq!(t.overdue(s(16)).unwrap().step, "exit");
        assert_eq!(
            t.timings(),
            vec![
                ("boot".into(), s(8)),
                ("one".into(), s(1)),
                ("two".into(), s(3))
            ]
        );
    }

    #[test]
    fn a_later_marker_skips_the_missing_steps() {
        let mut t = tracker();
        t.line(s(1), "@@INIT@@");
        t.line(s(2), "@@TWO@@");
        assert_eq!(t.overdue(s(5)), None);
        assert_eq!(t.overdue(s(6)).unwrap().step, "exit");
        // Earlier markers seen again do not move it back.
        t.line(s(3), "@@ONE@@");
        assert_eq!(t.overdue(s(6)).unwrap().step, "exit");
        assert_eq!(
            t.timings(),
            vec![("boot".into(), s(1)), ("two".into(), s(1))]
        );
    }
}
