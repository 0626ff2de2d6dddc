//! Export-name policy: which names may become scratch disks.
//!
//! A name is the build's identity and nothing more: it is only ever a key in
//! the registry's map, never part of a file path or a command line, so the
//! policy exists to keep names readable in logs and stats and to let an
//! operator reserve a namespace (`--name-prefix`), not to defend the file
//! system.
//!
//! [`unguessable`] makes names with 128 random bits, for builds whose peers
//! prove no identity (plain TCP) or share one (the same uid): there a name
//! is the only key to its disk, so it must not be guessable from a build id.

use std::io;

use scratchd_proto::negotiation::LookupError;

/// The longest name accepted.
pub const MAX_NAME_LEN: usize = 128;

/// Random bits in an [`unguessable`] name.
pub const RANDOM_BITS: usize = 128;

/// `prefix` followed by [`RANDOM_BITS`] bits from the kernel's random
/// generator, as 32 lowercase hex digits (`koji-4711-` →
/// `koji-4711-3f9c…`): a name nobody can guess, even knowing the build id.
///
/// # Errors
///
/// When the kernel gives no random bytes (`getrandom` failed).
pub fn unguessable(prefix: &str) -> io::Result<String> {
    let mut bytes = [0u8; RANDOM_BITS / 8];
    let mut filled = 0;
    while filled < bytes.len() {
        match rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut name = String::with_capacity(prefix.len() + 2 * bytes.len());
    name.push_str(prefix);
    for b in bytes {
        name.push_str(&format!("{b:02x}"));
    }
    Ok(name)
}

/// Which export names may be created: 1–128 characters of `[A-Za-z0-9._-]`,
/// not starting with `.`, starting with `prefix`.
#[derive(Debug, Clone, Default)]
pub struct NamePolicy {
    /// Every name must start with this (empty: any name).
    pub prefix: String,
}

impl NamePolicy {
    /// Accepts `name` or explains, as an NBD policy error, why not.
    pub fn check(&self, name: &str) -> Result<(), LookupError> {
        let refuse = |why: String| Err(LookupError::Policy(why));
        if name.is_empty() {
            return refuse(
                "this server makes one scratch disk per build: connect with the build's name \
                 as the export name (e.g. nbd+unix:///build-1234?socket=...)"
                    .into(),
            );
        }
        if name.len() > MAX_NAME_LEN {
            return refuse(format!(
                "export name is {} bytes long; at most {MAX_NAME_LEN} are allowed",
                name.len()
            ));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return refuse(format!(
                "export name contains {c:?}; only A-Z, a-z, 0-9, '.', '_' and '-' are allowed"
            ));
        }
        if name.starts_with('.') {
            return refuse("export name must not start with '.'".into());
        }
        if !name.starts_with(&self.prefix) {
            return refuse(format!(
                "export name must start with {:?} on this server",
                self.prefix
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(policy: &NamePolicy, name: &str) -> bool {
        policy.check(name).is_ok()
    }

    #[test]
    fn accepts_build_like_names() {
        let p = NamePolicy::default();
        for name in ["build-a", "koji.12345_x86-64", "A", "a.b", &"x".repeat(128)] {
            assert!(ok(&p, name), "{name}");
        }
    }

    #[test]
    fn refuses_paths_dots_long_and_odd_characters_with_policy_errors() {
        let p = NamePolicy::default();
        for name in [
            "",
            "../x",
            "a/b",
            ".hidden",
            ".",
            "..",
            "sp ace",
            "nul\0",
            "é",
            &"x".repeat(129),
            &"x".repeat(200),
        ] {
            match p.check(name) {
                Err(LookupError::Policy(msg)) => assert!(!msg.is_empty()),
                other => panic!("{name:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn unguessable_names_carry_128_random_bits_and_pass_the_policy() {
        let a = unguessable("koji-4711-").unwrap();
        let b = unguessable("koji-4711-").unwrap();
        assert_ne!(a, b);
        let random = a.strip_prefix("koji-4711-").unwrap();
        assert_eq!(random.len(), RANDOM_BITS / 4);
        assert!(random
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert!(ok(&NamePolicy::default(), &a));
        let p = NamePolicy {
            prefix: "ci-".into(),
        };
        assert!(ok(&p, &unguessable("ci-").unwrap()));
        assert_eq!(unguessable("").unwrap().len(), 32);
    }

    #[test]
    fn prefix_is_required_when_set() {
        let p = NamePolicy {
            prefix: "ci-".into(),
        };
        assert!(ok(&p, "ci-1"));
        assert!(!ok(&p, "build-1"));
        assert!(!ok(&p, "ci"));
    }
}
