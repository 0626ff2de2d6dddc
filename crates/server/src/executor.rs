//! Runs one validated request against a backend and appends its reply.
//!
//! Replies are built in a caller-owned buffer, never sent from here: the
//! connection thread batches many replies into one write, and a worker sends
//! its own. Nothing is sent until a reply is complete, so a READ that fails
//! halfway is rolled back and answered with a clean error, in every framing.

use std::io;

use scratchd_proto::consts::{STATE_HOLE, STATE_ZERO};
use scratchd_proto::negotiation::ReplyMode;
use scratchd_proto::reply::{self, Descriptor, ReplyTo};
use scratchd_proto::request::Command;
use scratchd_proto::Errno;
use scratchd_store::{BlockDevice, Extent, ExtentKind, ZeroFlags};

/// Reads at least this long are first checked for holes (with structured
/// replies), so sparse regions go out as 12-byte OFFSET_HOLE chunks instead
/// of zeros. Shorter reads skip the check: it would cost more than it saves.
const HOLE_SCAN_MIN: u32 = 64 * 1024;

/// Longest range one BLOCK_STATUS answer describes (the spec lets a server
/// answer less than asked); keeps every compact descriptor within 32 bits and
/// bounds the work per request.
const MAX_STATUS_RANGE: u64 = (1 << 32) - 4096;

/// Most descriptors in one reply, as the spec recommends.
const MAX_DESCRIPTORS: usize = 1 << 20;

/// Per-connection state reused across requests, so steady-state requests
/// allocate nothing.
#[derive(Default)]
pub struct Scratch {
    extents: Vec<Extent>,
    descriptors: Vec<Descriptor>,
}

/// What a connection needs to know to answer a request.
#[derive(Clone, Copy)]
pub struct ReplyContext {
    pub mode: ReplyMode,
    pub base_allocation: Option<u32>,
}

pub fn execute(
    dev: &dyn BlockDevice,
    cmd: Command,
    payload: &[u8],
    cx: ReplyContext,
    to: ReplyTo,
    out: &mut Vec<u8>,
    scratch: &mut Scratch,
) {
    let mark = out.len();
    let result = match cmd {
        Command::Read { offset, len, df } => read(dev, offset, len, df, cx.mode, to, out, scratch),
        Command::Write { offset, fua, .. } => {
            dev.write(offset, payload, fua).map(|_| ok(cx, to, out))
        }
        Command::Flush => dev.flush().map(|_| ok(cx, to, out)),
        Command::Trim { len: 0, .. }
        | Command::Cache { len: 0, .. }
        | Command::WriteZeroes { len: 0, .. } => Ok(ok(cx, to, out)),
        Command::Trim { offset, len, fua } => dev.trim(offset, len, fua).map(|_| ok(cx, to, out)),
        Command::Cache { offset, len } => dev.cache(offset, len).map(|_| ok(cx, to, out)),
        Command::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
            fast,
        } => {
            let flags = ZeroFlags {
                may_trim: !no_hole,
                fast,
            };
            dev.zero(offset, len, flags, fua).map(|_| ok(cx, to, out))
        }
        Command::BlockStatus {
            offset,
            len,
            req_one,
        } => block_status(dev, offset, len, req_one, cx, to, out, scratch),
        // The connection handles DISC itself; it has no reply.
        Command::Disconnect => Ok(()),
    };
    if let Err(e) = result {
        out.truncate(mark);
        let errno = Errno::from_os_error(e.raw_os_error());
        reply::put_error(out, cx.mode, to, errno, &e.to_string());
    }
}

fn ok(cx: ReplyContext, to: ReplyTo, out: &mut Vec<u8>) {
    reply::put_ok(out, cx.mode, to);
}

/// Appends `len` bytes read at `offset` to `out`.
fn read_into(dev: &dyn BlockDevice, offset: u64, len: u32, out: &mut Vec<u8>) -> io::Result<()> {
    let start = out.len();
    out.resize(start + len as usize, 0);
    dev.read(offset, &mut out[start..])
}

#[allow(clippy::too_many_arguments)]
fn read(
    dev: &dyn BlockDevice,
    offset: u64,
    len: u32,
    df: bool,
    mode: ReplyMode,
    to: ReplyTo,
    out: &mut Vec<u8>,
    scratch: &mut Scratch,
) -> io::Result<()> {
    if mode == ReplyMode::Simple || df || len < HOLE_SCAN_MIN {
        if len == 0 && mode != ReplyMode::Simple {
            reply::put_ok(out, mode, to);
            return Ok(());
        }
        reply::put_read_data(out, mode, to, offset, len, true);
        return read_into(dev, offset, len, out);
    }
    scratch.extents.clear();
    dev.extents(offset, len as u64, &mut scratch.extents)?;
    let mut at = offset;
    let n = scratch.extents.len();
    for (i, e) in scratch.extents.iter().enumerate() {
        // Extents exactly cover the range, so each fits in the read's u32.
        let elen = e.len as u32;
        let last = i + 1 == n;
        match e.kind {
            ExtentKind::Hole => reply::put_read_hole(out, mode, to, at, elen, last),
            ExtentKind::Data => {
                reply::put_read_data(out, mode, to, at, elen, last);
                read_into(dev, at, elen, out)?;
            }
        }
        at += e.len;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn block_status(
    dev: &dyn BlockDevice,
    offset: u64,
    len: u64,
    req_one: bool,
    cx: ReplyContext,
    to: ReplyTo,
    out: &mut Vec<u8>,
    scratch: &mut Scratch,
) -> io::Result<()> {
    let Some(context_id) = cx.base_allocation else {
        return Err(io::Error::from_raw_os_error(Errno::Inval as i32));
    };
    scratch.extents.clear();
    dev.extents(offset, len.min(MAX_STATUS_RANGE), &mut scratch.extents)?;
    let keep = if req_one { 1 } else { MAX_DESCRIPTORS };
    scratch.descriptors.clear();
    scratch
        .descriptors
        .extend(scratch.extents.iter().take(keep).map(|e| Descriptor {
            len: e.len,
            status: match e.kind {
                ExtentKind::Hole => STATE_HOLE | STATE_ZERO,
                ExtentKind::Data => 0,
            },
        }));
    reply::put_block_status(out, cx.mode, to, context_id, &scratch.descriptors);
    Ok(())
}
