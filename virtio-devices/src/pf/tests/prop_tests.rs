//! Property tests: random admin command sequences against a plain model of
//! the spec (R-ADM-1..3, R-MODE-1,2,5, R-CTX-1..3,6, R-WR-2,4,5), and fuzzing
//! of the command parser, the chain walker and the context decoder (nothing
//! may panic).

use proptest::prelude::*;

use super::*;
use crate::pf::admin::{qualifier as q, status as s};
use crate::pf::context::{ContextDecoder, ContextError};

/// The model's view of one member.
#[derive(Clone, Debug)]
struct MMember {
    mode: u8,
    snap: Option<Vec<u8>>,
    off: usize,
    /// The stream being written and how much of it went in.
    wstream: Option<(Vec<u8>, usize)>,
    pending: Option<MemberContext>,
    ctx: MemberContext,
    ranges: Vec<u64>,
}

impl MMember {
    fn read_partial(&self) -> bool {
        self.snap
            .as_ref()
            .is_some_and(|v| self.off > 0 && self.off < v.len())
    }
}

#[derive(Clone, Debug)]
struct Model {
    in_use: u64,
    vf_enable: bool,
    num_vfs: u16,
    members: Vec<MMember>,
}

#[derive(Clone, Debug)]
enum Step {
    Cmd {
        group: u16,
        op: u16,
        member: u64,
        arg: u64,
        cap: usize,
        layout: u8,
    },
    PfReset,
    VfEnable(bool),
    NumVfs(u16),
}

const OPS: [u16; 16] = [
    0x00, 0x01, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0f, 0x10, 0x11, 0x12, 0x0e, 0x02, 0x13,
];

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        20 => (
            prop_oneof![20 => Just(1u16), 1 => Just(0u16), 1 => Just(2u16)],
            prop::sample::select(OPS.to_vec()),
            prop_oneof![10 => 1u64..=3, 1 => Just(0u64), 1 => Just(4u64), 1 => Just(1u64 << 40)],
            any::<u64>(),
            0usize..200,
            0u8..5,
        )
            .prop_map(|(group, op, member, arg, cap, layout)| Step::Cmd {
                group,
                op,
                member,
                arg,
                cap,
                layout
            }),
        1 => Just(Step::PfReset),
        1 => any::<bool>().prop_map(Step::VfEnable),
        1 => (0u16..=3).prop_map(Step::NumVfs),
    ]
}

/// Streams a driver may write: valid contexts of the fake device.
fn stream_for(seed: u64) -> Vec<u8> {
    sample_context(2, seed % 4).to_bytes()
}

/// What the model expects: status, qualifier, output, result (`None` =
/// not checked).
type Expect = (u16, u16, u32, Option<Vec<u8>>);

impl Model {
    fn new(h: &mut Harness) -> Self {
        let members = (1..=3)
            .map(|i| MMember {
                mode: 0,
                snap: None,
                off: 0,
                wstream: None,
                pending: None,
                ctx: h.member(i).device.ctx.clone(),
                ranges: vec![],
            })
            .collect();
        Model {
            in_use: SUPPORTED_OPCODES,
            vf_enable: true,
            num_vfs: 3,
            members,
        }
    }

    /// The data bytes the driver sends for `op` with `arg`.
    fn data(&self, op: u16, member: u64, arg: u64) -> Vec<u8> {
        match op {
            opcode::LIST_USE => {
                let bits = if arg & 0xf == 0 {
                    arg
                } else {
                    arg & SUPPORTED_OPCODES
                };
                bits.to_le_bytes().to_vec()
            }
            opcode::DEV_MODE_SET => vec![(arg % 5) as u8],
            opcode::DEV_CTX_SIZE_GET => vec![(arg % 3) as u8],
            opcode::DEV_CTX_WRITE => {
                let m = usize::try_from(member)
                    .ok()
                    .and_then(|i| self.members.get(i.wrapping_sub(1)));
                let chunk = 1 + (arg >> 8) as usize % 120;
                match m.and_then(|m| m.wstream.as_ref()) {
                    Some((bytes, done)) => bytes[*done..(*done + chunk).min(bytes.len())].to_vec(),
                    None if arg.is_multiple_of(7) => vec![0xff, 0xff, 0xff, 0xff, 1, 2],
                    None => {
                        let b = stream_for(arg);
                        b[..chunk.min(b.len())].to_vec()
                    }
                }
            }
            opcode::DEV_WRITE_RECORDS_START => {
                let ps = if arg.is_multiple_of(9) { 8192u64 } else { 4096 };
                let k = (arg >> 4) % 4;
                let mut d = ps.to_le_bytes().to_vec();
                d.extend_from_slice(&1u32.to_le_bytes());
                d.extend_from_slice(&[0; 4]);
                d.extend_from_slice(&(k * 0x10_0000).to_le_bytes());
                d.extend_from_slice(&1u64.to_le_bytes());
                d
            }
            opcode::DEV_WRITE_RECORDS_READ => {
                let mut d = 0u64.to_le_bytes().to_vec();
                d.extend_from_slice(&(4u64 << 20).to_le_bytes());
                d
            }
            _ => vec![],
        }
    }

    fn exec(&mut self, group: u16, op: u16, member: u64, arg: u64, cap: usize) -> Expect {
        let err = |st, qu| (st, qu, 0, None);
        let ok = |out: u32, res: Vec<u8>| (0, 0, out, Some(res));
        if group != 1 {
            return err(s::EINVAL, q::INVALID_GROUP);
        }
        let usable = op < 64 && SUPPORTED_OPCODES & (self.in_use | 0b11) & (1 << op) != 0;
        if !usable {
            return err(s::EINVAL, q::INVALID_OPCODE);
        }
        let data = self.data(op, member, arg);
        match op {
            opcode::LIST_QUERY => return ok(0, SUPPORTED_OPCODES.to_le_bytes().to_vec()),
            opcode::LIST_USE => {
                let bits = u64::from_le_bytes(data[..8].try_into().unwrap());
                if bits & !SUPPORTED_OPCODES != 0 {
                    return err(s::EINVAL, q::INVALID_FIELD);
                }
                self.in_use = bits;
                return ok(0, vec![]);
            }
            _ => {}
        }
        if !self.vf_enable {
            return err(s::EINVAL, q::INVALID_GROUP);
        }
        if member == 0 || member > u64::from(self.num_vfs) {
            return err(s::EINVAL, q::INVALID_MEMBER);
        }
        let m = &mut self.members[member as usize - 1];
        match op {
            opcode::DEV_MODE_GET => ok(0, vec![m.mode]),
            opcode::DEV_MODE_SET => {
                let new = data[0];
                if new > 2 {
                    return err(s::EINVAL, q::INVALID_FIELD);
                }
                if new == m.mode {
                    return ok(0, vec![]);
                }
                if new != 2 && (m.read_partial() || m.wstream.is_some()) {
                    return err(s::EBUSY, q::INVALID_COMMAND);
                }
                if m.mode == 2 {
                    if let Some(p) = m.pending.take() {
                        m.ctx = p;
                    }
                }
                m.mode = new;
                m.snap = None;
                m.off = 0;
                ok(0, vec![])
            }
            opcode::DEV_CTX_SIZE_GET => {
                let f = data[0];
                if f > 1 {
                    return err(s::EINVAL, q::INVALID_FIELD);
                }
                let size = match (&m.snap, f == 1 && m.mode != 2) {
                    (Some(v), false) => v.len() - m.off,
                    _ => m.ctx.encoded_len(),
                };
                ok(0, (size as u64).to_le_bytes().to_vec())
            }
            opcode::DEV_CTX_READ => {
                let snap = m.snap.get_or_insert_with(|| m.ctx.to_bytes());
                let n = cap.min(snap.len() - m.off);
                let res = snap[m.off..m.off + n].to_vec();
                m.off += n;
                ok(n as u32, res)
            }
            opcode::DEV_CTX_WRITE => {
                if m.mode != 2 {
                    return err(s::EINVAL, q::INVALID_COMMAND);
                }
                let (bytes, done) = match m.wstream.take() {
                    Some(w) => w,
                    None if data.starts_with(&[0xff; 4]) => {
                        return err(s::EINVAL, q::INVALID_FIELD)
                    }
                    None => (stream_for(arg), 0),
                };
                let done = done + data.len();
                if done == bytes.len() {
                    m.pending = Some(MemberContext::decode(&bytes, &fake_limits(2)).unwrap());
                } else {
                    m.wstream = Some((bytes, done));
                }
                ok(0, vec![])
            }
            opcode::DEV_CTX_FIELDS_QUERY => (0, 0, 0, None),
            opcode::DEV_CTX_DISCARD => {
                if m.read_partial() {
                    m.snap = None;
                    m.off = 0;
                }
                m.wstream = None;
                ok(0, vec![])
            }
            opcode::DEV_WRITE_RECORD_CAP_QUERY => {
                let mut r = 0x211u32.to_le_bytes().to_vec();
                r.extend_from_slice(&64u32.to_le_bytes());
                ok(0, r)
            }
            opcode::DEV_WRITE_RECORDS_START => {
                let ps = u64::from_le_bytes(data[..8].try_into().unwrap());
                let a = u64::from_le_bytes(data[16..24].try_into().unwrap());
                if ps != 4096 || m.ranges.contains(&a) {
                    return err(s::EINVAL, q::INVALID_FIELD);
                }
                m.ranges.push(a);
                ok(0, vec![])
            }
            opcode::DEV_WRITE_RECORDS_STOP => {
                m.ranges.clear();
                ok(0, vec![])
            }
            opcode::DEV_WRITE_RECORDS_READ => {
                if m.ranges.is_empty() {
                    return err(s::EINVAL, q::INVALID_COMMAND);
                }
                ok(0, vec![])
            }
            _ => unreachable!("usable() admitted opcode {op:#x}"),
        }
    }
}

const LAYOUTS: [Layout; 5] = [
    Layout::Two,
    Layout::Split,
    Layout::Odd,
    Layout::Indirect,
    Layout::Bytes,
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Random command sequences in random buffer layouts agree with the
    /// model of the spec, command by command.
    #[test]
    fn admin_sequences_match_the_model(steps in prop::collection::vec(step(), 1..80)) {
        let mut h = Harness::new(3);
        let mut model = Model::new(&mut h);
        for st in steps {
            match st {
                Step::PfReset => {
                    h.admin.reset();
                    model.in_use = 0;
                }
                Step::VfEnable(b) => {
                    h.table.vf_enable = b;
                    model.vf_enable = b;
                }
                Step::NumVfs(n) => {
                    h.table.num_vfs = n;
                    model.num_vfs = n;
                }
                Step::Cmd { group, op, member, arg, cap, layout } => {
                    let data = model.data(op, member, arg);
                    let mut l = LAYOUTS[layout as usize];
                    if l == Layout::Bytes && 24 + data.len() + 8 + cap > 250 {
                        l = Layout::Odd;
                    }
                    h.layout = l;
                    let r = h.cmd_group(group, op, member, &data, cap);
                    let (es, eq, eo, eres) = model.exec(group, op, member, arg, cap);
                    prop_assert_eq!((r.status, r.qualifier), (es, eq),
                        "op {:#x} member {} data {:?}", op, member, data);
                    if es == 0 {
                        prop_assert_eq!(r.out_u32(), eo, "output of op {:#x}", op);
                        if let Some(res) = eres {
                            let n = res.len().min(cap);
                            prop_assert_eq!(&r.result[..], &res[..n], "result of op {:#x}", op);
                        }
                    } else {
                        prop_assert_eq!(r.used, 8);
                    }
                }
            }
        }
        // The device-side state agrees with the model at the end.
        for (i, mm) in model.members.iter().enumerate() {
            let m = h.member(i as u16 + 1);
            prop_assert_eq!(m.mode() as u8, mm.mode);
            prop_assert_eq!(&m.device.ctx, &mm.ctx);
            prop_assert_eq!(m.migration.write_partial(), mm.wstream.is_some());
            prop_assert_eq!(m.migration.pending_context(), mm.pending.as_ref());
            prop_assert_eq!(m.migration.recorder.ranges().len(), mm.ranges.len());
        }
    }

    /// Random readable bytes through the parser and executor: no panic, and
    /// a status is always produced.
    #[test]
    fn fuzz_command_parser_and_executor(bytes in prop::collection::vec(any::<u8>(), 0..200),
                                        op in prop::sample::select(OPS.to_vec()),
                                        cap in 0usize..300) {
        let mut h = Harness::new(2);
        let mut b = bytes.clone();
        if b.len() >= 24 && op != 0x13 {
            // Steer half the cases to real opcodes and group.
            b[0..2].copy_from_slice(&op.to_le_bytes());
            b[2..4].copy_from_slice(&1u16.to_le_bytes());
            let id = 1 + u64::from(b[16] % 2);
            b[16..24].copy_from_slice(&id.to_le_bytes());
        }
        if let Ok(cmd) = AdminCommand::parse(&b) {
            let mut res = Vec::new();
            let _ = h.admin.execute(&mut h.table, &cmd, &mut res, cap);
        } else {
            prop_assert!(b.len() < 24);
        }
        let head = h.submit_raw(&b, cap);
        let done = h.serve();
        prop_assert_eq!(done.len(), 1);
        prop_assert_eq!(done[0].0, head);
        prop_assert!(done[0].1 == 0 || done[0].1 >= 8);
    }

    /// Random descriptor tables (random addresses, lengths, flags, links,
    /// indirect tables): every chain terminates and completes, the queue
    /// keeps being served.
    #[test]
    fn fuzz_descriptor_chains(descs in prop::collection::vec(
                                  (prop_oneof![3 => 0x10_0000u64..0x10_4000, 1 => any::<u64>()],
                                   prop_oneof![3 => 0u32..64, 1 => any::<u32>()],
                                   0u16..8, 0u16..QSIZE), 1..40),
                              heads in prop::collection::vec(0u16..40, 1..8),
                              fill in any::<u8>()) {
        let mut h = Harness::new(2);
        h.mem.write_slice(&[fill; 0x4000], GuestAddress(0x10_0000)).unwrap();
        // A valid header at the start of the buffer area half of the time.
        if fill % 2 == 0 {
            let c = AdminCommand { opcode: u16::from(fill % 0x13), group_type: 1, member_id: 1, data: &[fill], truncated: false };
            h.mem.write_slice(&c.to_bytes(), GuestAddress(0x10_0000)).unwrap();
        }
        let table: Vec<(u16, Desc)> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags, next))| (i as u16, Desc { addr, len, flags, next: next % 48 }))
            .collect();
        // Indirect entries point into the table itself at times.
        for &head in &heads {
            h.tq.add_raw(&h.mem.clone(), &table, head % descs.len() as u16);
        }
        let done = h.serve();
        prop_assert_eq!(done.len(), heads.len());
        prop_assert!(h.cmd(opcode::LIST_QUERY, 0, &[], 8).ok());
    }

    /// Random bytes into the context decoder, whole and chunked: no panic,
    /// and whatever decodes re-encodes to a stream that decodes the same.
    #[test]
    fn fuzz_context_decoder(bytes in prop::collection::vec(any::<u8>(), 0..600),
                            chunk in 1usize..64,
                            prefix in any::<bool>()) {
        let limits = fake_limits(2);
        let mut b = bytes;
        if prefix && b.len() >= 4 {
            // Make field_count plausible so the decoder goes deeper.
            let n = u32::from(b[0] % 10);
            b[0..4].copy_from_slice(&n.to_le_bytes());
            if b.len() >= 20 {
                let ty = [0u16, 1, 2, 3, 4, 0x1000][usize::from(b[4]) % 6];
                b[4..6].copy_from_slice(&ty.to_le_bytes());
            }
        }
        let whole = MemberContext::decode(&b, &limits);
        let mut d = ContextDecoder::new(limits.clone());
        let mut chunked: Result<Option<MemberContext>, ContextError> = Ok(None);
        for piece in b.chunks(chunk) {
            chunked = d.feed(piece);
            if chunked.is_err() || matches!(chunked, Ok(Some(_))) {
                break;
            }
        }
        match (&whole, &chunked) {
            (Ok(c), Ok(Some(c2))) => {
                prop_assert_eq!(c, c2);
                prop_assert!(c.validate(&limits).is_ok());
                let again = MemberContext::decode(&c.to_bytes(), &limits);
                prop_assert_eq!(again.as_ref(), Ok(c));
            }
            (Ok(_), other) => prop_assert!(false, "whole ok, chunked {:?}", other),
            (Err(_), _) => {}
        }
    }

    /// Any valid context round-trips through encode and chunked decode.
    #[test]
    fn context_round_trip(nq in 1u16..6, seed in any::<u64>(), chunk in 1usize..200,
                          owned in prop::collection::vec(0u16..128, 0..20),
                          cfg in prop::collection::vec(any::<u8>(), 60)) {
        let limits = fake_limits(nq);
        let mut c = sample_context(nq, seed);
        let mut o = owned;
        o.sort_unstable();
        o.dedup();
        c.queues[0].device_owned = o;
        c.device_config = Some(cfg);
        if seed % 3 == 0 {
            c.common = None;
            c.queues.remove(0);
        }
        let b = c.to_bytes();
        let mut d = ContextDecoder::new(limits);
        let mut got = None;
        for piece in b.chunks(chunk) {
            if let Some(x) = d.feed(piece).unwrap() {
                got = Some(x);
            }
        }
        prop_assert_eq!(got, Some(c));
    }
}
