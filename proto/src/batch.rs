//! Batching of stream items into one gRPC message, bounded by count and by encoded bytes, so
//! that a batch always fits the message limit both ends set.

use tokio::sync::mpsc;

/// Items per batch at most.
pub const MAX_ITEMS: usize = 1024;
/// Encoded bytes per batch at most, plus the one item that crosses the bound: with items
/// of up to 8 MiB (the largest client frame), a batch stays under [`MAX_MESSAGE_BYTES`].
pub const MAX_BYTES: usize = 4 << 20;
/// The gRPC message limit both ends set, sending and receiving.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// The largest payload one item may carry (a client frame, a topic log in a `Take` reply)
/// so that it fits a message with room for its fields.
pub const MAX_ITEM_BYTES: usize = 8 << 20;

/// Waits for one item, then takes what is ready without waiting, until `max_items` items or
/// `max_bytes` encoded bytes (the item that crosses it included). Appends to `items`;
/// returns how many it took, 0 once the channel is closed and empty. Cancel-safe: it only
/// waits for the first item.
pub async fn recv<T: prost::Message>(
    rx: &mut mpsc::Receiver<T>,
    items: &mut Vec<T>,
    max_items: usize,
    max_bytes: usize,
) -> usize {
    let Some(first) = rx.recv().await else {
        return 0;
    };
    let mut bytes = first.encoded_len();
    items.push(first);
    let mut taken = 1;
    while taken < max_items && bytes < max_bytes {
        let Ok(item) = rx.try_recv() else { break };
        bytes += item.encoded_len();
        items.push(item);
        taken += 1;
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Delivery, Down};

    fn delivery(payload: usize) -> Down {
        Down::delivery(Delivery {
            topic: "t".into(),
            event: "e".into(),
            payload: vec![b'x'; payload].into(),
            epoch: 1,
            offset: 1,
            accepted_unix_micros: 0,
        })
    }

    #[tokio::test]
    async fn a_batch_ends_at_the_byte_bound_or_the_item_bound() {
        let (tx, mut rx) = mpsc::channel(64);
        for _ in 0..10 {
            tx.try_send(delivery(1000)).unwrap();
        }
        let mut items = Vec::new();
        // The third item crosses 2,500 bytes: it is the last of the batch.
        assert_eq!(recv(&mut rx, &mut items, 100, 2500).await, 3);
        items.clear();
        assert_eq!(recv(&mut rx, &mut items, 4, usize::MAX).await, 4);
        items.clear();
        // One item larger than the bound goes alone.
        tx.try_send(delivery(10_000)).unwrap();
        assert_eq!(recv(&mut rx, &mut items, 100, 2500).await, 3);
        assert_eq!(recv(&mut rx, &mut items, 100, 2500).await, 1);
        drop(tx);
        assert_eq!(recv(&mut rx, &mut items, 100, 2500).await, 0);
        assert_eq!(items.len(), 4);
    }
}
