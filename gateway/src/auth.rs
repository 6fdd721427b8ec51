//! Who a client is and what it may do: JSON Web Tokens signed by the user's backend.
//!
//! A connection token (query `token=`, or phoenix.js 1.8's `authToken` subprotocol) names the
//! user (`sub`) and the topics it may `subscribe` to and `publish` to, as patterns. A join may
//! bring a token of its own for one topic (`phx_join` params `{"token": ...}`). Keys come from
//! the configuration: HS256 secrets and RS256/ES256 public keys, each with an optional `kid`
//! so keys can be rotated. Everything here is plain data and functions; the keys are read
//! once, at start.

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The subprotocol prefix phoenix.js 1.8 puts the token in (`authToken`).
pub const BEARER_PROTOCOL: &str = "base64url.bearer.phx.";

/// A key tokens may be signed with.
#[derive(Clone)]
pub struct Key {
    /// The `kid` a token names it by (`None`: tokens without a `kid` try it).
    pub kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// An HS256 secret.
    pub fn hs256(kid: Option<String>, secret: &[u8]) -> Key {
        Key {
            kid,
            algorithms: vec![Algorithm::HS256],
            key: DecodingKey::from_secret(secret),
        }
    }

    /// An RS256 or ES256 public key in PEM.
    pub fn public_pem(kid: Option<String>, pem: &[u8]) -> Result<Key, String> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Key {
                kid,
                algorithms: vec![Algorithm::RS256],
                key,
            });
        }
        match DecodingKey::from_ec_pem(pem) {
            Ok(key) => Ok(Key {
                kid,
                algorithms: vec![Algorithm::ES256],
                key,
            }),
            Err(e) => Err(format!("not an RSA or EC public key in PEM: {e}")),
        }
    }
}

/// How clients prove who they are.
#[derive(Debug, Clone)]
pub enum Auth {
    /// Anyone may connect, join and publish (subject to `GATEWAY_TOPICS`).
    Open,
    /// A valid connection token is needed, and its claims say what it may do.
    Jwt { keys: Vec<Key>, leeway: Duration },
}

/// Why a token was refused (said in the HTTP 403, the join reply or the close reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("unknown key id")]
    UnknownKey,
    #[error("bad token signature")]
    BadSignature,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token for another user")]
    OtherUser,
    #[error("token for another topic")]
    OtherTopic,
}

/// Topic patterns: exact names, `prefix*`, and `{sub}` (the token's own user) anywhere.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patterns(Vec<String>);

impl Patterns {
    /// Whether `topic` matches one of the patterns, `{sub}` read as `sub`.
    pub fn allows(&self, topic: &str, sub: &str) -> bool {
        self.0.iter().any(|p| match p.contains("{sub}") {
            true => topic_matches(&p.replace("{sub}", sub), topic),
            false => topic_matches(p, topic),
        })
    }
}

/// Whether `topic` is `pattern`, or starts with it when it ends with `*`.
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => topic == pattern,
    }
}

/// Who a connection is, and what its connection token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user (`None` when authentication is off).
    pub sub: Option<String>,
    pub subscribe: Patterns,
    pub publish: Patterns,
    /// When the connection token expires (seconds since the epoch); the socket is closed then.
    pub exp: Option<u64>,
}

impl Identity {
    /// Anyone, allowed everything (authentication off).
    pub fn open() -> Identity {
        Identity {
            sub: None,
            subscribe: Patterns(vec!["*".into()]),
            publish: Patterns(vec!["*".into()]),
            exp: None,
        }
    }

    pub fn may_subscribe(&self, topic: &str) -> bool {
        self.subscribe
            .allows(topic, self.sub.as_deref().unwrap_or_default())
    }

    pub fn may_publish(&self, topic: &str) -> bool {
        self.publish
            .allows(topic, self.sub.as_deref().unwrap_or_default())
    }

    /// How long until the token expires (`None`: never), from `now`.
    pub fn expires_in(&self, now: SystemTime) -> Option<Duration> {
        let exp = UNIX_EPOCH + Duration::from_secs(self.exp?);
        Some(exp.duration_since(now).unwrap_or_default())
    }
}

/// What a join token allows: joining `topic`, and publishing to it if `publish`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinGrant {
    pub publish: bool,
}

#[derive(Debug, Deserialize)]
struct ConnectionClaims {
    sub: String,
    exp: u64,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct JoinClaims {
    sub: String,
    topic: String,
    #[serde(default)]
    publish: bool,
    #[allow(dead_code)] // checked by the validation
    exp: u64,
}

impl Auth {
    pub fn is_open(&self) -> bool {
        matches!(self, Auth::Open)
    }

    /// Checks a connection's token (none needed when open).
    pub fn connect(&self, token: Option<&str>) -> Result<Identity, TokenError> {
        let Auth::Jwt { .. } = self else {
            return Ok(Identity::open());
        };
        let token = token.ok_or(TokenError::Missing)?;
        let claims: ConnectionClaims = self.verify(token, &["sub", "exp"])?;
        Ok(Identity {
            sub: Some(claims.sub),
            subscribe: Patterns(claims.subscribe),
            publish: Patterns(claims.publish),
            exp: Some(claims.exp),
        })
    }

    /// Checks a join token for `topic`, presented by `identity`.
    pub fn join(
        &self,
        identity: &Identity,
        topic: &str,
        token: &str,
    ) -> Result<JoinGrant, TokenError> {
        let claims: JoinClaims = self.verify(token, &["sub", "exp"])?;
        if identity.sub.as_deref() != Some(claims.sub.as_str()) {
            return Err(TokenError::OtherUser);
        }
        if claims.topic != topic {
            return Err(TokenError::OtherTopic);
        }
        Ok(JoinGrant {
            publish: claims.publish,
        })
    }

    fn verify<T: serde::de::DeserializeOwned>(
        &self,
        token: &str,
        required: &[&str],
    ) -> Result<T, TokenError> {
        let Auth::Jwt { keys, leeway } = self else {
            return Err(TokenError::UnknownKey);
        };
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        let candidates: Vec<&Key> = match &header.kid {
            Some(kid) => keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .collect(),
            None => keys.iter().collect(),
        };
        if candidates.is_empty() {
            return Err(TokenError::UnknownKey);
        }
        let mut last = TokenError::BadSignature;
        for key in candidates {
            if !key.algorithms.contains(&header.alg) {
                continue;
            }
            let mut validation = Validation::new(header.alg);
            validation.leeway = leeway.as_secs();
            validation.set_required_spec_claims(required);
            validation.validate_aud = false;
            match jsonwebtoken::decode::<T>(token, &key.key, &validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) => {
                    last = match e.kind() {
                        jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                            return Err(TokenError::Expired);
                        }
                        jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                            TokenError::BadSignature
                        }
                        _ => TokenError::Malformed(e.to_string()),
                    };
                }
            }
        }
        Err(last)
    }
}

/// The token a websocket request carries: the `token` query parameter, or phoenix.js's
/// `authToken` subprotocol (`base64url.bearer.phx.<base64 of the token>`, padding stripped;
/// either base64 alphabet).
pub fn token_of<'a>(query_token: Option<&'a str>, protocols: &'a str) -> Option<String> {
    if let Some(token) = query_token.filter(|t| !t.is_empty()) {
        return Some(token.to_owned());
    }
    let encoded = protocols
        .split(',')
        .map(str::trim)
        .find_map(|p| p.strip_prefix(BEARER_PROTOCOL))?;
    let encoded = encoded.trim_end_matches('=');
    let engines = [
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
        base64::engine::general_purpose::STANDARD_NO_PAD,
    ];
    engines
        .iter()
        .find_map(|e| e.decode(encoded).ok())
        .and_then(|bytes| String::from_utf8(bytes).ok())
}

/// Whether a browser's `Origin` may open a websocket: no `Origin` (not a browser) always,
/// otherwise one of `allowed` (exact origins, or `*.example.com` for any subdomain, any
/// scheme); an empty list allows every origin.
pub fn origin_allowed(origin: Option<&str>, allowed: &[String]) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    if allowed.is_empty() {
        return true;
    }
    let host = origin.split_once("://").map_or(origin, |(_, h)| h);
    let host = host.split(':').next().unwrap_or(host);
    allowed.iter().any(|a| match a.strip_prefix("*.") {
        Some(domain) => host.ends_with(&format!(".{domain}")),
        None => a == origin,
    })
}

/// Reads `GATEWAY_JWT_SECRETS` (`kid:secret,...`, or a secret without a kid) and
/// `GATEWAY_JWT_PUBLIC_KEYS` (`kid:/path/key.pem,...`) into keys; errors name the variable.
pub fn keys_from(secrets: Option<&str>, public_keys: Option<&str>) -> Result<Vec<Key>, String> {
    let mut keys = Vec::new();
    for entry in list(secrets) {
        let (kid, secret) = split_kid(entry);
        if secret.len() < 32 {
            return Err(format!(
                "GATEWAY_JWT_SECRETS: the secret{} is {} bytes; HS256 secrets must be at least 32",
                kid.map(|k| format!(" of key `{k}`")).unwrap_or_default(),
                secret.len()
            ));
        }
        keys.push(Key::hs256(kid.map(str::to_owned), secret.as_bytes()));
    }
    for entry in list(public_keys) {
        let (kid, path) = split_kid(entry);
        let pem = std::fs::read(path)
            .map_err(|e| format!("GATEWAY_JWT_PUBLIC_KEYS: {path}: cannot read: {e}"))?;
        let key = Key::public_pem(kid.map(str::to_owned), &pem)
            .map_err(|e| format!("GATEWAY_JWT_PUBLIC_KEYS: {path}: {e}"))?;
        keys.push(key);
    }
    Ok(keys)
}

/// The entries of a comma-separated setting, trimmed, empty ones skipped.
pub(crate) fn list(value: Option<&str>) -> impl Iterator<Item = &str> {
    value
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
}

/// `kid:value` (a kid of letters, digits, `_`, `-`, `.`), or a bare value.
fn split_kid(entry: &str) -> (Option<&str>, &str) {
    match entry.split_once(':') {
        Some((kid, value))
            if !kid.is_empty()
                && kid.len() <= 64
                && kid
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) =>
        {
            (Some(kid), value)
        }
        _ => (None, entry),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn auth() -> Auth {
        Auth::Jwt {
            keys: vec![
                Key::hs256(Some("k1".into()), b"secret one"),
                Key::hs256(Some("k2".into()), b"secret two"),
            ],
            leeway: Duration::from_secs(5),
        }
    }

    fn sign(kid: Option<&str>, secret: &[u8], claims: serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.map(str::to_owned);
        encode(&header, &claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    #[test]
    fn a_connection_token_names_the_user_and_its_topics() {
        let token = sign(
            Some("k2"),
            b"secret two",
            json!({"sub": "42", "exp": now() + 60, "subscribe": ["room:*", "user:{sub}"], "publish": ["room:lobby"]}),
        );
        let id = auth().connect(Some(&token)).unwrap();
        assert_eq!(id.sub.as_deref(), Some("42"));
        assert!(id.may_subscribe("room:1") && id.may_subscribe("user:42"));
        assert!(!id.may_subscribe("user:43"), "another user's topic");
        assert!(id.may_publish("room:lobby") && !id.may_publish("room:1"));
        assert!(id.expires_in(SystemTime::now()).unwrap() <= Duration::from_secs(60));
    }

    #[test]
    fn bad_tokens_are_refused_with_their_reason() {
        let claims = json!({"sub": "42", "exp": now() + 60});
        let auth = auth();
        assert_eq!(auth.connect(None), Err(TokenError::Missing));
        let wrong = sign(Some("k1"), b"not the secret", claims.clone());
        assert_eq!(auth.connect(Some(&wrong)), Err(TokenError::BadSignature));
        let unknown = sign(Some("k9"), b"secret one", claims.clone());
        assert_eq!(auth.connect(Some(&unknown)), Err(TokenError::UnknownKey));
        let expired = sign(
            Some("k1"),
            b"secret one",
            json!({"sub": "42", "exp": now() - 60}),
        );
        assert_eq!(auth.connect(Some(&expired)), Err(TokenError::Expired));
        let within_leeway = sign(
            Some("k1"),
            b"secret one",
            json!({"sub": "42", "exp": now() - 2}),
        );
        assert!(auth.connect(Some(&within_leeway)).is_ok());
        let no_sub = sign(Some("k1"), b"secret one", json!({"exp": now() + 60}));
        assert!(matches!(
            auth.connect(Some(&no_sub)),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            auth.connect(Some("not.a.jwt")),
            Err(TokenError::Malformed(_))
        ));
        // Without a kid, every key is tried: rotation keeps old tokens valid.
        let no_kid = sign(None, b"secret two", claims);
        assert!(auth.connect(Some(&no_kid)).is_ok());
    }

    #[test]
    fn a_join_token_is_for_one_user_and_one_topic() {
        let auth = auth();
        let id = auth
            .connect(Some(&sign(
                Some("k1"),
                b"secret one",
                json!({"sub": "42", "exp": now() + 60}),
            )))
            .unwrap();
        let join = |claims| sign(Some("k1"), b"secret one", claims);
        let ok = join(json!({"sub": "42", "topic": "vip:1", "publish": true, "exp": now() + 60}));
        assert_eq!(
            auth.join(&id, "vip:1", &ok),
            Ok(JoinGrant { publish: true })
        );
        assert_eq!(auth.join(&id, "vip:2", &ok), Err(TokenError::OtherTopic));
        let other = join(json!({"sub": "7", "topic": "vip:1", "exp": now() + 60}));
        assert_eq!(auth.join(&id, "vip:1", &other), Err(TokenError::OtherUser));
        let read_only = join(json!({"sub": "42", "topic": "vip:1", "exp": now() + 60}));
        assert_eq!(
            auth.join(&id, "vip:1", &read_only),
            Ok(JoinGrant { publish: false })
        );
    }

    #[test]
    fn tokens_come_from_the_query_or_the_phoenix_subprotocol() {
        assert_eq!(token_of(Some("abc"), ""), Some("abc".into()));
        // "a.b-c_d?" in both base64 alphabets, padding stripped or not.
        let token = "eyJ.x-y_z+/=";
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token);
        let std = base64::engine::general_purpose::STANDARD.encode(token);
        for encoded in [url, std] {
            let protocols = format!("phoenix, {BEARER_PROTOCOL}{encoded}");
            assert_eq!(token_of(None, &protocols).as_deref(), Some(token));
        }
        assert_eq!(token_of(None, "phoenix"), None);
        assert_eq!(token_of(Some(""), "phoenix"), None);
    }

    #[test]
    fn origins_match_exactly_or_by_subdomain() {
        let allowed = vec![
            "https://app.example.com".to_owned(),
            "*.example.org".to_owned(),
        ];
        assert!(origin_allowed(None, &allowed), "not a browser");
        assert!(origin_allowed(Some("https://app.example.com"), &allowed));
        assert!(origin_allowed(Some("https://a.b.example.org"), &allowed));
        assert!(origin_allowed(Some("https://a.example.org:8443"), &allowed));
        assert!(!origin_allowed(
            Some("https://example.org.evil.test"),
            &allowed
        ));
        assert!(!origin_allowed(Some("https://evil.example"), &allowed));
        assert!(!origin_allowed(Some("http://app.example.com"), &allowed));
        assert!(
            origin_allowed(Some("https://evil.example"), &[]),
            "no list: any"
        );
    }
}
