//! The nbd family's messages against byte layouts computed by hand from
//! nbd-netlink.h and netlink(7): a 16-byte `nlmsghdr`, a 4-byte
//! `genlmsghdr`, then attributes, each a 4-byte header (length without
//! padding, type) and a value padded to 4 bytes; host byte order.

use super::*;

fn u16b(v: u16) -> [u8; 2] {
    v.to_ne_bytes()
}
fn u32b(v: u32) -> [u8; 4] {
    v.to_ne_bytes()
}
fn u64b(v: u64) -> [u8; 8] {
    v.to_ne_bytes()
}

/// `nlmsghdr` + `genlmsghdr`.
fn headers(len: u32, family: u16, flags: u16, seq: u32, cmd: u8) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(u32b(len));
    b.extend(u16b(family));
    b.extend(u16b(flags));
    b.extend(u32b(seq));
    b.extend(u32b(0)); // port: the kernel
    b.extend([cmd, 1, 0, 0]); // command, NBD_GENL_VERSION, reserved
    b
}

/// NLM_F_REQUEST | NLM_F_ACK.
const REQUEST_ACK: u16 = 0x1 | 0x4;
const FAMILY: u16 = 0x1a;

fn config() -> Config {
    Config {
        index: None,
        size: 1 << 30,
        block_size: 4096,
        // HAS_FLAGS | SEND_FLUSH | SEND_TRIM | SEND_WRITE_ZEROES | CAN_MULTI_CONN
        server_flags: 0x0165,
        timeout: None,
        dead_conn_timeout: Duration::from_secs(10),
        backend: Some("scratchd".to_owned()),
    }
}

#[test]
fn connect_message_layout() {
    let bytes = encode(config().message(&[3, 4]), FAMILY, 7);

    let mut want = headers(124, FAMILY, REQUEST_ACK, 7, 1);
    // NBD_ATTR_SIZE_BYTES (2): u64
    want.extend(u16b(12));
    want.extend(u16b(2));
    want.extend(u64b(1 << 30));
    // NBD_ATTR_BLOCK_SIZE_BYTES (3)
    want.extend(u16b(12));
    want.extend(u16b(3));
    want.extend(u64b(4096));
    // NBD_ATTR_SERVER_FLAGS (5): the transmission flags, widened to u64
    want.extend(u16b(12));
    want.extend(u16b(5));
    want.extend(u64b(0x0165));
    // NBD_ATTR_CLIENT_FLAGS (6): none, not NBD_CFLAG_DESTROY_ON_DISCONNECT
    // (1), which deleted the host's /dev/nbdN at disconnect
    want.extend(u16b(12));
    want.extend(u16b(6));
    want.extend(u64b(0));
    // NBD_ATTR_DEAD_CONN_TIMEOUT (8): seconds
    want.extend(u16b(12));
    want.extend(u16b(8));
    want.extend(u64b(10));
    // NBD_ATTR_SOCKETS (7 | NLA_F_NESTED): 4 + 2 * 12 bytes
    want.extend(u16b(28));
    want.extend(u16b(0x8007));
    for fd in [3, 4] {
        // NBD_SOCK_ITEM (1 | NLA_F_NESTED) { NBD_SOCK_FD (1): u32 }
        want.extend(u16b(12));
        want.extend(u16b(0x8001));
        want.extend(u16b(8));
        want.extend(u16b(1));
        want.extend(u32b(fd));
    }
    // NBD_ATTR_BACKEND_IDENTIFIER (10): "scratchd\0", 13 bytes, padded to 16
    want.extend(u16b(13));
    want.extend(u16b(10));
    want.extend(b"scratchd\0\0\0\0");

    assert_eq!(want.len(), 124);
    assert_eq!(bytes, want);
}

#[test]
fn connect_message_with_index_and_timeout() {
    let config = Config {
        index: Some(2),
        timeout: Some(Duration::from_secs(60)),
        dead_conn_timeout: Duration::ZERO,
        backend: None,
        ..config()
    };
    let message = config.message(&[9]);
    assert_eq!(
        message.attrs,
        [
            NbdAttr::Index(2),
            NbdAttr::SizeBytes(1 << 30),
            NbdAttr::BlockSizeBytes(4096),
            NbdAttr::Timeout(60),
            NbdAttr::ServerFlags(0x0165),
            NbdAttr::ClientFlags(0),
            NbdAttr::Sockets(vec![9]),
        ]
    );
    let bytes = encode(message, FAMILY, 1);
    // NBD_ATTR_INDEX (1) comes first, right after the headers: a u32.
    assert_eq!(bytes[20..22], u16b(8));
    assert_eq!(bytes[22..24], u16b(1));
    assert_eq!(bytes[24..28], u32b(2));
    // NBD_ATTR_TIMEOUT (4) after the block size: seconds.
    assert_eq!(bytes[52..56], [u16b(12), u16b(4)].concat());
    assert_eq!(bytes[56..64], u64b(60));
    // Headers 16 + 4, the index 8, five u64 attributes 5 * 12, the sockets
    // 4 + 12; no dead-connection timeout, no backend.
    assert_eq!(bytes.len(), 104);
    assert_eq!(bytes[0..4], u32b(104));
}

#[test]
fn disconnect_message_layout() {
    let bytes = encode(NbdMessage::disconnect(5), FAMILY, 3);
    let mut want = headers(28, FAMILY, REQUEST_ACK, 3, 2);
    want.extend(u16b(8));
    want.extend(u16b(1));
    want.extend(u32b(5));
    assert_eq!(bytes, want);
}

#[test]
fn messages_parse_back() {
    let message = config().message(&[3, 4, 5]);
    let bytes = encode(message.clone(), FAMILY, 1);
    let parsed = NetlinkMessage::<GenlMessage<NbdMessage>>::deserialize(&bytes).unwrap();
    let NetlinkPayload::InnerMessage(genl) = parsed.payload else {
        panic!("not an nbd message: {parsed:?}");
    };
    assert_eq!(genl.payload, message);
}

/// The kernel's answer to a CONNECT: `nbd_connect_reply` (NBD_CMD_CONNECT
/// with NBD_ATTR_INDEX), then the ACK (NLMSG_ERROR with error 0, followed
/// by the request's header), both in one datagram.
fn connect_answer(seq: u32, index: u32) -> Vec<u8> {
    let mut b = headers(28, FAMILY, 0, seq, 1);
    b.extend(u16b(8));
    b.extend(u16b(1));
    b.extend(u32b(index));
    b.extend(ack(seq, 0));
    b
}

fn ack(seq: u32, errno: i32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(u32b(36));
    b.extend(u16b(2)); // NLMSG_ERROR
    b.extend(u16b(0x100)); // NLM_F_CAPPED: the request's payload left out
    b.extend(u32b(seq));
    b.extend(u32b(0));
    b.extend((-errno).to_ne_bytes());
    b.extend(&headers(124, FAMILY, REQUEST_ACK, seq, 1)[..16]);
    b
}

#[test]
fn connect_reply_gives_the_index() {
    let answer = parse_answer::<NbdMessage>(&connect_answer(7, 5), 7).unwrap();
    let NetlinkAnswer::Done(replies) = answer else {
        panic!("{answer:?}");
    };
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].cmd, cmd::CONNECT);
    assert_eq!(replies[0].index(), Some(5));
}

#[test]
fn reply_without_ack_reads_on() {
    let mut only_reply = connect_answer(7, 5);
    only_reply.truncate(28);
    let answer = parse_answer::<NbdMessage>(&only_reply, 7).unwrap();
    assert!(matches!(answer, NetlinkAnswer::More(ref r) if r[0].index() == Some(5)));
}

#[test]
fn refusal_gives_the_errno() {
    let answer = parse_answer::<NbdMessage>(&ack(4, libc::EBUSY), 4).unwrap();
    assert_eq!(answer, NetlinkAnswer::Errno(libc::EBUSY));
}

#[test]
fn stale_answers_are_skipped() {
    // An answer to request 6 followed by the ACK of request 7.
    let mut b = connect_answer(6, 1);
    b.extend(ack(7, 0));
    let answer = parse_answer::<NbdMessage>(&b, 7).unwrap();
    assert_eq!(answer, NetlinkAnswer::Done(vec![]));
}

#[test]
fn truncated_answer_is_malformed() {
    let b = connect_answer(7, 5);
    assert!(matches!(
        parse_answer::<NbdMessage>(&b[..20], 7),
        Err(Error::Malformed(_))
    ));
}

#[test]
fn block_size_prefers_4096_within_the_export_limits() {
    assert_eq!(choose_block_size(None, 4096).unwrap(), 4096);
    assert_eq!(choose_block_size(Some((1, 32 << 20)), 4096).unwrap(), 4096);
    assert_eq!(choose_block_size(Some((512, 0)), 4096).unwrap(), 4096);
    assert_eq!(choose_block_size(Some((512, 1024)), 4096).unwrap(), 1024);
    // A file system made for 512-byte sectors (xfs) caps it.
    assert_eq!(choose_block_size(Some((1, 32 << 20)), 512).unwrap(), 512);
    assert!(choose_block_size(Some((8192, 65536)), 4096).is_err());
    assert!(choose_block_size(Some((4096, 4096)), 512).is_err());
}

#[test]
fn no_module_error_tells_what_to_do() {
    let text = Error::NoModule.to_string();
    assert!(text.contains("modprobe nbd"), "{text}");
    assert!(text.contains("--attach fuse"), "{text}");
}

/// Where the kernel has no nbd driver (this project's own machines): the
/// family lookup fails cleanly, and so does `connect`, without touching
/// the sockets beyond closing them.
#[test]
fn without_the_module_connect_says_so() {
    if Path::new("/sys/module/nbd").exists() {
        eprintln!("skipped: this kernel has the nbd module");
        return;
    }
    assert!(!kernel_nbd_available());
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let config = config();
    match connect(vec![OwnedFd::from(ours)], &config) {
        Err(Error::NoModule) => {}
        // Some sandboxes have no generic netlink at all.
        Err(Error::Netlink(e)) => eprintln!("no generic netlink here: {e}"),
        other => panic!("expected NoModule, got {other:?}"),
    }
    // Our end was closed: the peer reads end-of-file.
    let mut buf = [0u8; 1];
    assert_eq!(io::Read::read(&mut &theirs, &mut buf).unwrap(), 0);
    assert!(matches!(
        disconnect(0),
        Err(Error::NoModule | Error::Netlink(_))
    ));
}

#[test]
fn connect_checks_its_arguments_first() {
    assert!(matches!(
        connect(Vec::new(), &config()),
        Err(Error::Invalid(_))
    ));
    let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let config = Config {
        block_size: 1000,
        ..config()
    };
    assert!(matches!(
        connect(vec![OwnedFd::from(ours)], &config),
        Err(Error::Invalid(_))
    ));
}

/// An export size the block size does not divide is refused before the
/// kernel is asked (it would say only EINVAL), with what to do instead.
#[test]
fn connect_refuses_a_size_the_block_size_does_not_divide() {
    let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let config = Config {
        size: (1 << 30) + 512,
        ..config()
    };
    match connect(vec![OwnedFd::from(ours)], &config) {
        Err(e @ Error::Invalid(_)) => {
            let text = e.to_string();
            assert!(text.contains("1073742336 bytes"), "{text}");
            assert!(text.contains("block size (4096 bytes)"), "{text}");
            assert!(text.contains("--attach fuse"), "{text}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

/// A TCP socket handed to the kernel has keepalive and TCP_USER_TIMEOUT
/// (so that a vanished server is found dead), and no handshake timeouts;
/// a Unix socket only loses its timeouts.
#[test]
fn sockets_are_prepared_for_the_kernel() {
    use rustix::net::sockopt;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    prepare_socket(tcp.as_fd()).unwrap();
    assert!(sockopt::socket_keepalive(&tcp).unwrap());
    assert_eq!(sockopt::tcp_keepidle(&tcp).unwrap(), TCP_KEEPIDLE);
    assert_eq!(sockopt::tcp_keepintvl(&tcp).unwrap(), TCP_KEEPINTVL);
    assert_eq!(
        u128::from(sockopt::tcp_user_timeout(&tcp).unwrap()),
        TCP_DEAD_AFTER.as_millis()
    );
    assert_eq!(tcp.read_timeout().unwrap(), None);

    let (unix, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    unix.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    prepare_socket(unix.as_fd()).unwrap();
    assert_eq!(unix.read_timeout().unwrap(), None);
}

/// Workqueue workers' names while they run a receive work of the device
/// (and the rescuer's), and of workers idle, of another device, or of
/// another queue.
#[test]
fn receive_works_are_told_by_their_threads_names() {
    let among =
        |names: &[&str], index| Receivers::among(names.iter().map(|n| format!("{n}\n")), index);
    let counted = |running, rescuer| Receivers { running, rescuer };
    assert_eq!(
        among(&["kworker/u5:1+nbd0-recv", "kworker/u5:2+nbd0-recv"], 0),
        counted(2, false)
    );
    assert_eq!(
        among(&["nbd0-recv+nbd0-recv", "kworker/u5:2+nbd0-recv"], 0),
        counted(2, true)
    );
    assert_eq!(
        among(&["kworker/R-nbd3-recv+nbd3-recv"], 3),
        counted(1, true)
    );
    let others = [
        "kworker/u5:1-nbd0-recv",
        "nbd0-recv",
        "kworker/R-nbd0-recv",
        "kworker/u5:1+nbd10-recv",
        "kworker/u5:1+nbd0-del",
        "kworker/u5:1+xnbd0-recv",
        "bash",
    ];
    assert_eq!(among(&others, 0), counted(0, false));
    assert_eq!(among(&["nbd1-recv+nbd1-recv"], 11), counted(0, false));
}

/// Only a `/proc` whose PID 2 is the kernel's thread creator shows the
/// receive works; in a container's PID namespace the check is skipped.
#[test]
fn receive_works_are_checked_only_where_kernel_threads_show() {
    assert!(shows_kernel_threads(Some("kthreadd\n")));
    assert!(!shows_kernel_threads(Some("bash\n")));
    assert!(!shows_kernel_threads(None));
}

/// Kernel threads are told by their flags, which no process can set,
/// however their names (with spaces and parentheses) read.
#[test]
fn kernel_threads_are_told_by_their_flags() {
    let kthreadd = std::fs::read_to_string("/proc/2/stat").unwrap();
    assert!(is_kernel_thread(&kthreadd), "{kthreadd}");
    let me = std::fs::read_to_string("/proc/self/stat").unwrap();
    assert!(!is_kernel_thread(&me), "{me}");
    let forged = "42 (x) 0 0 0 0 0 2129984 (y) S 1 42 42 0 -1 4194560 0";
    assert!(!is_kernel_thread(forged));
    assert!(!is_kernel_thread("garbage"));
}

/// A process of another user that names itself like a receive worker
/// (PR_SET_NAME) is not counted: it could otherwise pass a starved
/// device as served, or force a reconnect.
#[test]
fn a_process_named_like_a_receive_worker_is_not_counted() {
    // Names hold 15 bytes: short, but enough to end like a worker's.
    const NAME: &str = "x+nbd77-recv";
    let script = format!(
        "import ctypes, time; ctypes.CDLL(None).prctl(15, b'{NAME}', 0, 0, 0); time.sleep(30)"
    );
    let mut command = if rustix::process::geteuid().is_root() {
        let mut c = std::process::Command::new("setpriv");
        c.args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "/usr/bin/python3",
        ]);
        c
    } else {
        std::process::Command::new("/usr/bin/python3")
    };
    let mut child = command
        .args(["-c", &script])
        .spawn()
        .expect("/usr/bin/python3");
    let comm = format!("/proc/{}/comm", child.id());
    let named = (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::read_to_string(&comm).is_ok_and(|c| c.trim_end() == NAME)
    });
    let counted = Receivers::now(77);
    let _ = child.kill();
    let _ = child.wait();
    assert!(named, "the process never took the name");
    assert_eq!(counted, Receivers::default());
}
