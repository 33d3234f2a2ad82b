//! Who may call the admin routes.
//!
//! `Authorization: Bearer <token>` carries one of:
//! - a static token, configured only as its SHA-256 hash: the presented
//!   token is hashed and compared with every configured hash in constant
//!   time (no early exit, so timing tells nothing about which or how much
//!   matched);
//! - the token in the `ADMIN_TOKEN` environment variable (hashed at start,
//!   compared the same way; the plain value is not kept);
//! - a JWT of the authentication service (one configured algorithm: HS256,
//!   RS256 or ES256), with `exp`, `iss` and `aud` required, `nbf` checked
//!   when present, and an admin claim.
//!
//! Missing, malformed, unknown, expired or badly signed → 401; verified but
//! not an admin → 403. Tokens are never logged: only the principal's id.

use axum::http::HeaderValue;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use super::error::ApiError;
use crate::config::{ApiConfig, JwtAlgorithm, JwtConfig};

/// Longest bearer token looked at (a JWT with many claims fits easily).
const MAX_TOKEN_BYTES: usize = 8192;
/// Shortest token accepted from the environment: a short one is guessable.
pub const MIN_ENV_TOKEN_BYTES: usize = 16;
/// Shortest HS256 secret (RFC 7518 §3.2: at least the hash size).
const MIN_HS256_SECRET_BYTES: usize = 32;

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A static token from `api.tokens`, by its configured name.
    StaticToken { name: String },
    /// The token of the environment variable, by the variable's name.
    EnvToken { variable: String },
    /// A JWT, by its subject.
    Jwt { subject: String },
}

impl Principal {
    /// Stable id for the audit trail and the rate limiter.
    pub fn id(&self) -> String {
        match self {
            Principal::StaticToken { name } => format!("token:{name}"),
            Principal::EnvToken { variable } => format!("env:{variable}"),
            Principal::Jwt { subject } => format!("jwt:{subject}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("{message}")]
    Jwt { field: &'static str, message: String },
    #[error("environment variable {variable}: the admin token must be at least {MIN_ENV_TOKEN_BYTES} bytes")]
    WeakEnvToken { variable: String },
    #[error("api.tokens: {0}")]
    TokenHash(String),
}

impl AuthSetupError {
    /// The config field at fault, below `api.jwt`.
    pub fn field(&self) -> &'static str {
        match self {
            AuthSetupError::Jwt { field, .. } => field,
            _ => "",
        }
    }
}

fn jwt_setup(field: &'static str, message: impl Into<String>) -> AuthSetupError {
    AuthSetupError::Jwt { field, message: message.into() }
}

/// Verifies JWTs with the one configured algorithm and key.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    admin_claim: Vec<String>,
    admin_value: String,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier").field("algorithms", &self.validation.algorithms).finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// None when no algorithm is configured (JWTs disabled).
    pub fn from_config(cfg: &JwtConfig) -> Result<Option<JwtVerifier>, AuthSetupError> {
        let Some(algorithm) = cfg.algorithm else { return Ok(None) };
        if cfg.issuer.trim().is_empty() {
            return Err(jwt_setup("issuer", "is required when api.jwt.algorithm is set"));
        }
        if cfg.audience.trim().is_empty() {
            return Err(jwt_setup("audience", "is required when api.jwt.algorithm is set"));
        }
        if cfg.admin_claim.trim().is_empty() || cfg.admin_claim.split('.').any(str::is_empty) {
            return Err(jwt_setup("admin_claim", "must be a claim name or a dotted path"));
        }
        let (key, alg) = match algorithm {
            JwtAlgorithm::HS256 => {
                if cfg.public_key_pem.is_some() || cfg.public_key_file.is_some() {
                    return Err(jwt_setup("public_key_pem", "is for RS256/ES256; HS256 uses api.jwt.secret"));
                }
                let secret = cfg.secret.as_deref().unwrap_or_default();
                if secret.len() < MIN_HS256_SECRET_BYTES {
                    return Err(jwt_setup(
                        "secret",
                        format!("HS256 needs a secret of at least {MIN_HS256_SECRET_BYTES} bytes"),
                    ));
                }
                (DecodingKey::from_secret(secret.as_bytes()), Algorithm::HS256)
            }
            JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => {
                if cfg.secret.is_some() {
                    return Err(jwt_setup("secret", "is for HS256; RS256/ES256 use a public key"));
                }
                let pem = match (&cfg.public_key_pem, &cfg.public_key_file) {
                    (Some(pem), None) => pem.clone().into_bytes(),
                    (None, Some(path)) => std::fs::read(path)
                        .map_err(|e| jwt_setup("public_key_file", format!("cannot read {}: {e}", path.display())))?,
                    _ => {
                        return Err(jwt_setup(
                            "public_key_pem",
                            "set exactly one of public_key_pem and public_key_file",
                        ));
                    }
                };
                let parsed = if algorithm == JwtAlgorithm::RS256 {
                    DecodingKey::from_rsa_pem(&pem).map(|k| (k, Algorithm::RS256))
                } else {
                    DecodingKey::from_ec_pem(&pem).map(|k| (k, Algorithm::ES256))
                };
                let field = if cfg.public_key_pem.is_some() { "public_key_pem" } else { "public_key_file" };
                parsed.map_err(|e| jwt_setup(field, format!("not a PEM public key for {algorithm:?}: {e}")))?
            }
        };
        let mut validation = Validation::new(alg);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.set_issuer(&[cfg.issuer.as_str()]);
        validation.set_audience(&[cfg.audience.as_str()]);
        validation.validate_nbf = true;
        validation.leeway = cfg.leeway.as_secs();
        Ok(Some(JwtVerifier {
            key,
            validation,
            admin_claim: cfg.admin_claim.split('.').map(str::to_owned).collect(),
            admin_value: cfg.admin_value.clone(),
        }))
    }

    pub fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        let claims =
            jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &self.key, &self.validation)
                .map_err(|e| {
                    let (code, message) = match e.kind() {
                        ErrorKind::ExpiredSignature => ("token_expired", "the token has expired".to_owned()),
                        ErrorKind::ImmatureSignature => {
                            ("token_not_yet_valid", "the token is not valid yet (nbf)".to_owned())
                        }
                        ErrorKind::InvalidSignature => {
                            ("invalid_token", "the token signature does not verify".to_owned())
                        }
                        ErrorKind::InvalidAudience => {
                            ("invalid_token", "the token audience is not accepted".to_owned())
                        }
                        ErrorKind::InvalidIssuer => ("invalid_token", "the token issuer is not accepted".to_owned()),
                        ErrorKind::InvalidAlgorithm => {
                            ("invalid_token", "the token algorithm is not accepted".to_owned())
                        }
                        ErrorKind::MissingRequiredClaim(claim) => {
                            ("invalid_token", format!("the token has no `{claim}` claim"))
                        }
                        ErrorKind::InvalidClaimFormat(claim) => {
                            ("invalid_token", format!("the token's `{claim}` claim is malformed"))
                        }
                        _ => ("malformed_token", "the bearer token is not a well-formed JWT".to_owned()),
                    };
                    metrics::counter!("audit_http_auth_failures_total", "reason" => code).increment(1);
                    ApiError::Unauthorized { code, message }
                })?
                .claims;
        let subject = claims.get("sub").and_then(|v| v.as_str()).unwrap_or("unknown").to_owned();
        if !self.is_admin(&claims) {
            metrics::counter!("audit_http_auth_failures_total", "reason" => "not_admin").increment(1);
            return Err(ApiError::Forbidden {
                code: "not_admin",
                message: format!("the token does not carry the admin claim `{}`", self.admin_claim.join(".")),
            });
        }
        Ok(Principal::Jwt { subject })
    }

    fn is_admin(&self, claims: &serde_json::Map<String, serde_json::Value>) -> bool {
        let mut path = self.admin_claim.iter();
        let Some(first) = path.next() else { return false };
        let mut value = claims.get(first);
        for segment in path {
            value = value.and_then(|v| v.get(segment));
        }
        match value {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(serde_json::Value::String(s)) => *s == self.admin_value,
            Some(serde_json::Value::Array(items)) => {
                items.iter().any(|v| v.as_str() == Some(self.admin_value.as_str()))
            }
            _ => false,
        }
    }
}

/// Every accepted credential, ready to check requests against.
#[derive(Debug)]
pub struct Authenticator {
    /// (hash, principal) of the static tokens and the environment token.
    hashed: Vec<([u8; 32], Principal)>,
    jwt: Option<JwtVerifier>,
}

impl Authenticator {
    /// `env` looks up environment variables (the process environment in
    /// production; a map in tests).
    pub fn new(cfg: &ApiConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Authenticator, AuthSetupError> {
        let mut hashed = Vec::new();
        for token in &cfg.tokens {
            let hash = decode_hex32(&token.sha256)
                .ok_or_else(|| AuthSetupError::TokenHash(format!("{}: sha256 must be 64 hex digits", token.name)))?;
            hashed.push((hash, Principal::StaticToken { name: token.name.clone() }));
        }
        if !cfg.admin_token_env.is_empty()
            && let Some(value) = env(&cfg.admin_token_env).filter(|v| !v.is_empty())
        {
            if value.len() < MIN_ENV_TOKEN_BYTES {
                return Err(AuthSetupError::WeakEnvToken { variable: cfg.admin_token_env.clone() });
            }
            hashed.push((sha256(value.as_bytes()), Principal::EnvToken { variable: cfg.admin_token_env.clone() }));
        }
        let jwt = JwtVerifier::from_config(&cfg.jwt)?;
        Ok(Authenticator { hashed, jwt })
    }

    /// True when no credential at all is configured: every admin request
    /// will be refused (logged once at start).
    pub fn is_empty(&self) -> bool {
        self.hashed.is_empty() && self.jwt.is_none()
    }

    /// The principal of an `Authorization` header, or the 401/403 to send.
    pub fn authenticate(&self, header: Option<&HeaderValue>) -> Result<Principal, ApiError> {
        let token = bearer_token(header).inspect_err(|e| {
            metrics::counter!("audit_http_auth_failures_total", "reason" => e.code()).increment(1);
        })?;
        let digest = sha256(token.as_bytes());
        // Compare with every hash, always: the index of the match (if any)
        // is selected without branching on secret data.
        let mut matched = u64::MAX;
        for (i, (hash, _)) in self.hashed.iter().enumerate() {
            matched.conditional_assign(&(i as u64), hash.ct_eq(&digest));
        }
        if let Some((_, principal)) = usize::try_from(matched).ok().and_then(|i| self.hashed.get(i)) {
            return Ok(principal.clone());
        }
        match &self.jwt {
            Some(verifier) if token.split('.').count() == 3 => verifier.verify(token),
            _ => {
                metrics::counter!("audit_http_auth_failures_total", "reason" => "invalid_token").increment(1);
                Err(ApiError::Unauthorized {
                    code: "invalid_token",
                    message: "the bearer token is not accepted".into(),
                })
            }
        }
    }
}

/// The token of `Authorization: Bearer <token>` (RFC 6750 syntax).
fn bearer_token(header: Option<&HeaderValue>) -> Result<&str, ApiError> {
    let Some(header) = header else {
        return Err(ApiError::Unauthorized {
            code: "missing_token",
            message: "this route needs Authorization: Bearer <token>".into(),
        });
    };
    let malformed = || ApiError::Unauthorized {
        code: "malformed_token",
        message: "the Authorization header must be `Bearer <token>`".into(),
    };
    let value = header.to_str().map_err(|_| malformed())?;
    let (scheme, token) = value.split_once(' ').ok_or_else(malformed)?;
    let token = token.trim_start_matches(' ');
    let b64token = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~' | '+' | '/');
    let body = token.trim_end_matches('=');
    if !scheme.eq_ignore_ascii_case("bearer")
        || body.is_empty()
        || token.len() > MAX_TOKEN_BYTES
        || !body.chars().all(b64token)
    {
        return Err(malformed());
    }
    Ok(token)
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn decode_hex32(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let nibble = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StaticTokenConfig;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn authenticator() -> Authenticator {
        let cfg = ApiConfig {
            tokens: vec![
                StaticTokenConfig { name: "ops".into(), sha256: hex(&sha256(b"ops-token-0123456789")) },
                StaticTokenConfig { name: "ci".into(), sha256: hex(&sha256(b"ci-token-0123456789")).to_uppercase() },
            ],
            ..ApiConfig::default()
        };
        let env = |name: &str| (name == "ADMIN_TOKEN").then(|| "env-token-0123456789".to_owned());
        Authenticator::new(&cfg, &env).unwrap()
    }

    fn header(v: &str) -> HeaderValue {
        HeaderValue::from_str(v).unwrap()
    }

    #[test]
    fn static_and_env_tokens() {
        let auth = authenticator();
        let principal = |v: &str| auth.authenticate(Some(&header(v))).map(|p| p.id());
        assert_eq!(principal("Bearer ops-token-0123456789").unwrap(), "token:ops");
        assert_eq!(principal("bearer ci-token-0123456789").unwrap(), "token:ci");
        assert_eq!(principal("Bearer env-token-0123456789").unwrap(), "env:ADMIN_TOKEN");
        assert_eq!(principal("Bearer ops-token-012345678").unwrap_err().code(), "invalid_token");
        assert_eq!(auth.authenticate(None).unwrap_err().code(), "missing_token");
        for bad in ["Basic b3BzOnRva2Vu", "Bearer", "Bearer ", "Bearer a b", "Bearer tok\"en", "ops-token-0123456789"] {
            assert_eq!(principal(bad).unwrap_err().code(), "malformed_token", "{bad}");
        }
    }

    #[test]
    fn weak_env_token_is_refused() {
        let env = |_: &str| Some("short".to_owned());
        let err = Authenticator::new(&ApiConfig::default(), &env).unwrap_err();
        assert!(err.to_string().contains("ADMIN_TOKEN"), "{err}");
    }

    #[test]
    fn hex_decoding() {
        assert_eq!(decode_hex32(&"ab".repeat(32)), Some([0xab; 32]));
        assert_eq!(decode_hex32(&"zz".repeat(32)), None);
        assert_eq!(decode_hex32("abcd"), None);
    }
}
