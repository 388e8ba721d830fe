//! The keyring and AES-256-GCM envelopes.
//!
//! Envelope layout (stored as one BLOB/BYTEA):
//! `[format version = 1][key id length: u8][key id][96-bit nonce][ciphertext || 128-bit tag]`.
//! The GCM associated data is the envelope header followed by a caller-supplied context (purpose,
//! user id, kind), so a ciphertext copied to another row, or relabelled with another key id,
//! fails to decrypt.

use aes_gcm::{
    Aes256Gcm, KeyInit, Nonce,
    aead::{Aead, Payload},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

const FORMAT_V1: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyringError {
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("malformed envelope")]
    Malformed,
    #[error("unknown key id '{0}'")]
    UnknownKey(String),
    #[error("authentication failed (wrong key, tampered or moved ciphertext)")]
    Authentication,
}

/// What a ciphertext is bound to. Parts are length-prefixed, so no two contexts collide.
pub struct Aad(Vec<u8>);

impl Aad {
    pub fn new(parts: &[&str]) -> Self {
        let mut v = Vec::new();
        for p in parts {
            v.extend_from_slice(&(p.len() as u32).to_be_bytes());
            v.extend_from_slice(p.as_bytes());
        }
        Self(v)
    }
    /// The legacy binding of a token bundle (user and kind only): read only to upgrade rows
    /// written before write ids existed (`keys::upgrade_legacy_bundles`, `rewrap`).
    pub fn token_bundle(user_id: &str, kind: &str) -> Self {
        Self::new(&["token_bundle", user_id, kind])
    }
    /// A token bundle as one write stored it: the user, the kind, the version that write created
    /// and its random write id. An older ciphertext put back into the row (an earlier version, or
    /// one from before an invalidation, or before a delete and a new login) fails to decrypt.
    pub fn token_bundle_write(user_id: &str, kind: &str, version: i64, write_id: &str) -> Self {
        Self::new(&["token_bundle/v2", user_id, kind, &version.to_string(), write_id])
    }
    pub fn key_check(key_id: &str) -> Self {
        Self::new(&["key_check", key_id])
    }
}

struct Key {
    id: String,
    cipher: Aes256Gcm,
    raw: Zeroizing<[u8; 32]>,
}

/// Keys by id; the first one encrypts, all of them decrypt.
pub struct Keyring {
    keys: Vec<Key>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring").field("key_ids", &self.key_ids()).finish()
    }
}

pub fn valid_key_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 32 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A fresh random 256-bit key, base64-encoded.
pub fn generate_key_b64() -> Zeroizing<String> {
    let key = Zeroizing::new(rand::random::<[u8; 32]>());
    Zeroizing::new(STANDARD.encode(key.as_slice()))
}

impl Keyring {
    /// Parses `id:base64key[,id:base64key...]`.
    pub fn parse(spec: &SecretString) -> Result<Self, KeyringError> {
        let mut keys: Vec<Key> = Vec::new();
        for (i, entry) in spec.expose_secret().split(',').map(str::trim).enumerate() {
            if entry.is_empty() {
                continue;
            }
            let Some((id, b64)) = entry.split_once(':') else {
                return Err(KeyringError::Invalid(format!("entry {} is not of the form id:base64key", i + 1)));
            };
            let id = id.trim();
            if !valid_key_id(id) {
                return Err(KeyringError::Invalid(format!(
                    "key id '{}' must be 1-32 characters of letters, digits, - and _",
                    id.escape_default()
                )));
            }
            let raw = Zeroizing::new(
                STANDARD
                    .decode(b64.trim())
                    .map_err(|_| KeyringError::Invalid(format!("key '{id}' is not valid base64")))?,
            );
            if raw.len() != 32 {
                return Err(KeyringError::Invalid(format!(
                    "key '{id}' must decode to 32 bytes (AES-256), got {}",
                    raw.len()
                )));
            }
            if keys.iter().any(|k| k.id == id) {
                return Err(KeyringError::Invalid(format!("key id '{id}' appears twice")));
            }
            let cipher = Aes256Gcm::new_from_slice(&raw)
                .map_err(|_| KeyringError::Invalid(format!("key '{id}' has the wrong length")))?;
            let mut bytes = Zeroizing::new([0u8; 32]);
            bytes.copy_from_slice(&raw);
            keys.push(Key { id: id.to_string(), cipher, raw: bytes });
        }
        if keys.is_empty() {
            return Err(KeyringError::Invalid("no keys given".into()));
        }
        Ok(Self { keys })
    }

    pub fn active_key_id(&self) -> &str {
        &self.keys[0].id
    }

    pub fn key_ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }

    pub fn has_key(&self, id: &str) -> bool {
        self.keys.iter().any(|k| k.id == id)
    }

    fn header(key_id: &str) -> Vec<u8> {
        let mut h = Vec::with_capacity(2 + key_id.len());
        h.push(FORMAT_V1);
        h.push(key_id.len() as u8);
        h.extend_from_slice(key_id.as_bytes());
        h
    }

    fn full_aad(header: &[u8], aad: &Aad) -> Vec<u8> {
        let mut a = header.to_vec();
        a.extend_from_slice(&aad.0);
        a
    }

    /// Encrypts under the active key with a fresh random nonce.
    pub fn encrypt(&self, plaintext: &[u8], aad: &Aad) -> Vec<u8> {
        self.encrypt_with(&self.keys[0], plaintext, aad)
    }

    /// Encrypts under a given key id (used for the per-key check value).
    pub fn encrypt_with_key_id(&self, key_id: &str, plaintext: &[u8], aad: &Aad) -> Option<Vec<u8>> {
        self.keys.iter().find(|k| k.id == key_id).map(|k| self.encrypt_with(k, plaintext, aad))
    }

    fn encrypt_with(&self, key: &Key, plaintext: &[u8], aad: &Aad) -> Vec<u8> {
        let header = Self::header(&key.id);
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let nonce = Nonce::from(nonce_bytes);
        let full_aad = Self::full_aad(&header, aad);
        // AES-GCM encryption only fails for inputs over ~64 GiB; our bodies are capped far below.
        let ct = key.cipher.encrypt(&nonce, Payload { msg: plaintext, aad: &full_aad }).unwrap_or_default();
        let mut out = header;
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&ct);
        out
    }

    /// A 256-bit subkey for another purpose (HMAC keys for the audit chain, tried-code MACs),
    /// derived from key `key_id` as HMAC-SHA256(key, "centraldb-mfa/" + label). Someone with
    /// the database but not the keyring cannot compute it. `None` if the id is not in the ring.
    pub fn derive(&self, key_id: &str, label: &str) -> Option<Zeroizing<[u8; 32]>> {
        use hmac::{KeyInit as _, Mac};
        let key = self.keys.iter().find(|k| k.id == key_id)?;
        let mut mac = <hmac::Hmac<sha2::Sha256>>::new_from_slice(key.raw.as_slice()).ok()?;
        mac.update(b"centraldb-mfa/");
        mac.update(label.as_bytes());
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(&mac.finalize().into_bytes());
        Some(out)
    }

    /// The key id an envelope names, without decrypting it.
    pub fn envelope_key_id(envelope: &[u8]) -> Result<&str, CryptoError> {
        let (&version, rest) = envelope.split_first().ok_or(CryptoError::Malformed)?;
        if version != FORMAT_V1 {
            return Err(CryptoError::Malformed);
        }
        let (&len, rest) = rest.split_first().ok_or(CryptoError::Malformed)?;
        let id = rest.get(..len as usize).ok_or(CryptoError::Malformed)?;
        std::str::from_utf8(id).map_err(|_| CryptoError::Malformed)
    }

    pub fn decrypt(&self, envelope: &[u8], aad: &Aad) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let key_id = Self::envelope_key_id(envelope)?;
        let header_len = 2 + key_id.len();
        let body = &envelope[header_len..];
        if body.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptoError::Malformed);
        }
        let key =
            self.keys.iter().find(|k| k.id == key_id).ok_or_else(|| CryptoError::UnknownKey(key_id.to_string()))?;
        let (nonce_bytes, ct) = body.split_at(NONCE_LEN);
        let nonce = Nonce::try_from(nonce_bytes).map_err(|_| CryptoError::Malformed)?;
        let full_aad = Self::full_aad(&envelope[..header_len], aad);
        key.cipher
            .decrypt(&nonce, Payload { msg: ct, aad: &full_aad })
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Authentication)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(spec: &str) -> Keyring {
        Keyring::parse(&SecretString::from(spec.to_string())).unwrap()
    }

    fn spec(id: &str) -> String {
        format!("{id}:{}", generate_key_b64().as_str())
    }

    #[test]
    fn round_trip_and_binding() {
        let k = ring(&spec("k1"));
        let aad = Aad::token_bundle("alice", "garth");
        let env = k.encrypt(b"secret", &aad);
        assert_eq!(Keyring::envelope_key_id(&env).unwrap(), "k1");
        assert_eq!(k.decrypt(&env, &aad).unwrap().as_slice(), b"secret");
        assert_eq!(k.decrypt(&env, &Aad::token_bundle("bob", "garth")), Err(CryptoError::Authentication));
        assert_eq!(k.decrypt(&env, &Aad::token_bundle("alice", "garminconnect")), Err(CryptoError::Authentication));
        // Two encryptions of the same plaintext differ (random nonce).
        assert_ne!(env, k.encrypt(b"secret", &aad));
    }

    #[test]
    fn every_flipped_byte_and_truncation_is_detected() {
        let k = ring(&spec("k1"));
        let aad = Aad::token_bundle("alice", "garth");
        let env = k.encrypt(b"secret payload", &aad);
        for i in 0..env.len() {
            let mut bad = env.clone();
            bad[i] ^= 0x01;
            assert!(k.decrypt(&bad, &aad).is_err(), "flip at {i} undetected");
        }
        for n in 0..env.len() {
            assert!(k.decrypt(&env[..n], &aad).is_err(), "truncation to {n} undetected");
        }
    }

    #[test]
    fn rotation_old_keys_decrypt_first_encrypts() {
        let old = spec("old");
        let k_old = ring(&old);
        let aad = Aad::token_bundle("u", "garth");
        let env_old = k_old.encrypt(b"x", &aad);
        let k_both = ring(&format!("{},{old}", spec("new")));
        assert_eq!(k_both.active_key_id(), "new");
        assert_eq!(k_both.decrypt(&env_old, &aad).unwrap().as_slice(), b"x");
        let k_new_only = ring(&spec("new"));
        assert_eq!(k_new_only.decrypt(&env_old, &aad), Err(CryptoError::UnknownKey("old".into())));
    }

    #[test]
    fn derived_keys_differ_by_label_and_key() {
        let k = ring(&format!("{},{}", spec("a"), spec("b")));
        let a1 = k.derive("a", "audit-chain/v1").unwrap();
        assert_eq!(*a1, *k.derive("a", "audit-chain/v1").unwrap());
        assert_ne!(*a1, *k.derive("a", "attempt-code/v1").unwrap());
        assert_ne!(*a1, *k.derive("b", "audit-chain/v1").unwrap());
        assert!(k.derive("zz", "audit-chain/v1").is_none());
    }

    #[test]
    fn parse_errors_are_clear() {
        for bad in ["", "k1", "k1:notbase64!", "k1:AAAA", "bad id:AAAA", &format!("{},{}", spec("a"), spec("a"))] {
            assert!(Keyring::parse(&SecretString::from(bad.to_string())).is_err(), "{bad}");
        }
    }
}
