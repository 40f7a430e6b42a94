//! Encryption of provider passwords at rest: XChaCha20-Poly1305 (RustCrypto) with a random
//! 192-bit nonce per value. The associated data binds each ciphertext to its group, provider
//! and username, so a ciphertext copied onto another row does not decrypt.
//!
//! Stored form: `v1:` + base64(nonce ‖ ciphertext ‖ tag). The `v1` names the key generation,
//! leaving room for key rotation.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

const PREFIX: &str = "v1:";
const NONCE_LENGTH: usize = 24;

/// Failure to seal or open a secret. Carries no secret material.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The key is not 32 bytes of base64.
    #[error("the data-encryption key must be 32 bytes, base64-encoded")]
    BadKey,
    /// The ciphertext was altered, belongs to another row, or was sealed with another key.
    #[error("a stored secret could not be decrypted (wrong key or tampered data)")]
    Undecryptable,
}

/// Seals and opens small secrets with the data-encryption key.
#[derive(Clone)]
pub struct SecretBox {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(<key redacted>)")
    }
}

impl SecretBox {
    /// Builds from a base64-encoded 32-byte key.
    pub fn from_base64_key(encoded: &str) -> Result<Self, CryptoError> {
        let key = BASE64
            .decode(encoded.trim())
            .map_err(|_| CryptoError::BadKey)?;
        if key.len() != 32 {
            return Err(CryptoError::BadKey);
        }
        let cipher = XChaCha20Poly1305::new_from_slice(&key).map_err(|_| CryptoError::BadKey)?;
        Ok(Self { cipher })
    }

    /// A fresh random key, base64-encoded (dev mode and `smd-gateway keygen`).
    pub fn generate_key() -> String {
        BASE64.encode(XChaCha20Poly1305::generate_key(&mut OsRng))
    }

    /// Encrypts `plaintext`, bound to `context`.
    pub fn seal(&self, plaintext: &str, context: &str) -> Result<String, CryptoError> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ciphertext = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Undecryptable)?;
        let mut sealed = Vec::with_capacity(NONCE_LENGTH + ciphertext.len());
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        Ok(format!("{PREFIX}{}", BASE64.encode(sealed)))
    }

    /// Decrypts what [`SecretBox::seal`] produced for the same `context`.
    pub fn open(&self, sealed: &str, context: &str) -> Result<String, CryptoError> {
        let encoded = sealed
            .strip_prefix(PREFIX)
            .ok_or(CryptoError::Undecryptable)?;
        let bytes = BASE64
            .decode(encoded)
            .map_err(|_| CryptoError::Undecryptable)?;
        if bytes.len() <= NONCE_LENGTH {
            return Err(CryptoError::Undecryptable);
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LENGTH);
        let plaintext = self
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Undecryptable)?;
        String::from_utf8(plaintext).map_err(|_| CryptoError::Undecryptable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret_box() -> SecretBox {
        SecretBox::from_base64_key(&SecretBox::generate_key()).unwrap()
    }

    #[test]
    fn a_sealed_secret_opens_with_the_same_context_only() {
        let secret_box = secret_box();
        let sealed = secret_box
            .seal("argus-sandbox-pw", "group-1/ARGUS/demo.argus")
            .unwrap();
        assert!(!sealed.contains("argus-sandbox-pw"));
        assert_eq!(
            secret_box
                .open(&sealed, "group-1/ARGUS/demo.argus")
                .unwrap(),
            "argus-sandbox-pw"
        );
        assert!(
            secret_box
                .open(&sealed, "group-2/ARGUS/demo.argus")
                .is_err()
        );
    }

    #[test]
    fn another_key_cannot_open_a_secret() {
        let sealed = secret_box().seal("argus-sandbox-pw", "ctx").unwrap();
        assert!(secret_box().open(&sealed, "ctx").is_err());
    }

    #[test]
    fn sealing_twice_gives_different_ciphertexts() {
        let secret_box = secret_box();
        assert_ne!(
            secret_box.seal("same", "ctx").unwrap(),
            secret_box.seal("same", "ctx").unwrap()
        );
    }

    #[test]
    fn keys_must_be_32_bytes() {
        assert!(SecretBox::from_base64_key("c2hvcnQ=").is_err());
        assert!(SecretBox::from_base64_key("not base64!").is_err());
    }
}
