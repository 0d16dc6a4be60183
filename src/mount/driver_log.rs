//! Keeping the log of a driver that traces every request (`exfat-fuse` stays in the
//! foreground only in its debug mode) to a bounded size. A filter process between the driver
//! and its log file copies the start of the output as it is, which contains every startup
//! message, and after that only the driver's errors and warnings.

use std::io::{self, BufRead, Write};

/// Hidden subcommand that filters a driver's output from standard input to standard output.
pub const FILTER_SUBCOMMAND: &str = "driver-log";

/// Bytes of output copied as they are before the filter keeps only errors and warnings.
const VERBATIM_BYTES: usize = 64 * 1024;

/// The line written where the copy as-is ends.
const TRIMMED_NOTICE: &[u8] =
    b"loopfuse: the driver's later request traces are left out of this log; its errors and warnings follow\n";

/// Line starts of messages worth keeping after the limit: exfat-fuse's errors and warnings
/// (`ERROR: `, `WARN: `), libfuse's own errors, and loopfuse's.
const KEPT_PREFIXES: [&[u8]; 4] = [b"ERROR", b"WARN", b"fuse:", b"loopfuse"];

/// Runs as the hidden subcommand and returns the exit status.
pub fn run_filter() -> u8 {
    let input = io::stdin().lock();
    match filter(input, io::stdout().lock()) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// Copies `input` to `output` line by line: everything up to [`VERBATIM_BYTES`], then only
/// the lines that [`KEPT_PREFIXES`] start. Each line is written as soon as it ends, so the
/// log is current while the driver runs.
pub fn filter(mut input: impl BufRead, mut output: impl Write) -> io::Result<()> {
    let mut copied = 0;
    let mut trimming = false;
    let mut line = Vec::new();
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            return output.flush();
        }
        if !trimming && copied + line.len() <= VERBATIM_BYTES {
            copied += line.len();
            output.write_all(&line)?;
        } else {
            if !trimming {
                trimming = true;
                output.write_all(TRIMMED_NOTICE)?;
            }
            if KEPT_PREFIXES.iter().any(|prefix| line.starts_with(prefix)) {
                output.write_all(&line)?;
            }
        }
        output.flush()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filtered(input: &[u8]) -> Vec<u8> {
        let mut output = Vec::new();
        filter(input, &mut output).unwrap();
        output
    }

    #[test]
    fn short_output_is_copied_whole() {
        let input = b"FUSE exfat 1.3.0\nunique: 1, opcode: INIT (26)\nno newline";
        assert_eq!(filtered(input), input);
    }

    #[test]
    fn long_output_keeps_only_errors_after_limit() {
        let trace = b"unique: 2, opcode: GETATTR (3), nodeid: 1, insize: 56, pid: 7\n";
        let mut input = Vec::new();
        while input.len() < VERBATIM_BYTES {
            input.extend_from_slice(trace);
        }
        let verbatim = input.len() - trace.len();
        input.extend_from_slice(b"ERROR: failed to write cluster 7\n");
        input.extend_from_slice(trace);

        let output = filtered(&input);

        assert_eq!(&output[..verbatim], &input[..verbatim]);
        let rest = &output[verbatim..];
        let mut expected = TRIMMED_NOTICE.to_vec();
        expected.extend_from_slice(b"ERROR: failed to write cluster 7\n");
        assert_eq!(rest, expected);
    }
}
