//! A failed disk creation leaves no file, no descriptor and no budget
//! behind. Descriptors are counted process-wide, so this is its own test
//! binary with a single test: nothing else opens files meanwhile.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use scratchd_scratch::config::{FormatKind, FormatSpec};
use scratchd_scratch::disk::{CreateError, DiskFactory, Maker, Placement};
use scratchd_scratch::format::FormatError;
use scratchd_store::memory::Budget;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn failing(timeout: Duration, script: &str) -> Box<FormatSpec> {
    Box::new(FormatSpec {
        kind: FormatKind::Command(script.into()),
        fs_type: "ext4".into(),
        label: None,
        env: vec![],
        timeout,
    })
}

#[test]
fn failed_and_timed_out_creations_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let budget = Arc::new(Budget::new(u64::MAX));
    let placements = || {
        [
            Placement::Memory(budget.clone()),
            Placement::Dir {
                path: dir.path().to_owned(),
                budget: Some(budget.clone()),
            },
        ]
    };
    fn failed(e: &CreateError) -> bool {
        matches!(e, CreateError::Format(FormatError::Exit { code: 1, stderr }) if stderr == "boom")
    }
    fn timed_out(e: &CreateError) -> bool {
        matches!(e, CreateError::Format(FormatError::TimedOut { stderr, .. }) if stderr == "slow")
    }
    let cases = [
        (
            Duration::from_secs(10),
            "echo boom >&2; exit 1",
            failed as fn(&CreateError) -> bool,
        ),
        (
            Duration::from_millis(200),
            "echo slow >&2; sleep 30",
            timed_out,
        ),
    ];
    for (timeout, script, expected) in cases {
        for placement in placements() {
            let maker = Maker {
                quota: None,
                size: 1 << 20,
                placement,
                format: failing(timeout, script),
            };
            maker.check().unwrap();
            let before = open_fds();
            let err = maker.create().unwrap_err();
            assert!(expected(&err), "{script:?}: {err:?}");
            assert_eq!(open_fds(), before, "descriptors leaked by {script:?}");
        }
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    assert_eq!(budget.used(), 0);
}
