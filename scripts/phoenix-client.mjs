// A phoenix.js client for ringcast under Node 20.
//
//   npm ci --prefix scripts
//   node scripts/phoenix-client.mjs [socket-url] [topic] [message]
//
// Joins `topic` (default topics:matrix) at `socket-url` (default ws://127.0.0.1:4000/socket)
// and prints every message. With a `message`, publishes it, prints it when it comes back
// through the cluster, and exits. The channel params are a function, so a rejoin after a
// reconnect sends the last position seen ({"recover": {epoch, offset}}).
import { Socket } from "phoenix";
import WebSocket from "ws";

const [url = "ws://127.0.0.1:4000/socket", topic = "topics:matrix", message] = process.argv.slice(2);

// Under Node, pass the `ws` WebSocket: without it phoenix.js silently falls back to long-polling.
const socket = new Socket(url, { transport: WebSocket });
socket.onError(() => console.error(`socket error (is the cluster running at ${url}?)`));
socket.connect();

let position = null; // {epoch, offset} of the last message seen
const channel = socket.channel(topic, () => (position ? { recover: position } : {}));
channel.onMessage = (event, payload) => {
  if (!event.startsWith("phx_") && !event.startsWith("chan_reply_") && position) {
    position = { epoch: position.epoch, offset: position.offset + 1 };
  }
  return payload;
};
channel.on("event", (payload) => {
  console.log(`${topic} event ${JSON.stringify(payload)}`);
  if (message && payload.message === message) process.exit(0);
});
channel.onError(() => console.error(`${topic}: channel error, rejoining`));

channel
  .join()
  .receive("ok", (reply) => {
    position = { epoch: reply.epoch, offset: reply.offset };
    const recovery =
      reply.recovered === true ? " (recovered: missed messages follow)"
      : reply.recovered === false ? " (could not recover: messages were missed)"
      : "";
    console.log(`joined ${topic} at epoch ${reply.epoch}, offset ${reply.offset}${recovery}`);
    if (message) {
      channel
        .push("publish", ["event", { message }])
        .receive("error", (e) => { console.error("publish refused:", e); process.exit(1); });
    }
  })
  .receive("error", (reply) => {
    console.error(`join refused: ${JSON.stringify(reply)}`);
    process.exit(1);
  });
