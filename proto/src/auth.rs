//! The cluster's shared secret: every gRPC call between ringcast processes carries it, and
//! every topic server checks it (in constant time) before it serves anything.

use std::sync::Arc;
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

/// The metadata key the secret travels in.
pub const SECRET_HEADER: &str = "x-ringcast-cluster-secret";
/// Shortest secret accepted.
pub const MIN_SECRET_BYTES: usize = 16;

/// The secret a process sends and expects; `None`: the cluster is open (loopback only,
/// unless told otherwise).
#[derive(Clone, Default)]
pub struct ClusterSecret(Option<Arc<str>>);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "ClusterSecret(set)"
        } else {
            "ClusterSecret(none)"
        })
    }
}

impl ClusterSecret {
    /// `CLUSTER_SECRET`: printable ASCII (it travels as gRPC metadata), at least
    /// [`MIN_SECRET_BYTES`]. The error names the variable.
    pub fn parse(value: Option<&str>) -> Result<ClusterSecret, String> {
        let Some(value) = value else {
            return Ok(ClusterSecret(None));
        };
        if value.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "CLUSTER_SECRET is {} bytes; it must be at least {MIN_SECRET_BYTES}",
                value.len()
            ));
        }
        if !value.bytes().all(|b| (0x21..0x7f).contains(&b)) {
            return Err("CLUSTER_SECRET must be printable ASCII without spaces".into());
        }
        Ok(ClusterSecret(Some(value.into())))
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// Adds the secret to an outgoing call.
    pub fn attach<T>(&self, request: &mut Request<T>) {
        if let Some(secret) = &self.0
            && let Ok(value) = MetadataValue::try_from(&**secret)
        {
            request.metadata_mut().insert(SECRET_HEADER, value);
        }
    }

    /// Checks an incoming call: it must carry the secret, when one is set.
    pub fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(secret) = &self.0 else {
            return Ok(());
        };
        let given = request
            .metadata()
            .get(SECRET_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if same_secret(given, secret.as_bytes()) {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "this call is not from a member of the cluster",
            ))
        }
    }
}

/// Whether `given` is `secret`, in time that depends on neither's content (both are padded to
/// the longer of the two: a caller may learn whether the secret is longer than what it sent,
/// nothing about its bytes).
pub fn same_secret(given: &[u8], secret: &[u8]) -> bool {
    let n = given.len().max(secret.len());
    let padded = |s: &[u8]| {
        let mut v = vec![0u8; n];
        v[..s.len()].copy_from_slice(s);
        v
    };
    let lengths = (given.len() as u64).ct_eq(&(secret.len() as u64));
    bool::from(padded(given).ct_eq(&padded(secret)) & lengths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_passes_with_the_secret_only() {
        let secret = ClusterSecret::parse(Some("s3cret-s3cret-s3cret")).unwrap();
        let mut call = Request::new(());
        assert!(secret.check(&call).is_err(), "no secret");
        ClusterSecret::parse(Some("another-secret-entirely"))
            .unwrap()
            .attach(&mut call);
        assert_eq!(
            secret.check(&call).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let mut call = Request::new(());
        secret.attach(&mut call);
        assert!(secret.check(&call).is_ok());
        assert!(
            ClusterSecret::default().check(&Request::new(())).is_ok(),
            "open"
        );
        assert!(ClusterSecret::parse(Some("short")).is_err());
        assert!(ClusterSecret::parse(Some("has a space in it ....")).is_err());
    }

    #[test]
    fn a_secret_matches_itself_only() {
        let secret = b"0123456789abcdef";
        assert!(same_secret(secret, secret));
        assert!(!same_secret(b"0123456789abcdeX", secret));
        assert!(!same_secret(b"0123456789abcde", secret), "a prefix");
        assert!(
            !same_secret(b"0123456789abcdef\0", secret),
            "padded with what pads"
        );
        assert!(!same_secret(b"", secret));
        assert!(same_secret(b"", b""));
    }
}
