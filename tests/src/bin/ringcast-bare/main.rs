//! `ringcast-bare`: a bare websocket broadcaster, the ceiling `scripts/bench.sh` measures
//! ringcast against on the same machine in the same hour.
//!
//! One process and nothing between the publisher and the sockets: no ring, no gRPC, no log,
//! no slow-client policy beyond a bounded channel. A published message is framed once and
//! the same bytes go to every connection joined to its topic (a tokio broadcast channel per
//! topic, one task per connection that writes whatever has gathered). It speaks just enough
//! of the Phoenix protocol for `ringcast-load fanout`: join (one topic per connection),
//! heartbeat, publish (`[join_ref, ref, topic, "publish", [event, payload]]`, delivered as
//! `[null, null, topic, event, payload]`). Not a server to deploy.

use bytes::{Buf, Bytes, BytesMut};
use clap::Parser;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast::{self, error::RecvError};

#[derive(Parser)]
#[command(
    name = "ringcast-bare",
    version,
    about = "Bare websocket broadcaster: the benchmark's ceiling"
)]
struct Args {
    /// Address to listen on (port 0: any free port, printed on stderr).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Frames a connection may fall behind before it is closed (1013).
    #[arg(long, default_value_t = 8192)]
    queue: usize,
}

/// Client frames larger than this close the connection (1009).
const MAX_FRAME: usize = 1 << 20;

type Topics = Arc<Mutex<HashMap<String, broadcast::Sender<Bytes>>>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("ringcast-bare: cannot raise the open-file limit: {e}");
    }
    let listener = TcpListener::bind(args.listen).await?;
    eprintln!("ringcast-bare: listening on {}", listener.local_addr()?);
    let topics = Topics::default();
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                let topics = topics.clone();
                tokio::spawn(async move {
                    // A client that goes away is not an error of the broadcaster's.
                    let _ = serve(tcp, topics, args.queue).await;
                });
            }
            // Out of file descriptors, for one: wait for connections to end.
            Err(e) => {
                eprintln!("ringcast-bare: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

/// What a connection has joined: its topic's feed and the sender it publishes into.
struct Joined {
    topic: String,
    feed: broadcast::Receiver<Bytes>,
    publish: broadcast::Sender<Bytes>,
}

async fn serve(tcp: TcpStream, topics: Topics, queue: usize) -> anyhow::Result<()> {
    tcp.set_nodelay(true)?;
    // The client sends nothing before the handshake's answer, so no frame is left in
    // tungstenite's buffer when the socket is taken back.
    let tcp = tokio_tungstenite::accept_async(tcp).await?.into_inner();
    let (mut rd, mut wr) = tcp.into_split();
    let mut inbound = BytesMut::with_capacity(4096);
    let mut out = BytesMut::new();
    let mut joined: Option<Joined> = None;
    loop {
        tokio::select! {
            biased;
            frame = async {
                match joined.as_mut() {
                    Some(j) => j.feed.recv().await,
                    None => std::future::pending().await,
                }
            } => match frame {
                Ok(frame) => {
                    let feed = &mut joined.as_mut().expect("fed").feed;
                    if out.is_empty() && feed.is_empty() {
                        // The common case: one frame, written from the shared bytes.
                        wr.write_all(&frame).await?;
                        continue;
                    }
                    out.extend_from_slice(&frame);
                    while out.len() < 64 * 1024 {
                        match feed.try_recv() {
                            Ok(frame) => out.extend_from_slice(&frame),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    out.extend_from_slice(&close_frame(1013, "slow consumer"));
                    wr.write_all(&out).await?;
                    return Ok(());
                }
                Err(RecvError::Closed) => return Ok(()),
            },
            read = rd.read_buf(&mut inbound) => {
                if read? == 0 {
                    return Ok(());
                }
                while let Some(frame) = take_client_frame(&mut inbound) {
                    match frame {
                        ClientFrame::Text(text) => {
                            on_text(&text, &mut joined, &topics, queue, &mut out);
                        }
                        ClientFrame::Ping(data) => out.extend_from_slice(&server_frame(0xA, &data)),
                        ClientFrame::Close => {
                            out.extend_from_slice(&close_frame(1000, ""));
                            wr.write_all(&out).await?;
                            return Ok(());
                        }
                        ClientFrame::TooBig => {
                            out.extend_from_slice(&close_frame(1009, "frame too large"));
                            wr.write_all(&out).await?;
                            return Ok(());
                        }
                        ClientFrame::Other => {}
                    }
                }
            }
        }
        if !out.is_empty() {
            wr.write_all(&out).await?;
            out.clear();
        }
    }
}

/// A Phoenix v2 frame with the payload left as raw text (key order kept).
#[derive(Deserialize)]
struct Message<'a> {
    join_ref: Option<&'a str>,
    msg_ref: Option<&'a str>,
    topic: &'a str,
    event: &'a str,
    #[serde(borrow)]
    payload: &'a RawValue,
}

/// Handles one text frame; replies go to `out`.
fn on_text(
    text: &[u8],
    joined: &mut Option<Joined>,
    topics: &Topics,
    queue: usize,
    out: &mut BytesMut,
) {
    let Ok(msg) = serde_json::from_slice::<Message>(text) else {
        return;
    };
    let reply = |status: &str, response: &str| {
        let text = format!(
            "[{},{},{},\"phx_reply\",{{\"status\":\"{status}\",\"response\":{response}}}]",
            json_str(msg.join_ref),
            json_str(msg.msg_ref),
            json_str(Some(msg.topic)),
        );
        server_frame(0x1, text.as_bytes())
    };
    match msg.event {
        "heartbeat" => out.extend_from_slice(&reply("ok", "{}")),
        "phx_join" => match joined {
            Some(j) if j.topic != msg.topic => {
                out.extend_from_slice(&reply("error", r#"{"reason":"one topic per connection"}"#))
            }
            Some(_) => out.extend_from_slice(&reply("ok", "{}")),
            None => {
                let publish = topics
                    .lock()
                    .entry(msg.topic.to_owned())
                    .or_insert_with(|| broadcast::channel(queue).0)
                    .clone();
                *joined = Some(Joined {
                    topic: msg.topic.to_owned(),
                    feed: publish.subscribe(),
                    publish,
                });
                out.extend_from_slice(&reply("ok", "{}"));
            }
        },
        "publish" => {
            let Some(j) = joined.as_ref().filter(|j| j.topic == msg.topic) else {
                out.extend_from_slice(&reply("error", r#"{"reason":"unmatched topic"}"#));
                return;
            };
            let Ok((event, payload)) = serde_json::from_str::<(&str, &RawValue)>(msg.payload.get())
            else {
                out.extend_from_slice(&reply("error", r#"{"reason":"bad publish"}"#));
                return;
            };
            let delivery = format!(
                "[null,null,{},{},{}]",
                json_str(Some(msg.topic)),
                json_str(Some(event)),
                payload.get()
            );
            // No receivers (everyone left) is not an error here.
            let _ = j.publish.send(server_frame(0x1, delivery.as_bytes()));
            if msg.msg_ref.is_some() {
                out.extend_from_slice(&reply("ok", "{}"));
            }
        }
        _ => {}
    }
}

fn json_str(s: Option<&str>) -> String {
    serde_json::to_string(&s).expect("a string serializes")
}

/// A server frame (never masked) with `opcode`.
fn server_frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(payload.len() + 10);
    frame.extend_from_slice(&[0x80 | opcode]);
    match payload.len() {
        n if n < 126 => frame.extend_from_slice(&[n as u8]),
        n if n <= 0xffff => {
            frame.extend_from_slice(&[126]);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.extend_from_slice(&[127]);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    frame.freeze()
}

fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    server_frame(0x8, &payload)
}

#[derive(Debug, PartialEq)]
enum ClientFrame {
    Text(Bytes),
    Ping(Bytes),
    Close,
    TooBig,
    /// Binary, pong or a fragment: not part of what the load generator sends.
    Other,
}

/// Takes the first whole client frame (masked, as clients must) off `buf`, unmasked.
fn take_client_frame(buf: &mut BytesMut) -> Option<ClientFrame> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    let (len, head) = match b1 & 0x7f {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            usize::try_from(u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?)).ok()?,
            10,
        ),
        n => (n as usize, 2),
    };
    if len > MAX_FRAME {
        return Some(ClientFrame::TooBig);
    }
    let mask_len = if b1 & 0x80 != 0 { 4 } else { 0 };
    if buf.len() < head + mask_len + len {
        return None;
    }
    let mask: [u8; 4] = match mask_len {
        4 => buf[head..head + 4].try_into().expect("4 bytes"),
        _ => [0; 4],
    };
    buf.advance(head + mask_len);
    let mut payload = buf.split_to(len);
    for (b, k) in payload.iter_mut().zip(mask.iter().cycle()) {
        *b ^= k;
    }
    let payload = payload.freeze();
    Some(match b0 & 0x0f {
        0x1 if b0 & 0x80 != 0 => ClientFrame::Text(payload),
        0x9 => ClientFrame::Ping(payload),
        0x8 => ClientFrame::Close,
        _ => ClientFrame::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let key = [1, 2, 3, 4];
        let mut frame = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(&key);
        frame.extend(payload.iter().zip(key.iter().cycle()).map(|(b, k)| b ^ k));
        frame
    }

    #[test]
    fn client_frames_are_unmasked_and_wait_for_their_end() {
        let long = "y".repeat(300);
        let mut wire = masked(0x1, b"hello");
        wire.extend(masked(0x9, b"p"));
        wire.extend(masked(0x1, long.as_bytes()));
        let mut buf = BytesMut::from(&wire[..wire.len() - 1]);
        assert_eq!(
            take_client_frame(&mut buf),
            Some(ClientFrame::Text(Bytes::from_static(b"hello")))
        );
        assert_eq!(
            take_client_frame(&mut buf),
            Some(ClientFrame::Ping(Bytes::from_static(b"p")))
        );
        assert_eq!(
            take_client_frame(&mut buf),
            None,
            "the last byte is missing"
        );
        buf.extend_from_slice(&wire[wire.len() - 1..]);
        assert_eq!(
            take_client_frame(&mut buf),
            Some(ClientFrame::Text(Bytes::from(long)))
        );
        assert!(buf.is_empty());
        let mut huge = BytesMut::from(&[0x81u8, 0xff, 0, 0, 0, 0, 0x10, 0, 0, 0][..]);
        assert_eq!(take_client_frame(&mut huge), Some(ClientFrame::TooBig));
    }

    #[test]
    fn a_publish_reaches_the_joined_and_keeps_the_payload_text() {
        let topics = Topics::default();
        let (mut sub, mut publisher) = (None, None);
        let mut out = BytesMut::new();
        on_text(
            br#"["1","1","t","phx_join",{}]"#,
            &mut sub,
            &topics,
            16,
            &mut out,
        );
        on_text(
            br#"["1","1","t","phx_join",{}]"#,
            &mut publisher,
            &topics,
            16,
            &mut out,
        );
        on_text(
            br#"["2","2","u","phx_join",{}]"#,
            &mut sub,
            &topics,
            16,
            &mut out,
        );
        on_text(
            br#"["1",null,"t","publish",["m",{"k":1,"t":2,"a":"x"}]]"#,
            &mut publisher,
            &topics,
            16,
            &mut out,
        );
        let replies = String::from_utf8_lossy(&out);
        assert_eq!(replies.matches(r#""status":"ok""#).count(), 2, "{replies}");
        assert!(replies.contains("one topic per connection"), "{replies}");
        let frame = sub.unwrap().feed.try_recv().unwrap();
        assert_eq!(&frame[2..], br#"[null,null,"t","m",{"k":1,"t":2,"a":"x"}]"#);
        assert_eq!(frame[0], 0x81);
    }
}
