//! `loopfuse doctor`: checks everything an attachment needs, with one verdict per check and
//! the fix for each failure, and concludes whether `attach` and `run` will work here.
//!
//! Every check looks at the real thing where it can: it opens `/dev/fuse`, mounts a trial
//! filesystem the way an attachment does, and creates a user namespace in a child process.
//! Besides those trials, whose mount points it removes, it changes nothing but creating the
//! runtime directory when missing, as `attach` would.
#![forbid(unsafe_code)]

mod checks;
pub mod container;
mod probe;
mod trial;

use std::fmt;

pub use probe::probe_in_namespace;

/// The verdict of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Attachments work, but something the user may want does not.
    Warn,
    /// Something an attachment needs is missing.
    Fail,
    /// Not checked, because an earlier failure makes it moot.
    Skip,
    /// A finding with no verdict.
    Info,
}

impl fmt::Display for Verdict {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "skip",
            Verdict::Info => "info",
        })
    }
}

/// One line of the report: `VERDICT subject: finding; fix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub verdict: Verdict,
    /// The subject, the finding and, for a failure, the fix.
    pub text: String,
}

impl Check {
    fn new(verdict: Verdict, subject: &str, finding: impl fmt::Display) -> Self {
        Self {
            verdict,
            text: format!("{subject}: {finding}"),
        }
    }

    /// Appends the fix: what to run or change.
    fn with_fix(mut self, fix: impl fmt::Display) -> Self {
        self.text.push_str(&format!("; {fix}"));
        self
    }

    /// Builds a check from an error message that names its own subject and fix.
    fn from_error(verdict: Verdict, error: &dyn std::error::Error) -> Self {
        Self {
            verdict,
            text: crate::error_chain(error),
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{:<4} {}", self.verdict.to_string(), self.text)
    }
}

/// The conclusion of a report: which commands can attach here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `attach` and `run` can mount.
    AttachAndRun,
    /// Only `run` can mount, inside a private user namespace.
    RunOnly,
    /// No attachment can be made.
    Nothing,
}

/// Everything `doctor` found.
#[derive(Debug, Clone)]
pub struct Report {
    pub checks: Vec<Check>,
    pub outcome: Outcome,
}

impl Report {
    /// Whether an attachment will work, through `attach` or at least through `run`.
    pub fn attachment_works(&self) -> bool {
        self.outcome != Outcome::Nothing
    }

    /// Returns the closing line of the report.
    pub fn conclusion(&self) -> &'static str {
        match self.outcome {
            Outcome::AttachAndRun => {
                "verdict: attachments will work: 'attach' and 'run' can mount here"
            }
            Outcome::RunOnly => {
                "verdict: only 'loopfuse run' will work, by mounting in a private user namespace; 'attach' needs the fixes above"
            }
            Outcome::Nothing => {
                "verdict: no attachment will work here until the failures above are fixed"
            }
        }
    }
}

/// Runs every check.
pub fn diagnose() -> Report {
    checks::run_all()
}
