//! Snapshots and clones with the real binary and real peers: a build root
//! prepared once by `scratchd run`, snapshotted with `scratchd snapshot`
//! and started again by `run --from`; a published image that a class's
//! disks start as, read by qemu-img and nbdinfo (which know nothing of
//! snapshots); and a second user (`nobody`) who can neither snapshot,
//! list, delete nor start from another owner's disk or snapshot.

use std::path::Path;
use std::process::Command;

use crate::util::{
    as_user, require, run_status, skip_without_fuse, stdout, Json, Server, NOBODY, SCRATCHD,
};

fn scratchd(args: &[&str]) -> (i32, String, String) {
    let (code, out) = run_status(Command::new(SCRATCHD).args(args));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (code, stdout(&out), err)
}

/// `scratchd ARGS` as `uid`.
fn scratchd_as(uid: u32, args: &[&str]) -> (i32, String, String) {
    let mut argv = vec![SCRATCHD];
    argv.extend_from_slice(args);
    let argv = as_user(Some(uid), &argv);
    let (code, out) = run_status(Command::new(&argv[0]).args(&argv[1..]).current_dir("/"));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (code, stdout(&out), err)
}

/// `scratchd run --server URI --name NAME [--from SNAP] -- sh -c SCRIPT`.
fn run_on(uri: &str, name: &str, from: Option<&str>, script: &str) -> (i32, String, String) {
    let mut args = vec!["run", "--server", uri, "--name", name];
    if let Some(from) = from {
        args.extend(["--from", from]);
    }
    args.extend(["--", "sh", "-c", script]);
    scratchd(&args)
}

#[test]
fn a_prepared_root_snapshotted_starts_builds_that_write_privately() {
    if skip_without_fuse("a_prepared_root_snapshotted_starts_builds_that_write_privately") {
        return;
    }
    let server = Server::start(&["tmpdisk", "size=256M", "linger=60s"]);
    let uri = server.uri();
    let (code, _, err) = run_on(
        &uri,
        "root",
        None,
        r#"mkdir "$SCRATCH_DIR/usr" && echo prepared > "$SCRATCH_DIR/usr/tool""#,
    );
    assert_eq!(code, 0, "{err}");
    // The disk lingers, unmounted and clean: snapshot it.
    let (code, out, err) = scratchd(&["snapshot", "take", &uri, "--name", "root", "base"]);
    assert_eq!((code, out.trim()), (0, "base"), "{err}");
    let read_and_write = r#"cat "$SCRATCH_DIR/usr/tool"; echo mine > "$SCRATCH_DIR/usr/tool""#;
    for build in ["build-1", "build-2"] {
        let (code, out, err) = run_on(&uri, build, Some("base"), read_and_write);
        assert_eq!((code, out.as_str()), (0, "prepared\n"), "{build}: {err}");
    }
    // The snapshot and the root are as they were; the builds' own writes
    // stayed on their disks (which linger).
    let (_, out, _) = run_on(&uri, "build-1", None, r#"cat "$SCRATCH_DIR/usr/tool""#);
    assert_eq!(out, "mine\n");
    let (_, out, _) = run_on(&uri, "root", None, r#"cat "$SCRATCH_DIR/usr/tool""#);
    assert_eq!(out, "prepared\n");
    let (code, out, _) = scratchd(&["snapshot", "list", &uri]);
    assert_eq!(code, 0);
    let line = out.lines().find(|l| l.starts_with("base ")).expect(&out);
    let clones: Vec<&str> = line.split_whitespace().collect();
    assert_eq!((clones[3], clones[5]), ("2", "yours"), "{line}");
    // A name in use is refused, a missing snapshot named.
    let (code, _, err) = scratchd(&["snapshot", "take", &uri, "--name", "root", "base"]);
    assert!(code != 0 && err.contains("exists already"), "{err}");
    let (code, _, err) = run_on(&uri, "build-3", Some("nosuch"), "true");
    assert!(code != 0 && err.contains("no snapshot \"nosuch\""), "{err}");
    // Deleted, its clones read on.
    let (code, _, err) = scratchd(&["snapshot", "delete", &uri, "base"]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = run_on(&uri, "build-2", None, r#"cat "$SCRATCH_DIR/usr/tool""#);
    assert_eq!(out, "mine\n");
}

/// An image the operator publishes, which a class's new disks start as:
/// qemu-img sees the image's bytes on a fresh disk of that class, and the
/// metrics count the snapshot's clone.
/// `qemu-img compare` of a raw image with an export: 0 when equal, 1 when
/// they differ.
fn qemu_img_compare(image: &Path, uri: &str) -> (i32, std::process::Output) {
    let image = image.to_str().unwrap();
    run_status(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", image, uri]))
}

#[test]
fn plain_clients_get_a_clone_of_a_published_image_through_a_class() {
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("root.img");
    crate::util::sparse_file(&image, 64 << 20, &[(0, 8192), (40 << 20, 100_000)]);
    let config = dir.path().join("scratchd.toml");
    std::fs::write(
        &config,
        "backend = \"tmpdisk\"\n[tmpdisk]\nsize = \"64M\"\ntype = \"none\"\n\n\
         [[class]]\nmatch = \"ci-*\"\nfrom = \"farm-root\"\n",
    )
    .unwrap();
    let control = dir.path().join("ctl.sock");
    let server = Server::start(&[
        "--config",
        config.to_str().unwrap(),
        "--publish",
        &format!("farm-root={}", image.display()),
        "--control",
        control.to_str().unwrap(),
    ]);
    let clone = server.uri_for("ci-1");
    let (code, out) = qemu_img_compare(&image, &clone);
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    // A name outside the class is a blank disk.
    let (code, _) = qemu_img_compare(&image, &server.uri_for("other"));
    assert_eq!(code, 1, "a disk outside the class differs from the image");
    let (code, out, err) = scratchd(&[
        "ctl",
        "--control",
        control.to_str().unwrap(),
        "--json",
        "snapshots",
    ]);
    assert_eq!(code, 0, "{err}");
    let j = Json::parse(&out);
    assert_eq!(j.get("snapshots.0.name"), "farm-root");
    assert_eq!(j.get("snapshots.0.owner"), "published");
    assert_eq!(
        j.int("snapshots.0.bytes"),
        8192 + 100_000_u64.next_multiple_of(4096)
    );
}

/// Another user reaches neither a disk nor a snapshot of root's: every
/// request is answered within its own owner, over its own connection.
#[test]
fn another_user_cannot_snapshot_clone_or_delete_what_is_not_theirs() {
    if skip_without_fuse("another_user_cannot_snapshot_clone_or_delete_what_is_not_theirs") {
        return;
    }
    let server = Server::start(&["tmpdisk", "size=64M", "linger=60s"]);
    server.open_to_everyone();
    let uri = server.uri();
    let (code, _, err) = run_on(
        &uri,
        "secret-root",
        None,
        r#"echo secret > "$SCRATCH_DIR/s""#,
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = scratchd(&["snapshot", "take", &uri, "--name", "secret-root", "base"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = scratchd_as(
        NOBODY,
        &["snapshot", "take", &uri, "--name", "secret-root", "stolen"],
    );
    assert!(code != 0 && err.contains("no disk"), "{err}");
    let (code, out, err) = scratchd_as(NOBODY, &["snapshot", "list", &uri]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("base"), "{out}");
    let (code, _, err) = scratchd_as(NOBODY, &["snapshot", "delete", &uri, "base"]);
    assert!(code != 0 && err.contains("no snapshot"), "{err}");
    // nobody's new disk cannot start as root's snapshot: the snapshot a
    // GO names is looked up within nobody's names (and the published).
    let argv = as_user(
        Some(NOBODY),
        &[
            "/usr/bin/python3",
            "-c",
            GO_FROM,
            server.sock.to_str().unwrap(),
            "base",
        ],
    );
    let (code, out) = run_status(Command::new(&argv[0]).args(&argv[1..]).current_dir("/"));
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        stdout(&out).trim(),
        "from=ack go=ERR_UNKNOWN no snapshot \"base\""
    );
    let (code, _, err) = scratchd_as(
        NOBODY,
        &["snapshot", "take", &uri, "--name", "nobodys", "x"],
    );
    assert!(code != 0 && err.contains("no disk"), "{err}");
    // root's snapshot is intact.
    let (code, out, _) = scratchd(&["snapshot", "list", &uri]);
    assert_eq!(code, 0);
    assert!(out.contains("base"), "{out}");
    assert!(Path::new(&server.sock).exists());
}

/// A raw NBD client (no libnbd: it cannot send scratchd's options): over
/// the socket ARGV[1], SCRATCHD_FROM ARGV[2], then GO "x"; prints what
/// each got.
const GO_FROM: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
def recv(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        assert c, "closed"
        b += c
    return b
recv(18)
s.sendall(struct.pack(">I", 3))
def option(code, data):
    s.sendall(struct.pack(">QII", 0x49484156454F5054, code, len(data)) + data)
def reply():
    _, _, kind, n = struct.unpack(">QIII", recv(20))
    return kind, recv(n)
name = sys.argv[2].encode()
option(0x53440001, struct.pack(">I", len(name)) + name)
kind, _ = reply()
words = ["from=ack" if kind == 1 else "from=%x" % kind]
option(7, struct.pack(">I", 1) + b"x" + struct.pack(">H", 0))
while True:
    kind, data = reply()
    if kind == 1:
        words.append("go=ack")
        break
    if kind & 0x80000000:
        code = {0x80000006: "ERR_UNKNOWN"}.get(kind, hex(kind))
        words.append("go=%s %s" % (code, data.decode()))
        break
print(" ".join(words))
"#;

/// With `backing=dir:` a snapshot and a clone of it live in the directory
/// without names, as disks do: nothing is left there after a SIGKILL of
/// the server.
#[test]
fn snapshots_and_clones_in_files_leave_nothing_after_sigkill() {
    let backing = tempfile::tempdir().unwrap();
    let dir = backing.path().canonicalize().unwrap();
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("scratchd.toml");
    std::fs::write(
        &config,
        format!(
            "backend = \"tmpdisk\"\n[tmpdisk]\nsize = \"64M\"\ntype = \"none\"\n\
             linger = \"60s\"\nbacking = \"dir:{}\"\n\n\
             [[class]]\nmatch = \"build-*\"\nfrom = \"base\"\n",
            dir.display()
        ),
    )
    .unwrap();
    let server = Server::start(&["--config", config.to_str().unwrap()]);
    let uri = server.uri();
    let libnbd = |name: &str, script: &str| {
        let out = crate::util::libnbd(&server.uri_for(name), script, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    libnbd("root", "h = connect()\nh.pwrite(b'r' * 65536, 0)\n");
    let (code, _, err) = scratchd(&["snapshot", "take", &uri, "--name", "root", "base"]);
    assert_eq!(code, 0, "{err}");
    // A clone (its class starts it as the snapshot), written privately,
    // lingering beside the snapshot and the root.
    libnbd(
        "build-1",
        "h = connect()\neq(h.pread(4, 0), b'rrrr', 'the snapshot data')\nh.pwrite(b'c' * 4096, 0)\n",
    );
    let open_in_dir = crate::util::files_open_under(server.pid(), &dir);
    assert!(
        open_in_dir >= 3,
        "root, snapshot and clone files open in the directory: {open_in_dir}"
    );
    let named = || std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(named(), 0, "while live");
    drop(server); // SIGKILL
    assert_eq!(named(), 0, "after SIGKILL");
}

/// Snapshot names are keys where peers share a namespace (`owner=name`),
/// so they come from the environment as disk names do: `snapshot take`
/// and `delete` read SCRATCHD_SNAPSHOT, `run --from` SCRATCHD_FROM. The
/// run's command line never holds the name, and its command inherits
/// neither variable (a scratchd it runs must not reuse them).
#[test]
fn snapshot_names_come_from_the_environment_and_stay_off_command_lines() {
    if skip_without_fuse("snapshot_names_come_from_the_environment_and_stay_off_command_lines") {
        return;
    }
    let server = Server::start(&["tmpdisk", "size=64M", "linger=60s"]);
    let uri = server.uri();
    let secret = format!("snap-{}", std::process::id());
    let (code, _, err) = run_on(&uri, "root", None, r#"echo prepared > "$SCRATCH_DIR/tool""#);
    assert_eq!(code, 0, "{err}");
    let with_env = |args: &[&str], var: &str| {
        let (code, out) = run_status(Command::new(SCRATCHD).args(args).env(var, &secret));
        (
            code,
            stdout(&out),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = with_env(
        &["snapshot", "take", &uri, "--name", "root"],
        "SCRATCHD_SNAPSHOT",
    );
    assert_eq!((code, out.trim()), (0, secret.as_str()), "{err}");
    // The run's own command line (its command's parent), and the
    // command's environment.
    let script = r#"cat "$SCRATCH_DIR/tool"; tr '\0' ' ' < /proc/$PPID/cmdline; echo; env"#;
    let (code, out, err) = with_env(
        &[
            "run", "--server", &uri, "--name", "build", "--", "sh", "-c", script,
        ],
        "SCRATCHD_FROM",
    );
    assert_eq!(code, 0, "{err}");
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("prepared"),
        "not started as the snapshot: {out}"
    );
    let cmdline = lines.next().unwrap_or_default();
    assert!(cmdline.contains("run --server"), "{cmdline}");
    assert!(
        !out.contains(&secret),
        "the snapshot's name reached the command: {out}"
    );
    let (code, _, err) = with_env(&["snapshot", "delete", &uri], "SCRATCHD_SNAPSHOT");
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = scratchd(&["snapshot", "list", &uri]);
    assert!(!out.contains(&secret), "not deleted: {out}");
}
