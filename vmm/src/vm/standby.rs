//! A VMM without a VM (`cloud-hypervisor --api-socket PATH` alone): it
//! serves the API until a VM arrives, by `vm.receive-migration` or
//! `vm.restore`, then runs that VM with the same API socket.

use std::os::fd::AsRawFd;

use super::migrate::{self, MigrationUrl};
use super::{start_api, wait_readable, ApiEnd, Vm, VmError};
use crate::api::{ApiError, ApiReply, ApiRequest, ApiResult};
use crate::config::ApiSocketConfig;
use crate::platform::ExitReason;
use crate::snapshot;

/// What a request to a VMM without a VM led to.
enum Outcome {
    Answer(ApiResult),
    Exit,
    /// A VM is ready (restored or received): answer, then run it.
    Vm(Box<Vm>),
}

/// Serves the API at `sock` with no VM until one arrives, then runs it;
/// returns why it stopped (or `PowerOff` for `vmm.shutdown`).
pub fn serve_standby(sock: &ApiSocketConfig) -> Result<ExitReason, VmError> {
    let api = start_api(sock)?;
    log::info!("no VM: waiting for vm.receive-migration or vm.restore");
    let remove_socket = || {
        if let ApiSocketConfig::Path(p) = sock {
            let _ = std::fs::remove_file(p);
        }
    };
    loop {
        if let Err(e) = wait_readable(&[api.wake.as_raw_fd()]) {
            remove_socket();
            return Err(VmError::EventFd(e));
        }
        let _ = api.wake.read();
        while let Ok(m) = api.requests.try_recv() {
            match handle(&m.request) {
                Outcome::Answer(a) => {
                    let _ = m.reply.send((a, None));
                }
                Outcome::Exit => {
                    // The API thread writes the answer, then tells us: the
                    // process must not end before the client has it.
                    let (told, written) = std::sync::mpsc::channel();
                    let then: crate::api::AfterResponse = Some(Box::new(move || {
                        let _ = told.send(());
                    }));
                    if m.reply.send((Ok(ApiReply::Done), then)).is_ok() {
                        let _ = written.recv_timeout(std::time::Duration::from_secs(5));
                    }
                    remove_socket();
                    return Ok(ExitReason::PowerOff);
                }
                Outcome::Vm(vm) => return run(*vm, api, sock, m.reply),
            }
        }
    }
}

/// Boots the VM that arrived (it comes up paused), resumes it if it was
/// migrated, answers the request that brought it, and runs it.
fn run(
    mut vm: Vm,
    api: ApiEnd,
    sock: &ApiSocketConfig,
    reply: std::sync::mpsc::Sender<(ApiResult, crate::api::AfterResponse)>,
) -> Result<ExitReason, VmError> {
    vm.cfg.api_socket = Some(sock.clone());
    vm.attach_api(api);
    let migrated = vm.incoming;
    let started = vm.boot().and_then(|()| {
        if migrated {
            vm.resume()
                .map(|_| ())
                .map_err(|e| VmError::Restore(format!("resume: {}", e.message)))
        } else {
            Ok(())
        }
    });
    match started {
        Ok(()) => {
            let _ = reply.send((Ok(ApiReply::Done), None));
            vm.run()
        }
        Err(e) => {
            let _ = reply.send((Err(ApiError::new(500, e.to_string())), None));
            Err(e)
        }
    }
}

fn no_vm(req: &ApiRequest) -> Outcome {
    Outcome::Answer(Err(ApiError::new(
        500,
        format!(
            "{}: this VMM has no VM yet (it waits for vm.receive-migration or vm.restore)",
            req.endpoint()
        ),
    )))
}

fn handle(req: &ApiRequest) -> Outcome {
    match req {
        ApiRequest::VmmPing => Outcome::Answer(Ok(ApiReply::Json(serde_json::json!({
            "build_version": env!("CARGO_PKG_VERSION"),
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "features": [],
        })))),
        ApiRequest::VmmShutdown => Outcome::Exit,
        ApiRequest::VmReceiveMigration(body) => {
            let url = match body.get("receiver_url").and_then(|u| u.as_str()) {
                Some(u) => u,
                None => {
                    return Outcome::Answer(Err(ApiError::new(
                        400,
                        "the body needs \"receiver_url\"",
                    )))
                }
            };
            let url = match MigrationUrl::parse(url) {
                Ok(u) => u,
                Err(e) => return Outcome::Answer(Err(ApiError::new(400, e.to_string()))),
            };
            match migrate::receive(&url) {
                Ok(mut vm) => {
                    vm.incoming = true;
                    event_monitor::event("vm", "received", &[]);
                    Outcome::Vm(Box::new(vm))
                }
                Err(e) => {
                    log::warn!("receiving a migration: {e}");
                    Outcome::Answer(Err(ApiError::new(500, e.to_string())))
                }
            }
        }
        ApiRequest::VmRestore(body) => {
            let dir = match body
                .get("source_url")
                .and_then(|u| u.as_str())
                .map(snapshot::url_to_dir)
            {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Outcome::Answer(Err(ApiError::new(400, e.to_string()))),
                None => {
                    return Outcome::Answer(Err(ApiError::new(
                        400,
                        "the body needs \"source_url\"",
                    )))
                }
            };
            match Vm::restore(&dir, None) {
                Ok(vm) => Outcome::Vm(Box::new(vm)),
                Err(e) => Outcome::Answer(Err(ApiError::new(500, e.to_string()))),
            }
        }
        other => no_vm(other),
    }
}
