//! A one-line progress bar on standard error, drawn only when it is a terminal.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Width of the bar in characters.
const BAR_WIDTH: usize = 30;

/// Minimum time between two redraws, so a fast operation does not flood the terminal.
const REDRAW_INTERVAL: Duration = Duration::from_millis(100);

/// A progress bar labelled `label`, silent when standard error is not a terminal.
pub struct Progress {
    label: &'static str,
    enabled: bool,
    drawn: Option<Instant>,
}

impl Progress {
    pub fn on_stderr(label: &'static str) -> Self {
        Self {
            label,
            enabled: std::io::stderr().is_terminal(),
            drawn: None,
        }
    }

    /// Redraws the bar for `done` of `total` bytes, at most every [`REDRAW_INTERVAL`] and
    /// always at the end.
    pub fn update(&mut self, done: u64, total: u64) {
        let recent = self
            .drawn
            .is_some_and(|drawn| drawn.elapsed() < REDRAW_INTERVAL);
        if !self.enabled || (recent && done < total) {
            return;
        }

        let fraction = if total == 0 {
            1.0
        } else {
            done as f64 / total as f64
        };
        let filled = (fraction * BAR_WIDTH as f64) as usize;
        let bar = format!("{}{}", "#".repeat(filled), " ".repeat(BAR_WIDTH - filled));
        let mut stderr = std::io::stderr().lock();
        let _ = write!(
            stderr,
            "\r{} [{bar}] {:3.0}% {} of {} MiB",
            self.label,
            fraction * 100.0,
            done >> 20,
            total >> 20
        );
        let _ = stderr.flush();
        self.drawn = Some(Instant::now());
    }

    /// Ends the line of a bar that was drawn.
    pub fn finish(&mut self) {
        if self.enabled && self.drawn.is_some() {
            eprintln!();
        }
    }
}
