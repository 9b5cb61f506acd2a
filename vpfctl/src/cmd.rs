//! One function per admin subcommand: run it, and describe the outcome for
//! humans and as JSON.

use std::path::Path;

use crate::admin::{AdminDev, Reply, Request};
use crate::error::{Error, Result};
use crate::json::{hex, Json};
use crate::wire::{self, opcode, Mode};

/// What a subcommand produced: JSON, human text, and the error that
/// decides the exit code (the JSON is printed even then).
#[derive(Debug)]
pub struct Outcome {
    /// JSON object.
    pub json: Json,
    /// Human-readable lines.
    pub human: String,
    /// Failure, if any.
    pub err: Option<Error>,
}

impl Outcome {
    /// A success.
    pub fn ok(json: Json, human: impl Into<String>) -> Outcome {
        Outcome {
            json,
            human: human.into(),
            err: None,
        }
    }
}

/// The JSON fields every admin reply shares.
pub fn reply_json(r: &Reply) -> Json {
    let mut j = Json::obj()
        .with("opcode", opcode::name(r.opcode))
        .with("opcode_value", r.opcode)
        .with("member", r.member);
    match r.completion {
        Some(c) => {
            j.set("status", wire::status::name(c.status))
                .set("status_value", c.status)
                .set("qualifier", wire::qualifier::name(c.qualifier))
                .set("qualifier_value", c.qualifier)
                .set("output", format!("{:#010x}", c.output_u32()));
        }
        None => {
            j.set("status", Json::Null).set("qualifier", Json::Null);
        }
    }
    j.with("used_len", r.used_len)
        .with("elapsed_us", r.elapsed.as_micros() as u64)
}

/// Describe `r` with `extra` fields; a non-OK reply becomes the error.
fn finish(r: Reply, extra: Vec<(&str, Json)>, human_ok: String) -> Outcome {
    let mut j = reply_json(&r);
    j.set("ok", r.is_ok());
    if r.is_ok() {
        for (k, v) in extra {
            j.set(k, v);
        }
        Outcome::ok(j, human_ok)
    } else {
        let e = r.error();
        let human = match r.completion {
            Some(c) => format!(
                "{} member {}: status {} qualifier {}",
                opcode::name(r.opcode),
                r.member,
                wire::status::name(c.status),
                wire::qualifier::name(c.qualifier)
            ),
            None => format!(
                "{} member {}: no status (used length {})",
                opcode::name(r.opcode),
                r.member,
                r.used_len
            ),
        };
        Outcome {
            json: j,
            human,
            err: Some(e),
        }
    }
}

/// `list-query`.
pub fn list_query(a: &mut AdminDev) -> Result<Outcome> {
    let r = a.exec(&Request::new(opcode::LIST_QUERY, 0, vec![], 8))?;
    let bits = wire::le64(&r.result, 0).unwrap_or(0);
    let names = opcode::names_in(bits);
    let human = format!("supported opcodes {bits:#x}: {}", names.join(" "));
    Ok(finish(
        r,
        vec![("bitmap", hex(bits)), ("opcodes", names.into())],
        human,
    ))
}

/// `list-use`.
pub fn list_use(a: &mut AdminDev, bitmap: Option<u64>) -> Result<Outcome> {
    let bits = match bitmap {
        Some(b) => b,
        None => match a.supported {
            Some(b) => b,
            None => a.list_query()?,
        },
    };
    let r = a.list_use(bits)?;
    let names = opcode::names_in(bits);
    let human = format!("commands in use {bits:#x}: {}", names.join(" "));
    Ok(finish(
        r,
        vec![("bitmap", hex(bits)), ("opcodes", names.into())],
        human,
    ))
}

/// `mode-get`.
pub fn mode_get(a: &mut AdminDev, member: u64) -> Result<Outcome> {
    let r = a.exec(&Request::new(opcode::DEV_MODE_GET, member, vec![], 1))?;
    let m = r.result.first().copied();
    let name = m.map(wire::mode_name);
    let human = format!(
        "member {member}: mode {}",
        name.clone().unwrap_or_else(|| "(none returned)".into())
    );
    Ok(finish(
        r,
        vec![("mode", name.into()), ("mode_value", m.into())],
        human,
    ))
}

/// `mode-set`.
pub fn mode_set(a: &mut AdminDev, member: u64, mode: u8) -> Result<Outcome> {
    let r = a.mode_set(member, mode)?;
    let human = format!("member {member}: mode set to {}", wire::mode_name(mode));
    Ok(finish(
        r,
        vec![
            ("mode", wire::mode_name(mode).into()),
            ("mode_value", mode.into()),
        ],
        human,
    ))
}

/// `ctx-size`.
pub fn ctx_size(a: &mut AdminDev, member: u64, freeze: bool) -> Result<Outcome> {
    let r = a.exec(&Request::new(
        opcode::DEV_CTX_SIZE_GET,
        member,
        wire::ctx_size_data(freeze),
        8,
    ))?;
    let size = wire::le64(&r.result, 0);
    let human = format!(
        "member {member}: context size {} bytes{}",
        size.map(|s| s.to_string()).unwrap_or_else(|| "?".into()),
        if freeze { " (Freeze estimate)" } else { "" }
    );
    Ok(finish(
        r,
        vec![("size", size.into()), ("freeze", freeze.into())],
        human,
    ))
}

fn ctx_fields_json(stream: &[u8]) -> (Json, String) {
    match wire::parse_context(stream) {
        Ok(s) => {
            let mut lines = format!("{} fields:", s.field_count);
            let fields: Vec<Json> = s
                .fields
                .iter()
                .map(|f| {
                    lines.push_str(&format!(
                        "\n  {:<22} length {:>4}{}",
                        wire::field_type_name(f.ty),
                        f.length,
                        f.queue.map(|q| format!("  queue {q}")).unwrap_or_default()
                    ));
                    Json::obj()
                        .with("type", f.ty)
                        .with("name", wire::field_type_name(f.ty))
                        .with("length", f.length)
                        .with("queue", f.queue)
                })
                .collect();
            (Json::A(fields), lines)
        }
        Err(e) => (
            Json::S(format!("unparsable: {e}")),
            format!("(stream unparsable: {e})"),
        ),
    }
}

/// `ctx-read`: loop until a short read.
pub fn ctx_read(
    a: &mut AdminDev,
    member: u64,
    out: Option<&Path>,
    chunk: usize,
) -> Result<Outcome> {
    let chunk = chunk.clamp(1, crate::admin::MAX_RESULT);
    let mut data = Vec::new();
    let mut reads = 0u32;
    loop {
        let r = a.exec(&Request::new(opcode::DEV_CTX_READ, member, vec![], chunk))?;
        reads += 1;
        if !r.is_ok() {
            let mut o = finish(r, vec![], String::new());
            o.json
                .set("bytes_read_before", data.len())
                .set("reads", reads);
            return Ok(o);
        }
        let n = r
            .completion
            .map(|c| c.output_u32() as usize)
            .unwrap_or(0)
            .min(r.result.len());
        data.extend_from_slice(&r.result[..n]);
        if n < chunk {
            break;
        }
    }
    if let Some(p) = out {
        std::fs::write(p, &data).map_err(|e| Error::io("write", p, e))?;
    }
    let (fields, lines) = ctx_fields_json(&data);
    let mut j = Json::obj()
        .with("opcode", "DEV_CTX_READ")
        .with("member", member)
        .with("ok", true)
        .with("status", "OK")
        .with("qualifier", "Q_OK")
        .with("bytes", data.len())
        .with("reads", reads)
        .with(
            "fields",
            if data.is_empty() {
                Json::A(vec![])
            } else {
                fields
            },
        );
    match out {
        Some(p) => j.set("out", p.display().to_string()),
        None => j.set("data_hex", wire::to_hex(&data)),
    };
    let mut human = format!(
        "member {member}: read {} context bytes in {reads} command(s)",
        data.len()
    );
    if let Some(p) = out {
        human.push_str(&format!(" -> {}", p.display()));
    }
    if !data.is_empty() {
        human.push('\n');
        human.push_str(&lines);
    }
    Ok(Outcome::ok(j, human))
}

/// `ctx-write`.
pub fn ctx_write(
    a: &mut AdminDev,
    member: u64,
    input: &Path,
    chunk: Option<usize>,
) -> Result<Outcome> {
    let data = std::fs::read(input).map_err(|e| Error::io("read", input, e))?;
    let chunk = chunk.unwrap_or(data.len().max(1));
    let mut sent = 0usize;
    let mut cmds = 0u32;
    for piece in data.chunks(chunk.max(1)) {
        let r = a.exec(&Request::new(
            opcode::DEV_CTX_WRITE,
            member,
            piece.to_vec(),
            0,
        ))?;
        cmds += 1;
        if !r.is_ok() {
            return Ok(finish(r, vec![], String::new())).map(|mut o| {
                o.json.set("bytes_accepted", sent).set("commands", cmds);
                o.human
                    .push_str(&format!(" after {sent} of {} bytes", data.len()));
                o
            });
        }
        sent += piece.len();
    }
    let j = Json::obj()
        .with("opcode", "DEV_CTX_WRITE")
        .with("member", member)
        .with("ok", true)
        .with("status", "OK")
        .with("qualifier", "Q_OK")
        .with("bytes", sent)
        .with("commands", cmds);
    Ok(Outcome::ok(
        j,
        format!("member {member}: wrote {sent} context bytes in {cmds} command(s)"),
    ))
}

/// `ctx-fields`.
pub fn ctx_fields(a: &mut AdminDev, member: u64) -> Result<Outcome> {
    let r = a.exec(&Request::new(
        opcode::DEV_CTX_FIELDS_QUERY,
        member,
        vec![],
        4096,
    ))?;
    let f = wire::parse_fields(&r.result);
    let mut human = format!("member {member}: {} field types", f.len());
    for x in &f {
        human.push_str(&format!(
            "\n  {:#06x} {:<22} length {}",
            x.ty,
            wire::field_type_name(x.ty),
            x.length
        ));
    }
    let list: Vec<Json> = f
        .iter()
        .map(|x| {
            Json::obj()
                .with("type", x.ty)
                .with("name", wire::field_type_name(x.ty))
                .with("length", x.length)
        })
        .collect();
    Ok(finish(r, vec![("fields", Json::A(list))], human))
}

/// `ctx-discard`.
pub fn ctx_discard(a: &mut AdminDev, member: u64) -> Result<Outcome> {
    let r = a.exec(&Request::new(opcode::DEV_CTX_DISCARD, member, vec![], 0))?;
    Ok(finish(
        r,
        vec![],
        format!("member {member}: context stream discarded"),
    ))
}

/// `wr-cap`.
pub fn wr_cap(a: &mut AdminDev, member: u64) -> Result<Outcome> {
    let r = a.exec(&Request::new(
        opcode::DEV_WRITE_RECORD_CAP_QUERY,
        member,
        vec![],
        8,
    ))?;
    let cap = wire::WrCap::parse(&r.result).ok();
    let human = match cap {
        Some(c) => format!(
            "member {member}: page sizes {:?}, up to {} ranges",
            c.page_sizes(),
            c.supported_ranges
        ),
        None => String::new(),
    };
    Ok(finish(
        r,
        vec![
            (
                "page_size_bitmap",
                cap.map(|c| hex(c.page_size_bitmap.into()))
                    .unwrap_or(Json::Null),
            ),
            ("page_sizes", cap.map(|c| c.page_sizes()).into()),
            ("supported_ranges", cap.map(|c| c.supported_ranges).into()),
        ],
        human,
    ))
}

fn ranges_json(ranges: &[(u64, u64)]) -> Json {
    Json::A(
        ranges
            .iter()
            .map(|&(a, n)| Json::obj().with("addr", hex(a)).with("pages", n))
            .collect(),
    )
}

/// `wr-start`.
pub fn wr_start(
    a: &mut AdminDev,
    member: u64,
    page_size: u64,
    ranges: &[(u64, u64)],
) -> Result<Outcome> {
    let r = a.exec(&Request::new(
        opcode::DEV_WRITE_RECORDS_START,
        member,
        wire::wr_start_data(page_size, ranges),
        0,
    ))?;
    Ok(finish(
        r,
        vec![
            ("page_size", page_size.into()),
            ("ranges", ranges_json(ranges)),
        ],
        format!(
            "member {member}: write recording started on {} range(s), page size {page_size}",
            ranges.len()
        ),
    ))
}

/// `wr-stop`.
pub fn wr_stop(a: &mut AdminDev, member: u64) -> Result<Outcome> {
    let r = a.exec(&Request::new(
        opcode::DEV_WRITE_RECORDS_STOP,
        member,
        vec![],
        0,
    ))?;
    Ok(finish(
        r,
        vec![],
        format!("member {member}: write recording stopped"),
    ))
}

/// `wr-read`.
pub fn wr_read(a: &mut AdminDev, member: u64, addr: u64, len: u64, max: usize) -> Result<Outcome> {
    let r = a.exec(&Request::new(
        opcode::DEV_WRITE_RECORDS_READ,
        member,
        wire::wr_read_data(addr, len),
        8 * max,
    ))?;
    let count = r.completion.map(|c| c.output_u32()).unwrap_or(0);
    let addrs = wire::parse_addresses(&r.result, count);
    let mut human = format!(
        "member {member}: {} recorded page(s) in [{addr:#x}, +{len:#x})",
        addrs.len()
    );
    for x in &addrs {
        human.push_str(&format!("\n  {x:#x}"));
    }
    let list: Vec<Json> = addrs.iter().map(|&x| hex(x)).collect();
    Ok(finish(
        r,
        vec![("count", count.into()), ("pages", Json::A(list))],
        human,
    ))
}

/// `raw`.
pub fn raw(a: &mut AdminDev, req: &Request) -> Result<Outcome> {
    let r = a.exec(req)?;
    let human = format!(
        "{} group {} member {}: status {} qualifier {} output {:#010x}, used length {}, result {}",
        opcode::name(req.opcode),
        req.group,
        req.member,
        r.completion
            .map(|c| wire::status::name(c.status))
            .unwrap_or_else(|| "(none)".into()),
        r.completion
            .map(|c| wire::qualifier::name(c.qualifier))
            .unwrap_or_else(|| "(none)".into()),
        r.completion.map(|c| c.output_u32()).unwrap_or(0),
        r.used_len,
        wire::to_hex(&r.result)
    );
    let result = wire::to_hex(&r.result);
    let mut o = finish(
        r,
        vec![("result_hex", result.clone().into())],
        human.clone(),
    );
    // Show the full picture for failures too: that is what raw is for.
    if o.err.is_some() {
        o.json.set("result_hex", result);
        o.human = human;
    }
    Ok(o)
}

/// Percentile `p` (0..=100) of sorted samples (nearest rank).
pub fn percentile(sorted: &[u64], p: u32) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (u64::from(p) * sorted.len() as u64).div_ceil(100).max(1) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// `bench`: the same command `count` times; every reply must be OK.
pub fn bench(a: &mut AdminDev, req: &Request, count: u32) -> Result<Outcome> {
    let mut us = Vec::with_capacity(count as usize);
    for _ in 0..count.max(1) {
        let r = a.exec(req)?;
        if !r.is_ok() {
            return Ok(finish(r, vec![], String::new()));
        }
        us.push(r.elapsed.as_micros() as u64);
    }
    us.sort_unstable();
    let (min, med, p99, max) = (
        us[0],
        percentile(&us, 50),
        percentile(&us, 99),
        us[us.len() - 1],
    );
    let j = Json::obj()
        .with("opcode", opcode::name(req.opcode))
        .with("member", req.member)
        .with("ok", true)
        .with("count", us.len())
        .with("min_us", min)
        .with("median_us", med)
        .with("p99_us", p99)
        .with("max_us", max);
    Ok(Outcome::ok(
        j,
        format!(
            "{} x{} member {}: min {min} us, median {med} us, p99 {p99} us, max {max} us",
            opcode::name(req.opcode),
            us.len(),
            req.member
        ),
    ))
}

/// Parse an opcode given by number or name (`DEV_MODE_GET`, `mode_get`).
pub fn parse_opcode(s: &str) -> std::result::Result<u16, String> {
    if let Ok(v) = wire::parse_u64(s) {
        return u16::try_from(v).map_err(|_| format!("opcode {s} does not fit 16 bits"));
    }
    let up = s.to_ascii_uppercase().replace('-', "_");
    opcode::ALL
        .iter()
        .find(|(_, n)| *n == up || n.strip_prefix("DEV_") == Some(up.as_str()))
        .map(|(o, _)| *o)
        .ok_or_else(|| format!("unknown opcode {s:?}"))
}

/// Parse a mode name for clap.
pub fn parse_mode(s: &str) -> std::result::Result<u8, String> {
    if let Some(m) = Mode::parse(s) {
        return Ok(m as u8);
    }
    // Raw values (e.g. 3) are allowed to test the device's rejection.
    wire::parse_u64(s)
        .ok()
        .and_then(|v| u8::try_from(v).ok())
        .ok_or_else(|| format!("mode {s:?} is not active, stop, freeze or a number 0..255"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Completion;
    use std::time::Duration;

    fn reply(status: u16, qual: u16, result: Vec<u8>) -> Reply {
        Reply {
            opcode: opcode::DEV_MODE_GET,
            member: 2,
            completion: Some(Completion {
                status,
                qualifier: qual,
                output: [1, 0, 0, 0],
            }),
            used_len: 8 + result.len() as u32,
            result,
            elapsed: Duration::from_micros(42),
        }
    }

    #[test]
    fn json_shape_of_success() {
        let o = finish(
            reply(0, 0, vec![2]),
            vec![("mode", "freeze".into())],
            "x".into(),
        );
        assert!(o.err.is_none());
        assert_eq!(
            o.json.to_string_compact(),
            r#"{"opcode":"DEV_MODE_GET","opcode_value":7,"member":2,"status":"OK","status_value":0,"qualifier":"Q_OK","qualifier_value":0,"output":"0x00000001","used_len":9,"elapsed_us":42,"ok":true,"mode":"freeze"}"#
        );
    }

    #[test]
    fn json_shape_of_failure() {
        let o = finish(reply(22, 5, vec![]), vec![("mode", "x".into())], "x".into());
        let e = o.err.as_ref().unwrap();
        assert_eq!(e.exit_code(), 1);
        assert_eq!(o.json.get("ok"), Some(&Json::Bool(false)));
        assert_eq!(o.json.get("status"), Some(&Json::S("EINVAL".into())));
        assert_eq!(
            o.json.get("qualifier"),
            Some(&Json::S("Q_INVALID_MEMBER".into()))
        );
        // Command-specific fields are left out of failures.
        assert_eq!(o.json.get("mode"), None);
        assert!(o.human.contains("EINVAL") && o.human.contains("Q_INVALID_MEMBER"));
    }

    #[test]
    fn context_fields_json() {
        let mut s = 1u32.to_le_bytes().to_vec();
        s.extend_from_slice(&3u16.to_le_bytes());
        s.extend_from_slice(&[0; 6]);
        s.extend_from_slice(&5u64.to_le_bytes());
        s.extend_from_slice(&[2, 0, 7, 0, 1]);
        let (j, h) = ctx_fields_json(&s);
        assert_eq!(
            j.to_string_compact(),
            r#"[{"type":3,"name":"VQ_SPLIT_RUNTIME_CFG","length":5,"queue":2}]"#
        );
        assert!(h.contains("VQ_SPLIT_RUNTIME_CFG"));
    }

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50), 50);
        assert_eq!(percentile(&v, 99), 99);
        assert_eq!(percentile(&v, 100), 100);
        assert_eq!(percentile(&[7], 50), 7);
        assert_eq!(percentile(&[1, 2, 3], 50), 2);
        assert_eq!(percentile(&[], 50), 0);
    }

    #[test]
    fn opcode_and_mode_parsing() {
        assert_eq!(parse_opcode("0x12"), Ok(0x12));
        assert_eq!(parse_opcode("14"), Ok(14));
        assert_eq!(parse_opcode("DEV_MODE_GET"), Ok(7));
        assert_eq!(parse_opcode("mode-set"), Ok(8));
        assert_eq!(parse_opcode("list_query"), Ok(0));
        assert!(parse_opcode("nope").is_err());
        assert!(parse_opcode("0x10000").is_err());
        assert_eq!(parse_mode("freeze"), Ok(2));
        assert_eq!(parse_mode("3"), Ok(3));
        assert!(parse_mode("fast").is_err());
    }
}
