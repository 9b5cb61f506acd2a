//! Host terminal input for the serial port (`--serial tty` on a terminal).

use std::io::Read;
use std::sync::Arc;

use crate::config::OutputConfig;
use crate::platform::Platform;

/// Forwards standard input to the guest's serial port when the serial port
/// goes to this terminal and standard input is a terminal. The thread ends
/// with the process.
pub fn spawn_serial_input(platform: Arc<Platform>, serial: &OutputConfig) {
    // SAFETY: isatty only inspects the file descriptor.
    let is_tty = unsafe { libc::isatty(libc::STDIN_FILENO) } == 1;
    if *serial != OutputConfig::Tty || !is_tty {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("serial-input".into())
        .spawn(move || {
            crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::SerialInput);
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => platform.serial_input(&buf[..n]),
                }
            }
        });
}
