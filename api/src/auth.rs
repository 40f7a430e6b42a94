//! Bearer-token verification. Algorithms are pinned by the configured keys (HS256 secret,
//! RS256/ES256 PEM public keys, or a JWKS file); `exp`, `iss`, `aud` and `sub` are required;
//! leeway is small. A token that fails any check is refused, never downgraded to anonymous.
//!
//! Two rules beyond the signature:
//! - **One deadline.** A verified identity is honoured until `exp` plus the configured leeway,
//!   and that deadline travels with it ([`VerifiedIdentity::expires_at`]), so an HTTP request
//!   and every operation on a long-lived WebSocket apply the same leeway.
//! - **Bounded lifetime.** With a maximum lifetime configured (the default), `exp − iat` may
//!   not exceed it, `iat` may not lie in the future (beyond the leeway), and a token without
//!   `iat` is refused, because its lifetime cannot be known. A stolen long-lived token is the
//!   risk this bounds.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, decode_header, encode,
};
use serde::{Deserialize, Serialize};

use crate::config::JwtSettings;
use crate::domain::types::Role;

/// The claims the gateway trusts (after verification).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// User id in the PMS.
    pub sub: String,
    /// Group (practice) id in the PMS.
    pub group: String,
    /// `practitioner` or `administrator`.
    pub role: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Issuer.
    pub iss: String,
    /// Audience: one string or a list (as many identity providers issue).
    pub aud: serde_json::Value,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

/// A verified identity.
#[derive(Debug, Clone)]
pub struct VerifiedIdentity {
    /// `sub`.
    pub subject: String,
    /// `group`.
    pub group_id: String,
    /// `role`.
    pub role: Role,
    /// `name`, or `sub` when absent.
    pub name: String,
    /// `exp` plus the verifier's leeway: the moment the identity stops being honoured, by an
    /// HTTP request and by every operation of a long-lived connection (WebSocket) alike.
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

/// Why a token was refused. The message is safe to show.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(pub String);

struct VerificationKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// Verifies bearer tokens against the configured keys.
pub struct TokenVerifier {
    keys: Vec<VerificationKey>,
    issuer: String,
    audience: String,
    leeway_seconds: u64,
    max_lifetime_seconds: Option<u64>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("keys", &self.keys.len())
            .field("issuer", &self.issuer)
            .finish()
    }
}

impl TokenVerifier {
    /// Loads every configured key. Fails with a message naming the bad key file.
    pub fn from_settings(settings: &JwtSettings) -> anyhow::Result<Self> {
        let mut keys = Vec::new();
        if let Some(secret) = &settings.hs256_secret {
            anyhow::ensure!(
                secret.len() >= 32,
                "the HS256 secret must be at least 32 bytes"
            );
            keys.push(VerificationKey {
                kid: None,
                algorithm: Algorithm::HS256,
                key: DecodingKey::from_secret(secret.as_bytes()),
            });
        }
        for path in &settings.public_key_files {
            let pem = std::fs::read(path)
                .map_err(|error| anyhow::anyhow!("cannot read {}: {error}", path.display()))?;
            let (algorithm, key) = if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                (Algorithm::RS256, key)
            } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                (Algorithm::ES256, key)
            } else {
                anyhow::bail!(
                    "{} is not an RSA or EC P-256 public key in PEM form",
                    path.display()
                );
            };
            keys.push(VerificationKey {
                kid: None,
                algorithm,
                key,
            });
        }
        if let Some(path) = &settings.jwks_file {
            let text = std::fs::read_to_string(path)
                .map_err(|error| anyhow::anyhow!("cannot read {}: {error}", path.display()))?;
            let set: JwkSet = serde_json::from_str(&text).map_err(|error| {
                anyhow::anyhow!("{} is not a JWKS document: {error}", path.display())
            })?;
            for jwk in &set.keys {
                let algorithm = match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                        Algorithm::ES256
                    }
                    _ => anyhow::bail!(
                        "{}: only RSA (RS256) and EC P-256 (ES256) keys are accepted",
                        path.display()
                    ),
                };
                let key = DecodingKey::from_jwk(jwk)?;
                keys.push(VerificationKey {
                    kid: jwk.common.key_id.clone(),
                    algorithm,
                    key,
                });
            }
        }
        anyhow::ensure!(!keys.is_empty(), "no JWT verification key is configured");
        Ok(Self {
            keys,
            issuer: settings
                .issuer
                .clone()
                .ok_or_else(|| anyhow::anyhow!("the JWT issuer is not configured"))?,
            audience: settings
                .audience
                .clone()
                .ok_or_else(|| anyhow::anyhow!("the JWT audience is not configured"))?,
            leeway_seconds: settings.leeway_seconds,
            max_lifetime_seconds: (settings.max_lifetime_seconds > 0)
                .then_some(settings.max_lifetime_seconds),
        })
    }

    /// Verifies signature, algorithm, `exp`, `nbf`, `iss`, `aud` and the gateway's own claims.
    pub fn verify(&self, token: &str) -> Result<VerifiedIdentity, AuthError> {
        let refused = || {
            AuthError(
                "the bearer token is invalid or expired; sign in again to get a new one".into(),
            )
        };
        // An unknown `alg` (including `none`) fails to parse here.
        let header = decode_header(token).map_err(|_| refused())?;
        let candidates = self.keys.iter().filter(|key| {
            key.algorithm == header.alg
                && match (&header.kid, &key.kid) {
                    (Some(wanted), Some(kid)) => wanted == kid,
                    _ => true,
                }
        });
        for candidate in candidates {
            let mut validation = Validation::new(candidate.algorithm);
            validation.set_issuer(&[&self.issuer]);
            validation.set_audience(&[&self.audience]);
            validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
            validation.validate_nbf = true;
            validation.leeway = self.leeway_seconds;
            if let Ok(data) = decode::<Claims>(token, &candidate.key, &validation) {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |since_epoch| since_epoch.as_secs());
                self.check_lifetime(&data.claims, now)?;
                return identity_from_claims(data.claims, self.leeway_seconds);
            }
        }
        Err(refused())
    }

    /// Refuses a token that lives longer than the configured maximum, claims to be issued in
    /// the future, or does not say when it was issued (while a maximum is set).
    fn check_lifetime(&self, claims: &Claims, now: u64) -> Result<(), AuthError> {
        let Some(max_lifetime) = self.max_lifetime_seconds else {
            return Ok(());
        };
        let Some(issued_at) = claims.iat else {
            return Err(AuthError(format!(
                "the token has no iat (issued-at) claim, so its lifetime cannot be checked; this gateway accepts only tokens with iat that live at most {max_lifetime} seconds"
            )));
        };
        if issued_at > now.saturating_add(self.leeway_seconds) {
            return Err(AuthError(
                "the token's iat (issued-at) claim is in the future; check the identity provider's clock".into(),
            ));
        }
        let lifetime = claims.exp.saturating_sub(issued_at);
        if lifetime > max_lifetime {
            return Err(AuthError(format!(
                "the token's lifetime (exp - iat) is {lifetime} seconds, longer than the {max_lifetime} seconds this gateway accepts; ask the identity provider for a shorter-lived token"
            )));
        }
        Ok(())
    }
}

fn identity_from_claims(
    claims: Claims,
    leeway_seconds: u64,
) -> Result<VerifiedIdentity, AuthError> {
    let well_formed = |value: &str, max: usize| {
        !value.trim().is_empty() && value.len() <= max && !value.chars().any(char::is_control)
    };
    if !well_formed(&claims.sub, 256) {
        return Err(AuthError(
            "the token's sub claim must be 1 to 256 characters".into(),
        ));
    }
    if !well_formed(&claims.group, 128) {
        return Err(AuthError(
            "the token's group claim must be 1 to 128 characters".into(),
        ));
    }
    let role = Role::from_code(&claims.role).ok_or_else(|| {
        AuthError("the token's role claim must be practitioner or administrator".into())
    })?;
    let name = claims
        .name
        .filter(|name| well_formed(name, 256))
        .unwrap_or_else(|| claims.sub.clone());
    let expires_at = claims
        .exp
        .checked_add(leeway_seconds)
        .and_then(|deadline| i64::try_from(deadline).ok())
        .and_then(|deadline| chrono::DateTime::from_timestamp(deadline, 0))
        .ok_or_else(|| AuthError("the token's exp claim is out of range".into()))?;
    Ok(VerifiedIdentity {
        subject: claims.sub,
        group_id: claims.group,
        role,
        name,
        expires_at,
    })
}

/// What a dev token says.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// `sub`.
    pub subject: String,
    /// `group`.
    pub group_id: String,
    /// `role`.
    pub role: Role,
    /// `name`.
    pub name: Option<String>,
    /// Lifetime in seconds.
    pub ttl_seconds: u64,
}

/// Signs an HS256 token (dev mode, tests, CI pipelines).
pub fn mint_hs256(
    secret: &str,
    issuer: &str,
    audience: &str,
    request: &TokenRequest,
) -> anyhow::Result<String> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = Claims {
        sub: request.subject.clone(),
        group: request.group_id.clone(),
        role: request.role.code().to_owned(),
        name: request.name.clone(),
        iss: issuer.to_owned(),
        aud: serde_json::Value::String(audience.to_owned()),
        exp: now + request.ttl_seconds,
        iat: Some(now),
    };
    Ok(encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// Parses a lifetime such as `90`, `30m`, `12h` or `7d` into seconds.
pub fn parse_ttl(value: &str) -> Result<u64, String> {
    let value = value.trim();
    let (number, unit) = match value.char_indices().last() {
        Some((index, unit)) if unit.is_ascii_alphabetic() => (&value[..index], unit),
        _ => (value, 's'),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("ttl must look like 90, 30m, 12h or 7d, not {value:?}"))?;
    let seconds = match unit {
        's' => number,
        'm' => number * 60,
        'h' => number * 3600,
        'd' => number * 86_400,
        _ => return Err(format!("ttl unit must be s, m, h or d, not {unit:?}")),
    };
    if seconds == 0 {
        return Err("ttl must be more than 0".into());
    }
    Ok(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn verifier() -> TokenVerifier {
        verifier_with_max_lifetime(0)
    }

    fn verifier_with_max_lifetime(max_lifetime_seconds: u64) -> TokenVerifier {
        crate::install_crypto_provider();
        TokenVerifier::from_settings(&JwtSettings {
            issuer: Some("iss".into()),
            audience: Some("aud".into()),
            hs256_secret: Some(SECRET.into()),
            leeway_seconds: 5,
            max_lifetime_seconds,
            ..JwtSettings::default()
        })
        .unwrap()
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn signed(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn claims(iat: Option<u64>, exp: u64) -> serde_json::Value {
        let mut claims = serde_json::json!({
            "sub": "u1", "group": "g1", "role": "practitioner", "iss": "iss", "aud": "aud", "exp": exp
        });
        if let Some(iat) = iat {
            claims["iat"] = iat.into();
        }
        claims
    }

    #[test]
    fn the_identity_is_honoured_until_exp_plus_the_leeway() {
        let exp = now() + 60;
        let identity = verifier().verify(&signed(claims(None, exp))).unwrap();
        assert_eq!(identity.expires_at.timestamp(), (exp + 5) as i64);
    }

    #[test]
    fn a_token_living_longer_than_the_maximum_is_refused_with_a_reason() {
        let verifier = verifier_with_max_lifetime(3600);
        let now = now();
        verifier
            .verify(&signed(claims(Some(now), now + 3600)))
            .expect("exactly the maximum is accepted");
        let error = verifier
            .verify(&signed(claims(Some(now), now + 3601)))
            .unwrap_err();
        assert!(error.0.contains("lifetime"), "{}", error.0);
        assert!(error.0.contains("3600"), "{}", error.0);
    }

    #[test]
    fn without_iat_a_token_is_refused_only_while_a_maximum_is_set() {
        let token = signed(claims(None, now() + 60));
        let error = verifier_with_max_lifetime(3600).verify(&token).unwrap_err();
        assert!(error.0.contains("iat"), "{}", error.0);
        verifier()
            .verify(&token)
            .expect("no maximum: iat is optional");
    }

    #[test]
    fn an_iat_in_the_future_cannot_stretch_the_lifetime() {
        let verifier = verifier_with_max_lifetime(3600);
        let far = now() + 10 * 365 * 86_400;
        let error = verifier
            .verify(&signed(claims(Some(far), far + 60)))
            .unwrap_err();
        assert!(error.0.contains("future"), "{}", error.0);
        let within_leeway = now() + 3;
        verifier
            .verify(&signed(claims(Some(within_leeway), within_leeway + 60)))
            .expect("a clock a little ahead is tolerated like on exp");
    }

    #[test]
    fn minted_dev_tokens_carry_iat_and_pass_a_one_day_maximum() {
        let token = mint_hs256(
            SECRET,
            "iss",
            "aud",
            &TokenRequest {
                ttl_seconds: 86_400,
                ..request(Role::Administrator)
            },
        )
        .unwrap();
        verifier_with_max_lifetime(86_400).verify(&token).unwrap();
    }

    fn request(role: Role) -> TokenRequest {
        TokenRequest {
            subject: "u1".into(),
            group_id: "g1".into(),
            role,
            name: Some("Dr A".into()),
            ttl_seconds: 60,
        }
    }

    #[test]
    fn a_minted_token_verifies() {
        let token = mint_hs256(SECRET, "iss", "aud", &request(Role::Practitioner)).unwrap();
        let identity = verifier().verify(&token).unwrap();
        assert_eq!(
            (identity.subject.as_str(), identity.group_id.as_str()),
            ("u1", "g1")
        );
        assert_eq!(identity.role, Role::Practitioner);
    }

    #[test]
    fn wrong_issuer_audience_or_key_is_refused() {
        let verifier = verifier();
        assert!(
            verifier
                .verify(&mint_hs256(SECRET, "other", "aud", &request(Role::Practitioner)).unwrap())
                .is_err()
        );
        assert!(
            verifier
                .verify(&mint_hs256(SECRET, "iss", "other", &request(Role::Practitioner)).unwrap())
                .is_err()
        );
        let other_secret = "ffffffffffffffffffffffffffffffff";
        assert!(
            verifier
                .verify(
                    &mint_hs256(other_secret, "iss", "aud", &request(Role::Practitioner)).unwrap()
                )
                .is_err()
        );
    }

    #[test]
    fn an_unsigned_token_is_refused() {
        use base64::Engine;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = engine.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = engine.encode(br#"{"sub":"u1","group":"g1","role":"practitioner","iss":"iss","aud":"aud","exp":9999999999}"#);
        assert!(verifier().verify(&format!("{header}.{body}.")).is_err());
    }

    #[test]
    fn ttls_parse() {
        assert_eq!(parse_ttl("90").unwrap(), 90);
        assert_eq!(parse_ttl("30m").unwrap(), 1800);
        assert_eq!(parse_ttl("7d").unwrap(), 604_800);
        assert!(parse_ttl("3w").is_err());
        assert!(parse_ttl("0").is_err());
    }
}
