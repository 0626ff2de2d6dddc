//! Replays the committed fuzz corpus on the stable toolchain: every file of
//! `fuzz/seeds/TARGET/` (the working corpus, minimized by `cargo fuzz cmin`) and of
//! `fuzz/regressions/TARGET/` (inputs that once crashed a target) goes
//! through the same function the fuzz target calls. A target that panics
//! fails the test, naming the file.

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(kind: &str) -> usize {
    let mut replayed = 0;
    for (name, target) in scratchd_fuzzing::TARGETS {
        for file in files(&fuzz_dir().join(kind).join(name)) {
            let data = std::fs::read(&file).expect("read a corpus file");
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name}: {} fails", file.display());
            replayed += 1;
        }
    }
    replayed
}

#[test]
fn the_seed_corpus_passes_every_target() {
    let n = replay("seeds");
    // Every target has seeds; an empty corpus means the path is wrong.
    assert!(
        n >= scratchd_fuzzing::TARGETS.len(),
        "only {n} corpus files"
    );
    for (name, _) in scratchd_fuzzing::TARGETS {
        assert!(
            !files(&fuzz_dir().join("seeds").join(name)).is_empty(),
            "no seeds for {name}"
        );
    }
}

#[test]
fn past_crashes_stay_fixed() {
    replay("regressions");
}

#[test]
fn empty_and_short_inputs_are_harmless() {
    for (_, target) in scratchd_fuzzing::TARGETS {
        for len in 0..64 {
            target(&vec![0; len]);
            target(&vec![0xff; len]);
        }
    }
}
