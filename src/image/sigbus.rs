//! A `SIGBUS` handler that explains a lost mapping instead of dying with "Bus error".
//!
//! Once the image file is truncated by another program (or its storage fails), pages of the
//! mapping vanish and any copy touching them raises `SIGBUS`. The mapping cannot be trusted
//! after that, so the handler writes one line naming the image to standard error (the
//! daemon's log) and ends the process. `loopfuse detach` then cleans up the stale attachment.

use std::path::Path;
use std::sync::OnceLock;

/// The message written by the handler, built before the handler is installed because a
/// signal handler may not allocate.
static MESSAGE: OnceLock<Vec<u8>> = OnceLock::new();

/// Exit status of a daemon stopped by a lost mapping.
const EXIT_STATUS: i32 = 75;

extern "C" fn on_sigbus(_signal: libc::c_int) {
    if let Some(message) = MESSAGE.get() {
        // SAFETY: write(2) is async-signal-safe, and `message` is a live, initialised buffer
        // that is never changed after `MESSAGE` was set.
        unsafe {
            libc::write(libc::STDERR_FILENO, message.as_ptr().cast(), message.len());
        }
    }

    // SAFETY: _exit(2) is async-signal-safe and does not return.
    unsafe { libc::_exit(EXIT_STATUS) }
}

/// Installs the handler for this process, naming `image` in its message.
///
/// Only the first call sets the message; a daemon serves a single image.
pub fn install(image: &Path) {
    let text = format!(
        "loopfuse: {}: bus error in the image mapping: the image file was truncated or its \
         storage failed; the daemon stops. Restore the image size, then run 'loopfuse detach'.\n",
        image.display()
    );
    if MESSAGE.set(text.into_bytes()).is_err() {
        return;
    }

    // SAFETY: a zeroed `sigaction` is a valid value (no flags, empty mask), and the fields set
    // below make it a plain handler. `on_sigbus` only calls async-signal-safe functions and
    // reads `MESSAGE`, which was initialised above, before the handler can run.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
            log::warn!("{}: cannot install the SIGBUS handler", image.display());
        }
    }
}
