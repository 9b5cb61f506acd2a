//! The HTTP API on a Unix socket (`--api-socket`), with Cloud Hypervisor's
//! endpoints under `/api/v1/`.
//!
//! The API thread accepts connections and gives each its own thread (at
//! most [`MAX_CLIENTS`] at a time, each with a read timeout, so a client
//! that connects and sends nothing holds up nobody). A request is parsed
//! and routed here; what it asks of the VM is done by a [`Control`]: in the
//! VMM, the main thread, which owns the VM (see [`ControlChannel`]).

pub mod http;

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use self::http::{ReadError, Response};

/// Most connections served at once; more get 503.
pub const MAX_CLIENTS: usize = 16;
/// How long a connection may stay silent (between or inside requests).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request may wait for the VM's answer.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a snapshot, restore or migration may take.
pub const LONG_CONTROL_TIMEOUT: Duration = Duration::from_secs(3600);

/// What a request asks of the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    VmmPing,
    VmmShutdown,
    VmInfo,
    VmCounters,
    VmPause,
    VmResume,
    VmShutdown,
    VmReboot,
    VmPowerButton,
    VmSnapshot(serde_json::Value),
    VmRestore(serde_json::Value),
    VmSendMigration(serde_json::Value),
    VmReceiveMigration(serde_json::Value),
}

impl ApiRequest {
    /// How long the VMM may take to answer it: [`LONG_CONTROL_TIMEOUT`]
    /// for requests that move the whole guest memory, else
    /// [`CONTROL_TIMEOUT`].
    pub fn timeout(&self) -> Duration {
        match self {
            ApiRequest::VmSnapshot(_)
            | ApiRequest::VmRestore(_)
            | ApiRequest::VmSendMigration(_)
            | ApiRequest::VmReceiveMigration(_) => LONG_CONTROL_TIMEOUT,
            _ => CONTROL_TIMEOUT,
        }
    }

    /// The endpoint's name (`vm.pause`).
    pub fn endpoint(&self) -> &'static str {
        match self {
            ApiRequest::VmmPing => "vmm.ping",
            ApiRequest::VmmShutdown => "vmm.shutdown",
            ApiRequest::VmInfo => "vm.info",
            ApiRequest::VmCounters => "vm.counters",
            ApiRequest::VmPause => "vm.pause",
            ApiRequest::VmResume => "vm.resume",
            ApiRequest::VmShutdown => "vm.shutdown",
            ApiRequest::VmReboot => "vm.reboot",
            ApiRequest::VmPowerButton => "vm.power-button",
            ApiRequest::VmSnapshot(_) => "vm.snapshot",
            ApiRequest::VmRestore(_) => "vm.restore",
            ApiRequest::VmSendMigration(_) => "vm.send-migration",
            ApiRequest::VmReceiveMigration(_) => "vm.receive-migration",
        }
    }
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiReply {
    /// 200 with a JSON body.
    Json(serde_json::Value),
    /// 204.
    Done,
}

/// A failed one: its status code and message (the response body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

pub type ApiResult = Result<ApiReply, ApiError>;

/// What to do once the response is written (see [`Control`]).
pub type AfterResponse = Option<Box<dyn FnOnce() + Send>>;

/// Carries out requests. `then` is called once the response has been
/// written to the client (or could not be): a request that ends the VMM
/// answers first and acts in `then`.
pub trait Control: Send + Sync {
    fn request(&self, req: ApiRequest) -> (ApiResult, AfterResponse);
}

/// The endpoints: `(method, name)`.
const ENDPOINTS: [(&str, &str); 13] = [
    ("GET", "vmm.ping"),
    ("PUT", "vmm.shutdown"),
    ("GET", "vm.info"),
    ("GET", "vm.counters"),
    ("PUT", "vm.pause"),
    ("PUT", "vm.resume"),
    ("PUT", "vm.shutdown"),
    ("PUT", "vm.reboot"),
    ("PUT", "vm.power-button"),
    ("PUT", "vm.snapshot"),
    ("PUT", "vm.restore"),
    ("PUT", "vm.send-migration"),
    ("PUT", "vm.receive-migration"),
];

/// Maps a request line and body to an [`ApiRequest`], or to the error a
/// client gets: 404 for an unknown path, 405 for a wrong method, 400 for a
/// body that is not the JSON object the endpoint takes.
pub fn route(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, ApiError> {
    let path = path.split('?').next().unwrap_or("");
    let Some(name) = path.strip_prefix("/api/v1/") else {
        return Err(ApiError::new(404, format!("unknown path {path}")));
    };
    let Some((want, _)) = ENDPOINTS.iter().find(|(_, n)| *n == name) else {
        return Err(ApiError::new(404, format!("unknown endpoint {name}")));
    };
    if method != *want {
        return Err(ApiError::new(
            405,
            format!("{name} takes {want}, not {method}"),
        ));
    }
    let object = || -> Result<serde_json::Value, ApiError> {
        let v: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::new(400, format!("{name}: the body is not JSON: {e}")))?;
        if !v.is_object() {
            return Err(ApiError::new(
                400,
                format!("{name}: the body must be a JSON object"),
            ));
        }
        Ok(v)
    };
    Ok(match name {
        "vmm.ping" => ApiRequest::VmmPing,
        "vmm.shutdown" => ApiRequest::VmmShutdown,
        "vm.info" => ApiRequest::VmInfo,
        "vm.counters" => ApiRequest::VmCounters,
        "vm.pause" => ApiRequest::VmPause,
        "vm.resume" => ApiRequest::VmResume,
        "vm.shutdown" => ApiRequest::VmShutdown,
        "vm.reboot" => ApiRequest::VmReboot,
        "vm.power-button" => ApiRequest::VmPowerButton,
        "vm.snapshot" => ApiRequest::VmSnapshot(object()?),
        "vm.restore" => ApiRequest::VmRestore(object()?),
        "vm.send-migration" => ApiRequest::VmSendMigration(object()?),
        _ => ApiRequest::VmReceiveMigration(object()?),
    })
}

fn to_response(r: &ApiResult) -> Response {
    match r {
        Ok(ApiReply::Json(v)) => Response::json(200, v),
        Ok(ApiReply::Done) => Response::empty(204),
        Err(e) => Response::text(e.status, &e.message),
    }
}

/// Serves one connection until it closes, goes silent for
/// [`CLIENT_TIMEOUT`] or sends something malformed.
fn serve_client(mut stream: UnixStream, control: &dyn Control) {
    let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    let mut buf = Vec::new();
    loop {
        let req = match http::read_request(&mut stream, &mut buf) {
            Ok(r) => r,
            Err(ReadError::Bad { status, message }) => {
                let _ = http::write_response(&mut stream, &Response::text(status, &message), true);
                return;
            }
            Err(ReadError::TimedOut) if !buf.is_empty() => {
                let _ = http::write_response(
                    &mut stream,
                    &Response::text(408, "the request did not arrive in time"),
                    true,
                );
                return;
            }
            Err(_) => return,
        };
        let (result, then) = match route(&req.method, &req.path, &req.body) {
            Ok(r) => control.request(r),
            Err(e) => (Err(e), None),
        };
        let written = http::write_response(&mut stream, &to_response(&result), req.close);
        if let Some(f) = then {
            f();
        }
        if req.close || written.is_err() {
            return;
        }
    }
}

/// Starts the API thread on `listener`.
pub fn spawn(listener: UnixListener, control: Arc<dyn Control>) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Api);
            let active = Arc::new(AtomicUsize::new(0));
            for stream in listener.incoming() {
                let mut stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        log::warn!("api: accept: {e}");
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                if active.load(Ordering::Acquire) >= MAX_CLIENTS {
                    let _ = http::write_response(
                        &mut stream,
                        &Response::text(503, "too many API connections"),
                        true,
                    );
                    continue;
                }
                active.fetch_add(1, Ordering::AcqRel);
                let (a, c) = (active.clone(), control.clone());
                let spawned =
                    std::thread::Builder::new()
                        .name("api-client".into())
                        .spawn(move || {
                            crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::ApiClient);
                            serve_client(stream, &*c);
                            a.fetch_sub(1, Ordering::AcqRel);
                        });
                if let Err(e) = spawned {
                    log::warn!("api: cannot start a client thread: {e}");
                    active.fetch_sub(1, Ordering::AcqRel);
                }
            }
        })
}

/// One request on its way to the main thread, with where to answer.
pub struct ControlMessage {
    pub request: ApiRequest,
    pub reply: mpsc::Sender<(ApiResult, AfterResponse)>,
}

/// A [`Control`] that hands each request to the thread that owns the VM:
/// queued on a channel, signalled on an eventfd the owner polls, answered
/// within [`CONTROL_TIMEOUT`].
pub struct ControlChannel {
    tx: Mutex<mpsc::Sender<ControlMessage>>,
    event: EventFd,
}

impl ControlChannel {
    /// The channel, and the receiving end for the VM's thread.
    pub fn new() -> io::Result<(ControlChannel, mpsc::Receiver<ControlMessage>, EventFd)> {
        let event = EventFd::new(libc::EFD_NONBLOCK)?;
        let wake = event.try_clone()?;
        let (tx, rx) = mpsc::channel();
        Ok((
            ControlChannel {
                tx: Mutex::new(tx),
                event,
            },
            rx,
            wake,
        ))
    }
}

impl Control for ControlChannel {
    fn request(&self, request: ApiRequest) -> (ApiResult, AfterResponse) {
        let (reply, answer) = mpsc::channel();
        let sent = self
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(ControlMessage {
                request: request.clone(),
                reply,
            });
        if sent.is_err() {
            return (Err(ApiError::new(500, "the VM is gone")), None);
        }
        let _ = self.event.write(1);
        let limit = request.timeout();
        match answer.recv_timeout(limit) {
            Ok(a) => a,
            Err(_) => (
                Err(ApiError::new(
                    500,
                    format!("the VMM did not answer within {} s", limit.as_secs()),
                )),
                None,
            ),
        }
    }
}

#[cfg(test)]
mod tests;
