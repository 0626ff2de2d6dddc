//! `scratchd generate`: manual pages and shell completions.
//!
//! What to expect is read from the binary's own `--help`, not listed here,
//! so that a new subcommand is checked for a page without touching this
//! file.

use std::path::Path;
use std::process::Command;

use crate::util::{require, run, run_status, stdout, SCRATCHD};

/// `scratchd ARGS… --help`.
fn help(path: &[String]) -> String {
    stdout(&run(Command::new(SCRATCHD).args(path).arg("--help")))
}

/// The subcommands `--help` lists under "Commands:" (clap's `help` left out).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// The long options `--help` lists (`--port`), clap's own left out.
fn long_options(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| *l != "Options:")
        .filter_map(|l| {
            let flag = l.split_whitespace().find(|w| w.starts_with("--"))?;
            let flag = flag.trim_end_matches(',');
            let flag = flag.split(['=', '[', '<', '.']).next()?;
            (flag != "--help" && flag != "--version").then(|| flag.to_owned())
        })
        .collect()
}

/// Every visible command, as its path below `scratchd` (`[]`, `["ctl"]`,
/// `["ctl", "list"]`, …), with its `--help`.
fn command_tree() -> Vec<(Vec<String>, String)> {
    let mut out = Vec::new();
    let mut todo = vec![Vec::new()];
    while let Some(path) = todo.pop() {
        let text = help(&path);
        for sub in subcommands(&text) {
            let mut child = path.clone();
            child.push(sub);
            todo.push(child);
        }
        out.push((path, text));
    }
    out
}

/// A page as text, rendered by groff with long lines and no hyphenation
/// (so that every flag is found whole); groff's warnings fail the test.
fn render(page: &Path) -> String {
    let out = run(Command::new("groff")
        .args(["-man", "-Tascii", "-P-cbou", "-rLL=300n", "-rHY=0", "-ww"])
        .arg(page));
    let warnings = String::from_utf8_lossy(&out.stderr);
    assert!(
        warnings.is_empty(),
        "groff warns about {}:\n{warnings}",
        page.display()
    );
    stdout(&out)
}

#[test]
fn man_pages_cover_every_visible_command_and_its_options() {
    require("groff");
    let dir = tempfile::tempdir().unwrap();
    let man = dir.path().join("man1");
    let out = run(Command::new(SCRATCHD).args(["generate", "man"]).arg(&man));
    let tree = command_tree();
    assert!(
        tree.len() >= 8,
        "serve, run, ctl and its subcommands: {tree:?}"
    );
    for (path, help) in &tree {
        let name = std::iter::once("scratchd")
            .chain(path.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join("-");
        let page = man.join(format!("{name}.1"));
        assert!(page.is_file(), "no page {}", page.display());
        assert!(stdout(&out).contains(&page.display().to_string()));
        let source = std::fs::read_to_string(&page).unwrap();
        assert!(source.contains(".TH"), "{name}: no .TH header");
        let text = render(&page);
        assert!(
            text.contains("NAME") && text.contains(&name),
            "{name}:\n{text}"
        );
        for flag in long_options(help) {
            assert!(text.contains(&flag), "{name}(1) does not mention {flag}");
        }
    }
    let pages = std::fs::read_dir(&man).unwrap().count();
    assert_eq!(pages, tree.len(), "pages beyond the visible commands");
    assert!(
        !man.join("scratchd-run-watchdog.1").exists(),
        "a hidden command has a page"
    );
}

#[test]
fn completions_for_bash_zsh_and_fish_name_the_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    let top = subcommands(&help(&[]));
    let ctl = subcommands(&help(&["ctl".to_owned()]));
    for (shell, file) in [
        ("bash", "scratchd.bash"),
        ("zsh", "_scratchd"),
        ("fish", "scratchd.fish"),
    ] {
        let out = run(Command::new(SCRATCHD)
            .args(["generate", "completions", shell])
            .arg(dir.path()));
        let path = dir.path().join(file);
        assert_eq!(stdout(&out).trim(), path.display().to_string());
        let script = std::fs::read_to_string(&path).unwrap();
        for sub in top.iter().chain(&ctl) {
            assert!(script.contains(sub.as_str()), "{shell}: no {sub}");
        }
        assert!(script.contains("memory-limit"), "{shell}: serve's options");
        // Without a directory: the same script on standard output.
        let printed = run(Command::new(SCRATCHD).args(["generate", "completions", shell]));
        assert_eq!(stdout(&printed), script, "{shell}");
    }
    run(Command::new("bash")
        .arg("-n")
        .arg(dir.path().join("scratchd.bash")));
    // The script loads into bash and completes the subcommands.
    let script = format!(
        "source {}; COMP_WORDS=(scratchd c); COMP_CWORD=1; _scratchd scratchd c scratchd; echo \"${{COMPREPLY[@]}}\"",
        dir.path().join("scratchd.bash").display()
    );
    let out = run(Command::new("bash").arg("-c").arg(script));
    assert_eq!(stdout(&out).trim(), "ctl", "completing `scratchd c`");
}

/// A directory that cannot be made, or a shell clap does not know: a
/// clear error and a failing exit status, nothing written.
#[test]
fn generate_errors_are_clear() {
    let (code, out) = run_status(Command::new(SCRATCHD).args(["generate", "man", "/proc/no/such"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot create /proc/no/such"), "{err}");
    let (code, out) = run_status(Command::new(SCRATCHD).args(["generate", "completions", "tcsh"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("invalid value 'tcsh'"), "{err}");
}
