//! gRPC clients to other topic servers, for handing topics over (`Take`).

use parking_lot::Mutex;
use ringcast_proto::auth::ClusterSecret;
use ringcast_proto::{TakeReply, TakeRequest, TopicServerClient, batch};
use std::collections::HashMap;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Peer channels kept at most.
const MAX_PEERS: usize = 64;

/// How long one `Take` may take, connection included.
const TAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a `Take` got no answer.
#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    #[error("bad address {0}: {1}")]
    Address(String, tonic::transport::Error),
    #[error("take at {0}: {1}")]
    Refused(String, tonic::Status),
    #[error("take at {0}: no answer within {1:?}")]
    Timeout(String, Duration),
}

/// One lazily connected channel per peer address.
#[derive(Debug)]
pub struct Peers {
    channels: Mutex<HashMap<String, Channel>>,
    /// Sent on every call: peers check it.
    secret: ClusterSecret,
}

impl Peers {
    pub fn new(secret: ClusterSecret) -> Peers {
        Peers {
            channels: Mutex::default(),
            secret,
        }
    }

    fn channel(&self, addr: &str) -> Result<Channel, TakeError> {
        let mut channels = self.channels.lock();
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        if channels.len() >= MAX_PEERS {
            // Peers' addresses come and go with ring edits: one that is not asked any more
            // makes room (channels connect lazily, so one asked again is made again).
            if let Some(old) = channels.keys().next().cloned() {
                channels.remove(&old);
            }
        }
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| TakeError::Address(addr.to_owned(), e))?
            .connect_timeout(TAKE_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Asks the topic server at `addr` to hand a topic over.
    pub async fn take(&self, addr: &str, request: TakeRequest) -> Result<TakeReply, TakeError> {
        // A reply carries the topic's whole log: the same limit as the server's own.
        let mut client = TopicServerClient::new(self.channel(addr)?)
            .max_decoding_message_size(batch::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(batch::MAX_MESSAGE_BYTES);
        let mut request = tonic::Request::new(request);
        self.secret.attach(&mut request);
        match tokio::time::timeout(TAKE_TIMEOUT, client.take(request)).await {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) => Err(TakeError::Refused(addr.to_owned(), status)),
            Err(_) => Err(TakeError::Timeout(addr.to_owned(), TAKE_TIMEOUT)),
        }
    }
}
