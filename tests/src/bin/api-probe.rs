//! `api-probe SOCKET`: puts a running VMM's API socket through what a
//! careless or hostile client does, and prints one `@@T:PROBE-<case>=<what
//! came back>@@` marker per case (the API test checks them). Read-only
//! endpoints only: it leaves the VM running.
//!
//! Cases: every GET endpoint and every PUT endpoint with the wrong method
//! (405); an unknown endpoint and a path outside the API (404); malformed
//! request line (400); a JSON body that is not an object (400); a body
//! over the limit (413); a head over the limit (431); chunked body (400);
//! a client that connects and sends nothing, one that sends half a request,
//! while eight others ping concurrently; keep-alive (three requests on one
//! connection).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn connect(path: &str) -> UnixStream {
    let s = UnixStream::connect(path).unwrap_or_else(|e| {
        println!("@@T:PROBE-CONNECT=failed {e}@@");
        std::process::exit(1)
    });
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    s
}

/// Sends raw bytes, returns the status line's code (or why none came).
fn raw(path: &str, bytes: &[u8]) -> String {
    let mut s = connect(path);
    if let Err(e) = s.write_all(bytes) {
        // The server may answer and close before reading everything.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return format!("write-error {e}");
        }
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(e) => return format!("read-error {e}"),
        }
    }
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace()
        .nth(1)
        .map(str::to_string)
        .unwrap_or_else(|| format!("no-status {text:?}"))
}

fn request(method: &str, endpoint: &str, body: Option<&str>) -> Vec<u8> {
    let mut r = format!("{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\n");
    if let Some(b) = body {
        r.push_str(&format!("Content-Length: {}\r\n\r\n{b}", b.len()));
    } else {
        r.push_str("\r\n");
    }
    r.into_bytes()
}

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: api-probe SOCKET");
        std::process::exit(2);
    };
    let p = path.as_str();
    let report = |case: &str, what: String| println!("@@T:PROBE-{case}={what}@@");

    for e in ["vmm.ping", "vm.info", "vm.counters"] {
        report(&format!("GET-{e}"), raw(p, &request("GET", e, None)));
    }
    for e in [
        "vmm.shutdown",
        "vm.pause",
        "vm.resume",
        "vm.shutdown",
        "vm.reboot",
        "vm.power-button",
        "vm.snapshot",
        "vm.restore",
        "vm.send-migration",
        "vm.receive-migration",
    ] {
        report(
            &format!("WRONG-METHOD-{e}"),
            raw(p, &request("GET", e, None)),
        );
    }
    report("UNKNOWN", raw(p, &request("GET", "vm.nothing", None)));
    report("OUTSIDE", raw(p, b"GET /etc/passwd HTTP/1.1\r\n\r\n"));
    report("MALFORMED", raw(p, b"GET\x01 nonsense\r\n\r\n"));
    report(
        "NOT-AN-OBJECT",
        raw(p, &request("PUT", "vm.snapshot", Some("[1,2,3]"))),
    );
    report(
        "HUGE-BODY",
        raw(
            p,
            b"PUT /api/v1/vm.restore HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n",
        ),
    );
    let mut head = b"GET /api/v1/vmm.ping HTTP/1.1\r\nX-Pad: ".to_vec();
    head.extend(std::iter::repeat_n(b'a', 64 * 1024));
    head.extend_from_slice(b"\r\n\r\n");
    report("HUGE-HEAD", raw(p, &head));
    report(
        "CHUNKED",
        raw(
            p,
            b"PUT /api/v1/vm.restore HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        ),
    );

    // A silent client and a half request hold up nobody: eight concurrent
    // clients ping meanwhile.
    let _silent = connect(p);
    let mut half = connect(p);
    let _ = half.write_all(b"GET /api/v1/vmm.pi");
    let t = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || raw(&path, &request("GET", "vmm.ping", None)))
        })
        .collect();
    let results: Vec<String> = threads
        .into_iter()
        .map(|t| t.join().unwrap_or_else(|_| "panicked".into()))
        .collect();
    report("CONCURRENT", results.join(","));
    report(
        "CONCURRENT-FAST",
        // Blocked behind the silent client, they would wait its 10 s timeout.
        (t.elapsed() < Duration::from_secs(9)).to_string(),
    );

    // Keep-alive: three requests on one connection.
    let mut c = connect(p);
    let mut ok = 0;
    for _ in 0..3 {
        if c.write_all(&request("GET", "vmm.ping", None)).is_err() {
            break;
        }
        // Read one response: head, then Content-Length bytes.
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            match c.read(&mut byte) {
                Ok(1) => buf.push(byte[0]),
                _ => break,
            }
        }
        let head = String::from_utf8_lossy(&buf).to_string();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        if c.read_exact(&mut body).is_ok() && head.starts_with("HTTP/1.1 200") {
            ok += 1;
        }
    }
    report("KEEP-ALIVE", ok.to_string());
    report("DONE", "yes".into());
}
