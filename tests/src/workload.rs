//! Host-side checks of what `vpfctl`'s workloads and migrations logged in a
//! real guest: the workload log (`SUBMIT`/`DONE`/`MOVED`/`FINAL`/`END`
//! lines), the JSON of `vpfctl migrate`, and the backing file read from the
//! host afterwards.

use std::collections::{BTreeMap, BTreeSet};

use crate::pattern::pattern;

/// The files a guest archived onto a disk: `VPFFILE name size\n` and the
/// bytes, per file, until anything else.
pub fn parse_archive(bytes: &[u8]) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    let mut at = 0;
    while let Some(nl) = bytes[at..].iter().position(|&b| b == b'\n') {
        let header = String::from_utf8_lossy(&bytes[at..at + nl]).to_string();
        at += nl + 1;
        let f: Vec<&str> = header.split_whitespace().collect();
        if f.len() != 3 || f[0] != "VPFFILE" {
            break;
        }
        let len: usize = f[2].parse().expect("archive size");
        let body = String::from_utf8_lossy(&bytes[at..at + len]).to_string();
        files.insert(f[1].to_string(), body);
        at += len;
    }
    files
}

/// Guest shell code that archives `files` (in /tmp) onto the whole disk of
/// the virtio-blk function `bdf` in the format [`parse_archive`] reads, and
/// prints `@@T:ARCHIVE=<dd's exit status>@@`.
pub fn archive_script(bdf: &str, files: &[&str]) -> String {
    let mut s = format!("A=/tmp/archive\n: > $A\nfor f in {}; do\n", files.join(" "));
    s.push_str("  [ -f /tmp/$f ] || continue\n");
    s.push_str("  echo \"VPFFILE $f $(wc -c < /tmp/$f)\" >> $A\n  cat /tmp/$f >> $A\ndone\n");
    s.push_str("echo VPFEND >> $A\n");
    s.push_str(&format!(
        "dd if=$A of=/dev/$(ls /sys/bus/pci/devices/{bdf}/virtio*/block) bs=65536 conv=fsync 2>/dev/null; echo \"@@T:ARCHIVE=$?@@\"\n"
    ));
    s
}

/// `key=value` of a log line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .skip(1)
        .find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

pub fn num(s: &str) -> u64 {
    if let Some(h) = s.strip_prefix("0x") {
        u64::from_str_radix(h, 16).unwrap_or_else(|_| panic!("bad number {s}"))
    } else {
        s.parse().unwrap_or_else(|_| panic!("bad number {s}"))
    }
}

/// The value of `"key":` in one-line JSON: a number, a string, or (for `[`)
/// the raw list text.
pub fn json_value(json: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\":");
    let i = json.find(&pat)? + pat.len();
    let rest = &json[i..];
    let end = if rest.starts_with('[') {
        rest.find(']')? + 1
    } else if let Some(r) = rest.strip_prefix('"') {
        return Some(r[..r.find('"')?].to_string());
    } else {
        rest.find([',', '}']).unwrap_or(rest.len())
    };
    Some(rest[..end].to_string())
}

pub fn json_hex_list(list: &str) -> BTreeSet<u64> {
    list.trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|s| s.trim().trim_matches('"'))
        .filter(|s| !s.is_empty())
        .map(num)
        .collect()
}

/// One request of a workload log.
pub struct Request {
    /// When it was submitted (`u64::MAX`: a DONE without a SUBMIT).
    pub submit_t: u64,
    /// Every completion: (time, device, pages written).
    pub done: Vec<(u64, String, Vec<u64>)>,
}

/// Requests of a workload log by id: SUBMIT time, and every DONE (time,
/// device, pages written).
pub fn requests(log: &str) -> BTreeMap<u64, Request> {
    let mut m: BTreeMap<u64, Request> = BTreeMap::new();
    for l in log.lines() {
        if l.starts_with("SUBMIT ") {
            let id = num(field(l, "id").expect("SUBMIT id"));
            let t = num(field(l, "t").expect("SUBMIT t"));
            let prev = m.insert(
                id,
                Request {
                    submit_t: t,
                    done: Vec::new(),
                },
            );
            assert!(prev.is_none(), "request {id} submitted twice");
        } else if l.starts_with("DONE ") {
            let id = num(field(l, "id").expect("DONE id"));
            let t = num(field(l, "t").expect("DONE t"));
            let dev = field(l, "dev").unwrap_or("").to_string();
            let pages = field(l, "wpages")
                .unwrap_or("")
                .split(',')
                .filter(|s| !s.is_empty())
                .map(num)
                .collect();
            m.entry(id)
                .or_insert(Request {
                    submit_t: u64::MAX,
                    done: Vec::new(),
                })
                .done
                .push((t, dev, pages));
        }
    }
    m
}

/// Each FINAL line's block of `disk` (the backing file `name`) holds
/// `pattern(dseed, bytes)`; returns how many blocks were checked (at least
/// one).
pub fn check_finals(log: &str, disk: &[u8], name: &str) -> usize {
    let mut blocks = 0;
    for l in log.lines().filter(|l| l.starts_with("FINAL ")) {
        let sector = num(field(l, "sector").unwrap()) as usize;
        let bytes = num(field(l, "bytes").unwrap()) as usize;
        let dseed = num(field(l, "dseed").unwrap());
        let at = sector * 512;
        assert!(
            disk[at..at + bytes] == pattern(dseed, bytes)[..],
            "{name} at sector {sector} does not hold the data of {l}"
        );
        blocks += 1;
    }
    assert!(blocks > 0, "no FINAL lines in the workload log");
    blocks
}

/// Every request of `reqs` was submitted and completed exactly once.
pub fn assert_exactly_once(reqs: &BTreeMap<u64, Request>) {
    for (id, q) in reqs {
        assert!(
            q.submit_t != u64::MAX,
            "DONE for request {id} never submitted"
        );
        assert_eq!(
            q.done.len(),
            1,
            "request {id} completed {} times",
            q.done.len()
        );
    }
}

/// The write records of a `vpfctl migrate` JSON against the workload's
/// requests: of the requests submitted after recording started and done
/// before Stop was sent, how many there were, and each page one wrote
/// that is not in `recorded_pages` ("PAGE (request ID)").
pub fn record_coverage(reqs: &BTreeMap<u64, Request>, mig: &str) -> (usize, Vec<String>) {
    let t_wr = num(&json_value(mig, "t_wr_started_ns").expect("t_wr_started_ns"));
    let t_stop = num(&json_value(mig, "t_stop_issued_ns").expect("t_stop_issued_ns"));
    let recorded = json_hex_list(&json_value(mig, "recorded_pages").expect("recorded_pages"));
    let mut checked = 0;
    let mut missing = Vec::new();
    for (id, q) in reqs {
        let (t_done, _, pages) = &q.done[0];
        if q.submit_t > t_wr && *t_done < t_stop {
            checked += 1;
            missing.extend(
                pages
                    .iter()
                    .filter(|p| !recorded.contains(p))
                    .map(|p| format!("{p:#x} (request {id})")),
            );
        }
    }
    (checked, missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parsers_read_workload_logs_and_migrate_json() {
        let mut arch = b"VPFFILE a.log 3\nx\nyVPFFILE b.json 2\n{}VPFEND\n".to_vec();
        arch.extend_from_slice(&[0u8; 64]);
        let files = parse_archive(&arch);
        assert_eq!(files.get("a.log").map(String::as_str), Some("x\ny"));
        assert_eq!(files.get("b.json").map(String::as_str), Some("{}"));
        assert_eq!(files.len(), 2);

        let log = "SUBMIT t=5 id=1 op=W\nSUBMIT t=6 id=2 op=W\nDONE t=9 id=1 op=W dev=A wpages=0x1000,0x2000\nDONE t=10 id=1 op=W dev=B wpages=\n";
        let r = requests(log);
        assert_eq!(r[&1].submit_t, 5);
        assert_eq!(
            r[&1].done.len(),
            2,
            "a duplicate completion is kept, so the check sees it"
        );
        assert_eq!(r[&1].done[0].2, vec![0x1000, 0x2000]);
        assert!(r[&2].done.is_empty());

        let j = r#"{"ok":true,"count":3,"pages":["0x1000","0x3000"],"mode":"stop","t":12}"#;
        assert_eq!(json_value(j, "ok").as_deref(), Some("true"));
        assert_eq!(json_value(j, "mode").as_deref(), Some("stop"));
        assert_eq!(json_value(j, "t").as_deref(), Some("12"));
        assert_eq!(
            json_hex_list(&json_value(j, "pages").unwrap()),
            BTreeSet::from([0x1000, 0x3000])
        );
        assert_eq!(field("DONE t=9 id=1 dev=A", "id"), Some("1"));
        assert_eq!(field("DONE t=9 xid=7 id=1", "id"), Some("1"));
    }
}
