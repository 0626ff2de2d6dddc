//! Identifiers nobody can guess, and what logs say instead of a disk's
//! name.

use tracing::warn;

/// 128 random bits from the kernel's generator, in hex: names nobody can
/// guess (see docs/RUN.md), and identifiers that are never reused.
pub fn random_id() -> String {
    let mut bytes = [0u8; 16];
    if let Err(e) = rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()) {
        // Only reached without getrandom(2) (Linux < 3.17); still unique
        // on this host for this process's lifetime.
        warn!(error = %e, "no random bytes; naming after the process and time");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return format!("{:08x}{:024x}", std::process::id(), now.as_nanos());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The environment variable that names an export for every command that
/// takes a name (`attach`, `run`, `ctl show|drop|keep`): root's environment
/// is readable by root alone, where every local user reads
/// `/proc/PID/cmdline`. Processes these commands start do not inherit it.
pub const NAME_VAR: &str = "SCRATCHD_NAME";

/// The environment variable that names the snapshot a new disk starts as
/// (`run --from`, `attach --from`): a snapshot's name is a key too, where
/// peers share a namespace (`owner=name`). Not inherited either.
pub const FROM_VAR: &str = "SCRATCHD_FROM";

/// The environment variable that names the snapshot `scratchd snapshot
/// take` makes and `scratchd snapshot delete` deletes, for the same
/// reason. Not inherited either.
pub const SNAPSHOT_VAR: &str = "SCRATCHD_SNAPSHOT";

/// Every variable above: what processes these commands start lose.
pub const SECRET_VARS: [&str; 3] = [NAME_VAR, FROM_VAR, SNAPSHOT_VAR];

/// What logs at info level say instead of a disk's name, which is its key:
/// the first 8 hex digits of the name's SHA-256. The mock plugin
/// (`contrib/mock/scratchd_root.py`, `fingerprint`) logs the same, so the
/// two can be matched up, and so can `scratchd ctl list`'s names. 32 bits
/// do not help anyone find a name of 128 random bits.
pub fn fingerprint(name: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same as the mock plugin's `hashlib.sha256(name).hexdigest()[:8]`.
    #[test]
    fn fingerprints_are_the_mock_plugins() {
        // printf %s build-42 | sha256sum
        assert_eq!(fingerprint("build-42"), "9bf1b543");
        assert_eq!(fingerprint(""), "e3b0c442");
    }

    #[test]
    fn random_ids_carry_128_bits() {
        let (a, b) = (random_id(), random_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
