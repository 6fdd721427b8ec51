//! gRPC clients to other topic servers, for handing topics over (`Take`).

use parking_lot::Mutex;
use ringcast_proto::{TakeReply, TakeRequest, TopicServerClient, batch};
use std::collections::HashMap;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// How long one `Take` may take, connection included.
const TAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// One lazily connected channel per peer address.
#[derive(Debug, Default)]
pub struct Peers {
    channels: Mutex<HashMap<String, Channel>>,
}

impl Peers {
    fn channel(&self, addr: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock();
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("bad address {addr}: {e}"))?
            .connect_timeout(TAKE_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Asks the topic server at `addr` to hand a topic over.
    pub async fn take(&self, addr: &str, request: TakeRequest) -> Result<TakeReply, String> {
        // A reply carries the topic's whole log: the same limit as the server's own.
        let mut client = TopicServerClient::new(self.channel(addr)?)
            .max_decoding_message_size(batch::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(batch::MAX_MESSAGE_BYTES);
        match tokio::time::timeout(TAKE_TIMEOUT, client.take(request)).await {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) => Err(format!("take at {addr}: {status}")),
            Err(_) => Err(format!("take at {addr}: no answer within {TAKE_TIMEOUT:?}")),
        }
    }
}
