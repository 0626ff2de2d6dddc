//! Identifiers nobody can guess.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_carry_128_bits() {
        let (a, b) = (random_id(), random_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
