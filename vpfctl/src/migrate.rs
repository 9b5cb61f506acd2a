//! `vpfctl migrate`: the pre-copy member migration flow from member A to
//! member B of one PF, with per-phase timing and the downtime (Stop of A
//! sent → Active of B completed).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::admin::AdminDev;
use crate::cmd::Outcome;
use crate::error::{Error, Result};
use crate::json::{hex, Json};
use crate::pci;
use crate::wire::{self, Mode};

/// Options of one migration.
#[derive(Debug, Clone)]
pub struct MigrateOpts {
    /// Source member.
    pub from: u64,
    /// Destination member.
    pub to: u64,
    /// Pre-copy rounds (context read + records drain while A is Active).
    pub rounds: u32,
    /// Least pre-copy time: when the rounds took less, wait for the rest
    /// (the member keeps working, recorded) and run one more round. A real
    /// owner pre-copies for as long as the dirty rate needs; a test needs
    /// the source to complete requests while it records.
    pub min_precopy_ms: u64,
    /// Also pre-copy until this file exists (checked every 100 ms, for at
    /// most `precopy_until_limit`), then run one more round: a test's way
    /// to keep the source working and recording until something outside
    /// happened.
    pub precopy_until: Option<PathBuf>,
    /// Longest wait for `precopy_until`.
    pub precopy_until_limit: Duration,
    /// Recording page size.
    pub page_size: u64,
    /// Byte ranges `(start, len)` to record.
    pub ranges: Vec<(u64, u64)>,
    /// DEV_CTX_READ result size per command.
    pub read_chunk: usize,
    /// DEV_CTX_WRITE bytes per command (None = whole stream at once).
    pub write_chunk: Option<usize>,
    /// Workload state directory to notify after B is Active.
    pub workload_dir: Option<PathBuf>,
    /// Do not try to restore A on failure.
    pub no_rollback: bool,
    /// Exit the process right after this phase, cleaning nothing up, as an
    /// owner that dies there would (for testing recovery).
    pub exit_after: Option<String>,
}

/// The phases of a migration, in order (`--exit-after` takes one).
pub const PHASES: [&str; 9] = [
    "prepare",
    "wr_start",
    "precopy",
    "stop",
    "freeze",
    "final_ctx_read",
    "final_drain",
    "ctx_write",
    "activate",
];

/// CLOCK_MONOTONIC in nanoseconds (the same clock the workload logs).
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Align byte ranges to `page_size`, merge overlaps and neighbours, then
/// merge the closest pairs until at most `max` remain (covering a gap
/// records more pages than needed, never fewer). Returns `(address,
/// pages)` in `page_size` units, ascending.
pub fn coalesce(ranges: &[(u64, u64)], page_size: u64, max: usize) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges
        .iter()
        .filter(|r| r.1 > 0)
        .map(|&(s, l)| {
            let start = s / page_size * page_size;
            let end = (s.saturating_add(l)).div_ceil(page_size) * page_size;
            (start, end)
        })
        .collect();
    v.sort_unstable();
    let mut m: Vec<(u64, u64)> = Vec::new();
    for (s, e) in v {
        match m.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => m.push((s, e)),
        }
    }
    while m.len() > max.max(1) {
        let i = (0..m.len() - 1)
            .min_by_key(|&i| m[i + 1].0 - m[i].1)
            .expect("at least two ranges");
        m[i].1 = m[i + 1].1;
        m.remove(i + 1);
    }
    m.into_iter()
        .map(|(s, e)| (s, (e - s) / page_size))
        .collect()
}

/// Parse a ranges file: `ADDR:PAGES` per line in 4 KiB pages, `#`
/// comments and blank lines ignored. Returns byte ranges.
pub fn parse_ranges_file(text: &str) -> std::result::Result<Vec<(u64, u64)>, String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| wire::parse_range(l).map(|(a, p)| (a, p * 4096)))
        .collect()
}

/// Read a ranges file.
pub fn read_ranges_file(path: &Path) -> Result<Vec<(u64, u64)>> {
    let t = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
    parse_ranges_file(&t).map_err(|m| Error::Usage(format!("{}: {m}", path.display())))
}

struct Phases {
    list: Vec<(&'static str, Duration)>,
    exit_after: Option<String>,
}

impl Phases {
    fn run<T>(&mut self, name: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let t = Instant::now();
        let r = f();
        self.done(name, t.elapsed());
        r
    }

    /// Phase `name` ended; with `--exit-after name`, the process ends here
    /// with nothing cleaned up (members left in their modes, recording on,
    /// streams as they are).
    fn done(&mut self, name: &'static str, took: Duration) {
        self.list.push((name, took));
        if self.exit_after.as_deref() == Some(name) {
            println!(
                "{}",
                Json::obj()
                    .with("command", "migrate")
                    .with("abandoned_after", name)
                    .to_string_compact()
            );
            std::process::exit(crate::error::EXIT_ABANDONED);
        }
    }
}

fn set_mode_checked(a: &mut AdminDev, member: u64, mode: Mode) -> Result<()> {
    a.mode_set(member, mode as u8)?.check().map(|_| ())
}

fn drain_all(
    a: &mut AdminDev,
    member: u64,
    ranges: &[(u64, u64)],
    ps: u64,
) -> Result<(Vec<u64>, u32)> {
    // One window from the first range's start to the last range's end: a
    // READ returns the recorded pages of every started range inside its
    // window, so the gaps between ranges cost no command. One command per
    // range made the final drain most of the downtime (10 ranges: 10 round
    // trips while the member is stopped).
    let (Some(&(start, _)), Some(end)) = (
        ranges.iter().min_by_key(|r| r.0),
        ranges.iter().map(|&(addr, n)| addr + n * ps).max(),
    ) else {
        return Ok((Vec::new(), 0));
    };
    a.wr_drain(member, start, end - start)
}

fn hexes(v: &[u64]) -> Json {
    Json::A(v.iter().map(|&x| hex(x)).collect())
}

/// Tell a workload its member moved: write `<dir>/moved` (atomically) with
/// the destination BDF, then SIGUSR1 the pid in `<dir>/pid`.
pub fn notify_workload(dir: &Path, dest_bdf: &str) -> Result<i32> {
    let tmp = dir.join("moved.tmp");
    std::fs::write(&tmp, format!("{dest_bdf}\n")).map_err(|e| Error::io("write", &tmp, e))?;
    let dst = dir.join("moved");
    std::fs::rename(&tmp, &dst).map_err(|e| Error::io("rename to", &dst, e))?;
    let pid_path = dir.join("pid");
    let pid: i32 = std::fs::read_to_string(&pid_path)
        .map_err(|e| Error::io("read", &pid_path, e))?
        .trim()
        .parse()
        .map_err(|_| Error::Usage(format!("{} holds no pid", pid_path.display())))?;
    // SAFETY: kill(2) with a pid read from the workload's own pid file.
    if unsafe { libc::kill(pid, libc::SIGUSR1) } != 0 {
        return Err(Error::last_os(format!("kill -USR1 {pid}")));
    }
    Ok(pid)
}

/// PCI configuration is not part of the device context (the owner carries
/// it): give B the memory-space and bus-master bits A has, so B may DMA
/// into the driver's rings the moment it turns Active. Skipped (`null`)
/// when the members have no sysfs functions (host tests).
fn carry_command_register(pf: &str, from: u64, to: u64) -> Result<Json> {
    let (Ok(a), Ok(b)) = (pci::vf_bdf(pf, from), pci::vf_bdf(pf, to)) else {
        return Ok(Json::Null);
    };
    let cmd_of = |bdf: &str| pci::read_config_u16(bdf, pci::PCI_COMMAND);
    let ca = cmd_of(&a)?;
    let cb = cmd_of(&b)?;
    let want = cb | (ca & (pci::CMD_MEMORY | pci::CMD_BUS_MASTER)) | pci::CMD_BUS_MASTER;
    if want != cb {
        pci::write_config_u16(&b, pci::PCI_COMMAND, want)?;
    }
    Ok(Json::obj()
        .with("bdf", b)
        .with("before", hex(cb.into()))
        .with("after", hex(want.into())))
}

/// Run the migration. Errors before any device change return `Err`; a
/// failure mid-way is reported in the outcome (with the phases reached
/// and whether A was restored).
pub fn migrate(a: &mut AdminDev, pf: &str, o: &MigrateOpts) -> Result<Outcome> {
    if o.from == o.to {
        return Err(Error::Usage("--from and --to must differ".into()));
    }
    if o.ranges.is_empty() {
        return Err(Error::Usage(
            "no ranges to record: give --range, --range-file or --workload-dir".into(),
        ));
    }
    let total = Instant::now();
    if let Some(p) = &o.exit_after {
        if !PHASES.contains(&p.as_str()) {
            return Err(Error::Usage(format!(
                "--exit-after {p}: not a phase (one of {})",
                PHASES.join(", ")
            )));
        }
    }
    let mut ph = Phases {
        list: Vec::new(),
        exit_after: o.exit_after.clone(),
    };
    let mut j = Json::obj()
        .with("command", "migrate")
        .with("pf", pf)
        .with("from", o.from)
        .with("to", o.to)
        .with("from_bdf", pci::vf_bdf(pf, o.from).ok())
        .with("to_bdf", pci::vf_bdf(pf, o.to).ok());
    let (from, to, ps) = (o.from, o.to, o.page_size);

    // Prepare: carry the PCI command register, check modes, put B in
    // Freeze, pick ranges.
    let mut carried = Json::Null;
    let ranges = ph.run("prepare", || {
        carried = carry_command_register(pf, from, to)?;
        let (ma, _) = a.mode_get(from)?;
        if ma != Mode::Active as u8 {
            return Err(Error::Usage(format!(
                "member {from} is in mode {}; migrate needs it active",
                wire::mode_name(ma)
            )));
        }
        let (mb, _) = a.mode_get(to)?;
        if mb == Mode::Active as u8 {
            set_mode_checked(a, to, Mode::Stop)?;
        }
        if mb != Mode::Freeze as u8 {
            set_mode_checked(a, to, Mode::Freeze)?;
        }
        let cap = a.wr_cap(from)?;
        if !cap.supports(ps) {
            return Err(Error::Usage(format!(
                "member {from} does not support write-record page size {ps} (supports {:?})",
                cap.page_sizes()
            )));
        }
        Ok(coalesce(&o.ranges, ps, cap.supported_ranges as usize))
    })?;
    j.set("dest_command_register", carried)
        .set("page_size", ps)
        .set(
            "ranges",
            Json::A(
                ranges
                    .iter()
                    .map(|&(a, n)| Json::obj().with("addr", hex(a)).with("pages", n))
                    .collect(),
            ),
        );

    ph.run("wr_start", || {
        a.exec_ok(&crate::admin::Request::new(
            wire::opcode::DEV_WRITE_RECORDS_START,
            from,
            wire::wr_start_data(ps, &ranges),
            0,
        ))
    })?;
    let t_wr_started = mono_ns();
    let mut all_pages: BTreeSet<u64> = BTreeSet::new();
    let mut rounds = Vec::new();
    let precopy = Instant::now();
    let min_precopy = Duration::from_millis(o.min_precopy_ms);
    let mut round = 0;
    let waiting_for_file = |o: &MigrateOpts| o.precopy_until.as_ref().is_some_and(|f| !f.exists());
    let mut file_seen = o.precopy_until.is_none();
    while round < o.rounds || precopy.elapsed() < min_precopy || !file_seen {
        round += 1;
        if round > o.rounds {
            std::thread::sleep(min_precopy.saturating_sub(precopy.elapsed()));
            let t = Instant::now();
            while waiting_for_file(o) {
                if t.elapsed() > o.precopy_until_limit {
                    return Err(Error::Timeout {
                        ms: o.precopy_until_limit.as_millis() as u64,
                        what: format!(
                            "{} to appear during the pre-copy",
                            o.precopy_until
                                .as_deref()
                                .unwrap_or(Path::new(""))
                                .display()
                        ),
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            file_seen = true;
        }
        let t = Instant::now();
        let (ctx, reads) = a.ctx_read_all(from, o.read_chunk)?;
        let (pages, cmds) = drain_all(a, from, &ranges, ps)?;
        all_pages.extend(&pages);
        rounds.push(
            Json::obj()
                .with("round", round)
                .with("ctx_bytes", ctx.len())
                .with("ctx_reads", reads)
                .with("record_reads", cmds)
                .with("pages", hexes(&pages))
                .with("us", t.elapsed().as_micros() as u64),
        );
    }
    ph.done("precopy", precopy.elapsed());

    // Downtime starts here.
    let t_stop = mono_ns();
    let stop_at = Instant::now();
    let mut a_stopped = false;
    let mut final_ctx_len = 0usize;
    let mut write_cmds = 0u32;
    let mut final_pages = Vec::new();
    let res: Result<()> = (|| {
        ph.run("stop", || set_mode_checked(a, from, Mode::Stop))?;
        a_stopped = true;
        ph.run("freeze", || set_mode_checked(a, from, Mode::Freeze))?;
        let (ctx, _) = ph.run("final_ctx_read", || a.ctx_read_all(from, o.read_chunk))?;
        if ctx.is_empty() {
            return Err(Error::Protocol(format!(
                "member {from} returned an empty context in Freeze"
            )));
        }
        final_ctx_len = ctx.len();
        let (pages, _) = ph.run("final_drain", || drain_all(a, from, &ranges, ps))?;
        final_pages = pages;
        let chunk = o.write_chunk.unwrap_or(ctx.len());
        write_cmds = ph.run("ctx_write", || a.ctx_write_all(to, &ctx, chunk))?;
        ph.run("activate", || set_mode_checked(a, to, Mode::Active))?;
        Ok(())
    })();
    let downtime = stop_at.elapsed();
    let t_active = mono_ns();
    all_pages.extend(&final_pages);

    let mut rolled_back = None;
    if let Err(e) = &res {
        if a_stopped && !o.no_rollback {
            // Best effort: drop B's partial context, resume A where it was.
            let _ = a.exec(&crate::admin::Request::new(
                wire::opcode::DEV_CTX_DISCARD,
                to,
                vec![],
                0,
            ));
            let ok = set_mode_checked(a, from, Mode::Active).is_ok();
            rolled_back = Some(ok);
        }
        let _ = a.exec(&crate::admin::Request::new(
            wire::opcode::DEV_WRITE_RECORDS_STOP,
            from,
            vec![],
            0,
        ));
        let phases = phases_json(&ph);
        j.set("ok", false)
            .set("error", e.to_string())
            .set("phases_us", phases)
            .set("rolled_back", rolled_back)
            .set("rounds", Json::A(rounds));
        let human = format!(
            "migration {from} -> {to} failed: {e}{}",
            match rolled_back {
                Some(true) => "; member A set active again",
                Some(false) => "; restoring member A failed too",
                None => "",
            }
        );
        return Ok(Outcome {
            json: j,
            human,
            err: res.err(),
        });
    }

    ph.run("wr_stop", || {
        a.exec_ok(&crate::admin::Request::new(
            wire::opcode::DEV_WRITE_RECORDS_STOP,
            from,
            vec![],
            0,
        ))
    })?;
    let mut notified = Json::Null;
    if let Some(dir) = &o.workload_dir {
        let dest = pci::vf_bdf(pf, to)?;
        let pid = ph.run("notify", || notify_workload(dir, &dest))?;
        notified = Json::obj().with("pid", pid).with("dest_bdf", dest);
    }
    let total = total.elapsed();
    let all: Vec<u64> = all_pages.into_iter().collect();
    j.set("ok", true)
        .set("rounds", Json::A(rounds))
        .set("final_ctx_bytes", final_ctx_len)
        .set("ctx_write_commands", write_cmds)
        .set("final_pages", hexes(&final_pages))
        .set("recorded_pages", hexes(&all))
        .set("phases_us", phases_json(&ph))
        .set("downtime_us", downtime.as_micros() as u64)
        .set("total_us", total.as_micros() as u64)
        .set("t_wr_started_ns", t_wr_started)
        .set("t_stop_issued_ns", t_stop)
        .set("t_active_done_ns", t_active)
        .set("workload_notified", notified);
    let mut human = format!("migrated member {from} -> {to} on {pf}\n");
    for (n, d) in &ph.list {
        human.push_str(&format!("  {n:<15} {:>10} us\n", d.as_micros()));
    }
    human.push_str(&format!(
        "  downtime        {:>10} us (Stop of {from} -> Active of {to})\n  total           {:>10} us\n  context {final_ctx_len} bytes, {} recorded page(s)",
        downtime.as_micros(),
        total.as_micros(),
        all.len()
    ));
    Ok(Outcome::ok(j, human))
}

fn phases_json(ph: &Phases) -> Json {
    Json::O(
        ph.list
            .iter()
            .map(|(n, d)| (n.to_string(), Json::U(d.as_micros() as u64)))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesce_aligns_merges_and_limits() {
        // Two adjacent 4K pages and one far away.
        let r = [(0x1000, 0x1000), (0x2000, 0x1000), (0x10000, 0x800)];
        assert_eq!(coalesce(&r, 4096, 8), vec![(0x1000, 2), (0x10000, 1)]);
        // Limit 1: everything in one range.
        assert_eq!(coalesce(&r, 4096, 1), vec![(0x1000, 16)]);
        // Unaligned start and overlapping ranges.
        assert_eq!(
            coalesce(&[(0x1010, 0x10), (0x1000, 0x2000)], 4096, 4),
            vec![(0x1000, 2)]
        );
        // Closest pair merged first.
        let r = [(0x0, 0x1000), (0x3000, 0x1000), (0x100000, 0x1000)];
        assert_eq!(coalesce(&r, 4096, 2), vec![(0x0, 4), (0x100000, 1)]);
        // Bigger page size.
        assert_eq!(coalesce(&[(0x1000, 0x1000)], 0x200000, 4), vec![(0, 1)]);
        assert!(coalesce(&[(0x1000, 0)], 4096, 4).is_empty());
    }

    #[test]
    fn ranges_file() {
        let t = "# ranges\n0x100000:3\n\n0x200000:1 # used ring\n";
        assert_eq!(
            parse_ranges_file(t).unwrap(),
            vec![(0x100000, 3 * 4096), (0x200000, 4096)]
        );
        assert!(parse_ranges_file("0x1000").is_err());
    }

    #[test]
    fn monotonic_clock_advances() {
        let a = mono_ns();
        let b = mono_ns();
        assert!(b >= a && a > 0);
    }
}
