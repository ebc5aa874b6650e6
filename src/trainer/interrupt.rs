//! Stopping a run between steps: SIGINT and SIGTERM set a flag (all a signal handler may
//! safely do) that [`super::run`] checks before each step; the run then writes its checkpoint
//! and returns an error that names the signal, the step and the checkpoint, so that
//! `recycle train` exits with a message and a resumable checkpoint instead of dying mid-step.
//! A second signal of the same kind, while the first is being handled, ends the process at
//! once (the handler is installed with `SA_RESETHAND`).

use std::sync::atomic::{AtomicI32, Ordering};

/// The signal that asked the run to stop; 0 when none did.
static STOP: AtomicI32 = AtomicI32::new(0);

/// The signal number that asked running trainers to stop, if any.
pub fn stop_requested() -> Option<i32> {
    match STOP.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Asks running trainers to stop after their current step, as `signal` would.
pub fn request_stop(signal: i32) {
    STOP.store(signal, Ordering::SeqCst);
}

/// The name of a signal number, for messages.
pub fn signal_name(signal: i32) -> String {
    #[cfg(unix)]
    {
        match signal {
            libc::SIGINT => return "SIGINT".to_string(),
            libc::SIGTERM => return "SIGTERM".to_string(),
            _ => {}
        }
    }
    format!("signal {signal}")
}

#[cfg(unix)]
extern "C" fn on_signal(signal: libc::c_int) {
    STOP.store(signal, Ordering::SeqCst);
}

/// Installs the SIGINT and SIGTERM handlers (for the command line; a library user decides for
/// itself, and can call [`request_stop`]).
#[cfg(unix)]
pub fn install_signal_handlers() -> std::io::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESETHAND;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Without unix signals there is nothing to install.
#[cfg(not(unix))]
pub fn install_signal_handlers() -> std::io::Result<()> {
    Ok(())
}
