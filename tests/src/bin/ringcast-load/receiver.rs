//! Subscriber sockets read without a task per socket. A few threads each poll their share
//! of the joined sockets with epoll (mio) and read every ready socket into one buffer,
//! parsing the server's websocket frames in place. Everything runs on the benchmark's own
//! machine, so what the generator spends per delivery is taken from the cluster: one task
//! wake-up, two reads and a frame decoder per message cost as much as the gateway's write.

use crate::client::{self, Ws};
use crate::stats;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

const READ_BUFFER: usize = 64 * 1024;

/// Moves joined websocket connections onto `threads` reader threads, which record every
/// delivery until the connection ends. Call from inside the tokio runtime.
pub fn start(conns: Vec<Ws>, threads: usize) -> anyhow::Result<()> {
    let threads = threads.clamp(1, conns.len().max(1));
    let mut shares: Vec<Vec<TcpStream>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, ws) in conns.into_iter().enumerate() {
        // The joins were answered and nothing is published yet: tungstenite holds no
        // unread bytes, so the socket can change hands here.
        let tcp = ws.into_inner().into_std()?;
        shares[i % threads].push(TcpStream::from_std(tcp));
    }
    for (n, share) in shares.into_iter().enumerate() {
        std::thread::Builder::new()
            .name(format!("receiver-{n}"))
            .spawn(move || {
                if let Err(e) = read_all(share) {
                    eprintln!("ringcast-load: receiver thread failed: {e}");
                }
            })?;
    }
    Ok(())
}

struct Sub {
    stream: TcpStream,
    /// The start of a frame that has not fully arrived yet.
    partial: Vec<u8>,
    open: bool,
}

fn read_all(streams: Vec<TcpStream>) -> std::io::Result<()> {
    let mut poll = Poll::new()?;
    let mut subs: Vec<Sub> = streams
        .into_iter()
        .map(|stream| Sub {
            stream,
            partial: Vec::new(),
            open: true,
        })
        .collect();
    for (i, sub) in subs.iter_mut().enumerate() {
        poll.registry()
            .register(&mut sub.stream, Token(i), Interest::READABLE)?;
    }
    let mut open = subs.len();
    let mut events = Events::with_capacity(1024);
    let mut buffer = vec![0u8; READ_BUFFER];
    let beat = client::masked_text(br#"[null,"hb","phoenix","heartbeat",{}]"#);
    let mut next_beat = Instant::now() + client::HEARTBEAT_EVERY;
    while open > 0 {
        match poll.poll(&mut events, Some(Duration::from_secs(1))) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for event in events.iter() {
            let sub = &mut subs[event.token().0];
            if !sub.open {
                continue;
            }
            if let Some(code) = sub.read_ready(&mut buffer) {
                stats::closed(code);
                sub.open = false;
                open -= 1;
                let _ = poll.registry().deregister(&mut sub.stream);
            }
        }
        if Instant::now() >= next_beat {
            next_beat += client::HEARTBEAT_EVERY;
            for sub in subs.iter_mut().filter(|s| s.open) {
                // 40 bytes into an idle socket's send buffer: a short write cannot happen.
                let _ = sub.stream.write_all(&beat);
            }
        }
    }
    Ok(())
}

impl Sub {
    /// Reads what the socket has; `Some(close code)` when the connection ended.
    fn read_ready(&mut self, buffer: &mut [u8]) -> Option<Option<u16>> {
        loop {
            let n = match self.stream.read(buffer) {
                Ok(0) => return Some(None),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return Some(None),
            };
            let closed = if self.partial.is_empty() {
                let (used, closed) = on_frames(&buffer[..n]);
                self.partial.extend_from_slice(&buffer[used..n]);
                closed
            } else {
                self.partial.extend_from_slice(&buffer[..n]);
                let (used, closed) = on_frames(&self.partial);
                self.partial.drain(..used);
                closed
            };
            if closed.is_some() {
                return closed;
            }
            // A short read emptied the socket; epoll reports the next arrival (edge
            // triggered), so the extra read that would only say "would block" is skipped.
            if n < buffer.len() {
                return None;
            }
        }
    }
}

/// Records the deliveries among the complete frames at the start of `data`; returns the
/// bytes used and, if a close frame came, its code.
fn on_frames(data: &[u8]) -> (usize, Option<Option<u16>>) {
    let mut used = 0;
    while let Some((frame, len)) = client::parse_frame(&data[used..]) {
        used += len;
        match frame {
            client::Frame::Text(text) => {
                if let Some((step, sent)) = std::str::from_utf8(text)
                    .ok()
                    .and_then(client::parse_delivery)
                {
                    stats::record(step, sent);
                }
            }
            client::Frame::Close(code) => return (used, Some(code)),
            client::Frame::Other => {}
        }
    }
    (used, None)
}
