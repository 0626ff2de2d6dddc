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

/// Why a name may not become a scratch disk. The messages go to the
/// client, so each says what a good name looks like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The empty (default) name, on a server without `--export-name`.
    #[error(
        "this server makes one scratch disk per build: connect with the build's name \
         as the export name (e.g. nbd+unix:///build-1234?socket=...)"
    )]
    Empty,
    #[error("export name is {0} bytes long; at most {MAX_NAME_LEN} are allowed")]
    TooLong(usize),
    #[error("export name contains {0:?}; only A-Z, a-z, 0-9, '.', '_' and '-' are allowed")]
    Character(char),
    #[error("export name must not start with '.'")]
    LeadingDot,
    /// The name lacks the server's `--name-prefix`.
    #[error("export name must start with {0:?} on this server")]
    Prefix(String),
}

/// Which export names may be created: 1–128 characters of `[A-Za-z0-9._-]`,
/// not starting with `.`, starting with `prefix`.
#[derive(Debug, Clone, Default)]
pub struct NamePolicy {
    /// Every name must start with this (empty: any name).
    pub prefix: String,
}

impl NamePolicy {
    /// Accepts `name` or says why not.
    pub fn check(&self, name: &str) -> Result<(), NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong(name.len()));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(NameError::Character(c));
        }
        if name.starts_with('.') {
            return Err(NameError::LeadingDot);
        }
        if !name.starts_with(&self.prefix) {
            return Err(NameError::Prefix(self.prefix.clone()));
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
    fn refuses_paths_dots_long_and_odd_characters_saying_why() {
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
            let why = p.check(name).expect_err(name);
            assert!(!why.to_string().is_empty());
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
        assert_eq!(p.check("build-1"), Err(NameError::Prefix("ci-".into())));
        assert_eq!(
            p.check("build-1").unwrap_err().to_string(),
            "export name must start with \"ci-\" on this server"
        );
        assert!(!ok(&p, "ci"));
    }
}
