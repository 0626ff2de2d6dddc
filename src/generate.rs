//! `scratchd generate`: manual pages and shell completions, made from the
//! command line's own clap definitions so that they cannot drift from it.
//!
//! Pages come from walking the command tree: `scratchd(1)`, then one page
//! per visible subcommand at every depth (`scratchd-serve(1)`,
//! `scratchd-ctl-list(1)`, …); hidden internal subcommands get none, and a
//! subcommand added later gets its page without a change here. Completions
//! are clap_complete's scripts for the shell asked for.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use clap_complete::Shell;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(subcommand)]
    what: Generate,
}

#[derive(Subcommand, Debug)]
enum Generate {
    /// Write manual pages (scratchd.1 and one per subcommand) into DIR,
    /// e.g. /usr/local/share/man/man1.
    Man {
        /// The directory to write the pages to (created if missing).
        dir: PathBuf,
    },
    /// Write the completion script for SHELL into DIR (as the file name the
    /// shell looks for), or to standard output without DIR.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: Shell,
        /// e.g. /usr/share/bash-completion/completions,
        /// /usr/local/share/zsh/site-functions,
        /// /usr/share/fish/vendor_completions.d.
        dir: Option<PathBuf>,
    },
}

/// Why nothing (or not everything) was written.
#[derive(Debug, thiserror::Error)]
enum GenerateError {
    #[error("cannot create {}: {source}", dir.display())]
    CreateDir { dir: PathBuf, source: io::Error },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot write to standard output: {0}")]
    Stdout(#[source] io::Error),
}

/// Runs `scratchd generate`; `cli` is the whole command line's definition.
pub fn main(args: GenerateArgs, cli: clap::Command) -> i32 {
    let result = match args.what {
        Generate::Man { dir } => man_pages(cli, &dir).map(|written| {
            for path in written {
                println!("{}", path.display());
            }
        }),
        Generate::Completions { shell, dir: None } => {
            let mut out = io::stdout().lock();
            completions(shell, cli, &mut out)
                .and_then(|()| out.flush())
                .map_err(GenerateError::Stdout)
        }
        Generate::Completions {
            shell,
            dir: Some(dir),
        } => completions_into(shell, cli, &dir).map(|path| println!("{}", path.display())),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("scratchd: {e}");
            1
        }
    }
}

/// Writes `scratchd.1` and a page per visible subcommand into `dir`;
/// the paths written.
fn man_pages(cli: clap::Command, dir: &Path) -> Result<Vec<PathBuf>, GenerateError> {
    create_dir(dir)?;
    // `help` is clap's, not ours: no page for it. Building names every
    // subcommand for its page (`scratchd-ctl-list`).
    let mut cli = cli.disable_help_subcommand(true);
    cli.build();
    let mut written = Vec::new();
    write_pages(&cli, dir, &mut written)?;
    Ok(written)
}

/// The page of `cmd`, then those of its visible subcommands.
fn write_pages(
    cmd: &clap::Command,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> Result<(), GenerateError> {
    let man = clap_mangen::Man::new(cmd.clone())
        .date(env!("SCRATCHD_BUILD_DATE"))
        .source(concat!("scratchd ", env!("CARGO_PKG_VERSION")))
        .manual("User Commands");
    let path = dir.join(man.get_filename());
    let mut page = Vec::new();
    man.render(&mut page)
        .and_then(|()| std::fs::write(&path, ascii_roff(&page)))
        .map_err(|source| GenerateError::Write {
            path: path.clone(),
            source,
        })?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir, written)?;
    }
    Ok(())
}

/// The page with every non-ASCII character as a roff escape (`…` becomes
/// `\[u2026]`): troff reads its input as Latin-1 unless a preprocessor
/// says otherwise, and would print UTF-8 help text as garbage.
fn ascii_roff(page: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(page);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            out.push_str(&format!("\\[u{:04X}]", c as u32));
        }
    }
    out.into_bytes()
}

/// Writes the completion script for `shell` to `out`.
fn completions(shell: Shell, mut cli: clap::Command, out: &mut dyn Write) -> io::Result<()> {
    // clap_complete panics on a failed write; buffer, then write.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cli, "scratchd", &mut script);
    out.write_all(&script)
}

/// Writes the completion script for `shell` into `dir` under the name the
/// shell looks for (`scratchd`, `_scratchd`, `scratchd.fish`); its path.
fn completions_into(
    shell: Shell,
    cli: clap::Command,
    dir: &Path,
) -> Result<PathBuf, GenerateError> {
    create_dir(dir)?;
    let path = dir.join(clap_complete::Generator::file_name(&shell, "scratchd"));
    let mut script = Vec::new();
    completions(shell, cli, &mut script)
        .and_then(|()| std::fs::write(&path, &script))
        .map_err(|source| GenerateError::Write {
            path: path.clone(),
            source,
        })?;
    Ok(path)
}

fn create_dir(dir: &Path) -> Result<(), GenerateError> {
    std::fs::create_dir_all(dir).map_err(|source| GenerateError::CreateDir {
        dir: dir.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::ascii_roff;

    #[test]
    fn non_ascii_becomes_roff_escapes() {
        assert_eq!(
            ascii_roff("nbds://…?x é".as_bytes()),
            b"nbds://\\[u2026]?x \\[u00E9]".to_vec()
        );
        assert_eq!(ascii_roff(b".TH A 1\n"), b".TH A 1\n".to_vec());
    }
}
