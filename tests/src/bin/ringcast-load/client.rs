//! Client connections: websocket over TCP from a spread of loopback source addresses, and
//! the few Phoenix frames the workloads need.

use crate::stats;
use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use std::net::{Ipv4Addr, SocketAddr};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub type Ws = WebSocketStream<TcpStream>;

/// The source address of connection `n`: 127.0.0.2 .. 127.0.0.(1 + spread).
pub fn source_addr(n: usize, spread: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (n % spread.max(1) as usize) as u8)
}

/// Opens a v2 Phoenix websocket to `gateway` (`ws://host:port`) from `source`.
pub async fn connect(gateway: &str, source: Ipv4Addr) -> anyhow::Result<Ws> {
    let host_port = gateway.trim_start_matches("ws://").trim_end_matches('/');
    let addr: SocketAddr = host_port
        .parse()
        .with_context(|| format!("gateway {gateway} must be ws://ip:port"))?;
    let socket = TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::from((source, 0)))
        .with_context(|| format!("bind {source}"))?;
    let stream = socket
        .connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    stream.set_nodelay(true)?;
    // Small buffers: the generator holds tens of thousands of sockets.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let url = format!("ws://{host_port}/socket/websocket?vsn=2.0.0");
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
    Ok(ws)
}

/// Joins `topics` (join_ref = ref = index + 1) and waits for every reply to be ok. A join
/// answered `unavailable` (the server is busy) is sent again a second later, as phoenix.js
/// does, up to 10 times; any other refusal fails.
pub async fn join_all(ws: &mut Ws, topics: &[String]) -> anyhow::Result<()> {
    let join = |r: usize| {
        Message::Text(format!(r#"["{r}","{r}","{}","phx_join",{{}}]"#, topics[r - 1]).into())
    };
    for r in 1..=topics.len() {
        ws.feed(join(r)).await?;
    }
    ws.flush().await?;
    let mut joined = 0;
    let mut attempts = vec![0u32; topics.len()];
    let mut retries = Vec::new();
    let mut retry_at = None;
    while joined < topics.len() {
        let wake = retry_at.unwrap_or_else(|| tokio::time::Instant::now() + MAX_WAIT);
        let message = tokio::select! {
            message = ws.next() => message,
            _ = tokio::time::sleep_until(wake) => {
                if retry_at.is_none() {
                    bail!("no join reply within {MAX_WAIT:?}");
                }
                for r in retries.drain(..) {
                    ws.feed(join(r)).await?;
                }
                ws.flush().await?;
                retry_at = None;
                continue;
            }
        };
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(_)) => continue,
            Some(Err(e)) => bail!("join: {e}"),
            None => bail!("connection closed while joining"),
        };
        let text = text.as_str();
        if !text.contains("\"phx_reply\"") {
            continue;
        }
        if text.contains(r#""status":"ok""#) {
            joined += 1;
            continue;
        }
        let reply: serde_json::Value = serde_json::from_str(text)?;
        let r = reply[1].as_str().and_then(|r| r.parse::<usize>().ok());
        match r {
            Some(r)
                if text.contains(r#""reason":"unavailable""#)
                    && (1..=topics.len()).contains(&r) =>
            {
                attempts[r - 1] += 1;
                anyhow::ensure!(attempts[r - 1] <= 10, "join refused 10 times: {text}");
                JOIN_RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                retries.push(r);
                retry_at
                    .get_or_insert(tokio::time::Instant::now() + std::time::Duration::from_secs(1));
            }
            _ => bail!("join refused: {text}"),
        }
    }
    Ok(())
}

/// How long a join reply may take.
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
/// Joins answered `unavailable` and sent again, over all connections.
pub static JOIN_RETRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A publish frame whose payload carries the ramp step and the send time, padded to
/// `payload` bytes: `{"k":STEP,"t":NANOS,"p":"xxx.."}`.
pub fn publish_frame(join_ref: usize, topic: &str, step: usize, payload: usize) -> String {
    let head = format!(r#"{{"k":{step},"t":{},"p":""#, stats::now_nanos());
    let pad = payload.saturating_sub(head.len() + 2);
    format!(
        r#"["{join_ref}",null,"{topic}","publish",["m",{head}{}"}}]]"#,
        "x".repeat(pad)
    )
}

/// Reads a delivery's step and send time without parsing the JSON: the payload is the
/// first object of the frame and starts `{"k":STEP,"t":NANOS`.
pub fn parse_delivery(frame: &str) -> Option<(usize, u64)> {
    let rest = frame.get(frame.find('{')?..)?.strip_prefix("{\"k\":")?;
    let (step, rest) = leading_number(rest)?;
    let (sent, _) = leading_number(rest.strip_prefix(",\"t\":")?)?;
    Some((step as usize, sent))
}

fn leading_number(text: &str) -> Option<(u64, &str)> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    Some((text[..digits].parse().ok()?, &text[digits..]))
}

/// A websocket frame from the server (never masked), as the receiver threads need it.
#[derive(Debug, PartialEq)]
pub enum Frame<'a> {
    Text(&'a [u8]),
    /// A close frame and its code, if it has one.
    Close(Option<u16>),
    /// Binary, ping, pong or a continuation: not used by the gateway's deliveries.
    Other,
}

/// Parses the frame at the start of `data`: the frame and its length in bytes, or `None`
/// until all of it has arrived.
pub fn parse_frame(data: &[u8]) -> Option<(Frame<'_>, usize)> {
    let (&b0, &b1) = (data.first()?, data.get(1)?);
    let (len, head) = match b1 & 0x7f {
        126 => (
            u16::from_be_bytes(data.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            usize::try_from(u64::from_be_bytes(data.get(2..10)?.try_into().ok()?)).ok()?,
            10,
        ),
        n => (n as usize, 2),
    };
    let mask: usize = if b1 & 0x80 != 0 { 4 } else { 0 };
    let payload = data.get(head + mask..(head + mask).checked_add(len)?)?;
    let frame = match b0 & 0x0f {
        0x1 if mask == 0 => Frame::Text(payload),
        0x8 => Frame::Close(payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]))),
        _ => Frame::Other,
    };
    Some((frame, head + mask + len))
}

/// A client's text frame (masked, as clients must) carrying `payload` (under 126 bytes).
pub fn masked_text(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126, "short frames only");
    let key = [0x5a, 0x17, 0xc3, 0x88];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&key);
    frame.extend(payload.iter().zip(key.iter().cycle()).map(|(b, k)| b ^ k));
    frame
}

/// Heartbeats keep the gateway's idle timeout (60 s) from closing a quiet subscriber.
pub const HEARTBEAT_EVERY: std::time::Duration = std::time::Duration::from_secs(20);

/// A subscriber as ordinary clients are written: its own task, reading one frame at a time
/// (tungstenite, 4 KiB reads), recording every delivery, sending a heartbeat every 20 s.
pub async fn subscriber_task(mut ws: Ws) {
    let start = tokio::time::Instant::now() + HEARTBEAT_EVERY;
    let mut heartbeat = tokio::time::interval_at(start, HEARTBEAT_EVERY);
    loop {
        let message = tokio::select! {
            message = ws.next() => message,
            _ = heartbeat.tick() => {
                let beat = r#"[null,"hb","phoenix","heartbeat",{}]"#;
                if ws.send(Message::Text(beat.into())).await.is_err() {
                    stats::closed(None);
                    return;
                }
                continue;
            }
        };
        match message {
            Some(Ok(Message::Text(text))) => {
                if let Some((step, sent)) = parse_delivery(text.as_str()) {
                    stats::record(step, sent);
                }
            }
            Some(Ok(Message::Close(frame))) => {
                stats::closed(frame.map(|f| f.code.into()));
                return;
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => {
                stats::closed(None);
                return;
            }
        }
    }
}

/// Reads the receiving half of a publishing connection, recording every delivery.
pub async fn receive_split(mut stream: futures::stream::SplitStream<Ws>) {
    while let Some(message) = stream.next().await {
        match message {
            Ok(Message::Text(text)) => {
                if let Some((step, sent)) = parse_delivery(text.as_str()) {
                    stats::record(step, sent);
                }
            }
            Ok(Message::Close(_)) | Err(_) => {
                stats::closed(None);
                return;
            }
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let frame = publish_frame(1, "bench:t", 3, 100);
        assert!(
            serde_json::from_str::<serde_json::Value>(&frame).is_ok(),
            "{frame}"
        );
        // The payload as the gateway delivers it: the raw text, key order kept.
        let payload = &frame[frame.find("[\"m\",").unwrap() + 5..frame.len() - 2];
        assert_eq!(payload.len(), 100, "{payload}");
        let delivery = format!(r#"["1",null,"bench:t","m",{payload}]"#);
        let (step, sent) = parse_delivery(&delivery).unwrap();
        assert_eq!(step, 3);
        assert!(sent <= stats::now_nanos());
        assert!(parse_delivery(r#"["1","2","t","phx_reply",{"status":"ok"}]"#).is_none());
        assert!(parse_delivery(r#"[null,"hb","phoenix","phx_reply",{}]"#).is_none());
    }

    #[test]
    fn frames_parse_as_tungstenite_writes_them_and_wait_for_their_end() {
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
        let mut wire = Vec::new();
        let texts: Vec<String> = [0, 5, 125, 126, 300, 65535, 70_000]
            .iter()
            .map(|&n| "x".repeat(n))
            .collect();
        for text in &texts {
            WsFrame::message(text.clone().into_bytes(), OpCode::Data(Data::Text), true)
                .format(&mut wire)
                .unwrap();
        }
        WsFrame::message(vec![1, 2], OpCode::Data(Data::Binary), true)
            .format(&mut wire)
            .unwrap();
        WsFrame::close(Some(CloseFrame {
            code: 1013.into(),
            reason: "slow consumer".into(),
        }))
        .format(&mut wire)
        .unwrap();
        let mut seen = Vec::new();
        let mut at = 0;
        while let Some((frame, len)) = parse_frame(&wire[at..]) {
            // Every shorter prefix of a frame is incomplete.
            for cut in [0, 1, len / 2, len - 1] {
                assert!(
                    parse_frame(&wire[at..at + cut]).is_none(),
                    "prefix {cut} of {len}"
                );
            }
            seen.push(match frame {
                Frame::Text(t) => format!("text {}", t.len()),
                Frame::Close(code) => format!("close {code:?}"),
                Frame::Other => "other".to_owned(),
            });
            at += len;
        }
        assert_eq!(at, wire.len());
        let mut want: Vec<String> = texts.iter().map(|t| format!("text {}", t.len())).collect();
        want.extend(["other".to_owned(), "close Some(1013)".to_owned()]);
        assert_eq!(seen, want);
        // A client frame is masked: the server unmasks it to the heartbeat.
        let beat = masked_text(b"hello");
        assert_eq!(beat[1], 0x80 | 5);
        let unmasked: Vec<u8> = beat[6..]
            .iter()
            .zip(beat[2..6].iter().cycle())
            .map(|(b, k)| b ^ k)
            .collect();
        assert_eq!(unmasked, b"hello");
    }
}
