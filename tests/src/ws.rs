//! A plain websocket client speaking Phoenix frames, for tests that check bytes.

use crate::EVENT_TIMEOUT;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_ref: u64,
}

/// How a connection ended, as seen by the client.
#[derive(Debug, PartialEq)]
pub enum Ended {
    Closed(Option<(u16, String)>),
    Dropped,
}

impl WsClient {
    pub async fn connect(url: &str) -> WsClient {
        let (ws, _) = tokio::time::timeout(EVENT_TIMEOUT, connect_async(url))
            .await
            .unwrap_or_else(|_| panic!("connect {url}: timed out"))
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        WsClient { ws, next_ref: 100 }
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        let text: String = text.into();
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("send frame");
    }

    /// Sends one websocket text frame holding `data` as it is (valid UTF-8 or not), with
    /// the first reserved bit set if `rsv1` (no extension was agreed, so a protocol error).
    pub async fn send_raw_text(&mut self, data: &'static [u8], rsv1: bool) {
        use tokio_tungstenite::tungstenite::protocol::frame::Frame;
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
        let mut frame = Frame::message(data, OpCode::Data(Data::Text), true);
        frame.header_mut().rsv1 = rsv1;
        self.ws
            .send(Message::Frame(frame))
            .await
            .expect("send raw frame");
    }

    /// Sends a websocket ping (the server answers with a pong of the same data).
    pub async fn send_ping(&mut self, data: &'static [u8]) {
        self.ws
            .send(Message::Ping(data.into()))
            .await
            .expect("send ping");
    }

    /// The next websocket message of any kind, failing the test after the event timeout.
    pub async fn recv_message(&mut self) -> Message {
        tokio::time::timeout(EVENT_TIMEOUT, self.ws.next())
            .await
            .expect("timed out waiting for a message")
            .expect("connection ended while waiting for a message")
            .expect("read message")
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send_text(value.to_string()).await;
    }

    /// The next text frame, failing the test after the event timeout.
    pub async fn recv_text(&mut self) -> String {
        loop {
            let message = tokio::time::timeout(EVENT_TIMEOUT, self.ws.next())
                .await
                .expect("timed out waiting for a frame")
                .expect("connection ended while waiting for a frame")
                .expect("read frame");
            match message {
                Message::Text(text) => return text.as_str().to_owned(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    pub async fn recv_json(&mut self) -> Value {
        let text = self.recv_text().await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("frame is not JSON ({e}): {text}"))
    }

    /// Reads until the connection ends; returns the close frame if one came.
    pub async fn recv_end(&mut self) -> Ended {
        loop {
            match tokio::time::timeout(EVENT_TIMEOUT, self.ws.next())
                .await
                .expect("timed out waiting for the end")
            {
                Some(Ok(Message::Close(frame))) => {
                    return Ended::Closed(frame.map(|CloseFrame { code, reason }| {
                        (u16::from(code), reason.as_str().to_owned())
                    }));
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Ended::Dropped,
            }
        }
    }

    fn fresh_ref(&mut self) -> String {
        self.next_ref += 1;
        self.next_ref.to_string()
    }

    /// Joins `topic` with `join_ref`, skipping whatever arrives before the reply (deliveries
    /// of other topics); returns the ok reply's response.
    pub async fn join_skipping(&mut self, topic: &str, join_ref: &str) -> Value {
        self.send_json(json!([join_ref, join_ref, topic, "phx_join", {}]))
            .await;
        self.reply_to(join_ref, "ok").await.1[4]["response"].clone()
    }

    /// Joins `topic` with `join_ref` and returns the reply's payload (`{status, response}`).
    pub async fn join(&mut self, topic: &str, join_ref: &str, params: Value) -> Value {
        self.send_json(json!([join_ref, join_ref, topic, "phx_join", params]))
            .await;
        let reply = self.recv_json().await;
        assert_eq!(reply[1], join_ref, "expected the join reply, got {reply}");
        assert_eq!(
            reply[3], "phx_reply",
            "expected the join reply, got {reply}"
        );
        reply[4].clone()
    }

    /// Joins and asserts the owner accepted it.
    pub async fn join_ok(&mut self, topic: &str, join_ref: &str) -> Value {
        let reply = self.join(topic, join_ref, json!({})).await;
        assert_eq!(reply["status"], "ok", "join {topic}: {reply}");
        reply["response"].clone()
    }

    /// Sends `publish` with `[event, payload]`; returns its ref.
    pub async fn send_publish(
        &mut self,
        join_ref: &str,
        topic: &str,
        event: &str,
        payload: Value,
    ) -> String {
        let msg_ref = self.fresh_ref();
        self.send_json(json!([
            join_ref,
            msg_ref,
            topic,
            "publish",
            [event, payload]
        ]))
        .await;
        msg_ref
    }

    /// Publishes `[event, payload]` and waits for the ok reply (frames before it are
    /// returned, in order).
    pub async fn publish(
        &mut self,
        join_ref: &str,
        topic: &str,
        event: &str,
        payload: Value,
    ) -> Vec<Value> {
        let msg_ref = self.send_publish(join_ref, topic, event, payload).await;
        self.until_reply(&msg_ref, "ok").await
    }

    /// Publishes `[event, payload]` and returns the ok reply's response (the message's
    /// epoch and offset), skipping any frame before it.
    pub async fn publish_reply(
        &mut self,
        join_ref: &str,
        topic: &str,
        event: &str,
        payload: Value,
    ) -> Value {
        let msg_ref = self.send_publish(join_ref, topic, event, payload).await;
        self.reply_to(&msg_ref, "ok").await.1[4]["response"].clone()
    }

    /// Reads frames until the reply to `msg_ref`, asserting its status; returns the frames
    /// read before it.
    pub async fn until_reply(&mut self, msg_ref: &str, status: &str) -> Vec<Value> {
        self.reply_to(msg_ref, status).await.0
    }

    /// The frames before the reply to `msg_ref`, and the reply (its status asserted).
    pub async fn reply_to(&mut self, msg_ref: &str, status: &str) -> (Vec<Value>, Value) {
        let mut before = Vec::new();
        loop {
            let frame = self.recv_json().await;
            if frame[1] == msg_ref && frame[3] == "phx_reply" {
                assert_eq!(frame[4]["status"], status, "reply to {msg_ref}: {frame}");
                return (before, frame);
            }
            before.push(frame);
        }
    }

    /// A barrier: sends a heartbeat and returns every frame that arrived before its reply.
    pub async fn sync(&mut self) -> Vec<Value> {
        let msg_ref = self.fresh_ref();
        self.send_json(json!([null, msg_ref, "phoenix", "heartbeat", {}]))
            .await;
        self.until_reply(&msg_ref, "ok").await
    }

    /// After a heartbeat: true if the connection is gone (closed or reset), false if the
    /// heartbeat was answered.
    pub async fn sync_or_closed(&mut self) -> bool {
        let heartbeat = Message::Text(r#"[null,"hb","phoenix","heartbeat",{}]"#.into());
        if self.ws.send(heartbeat).await.is_err() {
            return true;
        }
        loop {
            match tokio::time::timeout(EVENT_TIMEOUT, self.ws.next())
                .await
                .expect("timed out")
            {
                Some(Ok(Message::Text(t))) if t.as_str().contains(r#""hb""#) => return false,
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return true,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Reads `n` frames.
    pub async fn recv_n(&mut self, n: usize) -> Vec<Value> {
        let mut frames = Vec::with_capacity(n);
        for _ in 0..n {
            frames.push(self.recv_json().await);
        }
        frames
    }
}
