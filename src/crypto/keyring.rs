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

/// A fresh random 256-bit key, base64-encoded. It always passes [`weak_aes_key`] and, as text,
/// `weak_text_key` (it may serve as the bootstrap admin key): a draw that would not
/// (below one in 10^24) is replaced, so `keygen` never prints a key the service refuses.
pub fn generate_key_b64() -> Zeroizing<String> {
    loop {
        let key = Zeroizing::new(rand::random::<[u8; 32]>());
        let b64 = Zeroizing::new(STANDARD.encode(key.as_slice()));
        if weak_aes_key(key.as_slice()).is_none() && weak_text_key(&b64).is_none() {
            return b64;
        }
    }
}

/// Why key material is obviously not random, or `None`. `symbols` are a key's bytes (or a
/// text key's characters); it is refused when
/// - it is a short pattern repeated: the whole key has a period of at most half its length
///   (all bytes equal is period 1);
/// - it uses fewer than `min_distinct` distinct symbols;
/// - its consecutive differences (wrapping) take fewer than `min_distinct_steps` values
///   (`0,1,2,3,...`, `abcdef...`, `0123456789012...`).
///
/// The thresholds are chosen so that real random keys never trip them; see [`weak_aes_key`]
/// and `weak_text_key` for the arithmetic.
pub fn not_random(symbols: &[u8], min_distinct: usize, min_distinct_steps: usize) -> Option<String> {
    let n = symbols.len();
    if n == 0 {
        return Some("it is empty".into());
    }
    if let Some(p) = (1..=n / 2).find(|&p| (p..n).all(|i| symbols[i] == symbols[i - p])) {
        return Some(if p == 1 {
            "all its bytes are the same".into()
        } else {
            format!("it is a pattern of {p} bytes repeated")
        });
    }
    let mut seen = [false; 256];
    symbols.iter().for_each(|&b| seen[b as usize] = true);
    let distinct = seen.iter().filter(|&&s| s).count();
    if distinct < min_distinct {
        return Some(format!("it has only {distinct} distinct byte values"));
    }
    let mut steps = [false; 256];
    symbols.windows(2).for_each(|w| steps[w[1].wrapping_sub(w[0]) as usize] = true);
    let distinct_steps = steps.iter().filter(|&&s| s).count();
    if n > 1 && distinct_steps < min_distinct_steps {
        return Some("its bytes follow a simple sequence".into());
    }
    None
}

/// Why a 32-byte AES key is obviously not random, or `None`.
///
/// For 32 uniformly random bytes: a period of at most 16 has probability below 2^-127; at most
/// 11 distinct byte values, below 10^-24 (the exact count: sum over k <= 11 of
/// C(256,k) * k! * S(32,k) / 256^32, S the Stirling numbers of the second kind); the 31
/// differences, which are uniform and independent too, taking at most 11 values, below
/// 10^-23. So no key from `keygen` or any real random source is refused, while all-zero,
/// all-equal, repeated-pattern, counting and low-variety keys are.
pub fn weak_aes_key(raw: &[u8]) -> Option<String> {
    not_random(raw, 12, 12)
}

/// Checks the keys of an `id:base64key,...` specification that decode to 32 bytes (format
/// errors are left to [`Keyring::parse`]): the first weak one is named with the reason.
pub fn weak_key_in_spec(spec: &SecretString) -> Option<String> {
    spec.expose_secret().split(',').filter_map(|entry| entry.trim().split_once(':')).find_map(|(id, b64)| {
        let raw = Zeroizing::new(STANDARD.decode(b64.trim()).ok()?);
        let why = weak_aes_key(&raw)?;
        Some(weak_key_message(id.trim(), &why))
    })
}

fn weak_key_message(id: &str, why: &str) -> String {
    let id: String = id.chars().take(32).collect::<String>().escape_default().to_string();
    format!("key '{id}' is not random ({why}); generate one with `centraldb-mfa keygen`")
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
            if let Some(why) = weak_aes_key(&raw) {
                return Err(KeyringError::Invalid(weak_key_message(id, &why)));
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

/// Why a text key (the bootstrap admin key: 32-256 printable ASCII characters) is obviously
/// not random, or `None`: a pattern repeated, at most 2 distinct characters, or consecutive
/// differences taking at most 2 values (`abcdef...`, `0123456789012...`).
///
/// Even a key of only decimal digits, the smallest alphabet anyone would draw from, trips this
/// rarely enough to never happen: for 32 random digits, a period of at most 16 has probability
/// about 10^-16, at most 2 distinct digits about 2 x 10^-21, at most 2 distinct differences
/// (each pair of 31 differences among 19 values) below 10^-18; hex or base64 keys far less.
/// `keygen` output (44 base64 characters) always passes.
pub fn weak_text_key(key: &str) -> Option<String> {
    not_random(key.as_bytes(), 3, 3)
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

    /// Envelopes made by `scripts/make-vectors.py` (Python `cryptography` AESGCM, from the layout
    /// documented above) decrypt here with their context, and only with it; the envelopes made
    /// here have the same layout.
    #[test]
    fn decrypts_the_python_known_answer_envelopes() {
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/envelope-vectors.json")).unwrap();
        let vectors = doc["vectors"].as_array().unwrap();
        assert_eq!(vectors.len(), 6);
        let parts_of = |v: &serde_json::Value| -> Vec<String> {
            v["aad_parts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect()
        };
        for (i, v) in vectors.iter().enumerate() {
            let name = v["name"].as_str().unwrap();
            let spec = v["key_spec"].as_str().unwrap();
            let key_id = spec.split_once(':').unwrap().0;
            let k = ring(spec);
            let parts = parts_of(v);
            let aad = Aad::new(&parts.iter().map(String::as_str).collect::<Vec<_>>());
            let env = hex::decode(v["envelope_hex"].as_str().unwrap()).unwrap();
            let plaintext = hex::decode(v["plaintext_hex"].as_str().unwrap()).unwrap();
            assert_eq!(Keyring::envelope_key_id(&env), Ok(key_id), "{name}");
            assert_eq!(k.decrypt(&env, &aad).map(|p| p.to_vec()), Ok(plaintext.clone()), "{name}");
            // Any other context (another vector's parts under the same key) fails.
            for (j, w) in vectors.iter().enumerate() {
                if j != i && w["key_spec"] == v["key_spec"] && parts_of(w) != parts {
                    let other = parts_of(w);
                    let other = Aad::new(&other.iter().map(String::as_str).collect::<Vec<_>>());
                    assert_eq!(k.decrypt(&env, &other), Err(CryptoError::Authentication), "{name} with vector {j}");
                }
            }
            let mine = k.encrypt(&plaintext, &aad);
            assert_eq!(mine.len(), env.len(), "{name}");
            assert_eq!(mine[..2 + key_id.len()], env[..2 + key_id.len()], "{name}: the header");
        }
    }

    #[test]
    fn obviously_non_random_keys_are_refused() {
        let half: [u8; 16] = rand::random();
        let noise = b"2a6824aba9f6621747b9ffbe6663662e";
        let few: Vec<u8> = noise.iter().map(|b| [3, 141, 59, 26, 5][*b as usize % 5]).collect();
        let weak: [(Vec<u8>, &str); 6] = [
            (vec![0u8; 32], "all its bytes are the same"),
            (vec![0xa5; 32], "all its bytes are the same"),
            ([half, half].concat(), "pattern of 16 bytes"),
            (b"ab".repeat(16), "pattern of 2 bytes"),
            ((0u8..32).collect(), "simple sequence"),
            (few, "only 5 distinct"),
        ];
        for (key, why) in weak {
            let reason = weak_aes_key(&key).unwrap_or_else(|| panic!("{key:?} accepted"));
            assert!(reason.contains(why), "{key:?}: {reason}");
            let e = Keyring::parse(&SecretString::from(format!("k1:{}", STANDARD.encode(&key)))).unwrap_err();
            assert!(e.to_string().contains("'k1' is not random"), "{e}");
        }
        // Real random keys (and keygen's) never trip the rule.
        for _ in 0..20_000 {
            assert_eq!(weak_aes_key(&rand::random::<[u8; 32]>()), None);
        }
        for _ in 0..1000 {
            let key = STANDARD.decode(generate_key_b64().as_bytes()).unwrap();
            assert_eq!(weak_aes_key(&key), None);
        }
    }

    #[test]
    fn parse_errors_are_clear() {
        for bad in ["", "k1", "k1:notbase64!", "k1:AAAA", "bad id:AAAA", &format!("{},{}", spec("a"), spec("a"))] {
            assert!(Keyring::parse(&SecretString::from(bad.to_string())).is_err(), "{bad}");
        }
    }
}
