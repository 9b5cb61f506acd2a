//! `vpfctl`: userspace owner tool for the virtio-pf PF, run inside the L1
//! guest with the PF bound to `pci-pf-stub`. It drives the PF's admin
//! virtqueue from userspace (BAR via sysfs `resource0` mmap, DMA memory
//! translated through `/proc/self/pagemap`, completion by polling), runs
//! the pre-copy member migration, and contains a userspace virtio-blk
//! member driver (`blk-workload`) that follows its member across a
//! migration. See docs/vpfctl.md. This file is the command line; the
//! library crate holds the pieces.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use vpfctl::admin::{AdminDev, OpenOpts, Request};
use vpfctl::cmd::{self, Outcome};
use vpfctl::error::{Error, Result};
use vpfctl::json::{hex, Json};
use vpfctl::{garbage, migrate, pci, wire, workload};

#[derive(Parser, Debug)]
#[command(
    name = "vpfctl",
    version,
    about = "Userspace owner of a virtio-pf PF: admin commands, member migration, and a virtio-blk member-driver stand-in",
    after_help = "Exit codes: 0 ok; 1 the device returned a non-OK status; 2 usage; 3 system/device access error; \
                  4 timeout; 5 verification failure (workload data, exactly-once)."
)]
struct Cli {
    /// Print one JSON object on stdout instead of text (also on failure).
    #[arg(long, global = true)]
    json: bool,
    /// The PF (DDDD:BB:DD.F); default: the only virtio function with SR-IOV.
    #[arg(long, global = true, value_parser = pci::normalize_bdf)]
    pf: Option<String>,
    /// Milliseconds to wait for a completion (admin command, device reset,
    /// workload stall).
    #[arg(long, global = true, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Bind the PF (and VFs for blk-workload) to pci-pf-stub if a kernel
    /// driver owns them.
    #[arg(long, global = true)]
    bind: bool,
    /// Do not send LIST_QUERY + LIST_USE after bringing the PF up (to test
    /// commands outside the list in use).
    #[arg(long, global = true)]
    no_list_use: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show a function's virtio capabilities, SR-IOV state and driver
    /// (config space only; does not reset anything).
    Info {
        /// The function (default: the PF).
        #[arg(long, value_parser = pci::normalize_bdf)]
        dev: Option<String>,
    },
    /// Bind a function to a driver through driver_override.
    Bind {
        /// The function.
        #[arg(long, value_parser = pci::normalize_bdf)]
        dev: String,
        /// Driver.
        #[arg(long, default_value = pci::PF_STUB)]
        driver: String,
    },
    /// Unbind a function from its driver.
    Unbind {
        /// The function.
        #[arg(long, value_parser = pci::normalize_bdf)]
        dev: String,
    },
    /// Set sriov_numvfs of the PF and list the VFs.
    Sriov {
        /// Number of VFs (0 removes them).
        #[arg(long)]
        numvfs: u64,
        /// Set sriov_drivers_autoprobe first (off: VFs come up unbound).
        #[arg(long)]
        autoprobe: Option<OnOff>,
        /// Bind every VF to pci-pf-stub afterwards.
        #[arg(long)]
        bind_stub: bool,
    },
    /// Print the BDF of VF N (member N).
    VfBdf {
        /// Member (VF number, from 1).
        #[arg(long)]
        member: u64,
    },
    /// LIST_QUERY: supported admin commands.
    ListQuery,
    /// LIST_USE: commands the driver will use (default: all supported).
    ListUse {
        /// Opcode bitmap (hex or decimal).
        #[arg(long, value_parser = wire::parse_u64)]
        bitmap: Option<u64>,
    },
    /// DEV_MODE_GET.
    ModeGet {
        /// Member id.
        #[arg(long)]
        member: u64,
    },
    /// DEV_MODE_SET.
    ModeSet {
        /// Member id.
        #[arg(long)]
        member: u64,
        /// active | stop | freeze (or a raw number, to test rejection).
        #[arg(long, value_parser = cmd::parse_mode)]
        mode: u8,
    },
    /// DEV_CTX_SIZE_GET.
    CtxSize {
        /// Member id.
        #[arg(long)]
        member: u64,
        /// Ask for the Freeze-mode estimate.
        #[arg(long)]
        freeze: bool,
    },
    /// DEV_CTX_READ until a short read.
    CtxRead {
        /// Member id.
        #[arg(long)]
        member: u64,
        /// Write the stream here (else it is printed as hex with --json).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Result bytes per command.
        #[arg(long, default_value_t = 4096)]
        chunk: usize,
    },
    /// DEV_CTX_WRITE a stream from a file.
    CtxWrite {
        /// Member id.
        #[arg(long)]
        member: u64,
        /// The stream.
        #[arg(long = "in")]
        input: PathBuf,
        /// Bytes per command (default: all in one).
        #[arg(long)]
        chunk: Option<usize>,
    },
    /// DEV_CTX_FIELDS_QUERY.
    CtxFields {
        /// Member id.
        #[arg(long)]
        member: u64,
    },
    /// DEV_CTX_DISCARD.
    CtxDiscard {
        /// Member id.
        #[arg(long)]
        member: u64,
    },
    /// DEV_WRITE_RECORD_CAP_QUERY.
    WrCap {
        /// Member id.
        #[arg(long)]
        member: u64,
    },
    /// DEV_WRITE_RECORDS_START.
    WrStart {
        /// Member id.
        #[arg(long)]
        member: u64,
        /// Page size in bytes.
        #[arg(long, default_value_t = 4096, value_parser = wire::parse_u64)]
        page_size: u64,
        /// ADDR:PAGES (pages of --page-size); repeatable.
        #[arg(long = "range", required = true, value_parser = wire::parse_range)]
        ranges: Vec<(u64, u64)>,
    },
    /// DEV_WRITE_RECORDS_STOP.
    WrStop {
        /// Member id.
        #[arg(long)]
        member: u64,
    },
    /// DEV_WRITE_RECORDS_READ of one window.
    WrRead {
        /// Member id.
        #[arg(long)]
        member: u64,
        /// Window start address.
        #[arg(long, value_parser = wire::parse_u64)]
        addr: u64,
        /// Window length in bytes.
        #[arg(long, value_parser = wire::parse_u64)]
        len: u64,
        /// Most addresses to take in this command.
        #[arg(long, default_value_t = 512)]
        max: usize,
    },
    /// Send an arbitrary (possibly malformed) admin command.
    Raw {
        /// Opcode (number or name).
        #[arg(long, value_parser = cmd::parse_opcode)]
        opcode: u16,
        /// Group type.
        #[arg(long, default_value_t = 1)]
        group: u16,
        /// Member id.
        #[arg(long, default_value_t = 0)]
        member: u64,
        /// Command-specific data, hex.
        #[arg(long, default_value = "")]
        data: String,
        /// Result bytes to offer.
        #[arg(long, default_value_t = 64)]
        result_len: usize,
        /// Replace the whole readable part (header included) with these
        /// hex bytes (e.g. a 10-byte header).
        #[arg(long)]
        readable: Option<String>,
        /// Total writable bytes, status included (e.g. 4 for a short one).
        #[arg(long)]
        writable_len: Option<usize>,
    },
    /// Pre-copy migration of member --from to member --to.
    Migrate {
        /// Source member.
        #[arg(long)]
        from: u64,
        /// Destination member.
        #[arg(long)]
        to: u64,
        /// Pre-copy rounds while the source is Active.
        #[arg(long, default_value_t = 1)]
        rounds: u32,
        /// Least pre-copy time in ms: if the rounds were quicker, wait out
        /// the rest while the source works and recording runs, then run
        /// one more round.
        #[arg(long, default_value_t = 0)]
        min_precopy_ms: u64,
        /// Also pre-copy until FILE exists (at most --timeout-ms), then one
        /// more round: keeps the source working while something outside
        /// happens (a test's VMM migration, say).
        #[arg(long, value_name = "FILE")]
        precopy_until: Option<PathBuf>,
        /// Write-record page size.
        #[arg(long, default_value_t = 4096, value_parser = wire::parse_u64)]
        page_size: u64,
        /// ADDR:PAGES to record (4 KiB pages); repeatable.
        #[arg(long = "range", value_parser = wire::parse_range)]
        ranges: Vec<(u64, u64)>,
        /// File of ADDR:PAGES lines (4 KiB pages), e.g. a workload's ranges.
        #[arg(long)]
        range_file: Option<PathBuf>,
        /// Workload state directory: ranges from D/ranges; after success
        /// write D/moved and SIGUSR1 the workload.
        #[arg(long)]
        workload_dir: Option<PathBuf>,
        /// DEV_CTX_READ result bytes per command.
        #[arg(long, default_value_t = 4096)]
        read_chunk: usize,
        /// DEV_CTX_WRITE bytes per command (default: whole stream).
        #[arg(long)]
        chunk: Option<usize>,
        /// On failure after Stop, leave the source as it is.
        #[arg(long)]
        no_rollback: bool,
        /// Exit right after this phase with nothing cleaned up, as an owner
        /// that dies there would (exit status 6), to test recovery:
        /// prepare, wr_start, precopy, stop, freeze, final_ctx_read,
        /// final_drain, ctx_write, activate.
        #[arg(long, value_name = "PHASE")]
        exit_after: Option<String>,
    },
    /// Admin command round trip: send one command --count times and print
    /// min / median / p99 / max (submit to used entry, µs).
    Bench {
        /// Member id.
        #[arg(long, default_value_t = 1)]
        member: u64,
        /// Opcode (number or name; default DEV_MODE_GET).
        #[arg(long, value_parser = cmd::parse_opcode, default_value = "DEV_MODE_GET")]
        opcode: u16,
        /// Command-specific data, hex.
        #[arg(long, default_value = "")]
        data: String,
        /// Result bytes to offer.
        #[arg(long, default_value_t = 8)]
        result_len: usize,
        /// Commands to send.
        #[arg(long, default_value_t = 100)]
        count: u32,
    },
    /// Write garbage to the PF's admin queue (and with --sriov its SR-IOV
    /// capability) on purpose, then check the device still answers.
    Garbage {
        /// Rounds of admin-queue garbage (each after a fresh PF bring-up).
        #[arg(long, default_value_t = 200)]
        rounds: u32,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Milliseconds to watch each round.
        #[arg(long, default_value_t = 20)]
        wait_ms: u64,
        /// Also write this many random values to the read-only SR-IOV
        /// registers and the VF Migration bits (VFs stay enabled).
        #[arg(long, default_value_t = 0)]
        sriov_writes: u32,
        /// Afterwards DEV_MODE_GET on this member must succeed.
        #[arg(long)]
        check_member: Option<u64>,
    },
    /// Write-and-verify workload on a block device through the kernel's
    /// driver (one block at a time, O_DIRECT; a log line per step on
    /// stdout): for a guest whose disk is a VF passed through to it.
    DiskPattern {
        /// The block device.
        #[arg(long)]
        dev: PathBuf,
        /// Blocks used, from the start of the device.
        #[arg(long, default_value_t = 32)]
        blocks: u64,
        /// Bytes per block (multiple of 512).
        #[arg(long, default_value_t = 4096)]
        block_size: usize,
        /// Writes to do (0: until killed).
        #[arg(long, default_value_t = 0)]
        writes: u64,
    },
    /// Userspace virtio-blk write-and-verify workload on one VF.
    BlkWorkload {
        /// The VF to start on.
        #[arg(long, value_parser = pci::normalize_bdf)]
        vf: String,
        /// Request log file.
        #[arg(long)]
        log: PathBuf,
        /// Coordination directory (pid, ranges, ready, moved, done).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// First sector used.
        #[arg(long, default_value_t = 0)]
        start_sector: u64,
        /// Number of blocks used.
        #[arg(long, default_value_t = 64)]
        blocks: u64,
        /// Bytes per request (multiple of 512).
        #[arg(long, default_value_t = 4096)]
        block_size: usize,
        /// Requests kept in flight.
        #[arg(long, default_value_t = 8)]
        inflight: usize,
        /// Queue size.
        #[arg(long, default_value_t = 64)]
        queue_size: u16,
        /// Requests to submit in total (0 = until told to stop).
        #[arg(long, default_value_t = 0)]
        requests: u64,
        /// After the first move, finish once this many more requests have
        /// completed (0 = do not finish on that account).
        #[arg(long, default_value_t = 0)]
        after_move: u64,
        /// Most requests submitted per second (0 = as fast as the device
        /// completes them), for long runs with a log of bounded size.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Pattern seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Reach the VF through VFIO (bound to vfio-pci or a variant driver
        /// such as virtio_vfio_pci; with --bind, vfio-pci) with DMA mapped
        /// through the IOMMU. A move (STATE_DIR/moved) is then a VFIO
        /// migration this process makes: PRE_COPY and STOP_COPY on the
        /// source, RESUMING on the destination.
        #[arg(long)]
        vfio: bool,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

fn open_pf(cli: &Cli) -> Result<(String, AdminDev)> {
    let pf = match &cli.pf {
        Some(p) => p.clone(),
        None => pci::find_pf()?,
    };
    let a = AdminDev::open(
        &pf,
        &OpenOpts {
            timeout: Duration::from_millis(cli.timeout_ms),
            bind: cli.bind,
            list_use: !cli.no_list_use,
        },
    )?;
    Ok((pf, a))
}

fn pf_of(cli: &Cli) -> Result<String> {
    match &cli.pf {
        Some(p) => Ok(p.clone()),
        None => pci::find_pf(),
    }
}

fn info(dev: &str) -> Result<Outcome> {
    let cfg = pci::read_config(dev)?;
    let mut j = Json::obj()
        .with("command", "info")
        .with("dev", dev)
        .with("driver", pci::current_driver(dev))
        .with("config_bytes", cfg.len());
    let mut human = format!(
        "{dev}: driver {}, {} config bytes",
        pci::current_driver(dev).unwrap_or_else(|| "(none)".into()),
        cfg.len()
    );
    match pci::parse_virtio_caps(&cfg) {
        Ok(c) => {
            let reg = |r: pci::CapRegion| {
                Json::obj()
                    .with("bar", r.bar)
                    .with("offset", hex(r.offset.into()))
                    .with("length", hex(r.length.into()))
            };
            j.set("common", reg(c.common))
                .set("notify", reg(c.notify))
                .set("notify_off_multiplier", c.notify_multiplier)
                .set("isr", c.isr.map(reg))
                .set("device_cfg", c.device.map(reg))
                .set("msix_cap", c.msix.map(|o| hex(o.into())));
            human.push_str(&format!(
                "\n  common  BAR{} +{:#x} len {:#x}\n  notify  BAR{} +{:#x} len {:#x} multiplier {}",
                c.common.bar,
                c.common.offset,
                c.common.length,
                c.notify.bar,
                c.notify.offset,
                c.notify.length,
                c.notify_multiplier
            ));
        }
        Err(m) => {
            j.set("virtio", m.clone());
            human.push_str(&format!("\n  {m}"));
        }
    }
    if let Some(s) = pci::parse_sriov(&cfg) {
        j.set(
            "sriov",
            Json::obj()
                .with("offset", hex(s.offset.into()))
                .with("control", hex(s.control.into()))
                .with("total_vfs", s.total_vfs)
                .with("num_vfs", s.num_vfs)
                .with("first_vf_offset", s.first_vf_offset)
                .with("vf_stride", s.vf_stride)
                .with("vf_device_id", hex(s.vf_device_id.into())),
        );
        human.push_str(&format!(
            "\n  SR-IOV at {:#x}: control {:#x}, TotalVFs {}, NumVFs {}, offset {}, stride {}",
            s.offset, s.control, s.total_vfs, s.num_vfs, s.first_vf_offset, s.vf_stride
        ));
    }
    Ok(Outcome::ok(j, human))
}

fn sriov(pf: &str, numvfs: u64, autoprobe: Option<OnOff>, bind_stub: bool) -> Result<Outcome> {
    if let Some(a) = autoprobe {
        pci::set_autoprobe(pf, matches!(a, OnOff::On))?;
    }
    pci::set_numvfs(pf, numvfs)?;
    let mut vfs = Vec::new();
    for n in 1..=numvfs {
        let bdf = pci::vf_bdf(pf, n)?;
        if bind_stub {
            pci::bind(&bdf, pci::PF_STUB)?;
        }
        vfs.push(
            Json::obj()
                .with("member", n)
                .with("bdf", bdf.clone())
                .with("driver", pci::current_driver(&bdf)),
        );
    }
    let mut human = format!("{pf}: sriov_numvfs = {numvfs}");
    for v in &vfs {
        if let (Some(Json::U(n)), Some(Json::S(b))) = (v.get("member"), v.get("bdf")) {
            human.push_str(&format!("\n  member {n}: {b}"));
        }
    }
    let j = Json::obj()
        .with("command", "sriov")
        .with("pf", pf)
        .with("numvfs", numvfs)
        .with("vfs", Json::A(vfs));
    Ok(Outcome::ok(j, human))
}

fn run(cli: &Cli) -> Result<Outcome> {
    match &cli.cmd {
        Cmd::Info { dev } => {
            let d = match dev {
                Some(d) => d.clone(),
                None => pf_of(cli)?,
            };
            info(&d)
        }
        Cmd::Bind { dev, driver } => {
            pci::bind(dev, driver)?;
            Ok(Outcome::ok(
                Json::obj()
                    .with("command", "bind")
                    .with("dev", dev.as_str())
                    .with("driver", driver.as_str()),
                format!("{dev} bound to {driver}"),
            ))
        }
        Cmd::Unbind { dev } => {
            pci::unbind(dev)?;
            Ok(Outcome::ok(
                Json::obj()
                    .with("command", "unbind")
                    .with("dev", dev.as_str()),
                format!("{dev} unbound"),
            ))
        }
        Cmd::Sriov {
            numvfs,
            autoprobe,
            bind_stub,
        } => {
            let pf = pf_of(cli)?;
            if cli.bind {
                pci::prepare_for_userspace(&pf, true)?;
            }
            sriov(&pf, *numvfs, *autoprobe, *bind_stub)
        }
        Cmd::VfBdf { member } => {
            let pf = pf_of(cli)?;
            let b = pci::vf_bdf(&pf, *member)?;
            Ok(Outcome::ok(
                Json::obj()
                    .with("command", "vf-bdf")
                    .with("pf", pf)
                    .with("member", *member)
                    .with("bdf", b.clone()),
                b,
            ))
        }
        Cmd::Garbage {
            rounds,
            seed,
            wait_ms,
            sriov_writes,
            check_member,
        } => {
            let pf = pf_of(cli)?;
            let opts = OpenOpts {
                timeout: Duration::from_millis(cli.timeout_ms),
                bind: cli.bind,
                list_use: true,
            };
            let mut rng = garbage::Rng::new(seed.wrapping_add(0x5eed));
            let sriov = if *sriov_writes > 0 {
                garbage::sriov_garbage(
                    &mut rng,
                    *sriov_writes,
                    &mut || pci::read_config(&pf),
                    &mut |off, v| pci::write_config_u16(&pf, usize::from(off), v),
                )?
            } else {
                Json::Null
            };
            let mut reopen = || AdminDev::open(&pf, &opts);
            let mut check = |a: &mut AdminDev| -> Result<()> {
                if let Some(m) = check_member {
                    let (mode, _) = a.mode_get(*m)?;
                    if mode != wire::Mode::Active as u8 {
                        return Err(Error::Verify(format!(
                            "member {m} is in mode {} after the garbage, not Active",
                            wire::mode_name(mode)
                        )));
                    }
                }
                Ok(())
            };
            let mut o = garbage::run(
                &mut reopen,
                &mut check,
                &garbage::GarbageOpts {
                    rounds: *rounds,
                    seed: *seed,
                    wait: Duration::from_millis(*wait_ms),
                    reset_timeout: Duration::from_millis(cli.timeout_ms),
                },
            )?;
            o.json.set("pf", pf.as_str()).set("sriov", sriov);
            Ok(o)
        }
        Cmd::DiskPattern {
            dev,
            blocks,
            block_size,
            writes,
        } => {
            let o = vpfctl::disk::PatternOpts {
                blocks: *blocks,
                block_size: *block_size,
                writes: *writes,
                direct: true,
            };
            let ok = vpfctl::disk::run(dev, &o, &mut std::io::stdout().lock())?;
            let text = format!("{ok} writes read back intact");
            Ok(Outcome::ok(
                Json::obj()
                    .with("command", "disk-pattern")
                    .with("dev", dev.display().to_string())
                    .with("ok", ok),
                text,
            ))
        }
        Cmd::BlkWorkload {
            vf,
            log,
            state_dir,
            start_sector,
            blocks,
            block_size,
            inflight,
            queue_size,
            requests,
            after_move,
            rate,
            seed,
            vfio,
        } => {
            let o = workload::WorkloadOpts {
                vf: vf.clone(),
                log: log.clone(),
                state_dir: state_dir.clone(),
                start_sector: *start_sector,
                blocks: *blocks,
                block_bytes: *block_size,
                inflight: *inflight,
                queue_size: *queue_size,
                requests: *requests,
                after_move: *after_move,
                rate: *rate,
                seed: *seed,
                stall_timeout: Duration::from_millis(cli.timeout_ms),
                bind: cli.bind,
                vfio: *vfio,
            };
            let (sum, err) = match workload::run(&o) {
                Ok(s) => (Some(s), None),
                Err(e) => (None, Some(e)),
            };
            let mut j = Json::obj()
                .with("command", "blk-workload")
                .with("vf", vf.as_str())
                .with("log", log.display().to_string())
                .with("ok", err.is_none());
            let human = match &sum {
                Some(s) => {
                    j.set("submitted", s.submitted)
                        .set("completed", s.completed)
                        .set("writes", s.writes)
                        .set("reads", s.reads)
                        .set("verify_failures", s.verify_failures)
                        .set("status_errors", s.status_errors)
                        .set("moves", s.moves)
                        .set("device", s.device.as_str());
                    format!(
                        "workload done on {}: {} submitted, {} completed ({} writes, {} reads verified), {} move(s)",
                        s.device, s.submitted, s.completed, s.writes, s.reads, s.moves
                    )
                }
                None => String::new(),
            };
            Ok(Outcome {
                json: j,
                human,
                err,
            })
        }
        _ => {
            let (pf, mut a) = open_pf(cli)?;
            let mut o = admin_cmd(cli, &pf, &mut a)?;
            if let Json::O(v) = &mut o.json {
                if !v.iter().any(|(k, _)| k == "command") {
                    v.insert(0, ("command".into(), Json::S(cmd_name(&cli.cmd).into())));
                    v.insert(1, ("pf".into(), Json::S(pf.clone())));
                }
            }
            Ok(o)
        }
    }
}

fn cmd_name(c: &Cmd) -> &'static str {
    match c {
        Cmd::Info { .. } => "info",
        Cmd::Bind { .. } => "bind",
        Cmd::Unbind { .. } => "unbind",
        Cmd::Sriov { .. } => "sriov",
        Cmd::VfBdf { .. } => "vf-bdf",
        Cmd::ListQuery => "list-query",
        Cmd::ListUse { .. } => "list-use",
        Cmd::ModeGet { .. } => "mode-get",
        Cmd::ModeSet { .. } => "mode-set",
        Cmd::CtxSize { .. } => "ctx-size",
        Cmd::CtxRead { .. } => "ctx-read",
        Cmd::CtxWrite { .. } => "ctx-write",
        Cmd::CtxFields { .. } => "ctx-fields",
        Cmd::CtxDiscard { .. } => "ctx-discard",
        Cmd::WrCap { .. } => "wr-cap",
        Cmd::WrStart { .. } => "wr-start",
        Cmd::WrStop { .. } => "wr-stop",
        Cmd::WrRead { .. } => "wr-read",
        Cmd::Raw { .. } => "raw",
        Cmd::Migrate { .. } => "migrate",
        Cmd::Bench { .. } => "bench",
        Cmd::Garbage { .. } => "garbage",
        Cmd::DiskPattern { .. } => "disk-pattern",
        Cmd::BlkWorkload { .. } => "blk-workload",
    }
}

fn admin_cmd(cli: &Cli, pf: &str, a: &mut AdminDev) -> Result<Outcome> {
    match &cli.cmd {
        Cmd::ListQuery => cmd::list_query(a),
        Cmd::ListUse { bitmap } => cmd::list_use(a, *bitmap),
        Cmd::ModeGet { member } => cmd::mode_get(a, *member),
        Cmd::ModeSet { member, mode } => cmd::mode_set(a, *member, *mode),
        Cmd::CtxSize { member, freeze } => cmd::ctx_size(a, *member, *freeze),
        Cmd::CtxRead { member, out, chunk } => cmd::ctx_read(a, *member, out.as_deref(), *chunk),
        Cmd::CtxWrite {
            member,
            input,
            chunk,
        } => cmd::ctx_write(a, *member, input, *chunk),
        Cmd::CtxFields { member } => cmd::ctx_fields(a, *member),
        Cmd::CtxDiscard { member } => cmd::ctx_discard(a, *member),
        Cmd::WrCap { member } => cmd::wr_cap(a, *member),
        Cmd::WrStart {
            member,
            page_size,
            ranges,
        } => cmd::wr_start(a, *member, *page_size, ranges),
        Cmd::WrStop { member } => cmd::wr_stop(a, *member),
        Cmd::WrRead {
            member,
            addr,
            len,
            max,
        } => cmd::wr_read(a, *member, *addr, *len, *max),
        Cmd::Raw {
            opcode,
            group,
            member,
            data,
            result_len,
            readable,
            writable_len,
        } => {
            let req = Request {
                opcode: *opcode,
                group: *group,
                member: *member,
                data: wire::parse_hex(data)?,
                result_len: *result_len,
                readable: readable.as_deref().map(wire::parse_hex).transpose()?,
                writable_len: *writable_len,
            };
            cmd::raw(a, &req)
        }
        Cmd::Migrate {
            from,
            to,
            rounds,
            min_precopy_ms,
            precopy_until,
            page_size,
            ranges,
            range_file,
            workload_dir,
            read_chunk,
            chunk,
            no_rollback,
            exit_after,
        } => {
            let mut bytes: Vec<(u64, u64)> = ranges
                .iter()
                .map(|&(a, p)| (a, p.saturating_mul(4096)))
                .collect();
            if let Some(f) = range_file {
                bytes.extend(migrate::read_ranges_file(f)?);
            }
            if let Some(d) = workload_dir {
                if range_file.is_none() && ranges.is_empty() {
                    bytes.extend(migrate::read_ranges_file(&d.join("ranges"))?);
                }
            }
            let o = migrate::MigrateOpts {
                from: *from,
                to: *to,
                rounds: *rounds,
                min_precopy_ms: *min_precopy_ms,
                precopy_until: precopy_until.clone(),
                precopy_until_limit: Duration::from_millis(cli.timeout_ms),
                page_size: *page_size,
                ranges: bytes,
                read_chunk: *read_chunk,
                write_chunk: *chunk,
                workload_dir: workload_dir.clone(),
                no_rollback: *no_rollback,
                exit_after: exit_after.clone(),
            };
            migrate::migrate(a, pf, &o)
        }
        Cmd::Bench {
            member,
            opcode,
            data,
            result_len,
            count,
        } => {
            let req = Request::new(*opcode, *member, wire::parse_hex(data)?, *result_len);
            cmd::bench(a, &req, *count)
        }
        _ => Err(Error::Usage("not an admin command".into())),
    }
}

fn main() {
    let cli = Cli::parse();
    let code = match run(&cli) {
        Ok(mut o) => {
            if cli.json {
                if let Some(e) = &o.err {
                    if o.json.get("error").is_none() {
                        o.json.set("error", e.to_string());
                    }
                    o.json.set("exit_code", e.exit_code());
                }
                println!("{}", o.json.to_string_compact());
            } else if !o.human.is_empty() {
                println!("{}", o.human);
            }
            match o.err {
                None => 0,
                Some(e) => {
                    eprintln!("vpfctl: {e}");
                    e.exit_code()
                }
            }
        }
        Err(e) => {
            if cli.json {
                let j = Json::obj()
                    .with("command", cmd_name(&cli.cmd))
                    .with("ok", false)
                    .with("error", e.to_string())
                    .with("exit_code", e.exit_code());
                println!("{}", j.to_string_compact());
            }
            eprintln!("vpfctl: {e}");
            e.exit_code()
        }
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_representative_command_lines() {
        let c = Cli::try_parse_from([
            "vpfctl", "mode-set", "--member", "2", "--mode", "freeze", "--json", "--pf", "00:04.0",
        ])
        .unwrap();
        assert!(c.json);
        assert_eq!(c.pf.as_deref(), Some("0000:00:04.0"));
        assert!(matches!(c.cmd, Cmd::ModeSet { member: 2, mode: 2 }));
        let c = Cli::try_parse_from([
            "vpfctl",
            "wr-start",
            "--member",
            "1",
            "--range",
            "0x100000:4",
            "--range",
            "0x200000:1",
        ])
        .unwrap();
        match c.cmd {
            Cmd::WrStart {
                ranges, page_size, ..
            } => {
                assert_eq!(page_size, 4096);
                assert_eq!(ranges, vec![(0x100000, 4), (0x200000, 1)]);
            }
            other => panic!("{other:?}"),
        }
        let c = Cli::try_parse_from([
            "vpfctl",
            "raw",
            "--opcode",
            "DEV_MODE_GET",
            "--group",
            "2",
            "--member",
            "9",
            "--data",
            "01",
        ])
        .unwrap();
        assert!(matches!(
            c.cmd,
            Cmd::Raw {
                opcode: 7,
                group: 2,
                member: 9,
                ..
            }
        ));
        assert!(
            Cli::try_parse_from(["vpfctl", "mode-set", "--member", "1", "--mode", "warp"]).is_err()
        );
        assert!(Cli::try_parse_from(["vpfctl", "wr-start", "--member", "1"]).is_err());
        let c = Cli::try_parse_from([
            "vpfctl",
            "migrate",
            "--from",
            "1",
            "--to",
            "2",
            "--workload-dir",
            "/tmp/wl",
            "--rounds",
            "3",
            "--min-precopy-ms",
            "250",
        ])
        .unwrap();
        assert!(matches!(
            c.cmd,
            Cmd::Migrate {
                rounds: 3,
                min_precopy_ms: 250,
                ..
            }
        ));
        // --pf after the subcommand, as the docs show it.
        let c =
            Cli::try_parse_from(["vpfctl", "sriov", "--pf", "00:04.0", "--numvfs", "2"]).unwrap();
        assert_eq!(c.pf.as_deref(), Some("0000:00:04.0"));
        assert!(matches!(c.cmd, Cmd::Sriov { numvfs: 2, .. }));
        let c = Cli::try_parse_from([
            "vpfctl",
            "migrate",
            "--pf",
            "0000:00:04.0",
            "--from",
            "1",
            "--to",
            "2",
            "--range",
            "0x1000:2",
            "--json",
        ])
        .unwrap();
        assert!(c.json);
        assert!(matches!(c.cmd, Cmd::Migrate { from: 1, to: 2, .. }));
    }
}
