//! `mig-cutoff SOCKET PHASE close|refuse`: a migration receiver that
//! breaks off. It accepts one sender on the Unix socket SOCKET, answers
//! every request OK (and throws the payload away) until the first request
//! of PHASE (`start`, `config`, `memory`, `state`, `complete`), then closes
//! the connection (`close`) or answers it with an error (`refuse`) and
//! exits. The tests point a real VMM's send-migration at it to check that
//! the source survives a migration cut off at each phase.

use std::os::unix::net::UnixListener;
use std::process::exit;

use vm_migration::protocol::{self, Command};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, phase, how] = args.as_slice() else {
        eprintln!("usage: mig-cutoff SOCKET start|config|memory|state|complete close|refuse");
        exit(2)
    };
    let cut = match phase.as_str() {
        "start" => Command::Start,
        "config" => Command::Config,
        "memory" => Command::Memory,
        "state" => Command::State,
        "complete" => Command::Complete,
        other => {
            eprintln!("mig-cutoff: unknown phase {other}");
            exit(2)
        }
    };
    let refuse = match how.as_str() {
        "close" => false,
        "refuse" => true,
        other => {
            eprintln!("mig-cutoff: {other}: expected close or refuse");
            exit(2)
        }
    };
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).unwrap_or_else(|e| {
        eprintln!("mig-cutoff: cannot listen on {socket}: {e}");
        exit(1)
    });
    let (mut s, _) = listener.accept().unwrap_or_else(|e| {
        eprintln!("mig-cutoff: accept: {e}");
        exit(1)
    });
    let _ = std::fs::remove_file(socket);
    loop {
        let (cmd, _) = match protocol::read_request(&mut s) {
            Ok(r) => r,
            Err(e) => {
                println!("mig-cutoff: the sender went away before {phase}: {e}");
                exit(1)
            }
        };
        if cmd == cut {
            if refuse {
                let _ =
                    protocol::send_response(&mut s, Err(&format!("mig-cutoff refuses {phase}")));
            }
            println!("mig-cutoff: cut off at {phase}");
            exit(0)
        }
        if protocol::send_response(&mut s, Ok(())).is_err() {
            exit(1)
        }
    }
}
