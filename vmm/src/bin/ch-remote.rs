//! `ch-remote`: drives a running `cloud-hypervisor` through its API socket,
//! with Cloud Hypervisor's subcommands: `ch-remote --api-socket PATH ping`,
//! `info`, `counters`, `pause`, `resume`, `shutdown`, `reboot`,
//! `power-button`, `shutdown-vmm`, `snapshot URL`, `restore source_url=URL`,
//! `send-migration URL`, `receive-migration URL`.
//!
//! A command that returns data prints its JSON; the others print nothing.
//! A failure prints one line and exits with status 1.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vmm::api::http::exchange;

#[derive(Parser, Debug)]
#[command(
    name = "ch-remote",
    version,
    about = "Remotely control a cloud-hypervisor VMM through its API socket"
)]
struct Cli {
    /// The VMM's API socket (its --api-socket).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,

    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Check that the VMM answers (prints its version and pid).
    Ping,
    /// The VM's configuration and state.
    Info,
    /// The VM's device counters.
    Counters,
    /// Pause the VM.
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Shut the VM down (this VMM then exits).
    Shutdown,
    /// Reboot the VM (this VMM exits, as on a guest reboot).
    Reboot,
    /// Press the VM's power button.
    PowerButton,
    /// Shut the VMM down.
    ShutdownVmm,
    /// Snapshot the VM to a directory URL (file:///path).
    Snapshot { destination_url: String },
    /// Restore a VM: "source_url=file:///path".
    Restore { config: String },
    /// Send the VM to a receiving VMM (unix:/path or tcp:host:port).
    SendMigration {
        destination_url: String,
        /// Local migration through shared memory (Cloud Hypervisor's
        /// option; this VMM refuses it: it copies memory over the socket).
        #[arg(long)]
        local: bool,
        /// Downtime target of the last round, in milliseconds (default 300).
        #[arg(long, value_name = "MS")]
        downtime: Option<u64>,
    },
    /// Receive a VM from a sending VMM.
    ReceiveMigration { receiver_url: String },
}

/// (method, endpoint, body).
fn request(cmd: &Cmd) -> Result<(&'static str, &'static str, Option<String>), String> {
    let json = |v: serde_json::Value| Some(v.to_string());
    Ok(match cmd {
        Cmd::Ping => ("GET", "vmm.ping", None),
        Cmd::Info => ("GET", "vm.info", None),
        Cmd::Counters => ("GET", "vm.counters", None),
        Cmd::Pause => ("PUT", "vm.pause", None),
        Cmd::Resume => ("PUT", "vm.resume", None),
        Cmd::Shutdown => ("PUT", "vm.shutdown", None),
        Cmd::Reboot => ("PUT", "vm.reboot", None),
        Cmd::PowerButton => ("PUT", "vm.power-button", None),
        Cmd::ShutdownVmm => ("PUT", "vmm.shutdown", None),
        Cmd::Snapshot { destination_url } => (
            "PUT",
            "vm.snapshot",
            json(serde_json::json!({ "destination_url": destination_url })),
        ),
        Cmd::Restore { config } => {
            let url = config
                .split(',')
                .find_map(|kv| kv.strip_prefix("source_url="))
                .ok_or_else(|| format!("restore: expected source_url=URL, got {config:?}"))?;
            (
                "PUT",
                "vm.restore",
                json(serde_json::json!({ "source_url": url })),
            )
        }
        Cmd::SendMigration {
            destination_url,
            local,
            downtime,
        } => {
            let mut body =
                serde_json::json!({ "destination_url": destination_url, "local": local });
            if let Some(d) = downtime {
                body["downtime"] = (*d).into();
            }
            ("PUT", "vm.send-migration", json(body))
        }
        Cmd::ReceiveMigration { receiver_url } => (
            "PUT",
            "vm.receive-migration",
            json(serde_json::json!({ "receiver_url": receiver_url })),
        ),
    })
}

fn run(cli: &Cli) -> Result<Option<String>, String> {
    let (method, endpoint, body) = request(&cli.cmd)?;
    let mut stream = UnixStream::connect(&cli.api_socket)
        .map_err(|e| format!("cannot connect to {}: {e}", cli.api_socket.display()))?;
    // Snapshots, restores and migrations move the whole guest memory and
    // answer when done; everything else answers within seconds.
    let long = matches!(
        cli.cmd,
        Cmd::Snapshot { .. }
            | Cmd::Restore { .. }
            | Cmd::SendMigration { .. }
            | Cmd::ReceiveMigration { .. }
    );
    let limit = if long { 3600 } else { 60 };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(limit)));
    let r = exchange(
        &mut stream,
        method,
        &format!("/api/v1/{endpoint}"),
        body.as_deref().map(str::as_bytes),
    )
    .map_err(|e| format!("{endpoint}: {e}"))?;
    let text = String::from_utf8_lossy(&r.body).to_string();
    match r.status {
        200 => Ok(Some(text)),
        204 => Ok(None),
        s => Err(format!(
            "Server responded with an error: {s} {}: {}",
            vmm::api::http::reason(s),
            text.trim()
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error running command: {e}");
            ExitCode::from(1)
        }
    }
}
