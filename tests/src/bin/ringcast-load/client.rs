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

/// Joins `topics` (join_ref = ref = index + 1) and waits for every reply to be ok.
pub async fn join_all(ws: &mut Ws, topics: &[String]) -> anyhow::Result<()> {
    for (i, topic) in topics.iter().enumerate() {
        let r = i + 1;
        ws.feed(Message::Text(
            format!(r#"["{r}","{r}","{topic}","phx_join",{{}}]"#).into(),
        ))
        .await?;
    }
    ws.flush().await?;
    let mut replies = 0;
    while replies < topics.len() {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                if text.as_str().contains("\"phx_reply\"") {
                    if !text.as_str().contains(r#""status":"ok""#) {
                        bail!("join refused: {}", text.as_str());
                    }
                    replies += 1;
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("join: {e}"),
            None => bail!("connection closed while joining"),
        }
    }
    Ok(())
}

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

/// Reads a subscriber socket until it ends, recording every delivery; sends a heartbeat
/// every 20 s so the gateway's idle timeout never closes it. One task, no split halves.
pub async fn receive(mut ws: Ws) {
    let mut heartbeat = tokio::time::interval(std::time::Duration::from_secs(20));
    heartbeat.tick().await;
    loop {
        let message = tokio::select! {
            message = ws.next() => message,
            _ = heartbeat.tick() => {
                let beat = Message::Text(r#"[null,"hb","phoenix","heartbeat",{}]"#.into());
                if ws.send(beat).await.is_err() {
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
                stats::closed(frame.map(|f| u16::from(f.code)));
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
}
