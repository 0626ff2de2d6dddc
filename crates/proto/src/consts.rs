//! Magic numbers, flags and codes, named as in the NBD specification
//! (`doc/proto.md` of the NBD project, plus its extended-headers extension).

/// `NBDMAGIC`, first word of the server greeting.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second word of the greeting and prefix of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flags sent by the server.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flags, answering the handshake flags.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Option codes.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_PEEK_EXPORT: u32 = 4;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;

/// Option reply errors (bit 31 set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum OptError {
    Unsup = 0x8000_0001,
    Policy = 0x8000_0002,
    Invalid = 0x8000_0003,
    Platform = 0x8000_0004,
    TlsReqd = 0x8000_0005,
    Unknown = 0x8000_0006,
    Shutdown = 0x8000_0007,
    BlockSizeReqd = 0x8000_0008,
    TooBig = 0x8000_0009,
    ExtHeaderReqd = 0x8000_000A,
}

impl OptError {
    /// The error a server sent as an option reply type, if it is one the
    /// spec defines (clients report others by number).
    pub fn from_code(code: u32) -> Option<OptError> {
        use OptError::*;
        [
            Unsup,
            Policy,
            Invalid,
            Platform,
            TlsReqd,
            Unknown,
            Shutdown,
            BlockSizeReqd,
            TooBig,
            ExtHeaderReqd,
        ]
        .into_iter()
        .find(|e| *e as u32 == code)
    }

    /// The spec's name without its `NBD_REP_` prefix, e.g. `ERR_UNKNOWN`.
    pub fn name(self) -> &'static str {
        match self {
            OptError::Unsup => "ERR_UNSUP",
            OptError::Policy => "ERR_POLICY",
            OptError::Invalid => "ERR_INVALID",
            OptError::Platform => "ERR_PLATFORM",
            OptError::TlsReqd => "ERR_TLS_REQD",
            OptError::Unknown => "ERR_UNKNOWN",
            OptError::Shutdown => "ERR_SHUTDOWN",
            OptError::BlockSizeReqd => "ERR_BLOCK_SIZE_REQD",
            OptError::TooBig => "ERR_TOO_BIG",
            OptError::ExtHeaderReqd => "ERR_EXT_HEADER_REQD",
        }
    }
}

/// Info types carried by `REP_INFO` and requested by INFO/GO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags, sent with the export size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransmissionFlags(pub u16);

impl TransmissionFlags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    pub const BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

    pub fn contains(self, bit: u16) -> bool {
        self.0 & bit == bit
    }
}

/// Request types (commands).
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// The spec's name of a command type without its `NBD_CMD_` prefix, for
/// logs; `"unknown"` for a type the spec does not define.
pub fn command_name(kind: u16) -> &'static str {
    match kind {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown",
    }
}

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Structured reply chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;

/// `base:allocation` status bits.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// Error values carried in transmission replies. They are NBD's own numbers,
/// which match Linux errno values but must not be taken from the host's libc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl Errno {
    /// Every error the spec defines.
    pub const ALL: [Errno; 8] = [
        Errno::Perm,
        Errno::Io,
        Errno::NoMem,
        Errno::Inval,
        Errno::NoSpc,
        Errno::Overflow,
        Errno::NotSup,
        Errno::Shutdown,
    ];

    /// Maps a host error from a storage backend to the nearest NBD error, as
    /// the spec asks (anything without an NBD counterpart becomes EIO).
    pub fn from_os_error(code: Option<i32>) -> Errno {
        // Linux errno numbers, which NBD's values were taken from.
        match code {
            Some(1) | Some(13) | Some(30) => Errno::Perm, // EPERM, EACCES, EROFS
            Some(12) => Errno::NoMem,
            Some(22) => Errno::Inval,
            Some(27) | Some(28) | Some(122) => Errno::NoSpc, // EFBIG, ENOSPC, EDQUOT
            Some(75) => Errno::Overflow,
            Some(95) => Errno::NotSup,
            Some(108) => Errno::Shutdown,
            _ => Errno::Io,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Errno::Perm => "operation not permitted",
            Errno::Io => "input/output error",
            Errno::NoMem => "out of memory",
            Errno::Inval => "invalid argument",
            Errno::NoSpc => "no space left on device",
            Errno::Overflow => "value too large",
            Errno::NotSup => "operation not supported",
            Errno::Shutdown => "server is shutting down",
        }
    }
}

/// The one metadata context scratchd serves.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Longest string (export name, description, message) accepted or sent.
pub const MAX_STRING_LEN: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_errors_decode_from_their_codes() {
        assert_eq!(OptError::from_code(0x8000_0006), Some(OptError::Unknown));
        assert_eq!(
            OptError::from_code(0x8000_000A),
            Some(OptError::ExtHeaderReqd)
        );
        assert_eq!(OptError::from_code(0x8000_000B), None);
        assert_eq!(OptError::from_code(1), None);
        assert_eq!(OptError::TlsReqd.name(), "ERR_TLS_REQD");
    }
}
