use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use super::http::{exchange, read_response};
use super::*;

/// Answers pings and info, records what it was asked, and runs `then`
/// hooks that note the response was written first.
#[derive(Default)]
struct Fake {
    seen: Mutex<Vec<ApiRequest>>,
    then_ran: Arc<AtomicBool>,
}

impl Control for Fake {
    fn request(&self, req: ApiRequest) -> (ApiResult, AfterResponse) {
        self.seen.lock().unwrap().push(req.clone());
        match req {
            ApiRequest::VmmPing => (
                Ok(ApiReply::Json(serde_json::json!({"version": "test"}))),
                None,
            ),
            ApiRequest::VmShutdown => {
                let flag = self.then_ran.clone();
                (
                    Ok(ApiReply::Done),
                    Some(Box::new(move || flag.store(true, Ordering::Release))),
                )
            }
            ApiRequest::VmPause => (Err(ApiError::new(405, "not running")), None),
            _ => (Ok(ApiReply::Done), None),
        }
    }
}

struct Server {
    dir: std::path::PathBuf,
    path: std::path::PathBuf,
    fake: Arc<Fake>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn server(name: &str) -> Server {
    let dir = std::env::temp_dir().join(format!("ch-api-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("api.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let fake = Arc::new(Fake::default());
    spawn(listener, fake.clone()).unwrap();
    Server { dir, path, fake }
}

impl Server {
    fn call(&self, method: &str, endpoint: &str, body: Option<&[u8]>) -> http::ClientResponse {
        let mut s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        exchange(&mut s, method, &format!("/api/v1/{endpoint}"), body).unwrap()
    }
}

#[test]
fn every_endpoint_routes_with_its_method() {
    for (method, name) in ENDPOINTS {
        let body: &[u8] = if method == "PUT" { b"{\"x\":1}" } else { b"" };
        let r = route(method, &format!("/api/v1/{name}"), body);
        assert_eq!(
            r.as_ref().map(|r| r.endpoint()),
            Ok(name),
            "{method} {name}"
        );
        let other = if method == "PUT" { "GET" } else { "PUT" };
        let e = route(other, &format!("/api/v1/{name}"), body).unwrap_err();
        assert_eq!(e.status, 405, "{other} {name}");
    }
    assert_eq!(
        route(
            "PUT",
            "/api/v1/vm.snapshot",
            b"{\"destination_url\":\"file:///x\"}"
        )
        .unwrap(),
        ApiRequest::VmSnapshot(serde_json::json!({"destination_url": "file:///x"}))
    );
    assert_eq!(
        route("GET", "/api/v1/vm.nothing", b"").unwrap_err().status,
        404
    );
    assert_eq!(route("GET", "/elsewhere", b"").unwrap_err().status, 404);
    for body in [&b"not json"[..], b"[1,2]", b""] {
        let e = route("PUT", "/api/v1/vm.restore", body).unwrap_err();
        assert_eq!(e.status, 400, "{:?}", String::from_utf8_lossy(body));
    }
    // A query string does not change the endpoint.
    assert_eq!(
        route("GET", "/api/v1/vm.info?x=1", b"").unwrap(),
        ApiRequest::VmInfo
    );
}

#[test]
fn the_server_answers_with_status_codes_and_bodies() {
    let s = server("codes");
    let r = s.call("GET", "vmm.ping", None);
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["version"], "test");
    assert_eq!(s.call("PUT", "vm.pause", None).status, 405);
    assert_eq!(s.call("PUT", "vm.ping", None).status, 404);
    assert_eq!(s.call("PUT", "vmm.ping", None).status, 405);
    let bad = s.call("PUT", "vm.snapshot", Some(b"{oops"));
    assert_eq!(bad.status, 400);
    assert!(String::from_utf8_lossy(&bad.body).contains("not JSON"));
    // Only routed requests reach the VM.
    assert_eq!(
        *s.fake.seen.lock().unwrap(),
        vec![ApiRequest::VmmPing, ApiRequest::VmPause]
    );
    // A body over the limit: 413, the connection closed.
    let mut c = UnixStream::connect(&s.path).unwrap();
    c.write_all(b"PUT /api/v1/vm.restore HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut c).unwrap().status, 413);
}

#[test]
fn the_response_is_written_before_an_action_that_ends_the_vmm() {
    let s = server("then");
    let r = s.call("PUT", "vm.shutdown", None);
    assert_eq!(r.status, 204);
    let t = Instant::now();
    while !s.fake.then_ran.load(Ordering::Acquire) {
        assert!(t.elapsed() < Duration::from_secs(5), "then never ran");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn silent_and_concurrent_clients_do_not_block_each_other() {
    let s = server("concurrent");
    // A client that connects and sends nothing, one that sends half a
    // request: neither holds up the others.
    let _silent = UnixStream::connect(&s.path).unwrap();
    let mut half = UnixStream::connect(&s.path).unwrap();
    half.write_all(b"GET /api/v1/vmm.pi").unwrap();
    // Blocked behind them, the answer would come after CLIENT_TIMEOUT.
    let t = Instant::now();
    assert_eq!(s.call("GET", "vmm.ping", None).status, 200);
    assert!(t.elapsed() < CLIENT_TIMEOUT / 2, "{:?}", t.elapsed());
    // Eight clients, twenty requests each on one connection (keep-alive).
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let path = s.path.clone();
            std::thread::spawn(move || {
                let mut c = UnixStream::connect(&path).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                for _ in 0..20 {
                    let r = exchange(&mut c, "GET", "/api/v1/vmm.ping", None).unwrap();
                    assert_eq!(r.status, 200);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        s.fake
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| **r == ApiRequest::VmmPing)
            .count(),
        161
    );
}

#[test]
fn too_many_connections_get_503_and_the_server_recovers() {
    let s = server("limit");
    let held: Vec<UnixStream> = (0..MAX_CLIENTS)
        .map(|_| UnixStream::connect(&s.path).unwrap())
        .collect();
    // The accept loop takes connections in order: these sixteen are
    // counted before the next one is looked at.
    assert_eq!(s.call("GET", "vmm.ping", None).status, 503);
    drop(held);
    let t = Instant::now();
    loop {
        let r = s.call("GET", "vmm.ping", None);
        if r.status == 200 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "still {}", r.status);
        std::thread::sleep(Duration::from_millis(20));
    }
}
