//! `vpfctl garbage`: a guest that writes garbage to the PF's admin queue
//! (and, optionally, its SR-IOV capability) on purpose, then checks the
//! device still answers. Every round brings the PF up afresh (reset,
//! admin queue), writes one kind of garbage into the ring, rings the
//! doorbell and watches the used index and device status for a while.
//!
//! The garbage never lets the device write outside this process's DMA
//! memory: every device-writable descriptor (direct or in an indirect
//! table, whatever chain reaches it) points into the writable half of the
//! scratch area, page-local, or above 2^50 where no guest memory is.
//! Indirect tables live only in the other half, which the device never
//! writes. Device-readable descriptors may point anywhere.

use std::time::{Duration, Instant};

use crate::admin::AdminDev;
use crate::cmd::Outcome;
use crate::dma::{mb, Mem, PAGE};
use crate::error::Result;
use crate::json::Json;
use crate::virtio::st;
use crate::virtq::{DESC_F_NEXT, DESC_F_WRITE};

const DESC_F_INDIRECT: u16 = 4;
const FAR: u64 = 1 << 50;

/// xorshift64 generator (deterministic per seed).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform-ish in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Options.
#[derive(Debug, Clone)]
pub struct GarbageOpts {
    /// Rounds.
    pub rounds: u32,
    /// Seed.
    pub seed: u64,
    /// How long to watch each round.
    pub wait: Duration,
    /// How long the end-of-round reset may take.
    pub reset_timeout: Duration,
}

/// Where garbage may point, in the admin queue's memory.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Descriptor table offset.
    pub desc: usize,
    /// Available ring offset.
    pub avail: usize,
    /// Used ring offset.
    pub used: usize,
    /// Queue size.
    pub size: u16,
    /// Indirect-table half of the scratch area (never device-written).
    pub tables: (usize, usize),
    /// Device-writable half of the scratch area.
    pub writable: (usize, usize),
}

/// One descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Flags.
    pub flags: u16,
    /// Next.
    pub next: u16,
}

/// Whether a descriptor is safe: a writable one points page-locally into
/// the writable half or far above guest memory; an indirect one points
/// into the table half.
pub fn is_safe(d: &Desc, mem: &dyn Mem, l: &Layout) -> bool {
    let inside = |(off, len): (usize, usize)| {
        (0..len / PAGE).any(|p| {
            let base = mem.phys(off + p * PAGE);
            d.addr >= base && d.addr + u64::from(d.len) <= base + PAGE as u64
        })
    };
    if d.flags & DESC_F_INDIRECT != 0 {
        return inside(l.tables);
    }
    if d.flags & DESC_F_WRITE != 0 {
        return d.addr >= FAR || inside(l.writable);
    }
    true
}

fn page_local(rng: &mut Rng, mem: &dyn Mem, (off, len): (usize, usize)) -> (u64, u32) {
    let page = rng.below((len / PAGE) as u64) as usize;
    let o = rng.below(PAGE as u64) as usize;
    let n = rng.below((PAGE - o) as u64 + 1) as u32;
    (mem.phys(off + page * PAGE + o), n)
}

/// A random safe descriptor.
pub fn random_desc(rng: &mut Rng, mem: &dyn Mem, l: &Layout) -> Desc {
    let mut flags = (rng.next_u64() & 7) as u16;
    let next = match rng.below(4) {
        0 => rng.next_u64() as u16,
        _ => rng.below(u64::from(l.size)) as u16,
    };
    let (addr, len) = if flags & DESC_F_INDIRECT != 0 {
        let (a, n) = page_local(rng, mem, l.tables);
        // Sometimes a whole number of entries, sometimes not.
        (a, if rng.below(2) == 0 { n & !15 } else { n })
    } else if flags & DESC_F_WRITE != 0 {
        if rng.below(2) == 0 {
            page_local(rng, mem, l.writable)
        } else {
            (FAR + rng.below(1 << 40), rng.next_u64() as u32)
        }
    } else {
        match rng.below(3) {
            0 => page_local(rng, mem, l.writable),
            1 => (rng.below(1 << 32), rng.below(1 << 20) as u32),
            _ => (FAR + rng.below(1 << 40), rng.next_u64() as u32),
        }
    };
    if !is_safe(
        &Desc {
            addr,
            len,
            flags,
            next,
        },
        mem,
        l,
    ) {
        flags &= !(DESC_F_WRITE | DESC_F_INDIRECT);
    }
    Desc {
        addr,
        len,
        flags,
        next,
    }
}

fn put(mem: &dyn Mem, at: usize, d: &Desc) {
    mem.w64(at, d.addr);
    mem.w32(at + 8, d.len);
    mem.w16(at + 12, d.flags);
    mem.w16(at + 14, d.next);
}

/// Fill the descriptor table and the indirect-table half with safe
/// garbage.
pub fn fill_safe(rng: &mut Rng, mem: &dyn Mem, l: &Layout) {
    for i in 0..usize::from(l.size) {
        put(mem, l.desc + 16 * i, &random_desc(rng, mem, l));
    }
    for i in 0..l.tables.1 / 16 {
        put(mem, l.tables.0 + 16 * i, &random_desc(rng, mem, l));
    }
}

/// The kinds of garbage.
pub const KINDS: [&str; 5] = [
    "random-chains",
    "avail-index-jump",
    "head-out-of-range",
    "descriptor-loop",
    "indirect-tables",
];

/// Write one round of garbage of `kind`; returns how many avail entries
/// it published.
pub fn inject(rng: &mut Rng, mem: &dyn Mem, l: &Layout, kind: usize) -> u16 {
    fill_safe(rng, mem, l);
    let avail_idx = mem.r16(l.avail + 2);
    let publish = |heads: &[u16]| {
        for (k, h) in heads.iter().enumerate() {
            let slot = usize::from(avail_idx.wrapping_add(k as u16) % l.size);
            mem.w16(l.avail + 4 + 2 * slot, *h);
        }
        mb();
        mem.w16(l.avail + 2, avail_idx.wrapping_add(heads.len() as u16));
        mb();
        heads.len() as u16
    };
    match kind {
        0 => {
            let n = 1 + rng.below(u64::from(l.size.min(8)));
            let heads: Vec<u16> = (0..n)
                .map(|_| rng.below(u64::from(l.size)) as u16)
                .collect();
            publish(&heads)
        }
        1 => {
            let jump = rng.next_u64() as u16;
            mem.w16(l.avail + 2, avail_idx.wrapping_add(jump));
            mb();
            jump
        }
        2 => publish(&[
            l.size
                .wrapping_add(rng.next_u64() as u16 % (u16::MAX - l.size)),
            0xffff,
        ]),
        3 => {
            let a = rng.below(u64::from(l.size)) as u16;
            let b = rng.below(u64::from(l.size)) as u16;
            let (wa, wl) = page_local(rng, mem, l.writable);
            put(
                mem,
                l.desc + 16 * usize::from(a),
                &Desc {
                    addr: wa,
                    len: wl,
                    flags: DESC_F_NEXT,
                    next: b,
                },
            );
            put(
                mem,
                l.desc + 16 * usize::from(b),
                &Desc {
                    addr: wa,
                    len: wl,
                    flags: DESC_F_NEXT | DESC_F_WRITE,
                    next: a,
                },
            );
            publish(&[a])
        }
        _ => {
            let h = rng.below(u64::from(l.size)) as u16;
            let (ta, tl) = page_local(rng, mem, l.tables);
            let flags = DESC_F_INDIRECT | if rng.below(3) == 0 { DESC_F_NEXT } else { 0 };
            put(
                mem,
                l.desc + 16 * usize::from(h),
                &Desc {
                    addr: ta,
                    len: tl & !15,
                    flags,
                    next: rng.below(u64::from(l.size)) as u16,
                },
            );
            publish(&[h])
        }
    }
}

/// Run `o.rounds` rounds; `reopen` brings the PF up afresh (reset). Each
/// round ends with a virtio reset of the PF that must complete (status
/// reads back 0) before the round's DMA memory is freed: a chain the device
/// is still working on must not land in pages this process gives back.
/// After the last round the PF must come up again and answer LIST_QUERY,
/// and `check` (e.g. a member's DEV_MODE_GET, or I/O on another VF) must
/// pass. The run is healthy only if the garbage reached the device: some
/// rounds completed requests or set DEVICE_NEEDS_RESET.
pub fn run(
    reopen: &mut dyn FnMut() -> Result<AdminDev>,
    check: &mut dyn FnMut(&mut AdminDev) -> Result<()>,
    o: &GarbageOpts,
) -> Result<Outcome> {
    let mut rng = Rng::new(o.seed);
    let mut per_kind = vec![(0u32, 0u32, 0u32); KINDS.len()];
    for _ in 0..o.rounds {
        let mut a = reopen()?;
        let kind = rng.below(KINDS.len() as u64) as usize;
        let (mem, desc, avail, used, size, scratch, slen) = a.raw_ring();
        let half = slen / 2 / PAGE * PAGE;
        let l = Layout {
            desc,
            avail,
            used,
            size,
            tables: (scratch, half),
            writable: (scratch + half, half),
        };
        let used_before = mem.r16(l.used + 2);
        inject(&mut rng, mem, &l, kind);
        a.kick();
        let t = Instant::now();
        let mut status = a.dev.status();
        while t.elapsed() < o.wait && status & st::NEEDS_RESET == 0 {
            a.run_poll_hook();
            std::thread::sleep(Duration::from_micros(200));
            status = a.dev.status();
        }
        let (mem, ..) = a.raw_ring();
        let completed = mem.r16(l.used + 2).wrapping_sub(used_before);
        let e = &mut per_kind[kind];
        e.0 += 1;
        e.1 += u32::from(completed > 0);
        e.2 += u32::from(status & st::NEEDS_RESET != 0);
        // The device is done with this round's memory only once its reset
        // has completed; `a` (and its DMA memory) goes after that.
        a.dev.reset(o.reset_timeout)?;
    }
    let mut a = reopen()?;
    let bits = a.list_query()?;
    check(&mut a)?;
    let reached: u32 = per_kind.iter().map(|(_, c, nr)| c + nr).sum();
    let healthy = o.rounds == 0 || reached > 0;
    let kinds: Vec<Json> = KINDS
        .iter()
        .zip(&per_kind)
        .map(|(n, (r, c, nr))| {
            Json::obj()
                .with("kind", *n)
                .with("rounds", *r)
                .with("rounds_with_completions", *c)
                .with("rounds_needs_reset", *nr)
        })
        .collect();
    let mut human = if healthy {
        format!(
            "{} rounds of admin-queue garbage ({reached} reached the device); device healthy afterwards",
            o.rounds
        )
    } else {
        format!(
            "{} rounds of admin-queue garbage, none completed a request or set \
             DEVICE_NEEDS_RESET: the garbage never reached the device",
            o.rounds
        )
    };
    for (n, (r, c, nr)) in KINDS.iter().zip(&per_kind) {
        human.push_str(&format!(
            "\n  {n:<18} {r:>5} rounds, {c:>5} with completions, {nr:>5} set DEVICE_NEEDS_RESET"
        ));
    }
    let json = Json::obj()
        .with("command", "garbage")
        .with("ok", healthy)
        .with("rounds", o.rounds)
        .with("seed", o.seed)
        .with("kinds", Json::A(kinds))
        .with("rounds_reached_device", reached)
        .with("healthy", healthy)
        .with("list_query_after", crate::json::hex(bits));
    let mut out = Outcome::ok(json, human);
    if !healthy {
        out.err = Some(crate::error::Error::Verify(out.human.clone()));
    }
    Ok(out)
}

/// SR-IOV capability registers (offsets in the capability) a garbage
/// writer may hit without taking VFs away: all read-only for the guest
/// while VF Enable is set (InitialVFs, TotalVFs, NumVFs, Function
/// Dependency Link, First VF Offset, VF Stride, VF Device ID, Supported
/// Page Sizes).
pub const SRIOV_RO_REGS: [u16; 8] = [0x0c, 0x0e, 0x10, 0x12, 0x14, 0x16, 0x1a, 0x1c];

/// Write `writes` random values into the PF's read-only SR-IOV registers
/// and the VF Migration bits of SR-IOV Control (VF Enable, VF MSE and ARI
/// Capable Hierarchy kept), through `write16(config offset, value)`; then
/// check with `read_cfg()` that no read-only register changed.
pub fn sriov_garbage(
    rng: &mut Rng,
    writes: u32,
    read_cfg: &mut dyn FnMut() -> Result<Vec<u8>>,
    write16: &mut dyn FnMut(u16, u16) -> Result<()>,
) -> Result<Json> {
    let cfg = read_cfg()?;
    let cap = crate::pci::parse_sriov(&cfg)
        .ok_or_else(|| crate::error::Error::Usage("the PF has no SR-IOV capability".into()))?;
    let base = usize::from(cap.offset);
    let reg = |c: &[u8], off: u16| crate::wire::le16(c, base + usize::from(off)).unwrap_or(0);
    let before: Vec<u16> = SRIOV_RO_REGS.iter().map(|&o| reg(&cfg, o)).collect();
    let keep = cap.control & 0x19;
    for _ in 0..writes {
        if rng.below(4) == 0 {
            write16(cap.offset + 0x08, keep | (rng.next_u64() as u16 & 0x6))?;
        } else {
            let o = SRIOV_RO_REGS[rng.below(SRIOV_RO_REGS.len() as u64) as usize];
            write16(cap.offset + o, rng.next_u64() as u16)?;
        }
    }
    write16(cap.offset + 0x08, cap.control)?;
    let after_cfg = read_cfg()?;
    let changed: Vec<Json> = SRIOV_RO_REGS
        .iter()
        .zip(&before)
        .filter(|(&o, &b)| reg(&after_cfg, o) != b)
        .map(|(&o, &b)| {
            Json::obj()
                .with("offset", crate::json::hex(u64::from(o)))
                .with("before", crate::json::hex(b.into()))
                .with("after", crate::json::hex(reg(&after_cfg, o).into()))
        })
        .collect();
    if !changed.is_empty() {
        return Err(crate::error::Error::Verify(format!(
            "read-only SR-IOV registers changed: {}",
            Json::A(changed).to_string_compact()
        )));
    }
    Ok(Json::obj()
        .with("writes", writes)
        .with("read_only_intact", true)
        .with("control", crate::json::hex(reg(&after_cfg, 0x08).into())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::FakeMem;

    fn layout(mem: &FakeMem) -> Layout {
        let _ = mem;
        Layout {
            desc: 0,
            avail: PAGE,
            used: 2 * PAGE,
            size: 16,
            tables: (3 * PAGE, 2 * PAGE),
            writable: (5 * PAGE, 2 * PAGE),
        }
    }

    #[test]
    fn garbage_is_always_safe() {
        let mem = FakeMem::new(8, false);
        let l = layout(&mem);
        let mut rng = Rng::new(42);
        for round in 0..2000 {
            let kind = round % KINDS.len();
            inject(&mut rng, &mem, &l, kind);
            for i in 0..usize::from(l.size) {
                let o = l.desc + 16 * i;
                let mut a = [0u8; 8];
                mem.read(o, &mut a);
                let d = Desc {
                    addr: u64::from_le_bytes(a),
                    len: mem.r32(o + 8),
                    flags: mem.r16(o + 12),
                    next: mem.r16(o + 14),
                };
                assert!(is_safe(&d, &mem, &l), "round {round} kind {kind}: {d:x?}");
            }
            for i in 0..l.tables.1 / 16 {
                let o = l.tables.0 + 16 * i;
                let mut a = [0u8; 8];
                mem.read(o, &mut a);
                let d = Desc {
                    addr: u64::from_le_bytes(a),
                    len: mem.r32(o + 8),
                    flags: mem.r16(o + 12),
                    next: mem.r16(o + 14),
                };
                assert!(is_safe(&d, &mem, &l), "table entry {i}: {d:x?}");
            }
        }
    }

    #[test]
    fn safety_rules() {
        let mem = FakeMem::new(8, false);
        let l = layout(&mem);
        let w = mem.phys(5 * PAGE);
        let ok = |addr, len, flags| {
            is_safe(
                &Desc {
                    addr,
                    len,
                    flags,
                    next: 0,
                },
                &mem,
                &l,
            )
        };
        assert!(ok(w, 4096, DESC_F_WRITE));
        assert!(
            !ok(w, 4097, DESC_F_WRITE),
            "crosses into a discontiguous page"
        );
        assert!(!ok(0x1000, 8, DESC_F_WRITE), "guest memory not ours");
        assert!(ok(FAR, u32::MAX, DESC_F_WRITE));
        assert!(ok(0x1000, 8, 0), "reads are harmless");
        assert!(!ok(w, 16, DESC_F_INDIRECT), "tables only in the table half");
        assert!(ok(mem.phys(3 * PAGE), 64, DESC_F_INDIRECT));
    }
}
