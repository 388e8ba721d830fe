//! API keys: 256 random bits behind a recognisable prefix, stored only as SHA-256.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Every generated key starts with this, so it is easy to spot in a leak scanner.
pub const PREFIX: &str = "cdbm_";

pub type KeyHash = [u8; 32];

/// A new key; shown once, never stored.
pub fn generate() -> Zeroizing<String> {
    let raw = Zeroizing::new(rand::random::<[u8; 32]>());
    Zeroizing::new(format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(raw.as_slice())))
}

pub fn hash(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// The part of a key that is safe to show in listings (`cdbm_AbCdEfG`: 42 of its 256 random
/// bits). A key not made here (a bootstrap key) shows nothing of itself.
pub fn display_prefix(key: &str) -> String {
    if key.starts_with(PREFIX) && key.len() >= PREFIX.len() + 43 {
        key.chars().take(PREFIX.len() + 7).collect()
    } else {
        "(custom)".into()
    }
}

pub fn hashes_equal(a: &KeyHash, b: &[u8]) -> bool {
    b.len() == a.len() && bool::from(a.as_slice().ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_prefixed_unique_and_hash_stably() {
        let a = generate();
        let b = generate();
        assert!(a.starts_with(PREFIX));
        assert_eq!(a.len(), PREFIX.len() + 43);
        assert_ne!(*a, *b);
        assert!(hashes_equal(&hash(&a), &hash(&a)));
        assert!(!hashes_equal(&hash(&a), &hash(&b)));
        assert!(!hashes_equal(&hash(&a), &[0u8; 31]));
    }
}
