//! Shell completions and man pages, generated from the clap definitions so they never
//! disagree with the parser.
//!
//! The man pages come from a hidden subcommand rather than a separate `[[bin]]` or xtask
//! crate: the pages then describe exactly the binary that writes them, and the project
//! builds one executable instead of two.

use std::path::PathBuf;

use clap::{Args, CommandFactory};
use clap_complete::Shell;

use super::{Cli, CommandResult};

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    pub shell: Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Directory to write loopfuse.1 and one loopfuse-COMMAND.1 per command into.
    pub directory: PathBuf,
}

pub fn run_completions(args: &CompletionsArgs) -> CommandResult {
    let mut command = Cli::command();
    clap_complete::generate(args.shell, &mut command, "loopfuse", &mut std::io::stdout());
    Ok(())
}

pub fn run_man(args: &ManArgs) -> CommandResult {
    let command = Cli::command();
    std::fs::create_dir_all(&args.directory)?;
    for path in write_pages(&command, &args.directory)? {
        println!("{}", path.display());
    }
    Ok(())
}

/// Writes the page of `command` and of each visible subcommand; returns the paths written.
fn write_pages(
    command: &clap::Command,
    directory: &std::path::Path,
) -> std::io::Result<Vec<PathBuf>> {
    let command = command.clone().disable_help_subcommand(true);
    let mut written = Vec::new();

    let path = directory.join("loopfuse.1");
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut page)?;
    std::fs::write(&path, page)?;
    written.push(path);

    for subcommand in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        let name = format!("loopfuse-{}", subcommand.get_name());
        let path = directory.join(format!("{name}.1"));
        let mut page = Vec::new();
        clap_mangen::Man::new(subcommand.clone().name(name)).render(&mut page)?;
        std::fs::write(&path, page)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_cover_visible_commands() {
        let directory = tempfile::tempdir().unwrap();

        let written = write_pages(&Cli::command(), directory.path()).unwrap();

        let names: Vec<String> = written
            .iter()
            .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert!(names.contains(&"loopfuse.1".to_string()), "{names:?}");
        assert!(names.contains(&"loopfuse-mount.1".to_string()), "{names:?}");
        assert!(
            names.contains(&"loopfuse-losetup.1".to_string()),
            "{names:?}"
        );
        assert!(
            !names.iter().any(|name| name.contains("daemon")),
            "{names:?}"
        );
        let page = std::fs::read_to_string(directory.path().join("loopfuse-mount.1")).unwrap();
        assert!(page.contains(".TH loopfuse-mount"), "{page}");
    }

    #[test]
    fn completions_name_subcommands() {
        let mut output = Vec::new();
        clap_complete::generate(Shell::Bash, &mut Cli::command(), "loopfuse", &mut output);

        let script = String::from_utf8(output).unwrap();
        assert!(script.contains("umount"));
        assert!(script.contains("losetup"));
    }
}
