//! Connection tokens for tests, signed as a backend would (HS256).

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::Value;
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (a token's `exp` is on this scale).
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `claims` signed with HS256 under `key`, with `kid` in the header if given.
pub fn sign(kid: Option<&str>, key: &[u8], claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(key)).unwrap()
}
