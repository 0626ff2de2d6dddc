//! The real binary's snapshot commands (`snapshot list`, `take`, `delete`,
//! `run --from`, `attach --from`) and `run`'s negotiation against a
//! hostile server ([`ScriptedServer`]): names that would drive a terminal,
//! listings past the bound, truncated entries, replies that answer nothing
//! asked, huge or escape-laden refusals, a hang-up mid-answer. Each command
//! must exit non-zero within a time limit, with one short line on standard
//! error, nothing raw from the server on either output (no control
//! character but the line's end), and nothing left behind. The option
//! numbers and the entry's layout are written here from
//! `docs/protocol-notes.md` §13, not taken from `scratchd-proto`, so that a
//! mistake there shows.

use std::path::Path;
use std::process::{Command, Output};

use crate::front::{Attachments, Front};
use crate::util::{run_status, skip_without_fuse, SCRATCHD};
use crate::wire::{
    option_reply, Answer, Msg, ScriptedServer, ERR_POLICY, OPT_EXTENDED_HEADERS, OPT_GO,
    OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY, REP_ACK, REP_SERVER,
};

const OPT_SCRATCHD_FROM: u32 = 0x5344_0001;
const OPT_SCRATCHD_SNAPSHOT: u32 = 0x5344_0002;
const OPT_SCRATCHD_SNAPSHOTS: u32 = 0x5344_0003;
const OPT_SCRATCHD_DELETE_SNAPSHOT: u32 = 0x5344_0004;
const REP_SCRATCHD_SNAPSHOT: u32 = 0x5344_0001;
const ERR_UNKNOWN: u32 = 0x8000_0006;
/// The most entries our client takes in one listing.
const MAX_LISTED: usize = 4096;

/// How long a command may take against a server that answers at once.
const WITHIN_SECONDS: &str = "30";

/// A listed snapshot named `name`: size, bytes held, clones, age in ms,
/// published, string32 name.
fn entry(name: &[u8]) -> Vec<u8> {
    Msg::new()
        .u64(1 << 20)
        .u64(4096)
        .u32(0)
        .u64(1)
        .bytes(&[0])
        .u32(name.len() as u32)
        .bytes(name)
        .0
}

/// A listing reply carrying `data`, to SNAPSHOTS.
fn listed(data: &[u8]) -> Vec<u8> {
    option_reply(OPT_SCRATCHD_SNAPSHOTS, REP_SCRATCHD_SNAPSHOT, data)
}

/// An error message that would retitle the terminal and clear its screen,
/// then fill it.
fn escape_laden_message() -> Vec<u8> {
    [b"\x1b]0;owned\x07\x1b[2J".as_slice(), &[b'x'; 100_000]].concat()
}

/// A server that answers every option with `bytes`.
fn answering(bytes: Vec<u8>) -> ScriptedServer {
    ScriptedServer::start(move |_| Answer {
        bytes: bytes.clone(),
        hang_up: false,
    })
}

/// Runs `command` under `timeout`, so that a hang fails the test rather
/// than stalling it.
fn bounded(command: &mut Command) -> (i32, Output) {
    let mut bounded = Command::new("timeout");
    bounded
        .args(["--kill-after=5", WITHIN_SECONDS])
        .arg(command.get_program())
        .args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => bounded.env(key, value),
            None => bounded.env_remove(key),
        };
    }
    run_status(&mut bounded)
}

/// Asserts that `scratchd WHO ...` failed as it must against a hostile
/// server: not timed out, one line on standard error starting
/// `scratchd WHO: ` and saying `why`, nothing on standard output, no
/// control character anywhere but the line's end.
fn assert_refused_cleanly(case: &str, who: &str, (code, out): (i32, Output), why: &str) {
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let raw = |text: &str| text.chars().any(|c| c.is_control() && c != '\n');
    // What the server sent may be megabytes: messages show its start.
    let head = |text: &str| text.chars().take(300).collect::<String>();
    let (out, err) = (head(&stdout), head(&stderr));
    assert!(
        !raw(&stdout) && !raw(&stderr),
        "{case}: raw server bytes shown: {out:?} {err:?}"
    );
    assert!(
        stderr.len() < 2048,
        "{case}: {} bytes of error: {err:?}...",
        stderr.len()
    );
    assert_ne!(code, 124, "{case}: hung");
    assert!(code != 0, "{case}: succeeded: {out:?} {err:?}");
    assert_eq!(stdout, "", "{case}: {out:?}");
    assert_eq!(stderr.lines().count(), 1, "{case}: {stderr}");
    assert!(
        stderr.starts_with(&format!("scratchd {who}: ")) && stderr.contains(why),
        "{case}: wanted {why:?}: {stderr}"
    );
}

/// `scratchd snapshot ...` of each kind, against the server at `server`.
fn snapshot_command(option: u32, server: &ScriptedServer) -> Command {
    let mut command = Command::new(SCRATCHD);
    command.arg("snapshot");
    match option {
        OPT_SCRATCHD_SNAPSHOTS => command.args(["list", &server.uri_for("")]),
        OPT_SCRATCHD_SNAPSHOT => command.args(["take", &server.uri_for("root"), "base"]),
        OPT_SCRATCHD_DELETE_SNAPSHOT => command.args(["delete", &server.uri_for(""), "base"]),
        other => panic!("no snapshot command sends option {other:#x}"),
    };
    command
}

/// Each hostile answer to a snapshot command: the command it answers, the
/// answer, whether the server then hangs up, and what the error says.
fn snapshot_cases() -> Vec<(&'static str, u32, Vec<u8>, bool, &'static str)> {
    let (list, take, delete) = (
        OPT_SCRATCHD_SNAPSHOTS,
        OPT_SCRATCHD_SNAPSHOT,
        OPT_SCRATCHD_DELETE_SNAPSHOT,
    );
    let ack = |option| option_reply(option, REP_ACK, &[]);
    let good = listed(&entry(b"base"));
    let whole = entry(b"base");
    let server_reply = Msg::new().u32(4).bytes(b"\x1b[2J").bytes(b"\x1b]0;x\x07").0;
    vec![
        (
            "a name that drives the terminal",
            list,
            [listed(&entry(b"\x1b]0;owned\x07\x1b[2J")), ack(list)].concat(),
            false,
            "a listed snapshot is malformed",
        ),
        (
            "one entry past the bound",
            list,
            [good.repeat(MAX_LISTED + 1), ack(list)].concat(),
            false,
            "more than 4096 snapshots listed",
        ),
        (
            "a truncated entry",
            list,
            [good.clone(), listed(&whole[..whole.len() - 2]), ack(list)].concat(),
            false,
            "a listed snapshot is malformed",
        ),
        (
            "an entry with bytes after its name",
            list,
            [listed(&[whole.as_slice(), b"\x1b[2J"].concat()), ack(list)].concat(),
            false,
            "a listed snapshot is malformed",
        ),
        (
            "a reply type that does not answer the option",
            delete,
            [option_reply(delete, REP_SERVER, &server_reply), ack(delete)].concat(),
            false,
            "reply type 0x2 to SCRATCHD_DELETE_SNAPSHOT",
        ),
        (
            "a listing in answer to a take",
            take,
            [option_reply(take, REP_SCRATCHD_SNAPSHOT, &whole), ack(take)].concat(),
            false,
            "a snapshot listed in answer to SCRATCHD_SNAPSHOT",
        ),
        (
            "a reply for a different option",
            take,
            [ack(list), ack(take)].concat(),
            false,
            "broke the NBD protocol: reply to option",
        ),
        (
            "a huge refusal with escapes",
            delete,
            option_reply(delete, ERR_UNKNOWN, &escape_laden_message()),
            false,
            "(SCRATCHD_DELETE_SNAPSHOT: ERR_UNKNOWN): \\u{1b}]0;owned\\u{7}\\u{1b}[2Jxxx",
        ),
        (
            "a hang-up mid-listing",
            list,
            [good.clone(), good[..good.len() / 2].to_vec()].concat(),
            true,
            "I/O error during the NBD handshake",
        ),
    ]
}

#[test]
fn snapshot_commands_refuse_hostile_answers_cleanly() {
    for (case, option, answer, hang_up, why) in snapshot_cases() {
        let server = ScriptedServer::start(move |_| Answer {
            bytes: answer.clone(),
            hang_up,
        });
        let result = bounded(&mut snapshot_command(option, &server));
        assert_refused_cleanly(case, "snapshot", result, why);
        assert_eq!(server.asked(), [option], "{case}: what was asked");
    }
}

/// Hostile answers to SCRATCHD_FROM, the option `run --from` and `attach
/// --from` send before anything is made: a listing it never asks for (of
/// 1 MiB), a reply type it does not take, a huge refusal with escapes.
fn start_from_cases() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let from = OPT_SCRATCHD_FROM;
    let server_reply = Msg::new().u32(4).bytes(b"\x1b[2J").bytes(&[0x1b; 4000]).0;
    vec![
        (
            "a listing to FROM",
            option_reply(from, REP_SCRATCHD_SNAPSHOT, &[0x1b; 1 << 20]),
            "a snapshot listed in answer to SCRATCHD_FROM",
        ),
        (
            "a reply type FROM does not take",
            option_reply(from, REP_SERVER, &server_reply),
            "reply type 0x2 to SCRATCHD_FROM",
        ),
        (
            "a huge refusal of FROM with escapes",
            option_reply(from, ERR_UNKNOWN, &escape_laden_message()),
            "(SCRATCHD_FROM: ERR_UNKNOWN): \\u{1b}]0;owned",
        ),
    ]
}

/// `scratchd run --attach fuse [MORE...] --server URI -- true` on
/// `server`'s disk "build", with `tmp` as its `$TMPDIR` (where a run makes
/// its work directory).
fn run_command(server: &ScriptedServer, more: &[&str], tmp: &Path) -> Command {
    let mut run = Command::new(SCRATCHD);
    run.args(["run", "--attach", "fuse"])
        .args(more)
        .arg("--server")
        .arg(server.uri_for("build"))
        .args(["--", "true"])
        .env("TMPDIR", tmp);
    run
}

/// Asserts that a run left nothing in its `$TMPDIR`.
fn assert_nothing_left_in(tmp: &Path, case: &str) {
    let left: Vec<_> = std::fs::read_dir(tmp).unwrap().collect();
    assert!(left.is_empty(), "{case}: left in TMPDIR: {left:?}");
}

/// `run --from` fails before its disk is attached, and leaves no work
/// directory and no mount.
#[test]
fn run_from_refuses_hostile_answers_cleanly() {
    if skip_without_fuse("run_from_refuses_hostile_answers_cleanly") {
        return;
    }
    for (case, answer, why) in start_from_cases() {
        let server = answering([answer, option_reply(OPT_SCRATCHD_FROM, REP_ACK, &[])].concat());
        let tmp = tempfile::tempdir().unwrap();
        let mut run = run_command(&server, &["--from", "base"], tmp.path());
        assert_refused_cleanly(case, "run", bounded(&mut run), why);
        assert_eq!(server.asked(), [OPT_SCRATCHD_FROM], "{case}");
        assert_nothing_left_in(tmp.path(), case);
    }
}

/// The options every connection of ours sends, answered hostilely:
/// refusals full of escapes, which `-vv` logs (EXTENDED_HEADERS,
/// SET_META_CONTEXT) and the error shows (GO), and a reply of 1 MiB of a
/// type the option does not take. A run shows neither raw nor whole.
#[test]
fn run_shows_no_raw_server_text_in_its_log_or_errors() {
    if skip_without_fuse("run_shows_no_raw_server_text_in_its_log_or_errors") {
        return;
    }
    let server = ScriptedServer::start(|option| Answer {
        bytes: match option {
            OPT_STRUCTURED_REPLY => option_reply(option, REP_ACK, &[]),
            other => option_reply(other, ERR_POLICY, &escape_laden_message()),
        },
        hang_up: false,
    });
    let tmp = tempfile::tempdir().unwrap();
    let (code, out) = bounded(&mut run_command(&server, &["-vv"], tmp.path()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(code != 0 && code != 124, "{code}: {stderr}");
    let asked = [
        OPT_EXTENDED_HEADERS,
        OPT_STRUCTURED_REPLY,
        OPT_SET_META_CONTEXT,
        OPT_GO,
    ];
    assert_eq!(server.asked(), asked);
    let raw = stderr.chars().any(|c| c.is_control() && c != '\n');
    assert!(!raw, "raw server bytes in the log: {stderr:?}");
    // Both refusals logged, and GO's in the error, each escaped, clipped.
    let shown = "\\u{1b}]0;owned\\u{7}\\u{1b}[2Jxxx";
    assert_eq!(stderr.matches(shown).count(), 3, "{stderr}");
    assert!(stderr.lines().all(|l| l.len() < 2048), "{stderr}");
    assert_nothing_left_in(tmp.path(), "refusals");

    let huge = option_reply(
        OPT_EXTENDED_HEADERS,
        REP_SCRATCHD_SNAPSHOT,
        &[0x1b; 1 << 20],
    );
    let server = answering(huge);
    let run = bounded(&mut run_command(&server, &[], tmp.path()));
    let why = "unexpected reply type 0x53440001 to option 11";
    assert_refused_cleanly("1 MiB to EXTENDED_HEADERS", "run", run, why);
    assert_nothing_left_in(tmp.path(), "1 MiB to EXTENDED_HEADERS");
}

/// `attach --from` fails before a holder starts: no record, no mount, no
/// device.
#[test]
fn attach_from_refuses_hostile_answers_cleanly() {
    if skip_without_fuse("attach_from_refuses_hostile_answers_cleanly") {
        return;
    }
    let attachments = Attachments::new(Front::Fuse);
    for (i, (case, answer, why)) in start_from_cases().into_iter().enumerate() {
        let server = answering([answer, option_reply(OPT_SCRATCHD_FROM, REP_ACK, &[])].concat());
        let mount = attachments.mount_point(&format!("m{i}"));
        let uri = server.uri_for("build");
        let mut attach = attachments.attach_command(&mount, &uri, &["--from", "base"]);
        assert_refused_cleanly(case, "attach", bounded(&mut attach), why);
        assert_eq!(server.asked(), [OPT_SCRATCHD_FROM], "{case}");
        let left = attachments.leftovers(&mount, None);
        assert!(left.is_empty(), "{case}: {left:?}");
    }
}
