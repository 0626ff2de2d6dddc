//! Names the build for `scratchd --version` (and the man pages): the crate
//! version, the git commit it was built from (`-dirty` with uncommitted
//! changes to tracked files), the build date and the cargo profile, as
//! `SCRATCHD_VERSION`, e.g. `0.1.0 (5d5c40f-dirty, built 2026-05-01, release)`.
//!
//! Outside a git checkout of this very tree (a release tarball, a vendored
//! copy inside another project's repository) the commit is `unknown`. The
//! date is `SOURCE_DATE_EPOCH`'s when that is set, so that distribution
//! builds stay reproducible.

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let commit = commit(Path::new(&manifest_dir)).unwrap_or_else(|| "unknown".to_owned());
    let profile = std::env::var("PROFILE").unwrap_or_else(|_| "unknown".to_owned());
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let date = build_date();
    println!("cargo:rustc-env=SCRATCHD_VERSION={version} ({commit}, built {date}, {profile})");
    println!("cargo:rustc-env=SCRATCHD_BUILD_DATE={date}");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    // The binary's sources decide whether the tree is dirty (an edit only
    // to tests or docs leaves the mark as it was: the binary is the same);
    // the git files below decide the commit. Cargo scans directories.
    for path in ["build.rs", "Cargo.toml", "Cargo.lock", "src", "crates"] {
        println!("cargo:rerun-if-changed={path}");
    }
    for path in git_files(Path::new(&manifest_dir)) {
        println!("cargo:rerun-if-changed={path}");
    }
}

/// Runs git in `dir`; its trimmed output if it succeeded.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The short hash of HEAD, with `-dirty` when tracked files differ from
/// it; `None` unless `dir` is the top of a git work tree.
fn commit(dir: &Path) -> Option<String> {
    let top = git(dir, &["rev-parse", "--show-toplevel"])?;
    if Path::new(&top).canonicalize().ok()? != dir.canonicalize().ok()? {
        return None;
    }
    let hash = git(dir, &["rev-parse", "--short", "HEAD"])?;
    let changes = git(dir, &["status", "--porcelain", "--untracked-files=no"])?;
    Some(if changes.is_empty() {
        hash
    } else {
        format!("{hash}-dirty")
    })
}

/// The files whose change means another commit or another index: HEAD,
/// the branch it points to (loose or packed) and the index. In a linked
/// worktree these live in different directories, which git names.
fn git_files(dir: &Path) -> Vec<String> {
    let mut names = vec![
        "HEAD".to_owned(),
        "index".to_owned(),
        "packed-refs".to_owned(),
    ];
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        names.push(branch);
    }
    names
        .iter()
        .filter_map(|name| {
            git(
                dir,
                &["rev-parse", "--path-format=absolute", "--git-path", name],
            )
        })
        .filter(|path| Path::new(path).exists())
        .collect()
}

/// The build date as YYYY-MM-DD (UTC).
fn build_date() -> String {
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        });
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard
/// Hinnant's `civil_from_days`), to spare the build a date crate.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}
