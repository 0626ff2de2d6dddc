//! scratchd's own options: snapshots of disks, and new disks that start as
//! one. They travel in the ordinary option haggling of a normal
//! connection, so they inherit its TLS and the identity the server proved
//! (Unix peer credentials, a client certificate): no second channel and no
//! second secret. A server that does not know them answers `ERR_UNSUP`, as
//! for any unknown option.
//!
//! Option numbers are taken far above the spec's (which count up from 1),
//! in one block marked `0x5344` ("SD").
//!
//! | option | payload | answer |
//! |---|---|---|
//! | [`OPT_SCRATCHD_FROM`] | string32 snapshot | ACK; the next GO or EXPORT_NAME that creates its disk makes it a clone of the snapshot |
//! | [`OPT_SCRATCHD_SNAPSHOT`] | string32 disk, string32 snapshot | ACK once taken |
//! | [`OPT_SCRATCHD_SNAPSHOTS`] | none | one [`REP_SCRATCHD_SNAPSHOT`] per snapshot the client can use, then ACK |
//! | [`OPT_SCRATCHD_DELETE_SNAPSHOT`] | string32 snapshot | ACK once deleted |
//!
//! A string32 is a u32 length and that many bytes of UTF-8 (no NUL, at most
//! [`MAX_STRING_LEN`]); a payload with bytes left over is malformed.

use crate::codec::{DecodeError, PutBe, Reader};
use crate::consts::MAX_STRING_LEN;

/// The next disk made by GO/EXPORT_NAME starts as this snapshot.
pub const OPT_SCRATCHD_FROM: u32 = 0x5344_0001;
/// Take a snapshot of one of the client's disks.
pub const OPT_SCRATCHD_SNAPSHOT: u32 = 0x5344_0002;
/// List the snapshots the client can start disks from.
pub const OPT_SCRATCHD_SNAPSHOTS: u32 = 0x5344_0003;
/// Delete one of the client's snapshots.
pub const OPT_SCRATCHD_DELETE_SNAPSHOT: u32 = 0x5344_0004;
/// One snapshot of an [`OPT_SCRATCHD_SNAPSHOTS`] answer (a non-error
/// reply type: bit 31 clear).
pub const REP_SCRATCHD_SNAPSHOT: u32 = 0x5344_0001;

/// A snapshot request the server carries out (as opposed to
/// [`OPT_SCRATCHD_FROM`], which only changes the negotiation's state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotRequest {
    /// Snapshot the client's disk `disk` as `name`.
    Take {
        disk: String,
        name: String,
    },
    List,
    Delete {
        name: String,
    },
}

impl SnapshotRequest {
    /// Its option number.
    pub fn option(&self) -> u32 {
        match self {
            SnapshotRequest::Take { .. } => OPT_SCRATCHD_SNAPSHOT,
            SnapshotRequest::List => OPT_SCRATCHD_SNAPSHOTS,
            SnapshotRequest::Delete { .. } => OPT_SCRATCHD_DELETE_SNAPSHOT,
        }
    }

    /// Its payload.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            SnapshotRequest::Take { disk, name } => {
                put_string32(out, disk);
                put_string32(out, name);
            }
            SnapshotRequest::List => {}
            SnapshotRequest::Delete { name } => put_string32(out, name),
        }
    }

    /// The request of `option`, one of the snapshot options but
    /// [`OPT_SCRATCHD_FROM`], from its whole payload; `None` for other
    /// options.
    pub fn decode(option: u32, payload: &[u8]) -> Option<Result<Self, DecodeError>> {
        let mut r = Reader::new(payload);
        let request = match option {
            OPT_SCRATCHD_SNAPSHOT => (|| {
                let disk = string32(&mut r)?;
                let name = string32(&mut r)?;
                Ok(SnapshotRequest::Take { disk, name })
            })(),
            OPT_SCRATCHD_SNAPSHOTS => Ok(SnapshotRequest::List),
            OPT_SCRATCHD_DELETE_SNAPSHOT => {
                string32(&mut r).map(|name| SnapshotRequest::Delete { name })
            }
            _ => return None,
        };
        Some(request.and_then(|request| r.finish().map(|()| request)))
    }
}

/// The payload of [`OPT_SCRATCHD_FROM`]: the snapshot's name.
///
/// # Errors
///
/// A malformed string, or bytes after it.
pub fn decode_from(payload: &[u8]) -> Result<String, DecodeError> {
    let mut r = Reader::new(payload);
    let name = string32(&mut r)?;
    r.finish()?;
    Ok(name)
}

/// The payload of [`OPT_SCRATCHD_FROM`] for `name`.
pub fn encode_from(name: &str, out: &mut Vec<u8>) {
    put_string32(out, name);
}

/// One snapshot, as [`REP_SCRATCHD_SNAPSHOT`] carries it: u64 size, u64
/// bytes held, u32 clones, u64 age in milliseconds, u8 published (0 or 1),
/// string32 name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    pub name: String,
    /// Published by the operator for every client, rather than the
    /// client's own.
    pub published: bool,
    pub size: u64,
    /// Bytes of data it holds, once.
    pub bytes: u64,
    /// Disks alive that started as it.
    pub clones: u32,
    pub age_ms: u64,
}

impl SnapshotEntry {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64(self.size);
        out.put_u64(self.bytes);
        out.put_u32(self.clones);
        out.put_u64(self.age_ms);
        out.push(u8::from(self.published));
        put_string32(out, &self.name);
    }

    /// # Errors
    ///
    /// A short or over-long payload, a malformed name, a flag not 0 or 1.
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let size = r.u64()?;
        let bytes = r.u64()?;
        let clones = r.u32()?;
        let age_ms = r.u64()?;
        let published = match r.u8()? {
            0 => false,
            1 => true,
            other => return Err(DecodeError::BadFlag(other)),
        };
        let name = string32(&mut r)?;
        r.finish()?;
        Ok(SnapshotEntry {
            name,
            published,
            size,
            bytes,
            clones,
            age_ms,
        })
    }
}

/// What the server did for a [`SnapshotRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotAnswer {
    /// Taken, or deleted.
    Done,
    Listing(Vec<SnapshotEntry>),
}

/// The most entries a client takes in one [`OPT_SCRATCHD_SNAPSHOTS`]
/// answer: an owner holds at most 64 snapshots (scratchd's registry), and
/// the operator publishes a handful; a server sending more is refused
/// rather than let grow the client's memory without end (each entry may
/// be 4 KiB).
pub const MAX_LISTED: usize = 4096;

/// Why the replies to a snapshot request are not an answer: each is the
/// server misbehaving (its error replies are refusals, not these).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotReplyError {
    #[error("more than {MAX_LISTED} snapshots listed")]
    TooMany,
    #[error("a snapshot listed in answer to {0}, which lists nothing")]
    ListingUnasked(&'static str),
    #[error("reply type {reply_type:#x} to {option}, which answers only ACK{}", if *listing { " and SNAPSHOT" } else { "" })]
    UnexpectedReply {
        option: &'static str,
        reply_type: u32,
        listing: bool,
    },
    #[error("a listed snapshot is malformed")]
    Entry(#[source] DecodeError),
}

/// Reads the answer to one [`SnapshotRequest`] from its non-error
/// replies, in order, bounded by [`MAX_LISTED`]: the one decoder of
/// snapshot answers.
#[derive(Debug)]
pub struct AnswerReader {
    option: u32,
    /// The entries so far; `None` for a request that lists nothing.
    listing: Option<Vec<SnapshotEntry>>,
}

impl AnswerReader {
    pub fn new(request: &SnapshotRequest) -> Self {
        AnswerReader {
            option: request.option(),
            listing: matches!(request, SnapshotRequest::List).then(Vec::new),
        }
    }

    /// The reader of [`OPT_SCRATCHD_FROM`]'s answer, an ACK alone: the
    /// option only changes the negotiation's state, but its replies come
    /// from the same server as the others' and are read as strictly.
    pub fn start_from() -> Self {
        AnswerReader {
            option: OPT_SCRATCHD_FROM,
            listing: None,
        }
    }

    /// Takes one reply of type `reply_type` (not an error: bit 31 clear)
    /// with its `data`; the answer once the reply is the ACK.
    ///
    /// # Errors
    ///
    /// A reply the option does not answer with, an entry that does not
    /// decode or has a control character in its name, too many entries.
    pub fn reply(
        &mut self,
        reply_type: u32,
        data: &[u8],
    ) -> Result<Option<SnapshotAnswer>, SnapshotReplyError> {
        match (reply_type, &mut self.listing) {
            (crate::consts::REP_ACK, listing) => Ok(Some(match listing.take() {
                Some(entries) => SnapshotAnswer::Listing(entries),
                None => SnapshotAnswer::Done,
            })),
            (REP_SCRATCHD_SNAPSHOT, Some(entries)) => {
                if entries.len() >= MAX_LISTED {
                    return Err(SnapshotReplyError::TooMany);
                }
                entries.push(listed_entry(data)?);
                Ok(None)
            }
            (REP_SCRATCHD_SNAPSHOT, None) => {
                Err(SnapshotReplyError::ListingUnasked(option_name(self.option)))
            }
            (reply_type, listing) => Err(SnapshotReplyError::UnexpectedReply {
                option: option_name(self.option),
                reply_type,
                listing: listing.is_some(),
            }),
        }
    }
}

/// An entry as a client takes it: well formed, and with a name no
/// terminal acts on (scratchd's names are letters, digits, `.`, `_`, `-`;
/// a list prints them).
fn listed_entry(data: &[u8]) -> Result<SnapshotEntry, SnapshotReplyError> {
    let entry = SnapshotEntry::decode(data).map_err(SnapshotReplyError::Entry)?;
    if entry.name.is_empty() || entry.name.chars().any(char::is_control) {
        return Err(SnapshotReplyError::Entry(DecodeError::BadString));
    }
    Ok(entry)
}

/// The name of a snapshot option, for messages.
pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_SCRATCHD_FROM => "SCRATCHD_FROM",
        OPT_SCRATCHD_SNAPSHOT => "SCRATCHD_SNAPSHOT",
        OPT_SCRATCHD_SNAPSHOTS => "SCRATCHD_SNAPSHOTS",
        OPT_SCRATCHD_DELETE_SNAPSHOT => "SCRATCHD_DELETE_SNAPSHOT",
        _ => "an option that is not scratchd's",
    }
}

fn string32(r: &mut Reader<'_>) -> Result<String, DecodeError> {
    Ok(r.string32(MAX_STRING_LEN)?.to_owned())
}

fn put_string32(out: &mut Vec<u8>, s: &str) {
    out.put_u32(s.len() as u32);
    out.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_entries_round_trip_and_junk_is_refused() {
        for request in [
            SnapshotRequest::Take {
                disk: "root".into(),
                name: "base".into(),
            },
            SnapshotRequest::List,
            SnapshotRequest::Delete {
                name: "base".into(),
            },
        ] {
            let mut payload = Vec::new();
            request.encode(&mut payload);
            let decoded = SnapshotRequest::decode(request.option(), &payload);
            assert_eq!(decoded, Some(Ok(request.clone())));
            payload.push(0);
            assert!(matches!(
                SnapshotRequest::decode(request.option(), &payload),
                Some(Err(_))
            ));
        }
        assert_eq!(SnapshotRequest::decode(7, &[]), None);
        // A length past the payload.
        assert!(
            SnapshotRequest::decode(OPT_SCRATCHD_DELETE_SNAPSHOT, &[0, 0, 0, 9, b'x'])
                .unwrap()
                .is_err()
        );
        let entry = SnapshotEntry {
            name: "base".into(),
            published: true,
            size: 1 << 30,
            bytes: 4096,
            clones: 3,
            age_ms: 12,
        };
        let mut payload = Vec::new();
        entry.encode(&mut payload);
        assert_eq!(SnapshotEntry::decode(&payload), Ok(entry));
        payload[28] = 2;
        assert!(SnapshotEntry::decode(&payload).is_err());
        let mut from = Vec::new();
        encode_from("base", &mut from);
        assert_eq!(decode_from(&from), Ok("base".into()));
        assert!(decode_from(&from[..5]).is_err());
    }

    fn entry(name: &str) -> Vec<u8> {
        let mut data = Vec::new();
        SnapshotEntry {
            name: name.into(),
            published: false,
            size: 4096,
            bytes: 0,
            clones: 0,
            age_ms: 1,
        }
        .encode(&mut data);
        data
    }

    #[test]
    fn answers_are_read_within_bounds() {
        use crate::consts::{REP_ACK, REP_SERVER};
        let list = SnapshotRequest::List;
        let mut reader = AnswerReader::new(&list);
        assert_eq!(reader.reply(REP_SCRATCHD_SNAPSHOT, &entry("a")), Ok(None));
        let Ok(Some(SnapshotAnswer::Listing(entries))) = reader.reply(REP_ACK, &[]) else {
            panic!("no listing");
        };
        assert_eq!(entries.len(), 1);
        // Bounded: the entry after the last allowed is refused.
        let mut reader = AnswerReader::new(&list);
        for _ in 0..MAX_LISTED {
            assert_eq!(reader.reply(REP_SCRATCHD_SNAPSHOT, &entry("a")), Ok(None));
        }
        assert_eq!(
            reader.reply(REP_SCRATCHD_SNAPSHOT, &entry("a")),
            Err(SnapshotReplyError::TooMany)
        );
        // Names: truncated, over-long, a terminal's escape, none.
        let mut reader = AnswerReader::new(&list);
        let whole = entry("base");
        for bad in [
            whole[..whole.len() - 1].to_vec(),
            [whole.clone(), vec![0]].concat(),
            entry("\x1b]0;owned\x07"),
            entry(""),
        ] {
            assert!(matches!(
                reader.reply(REP_SCRATCHD_SNAPSHOT, &bad),
                Err(SnapshotReplyError::Entry(_))
            ));
        }
        let mut long = entry("");
        long.truncate(long.len() - 4);
        long.extend_from_slice(&(MAX_STRING_LEN as u32 + 1).to_be_bytes());
        long.extend(std::iter::repeat_n(b'a', MAX_STRING_LEN + 1));
        assert!(matches!(
            reader.reply(REP_SCRATCHD_SNAPSHOT, &long),
            Err(SnapshotReplyError::Entry(DecodeError::StringTooLong { .. }))
        ));
        // A take or delete lists nothing, and no option takes another type.
        let delete = SnapshotRequest::Delete { name: "a".into() };
        let mut reader = AnswerReader::new(&delete);
        assert_eq!(
            reader.reply(REP_SCRATCHD_SNAPSHOT, &entry("a")),
            Err(SnapshotReplyError::ListingUnasked(
                "SCRATCHD_DELETE_SNAPSHOT"
            ))
        );
        assert!(matches!(
            reader.reply(REP_SERVER, &[]),
            Err(SnapshotReplyError::UnexpectedReply { .. })
        ));
        assert_eq!(reader.reply(REP_ACK, &[]), Ok(Some(SnapshotAnswer::Done)));
    }

    #[test]
    fn a_start_from_is_answered_by_an_ack_alone() {
        use crate::consts::{REP_ACK, REP_SERVER};
        let mut reader = AnswerReader::start_from();
        assert_eq!(
            reader.reply(REP_SCRATCHD_SNAPSHOT, &entry("a")),
            Err(SnapshotReplyError::ListingUnasked("SCRATCHD_FROM"))
        );
        let refused = reader.reply(REP_SERVER, &[0; 1 << 20]).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "reply type 0x2 to SCRATCHD_FROM, which answers only ACK"
        );
        assert_eq!(reader.reply(REP_ACK, &[]), Ok(Some(SnapshotAnswer::Done)));
    }
}
