//! The websocket layer under a connection: the opening handshake, and the write side.
//!
//! A server's frames are not masked (RFC 6455, 5.1), so a delivery's whole frame, header
//! included, is the same bytes for every subscriber of a group. The gateway frames each
//! message once ([`text_frame`]) and a connection writes those shared bytes straight to its
//! socket with `writev` ([`Outbox`]): no per-subscriber copy into a websocket buffer and no
//! reference count touched per message. tungstenite still reads the client's frames and
//! writes the control frames it owns (pongs, the close frame); the connection calls it only
//! between whole frames of its own.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::AsyncWrite;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// FIN set, opcode 1 (text).
const FIN_TEXT: u8 = 0x81;
/// Frames gathered into one `writev` at most.
const MAX_IOVECS: usize = 64;

/// Frames a text message for a client (unmasked): header then `payload`, in one buffer.
pub fn text_frame(payload: &str) -> Bytes {
    let len = payload.len();
    let mut frame = Vec::with_capacity(len + 10);
    frame.push(FIN_TEXT);
    if len < 126 {
        frame.push(len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        frame.push(126);
        frame.extend_from_slice(&len.to_be_bytes());
    } else {
        frame.push(127);
        frame.extend_from_slice(&(len as u64).to_be_bytes());
    }
    frame.extend_from_slice(payload.as_bytes());
    Bytes::from(frame)
}

/// The texts of frames made by [`text_frame`], back to back, as a client reads them.
#[cfg(test)]
pub fn frame_texts(bytes: &[u8]) -> Vec<String> {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket};
    let cursor = io::Cursor::new(bytes.to_vec());
    let mut ws = WebSocket::from_raw_socket(cursor, Role::Client, None);
    let mut out = Vec::new();
    loop {
        match ws.read() {
            Ok(Message::Text(text)) => out.push(text.as_str().to_owned()),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => return out,
        }
    }
}

/// A websocket opening handshake (RFC 6455, 4.2) that passed validation.
#[derive(Debug)]
pub struct Handshake {
    accept: String,
    protocol: Option<HeaderValue>,
}

impl Handshake {
    /// Checks an upgrade request's headers; `protocols` are the subprotocols the server
    /// speaks, the first one the client offers is selected. A bad request gets the
    /// status and reason to answer with, as axum's extractor answers: 426 for a request
    /// that does not ask for an upgrade, 400 for a malformed one.
    pub fn check(
        headers: &HeaderMap,
        protocols: &[&'static str],
    ) -> Result<Handshake, (StatusCode, &'static str)> {
        let has_token = |name: header::HeaderName, token: &str| {
            headers.get_all(name).iter().any(|value| {
                value
                    .to_str()
                    .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            })
        };
        if !has_token(header::CONNECTION, "upgrade") {
            return Err((
                StatusCode::UPGRADE_REQUIRED,
                "Connection header did not include 'upgrade'",
            ));
        }
        if !has_token(header::UPGRADE, "websocket") {
            return Err((
                StatusCode::BAD_REQUEST,
                "`Upgrade` header did not include 'websocket'",
            ));
        }
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(|v| v.as_bytes())
            != Some(b"13")
        {
            return Err((
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Version` header did not include '13'",
            ));
        }
        let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
            return Err((
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Key` header missing",
            ));
        };
        let protocol = headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(',').map(str::trim))
            .find_map(|offered| protocols.iter().find(|p| **p == offered))
            .map(|p| HeaderValue::from_static(p));
        Ok(Handshake {
            accept: derive_accept_key(key.as_bytes()),
            protocol,
        })
    }

    /// The `101 Switching Protocols` answer.
    pub fn response(self) -> Response {
        let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_str(&self.accept).expect("base64 is a valid header value"),
        );
        if let Some(protocol) = self.protocol {
            headers.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
        }
        response
    }
}

/// Frames waiting to be written, each whole: replies framed for this connection,
/// deliveries read from a feed (several frames in one buffer) or shared with others.
#[derive(Debug, Default)]
pub struct Outbox {
    chunks: VecDeque<Bytes>,
    /// Bytes of the first chunk written already.
    written: usize,
    /// Bytes queued and not written yet.
    queued: usize,
    /// Bytes written since the outbox was made.
    total_written: u64,
    /// When the owner accepted the oldest delivery queued (microseconds since the Unix epoch;
    /// 0: none), for the delivery latency once it is written.
    oldest_stamp: u64,
}

impl Outbox {
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Notes that deliveries accepted by their owner at `stamp` are queued.
    pub fn stamp(&mut self, stamp: u64) {
        if stamp != 0 && (self.oldest_stamp == 0 || stamp < self.oldest_stamp) {
            self.oldest_stamp = stamp;
        }
    }

    /// The oldest stamp queued since the last call (0: none).
    pub fn take_stamp(&mut self) -> u64 {
        std::mem::take(&mut self.oldest_stamp)
    }

    /// Bytes queued and not written yet.
    pub fn len(&self) -> usize {
        self.queued
    }

    /// Bytes written so far, all writes together (to tell a slow reader from a stalled one).
    pub fn written(&self) -> u64 {
        self.total_written
    }

    pub fn push_text(&mut self, text: impl AsRef<str>) {
        self.push(text_frame(text.as_ref()));
    }

    /// Queues whole frames made by [`text_frame`] (one or several back to back).
    pub fn push(&mut self, frames: Bytes) {
        if !frames.is_empty() {
            self.queued += frames.len();
            self.chunks.push_back(frames);
        }
    }

    /// Writes everything queued; `Ready(Ok)` once the outbox is empty.
    pub fn poll_write<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        mut io: Pin<&mut W>,
    ) -> Poll<io::Result<()>> {
        while !self.chunks.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let count = self.gather(&mut slices);
            let n = ready!(io.as_mut().poll_write_vectored(cx, &slices[..count]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.advance(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Fills `slices` with the unwritten chunks, in order; returns how many.
    fn gather<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let mut count = 0;
        for (slot, chunk) in slices.iter_mut().zip(&self.chunks) {
            let rest = if count == 0 {
                &chunk[self.written..]
            } else {
                &chunk[..]
            };
            *slot = IoSlice::new(rest);
            count += 1;
        }
        count
    }

    /// Drops `n` written bytes from the front.
    fn advance(&mut self, mut n: usize) {
        self.queued -= n;
        self.total_written += n as u64;
        while let Some(chunk) = self.chunks.front() {
            let left = chunk.len() - self.written;
            if n < left {
                self.written += n;
                return;
            }
            n -= left;
            self.written = 0;
            self.chunks.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_every_length_class_as_tungstenite_reads_it() {
        let texts: Vec<String> = [0, 1, 125, 126, 127, 65_535, 65_536, 200_000]
            .iter()
            .map(|&n| "é".repeat(n / 2) + &"x".repeat(n % 2))
            .collect();
        let bytes: Vec<u8> = texts.iter().flat_map(|t| text_frame(t).to_vec()).collect();
        assert_eq!(frame_texts(&bytes), texts);
    }

    /// A writer that takes at most `limit` bytes per call, and says "not now" every other
    /// call.
    struct Trickle {
        out: Vec<u8>,
        limit: usize,
        calls: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.calls += 1;
            if self.calls.is_multiple_of(2) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let mut taken = 0;
            for buf in bufs {
                let n = buf.len().min(self.limit - taken);
                self.out.extend_from_slice(&buf[..n]);
                taken += n;
                if taken == self.limit {
                    break;
                }
            }
            Poll::Ready(Ok(taken))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }
    }

    proptest! {
        /// Whatever the writer accepts per call, the client reads every frame, in order.
        #[test]
        fn partial_writes_keep_frames_whole_and_in_order(
            runs in prop::collection::vec(prop::collection::vec("[a-z]{0,300}", 0..5), 1..30),
            limit in 1usize..500,
        ) {
            let mut outbox = Outbox::default();
            let mut expected = Vec::new();
            for (i, run) in runs.iter().enumerate() {
                if i % 3 == 0 {
                    for text in run {
                        outbox.push_text(text);
                    }
                } else {
                    // Several frames back to back in one buffer, as a feed is read.
                    let frames: Vec<u8> = run.iter().flat_map(|t| text_frame(t).to_vec()).collect();
                    outbox.push(frames.into());
                }
                expected.extend(run.iter().cloned());
            }
            let queued = outbox.len();
            let mut writer = Trickle { out: Vec::new(), limit, calls: 0 };
            let waker = futures::task::noop_waker();
            let mut cx = Context::from_waker(&waker);
            while outbox.poll_write(&mut cx, Pin::new(&mut writer)).is_pending() {}
            prop_assert!(outbox.is_empty());
            prop_assert_eq!(outbox.len(), 0);
            prop_assert_eq!(outbox.written(), queued as u64);
            prop_assert_eq!(writer.out.len(), queued);
            prop_assert_eq!(frame_texts(&writer.out), expected);
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    header::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    const VALID: [(&str, &str); 4] = [
        ("connection", "keep-alive, Upgrade"),
        ("upgrade", "WebSocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn handshake_accepts_rfc_example_and_picks_the_protocol() {
        let mut request = headers(&VALID);
        request.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("base64url.bearer.phx.dG9r, phoenix"),
        );
        let response = Handshake::check(&request, &["phoenix"]).unwrap().response();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        // RFC 6455, 1.3.
        assert_eq!(
            response.headers()[header::SEC_WEBSOCKET_ACCEPT],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(
            response.headers()[header::SEC_WEBSOCKET_PROTOCOL],
            "phoenix"
        );
        let response = Handshake::check(&headers(&VALID), &["phoenix"])
            .unwrap()
            .response();
        assert!(
            !response
                .headers()
                .contains_key(header::SEC_WEBSOCKET_PROTOCOL)
        );
    }

    #[test]
    fn handshake_names_what_is_missing() {
        for (skip, (missing, _)) in VALID.iter().enumerate() {
            let partial: Vec<_> = VALID
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, pair)| *pair)
                .collect();
            let (status, reason) = Handshake::check(&headers(&partial), &[]).unwrap_err();
            let expected = match *missing {
                "connection" => StatusCode::UPGRADE_REQUIRED,
                _ => StatusCode::BAD_REQUEST,
            };
            assert_eq!(status, expected);
            let name = missing.replace("sec-websocket-", "Sec-WebSocket-");
            assert!(
                reason.to_lowercase().contains(&name.to_lowercase()),
                "{reason} names {name}"
            );
        }
        let mut old = headers(&VALID);
        old.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("8"));
        assert!(Handshake::check(&old, &[]).is_err());
    }
}
