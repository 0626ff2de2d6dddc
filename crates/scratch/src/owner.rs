//! Who a scratch disk belongs to, and what one owner may take.
//!
//! A disk belongs to the [`Owner`] of the connection that created it, and
//! names are looked up within the asking connection's owner only: every
//! owner has a namespace of its own. A connection from another owner that
//! asks for a name in use gets what it would get for any fresh name — a new,
//! empty disk of its own — so no answer (LIST, INFO, GO, or a refusal)
//! tells it whether someone else's disk has that name, and nobody can block
//! a build by taking its name first. The [`OwnerPolicy`] (`owner=`) turns a
//! connection's [`Peer`] into its owner.
//!
//! A [`Peer`] is what the connection's transport proved about the other
//! end, in the registry's own terms: the server's identity type is mapped
//! to it by the exports layer above, so that this crate knows owners, not
//! connections.
//!
//! [`OwnerLimits`] keep one owner from taking the whole host: a cap on its
//! disks and a share of each budget (see [`crate::device::Budgets`]).

use std::fmt;

/// Who asks for a disk, as far as the connection's transport proved it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A process on this host (a Unix socket's peer credentials).
    Unix { uid: u32, gid: u32 },
    /// A TLS client, by the SHA-256 of its verified certificate.
    Certificate([u8; 32]),
    /// Nothing is known about the peer (plain TCP, stdio, or the run's own
    /// registry).
    Anonymous,
}

/// Who a disk belongs to: a connection's identity under the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    /// A local user (`owner=peer` on a Unix socket).
    Uid(u32),
    /// A local user and group (`owner=peer+gid` on a Unix socket).
    UidGid(u32, u32),
    /// A TLS client certificate.
    Certificate([u8; 32]),
    /// Whoever knows the name: peers that prove nothing (plain TCP), or
    /// every peer under `owner=name`.
    Anyone,
}

impl Owner {
    /// Whether the owner is a proven identity rather than "whoever knows
    /// the name": only those see their disks in LIST.
    pub fn is_identified(&self) -> bool {
        *self != Owner::Anyone
    }

    /// Who the owner's caps and budget shares are counted for: the user
    /// alone under `owner=peer+gid`, so that a user switching groups
    /// (`sg`, `newgrp`) gets more namespaces but not more room.
    pub fn holder(&self) -> Owner {
        match *self {
            Owner::UidGid(uid, _) => Owner::Uid(uid),
            other => other,
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Uid(uid) => write!(f, "uid {uid}"),
            Owner::UidGid(uid, gid) => write!(f, "uid {uid} gid {gid}"),
            Owner::Certificate(fp) => {
                f.write_str("certificate sha256:")?;
                fp.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
            Owner::Anyone => f.write_str("anyone"),
        }
    }
}

/// How a connection's identity becomes a disk's owner (`owner=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OwnerPolicy {
    /// `peer` (the default): the Unix peer's uid, or the TLS client
    /// certificate; peers without either own their disks in common.
    #[default]
    Peer,
    /// `peer+gid`: as `peer`, with the Unix peer's gid too.
    PeerGid,
    /// `name`: no owners; whoever knows a name reaches its disk.
    Name,
}

/// Why [`OwnerPolicy::parse`] refused its text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid owner={0:?}: use peer (the default), peer+gid or name")]
pub struct OwnerPolicyError(pub String);

impl OwnerPolicy {
    /// Parses the value of `owner=`.
    pub fn parse(text: &str) -> Result<OwnerPolicy, OwnerPolicyError> {
        match text {
            "peer" => Ok(OwnerPolicy::Peer),
            "peer+gid" => Ok(OwnerPolicy::PeerGid),
            "name" => Ok(OwnerPolicy::Name),
            _ => Err(OwnerPolicyError(text.to_owned())),
        }
    }

    /// The owner of disks that `peer` creates and may open.
    pub fn owner_of(self, peer: Peer) -> Owner {
        match (self, peer) {
            (OwnerPolicy::Name, _) | (_, Peer::Anonymous) => Owner::Anyone,
            (OwnerPolicy::Peer, Peer::Unix { uid, .. }) => Owner::Uid(uid),
            (OwnerPolicy::PeerGid, Peer::Unix { uid, gid }) => Owner::UidGid(uid, gid),
            (_, Peer::Certificate(fp)) => Owner::Certificate(fp),
        }
    }
}

/// What one owner may hold at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OwnerLimits {
    /// Disks (being created, live or lingering).
    pub max_exports: Option<usize>,
    /// Bytes of the memory budget (`--owner-memory-limit`).
    pub memory: Option<u64>,
    /// Bytes of the disk budget (`--owner-disk-limit`).
    pub disk: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_turn_peers_into_owners() {
        let unix = Peer::Unix {
            uid: 1000,
            gid: 100,
        };
        let cert = Peer::Certificate([7; 32]);
        let p = |text| OwnerPolicy::parse(text).unwrap();
        assert_eq!(p("peer").owner_of(unix), Owner::Uid(1000));
        assert_eq!(p("peer+gid").owner_of(unix), Owner::UidGid(1000, 100));
        assert_eq!(p("name").owner_of(unix), Owner::Anyone);
        assert_eq!(p("peer").owner_of(cert), Owner::Certificate([7; 32]));
        assert_eq!(p("name").owner_of(cert), Owner::Anyone);
        assert_eq!(p("peer").owner_of(Peer::Anonymous), Owner::Anyone);
        assert_eq!(OwnerPolicy::default(), OwnerPolicy::Peer);
        assert_eq!(
            Owner::UidGid(1000, 100).holder(),
            Owner::UidGid(1000, 5).holder(),
            "one user's caps across groups"
        );
        assert_ne!(Owner::Uid(1000).holder(), Owner::Uid(1001).holder());
        for bad in ["", "uid", "Peer", "peer+uid"] {
            assert_eq!(OwnerPolicy::parse(bad), Err(OwnerPolicyError(bad.into())));
        }
        assert!(!Owner::Anyone.is_identified() && Owner::Uid(0).is_identified());
        assert_eq!(Owner::UidGid(1, 2).to_string(), "uid 1 gid 2");
        let cert = Owner::Certificate([0xab; 32]).to_string();
        assert_eq!(cert, format!("certificate sha256:{}", "ab".repeat(32)));
    }
}
