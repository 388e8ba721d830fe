//! Keys and ciphertexts: the AES-256-GCM keyring and API-key hashing.

pub mod api_keys;
pub mod keyring;

pub use keyring::{Aad, CryptoError, Keyring, KeyringError};
