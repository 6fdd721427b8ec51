// phoenix.js driver for the ringcast end-to-end tests.
//
// Usage: node driver.mjs ws://127.0.0.1:PORT/socket ['{"params":{...},"authToken":"..."}']
// (the optional JSON is given to phoenix.js's Socket: connect params, 1.8's authToken)
// Reads one JSON command per line on stdin, writes one JSON event per line on stdout:
//   {"op":"join","topic":T,"params":{...}}        -> join_ok / join_error / join_timeout
//     with "recover": true, the channel keeps its position (epoch + offset, counting every
//     message) and every rejoin sends it as {"recover": position}; messages then carry
//     their "offset"
//     with "presence": true, a phoenix.js Presence is attached before the join: every onSync
//     writes {"ev":"presence_sync","topic":T,"state":{key: [phx_ref, ...]}, "metas": {...}}
//     and every raw presence_diff {"ev":"presence_diff","topic":T,"diff":D}
//   {"op":"push","topic":T,"event":E,"payload":P} -> push_ok / push_error / push_timeout
//   {"op":"leave","topic":T}                      -> leave_ok
//   {"op":"exit"}
// and, as they happen: open, close, message (every non-phx event of a joined channel),
// channel_error, channel_close.
import { Presence, Socket } from "phoenix";
import WebSocket from "ws";
import readline from "node:readline";

const url = process.argv[2];
const options = process.argv[3] ? JSON.parse(process.argv[3]) : {};
const out = (event) => process.stdout.write(JSON.stringify(event) + "\n");

// transport: WebSocket is required under Node, or phoenix.js falls back to long-polling.
const socket = new Socket(url, {
  ...options,
  transport: WebSocket,
  reconnectAfterMs: () => 100,
  rejoinAfterMs: () => 200,
});
socket.onOpen(() => out({ ev: "open" }));
socket.onClose((e) => out({ ev: "close", code: e.code }));
socket.onError(() => out({ ev: "socket_error" }));
socket.connect();

const channels = new Map();

function join(topic, params, recover, withPresence) {
  // The README's recovery pattern: channel params as a function, so that a rejoin sends the
  // position the client has reached.
  let position = null;
  const joinParams = recover
    ? () => (position ? { ...params, recover: position } : { ...params })
    : params || {};
  const channel = socket.channel(topic, joinParams);
  channels.set(topic, channel);
  if (withPresence) {
    // Bound before the Presence's own handlers: a diff is reported before the sync it causes.
    channel.on("presence_diff", (diff) => out({ ev: "presence_diff", topic, diff }));
    channel.on("presence_stats", (stats) => out({ ev: "presence_stats", topic, stats }));
    const presence = new Presence(channel);
    presence.onSync(() => {
      const state = {};
      const metas = {};
      for (const [key, { metas: list }] of Object.entries(presence.state)) {
        state[key] = list.map((m) => m.phx_ref).sort();
        metas[key] = list;
      }
      out({ ev: "presence_sync", topic, state, metas });
    });
  }
  channel.onMessage = (event, payload) => {
    // Presence events are not numbered with the topic's messages.
    if (event.startsWith("presence_")) return payload;
    if (!event.startsWith("phx_") && !event.startsWith("chan_reply_")) {
      if (recover) {
        position.offset += 1;
        out({ ev: "message", topic, event, payload, offset: position.offset });
      } else {
        out({ ev: "message", topic, event, payload });
      }
    }
    return payload;
  };
  channel.onError((reason) => out({ ev: "channel_error", topic, reason }));
  channel.onClose(() => out({ ev: "channel_close", topic }));
  channel
    .join()
    .receive("ok", (response) => {
      if (recover) position = { epoch: response.epoch, offset: response.offset };
      out({ ev: "join_ok", topic, response });
    })
    .receive("error", (response) => out({ ev: "join_error", topic, response }))
    .receive("timeout", () => out({ ev: "join_timeout", topic }));
}

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  if (!line.trim()) return;
  const cmd = JSON.parse(line);
  const channel = channels.get(cmd.topic);
  switch (cmd.op) {
    case "join":
      join(cmd.topic, cmd.params, cmd.recover, cmd.presence);
      break;
    case "push":
      channel
        .push(cmd.event, cmd.payload)
        .receive("ok", (response) => out({ ev: "push_ok", topic: cmd.topic, event: cmd.event, response }))
        .receive("error", (response) => out({ ev: "push_error", topic: cmd.topic, event: cmd.event, response }))
        .receive("timeout", () => out({ ev: "push_timeout", topic: cmd.topic, event: cmd.event }));
      break;
    case "leave":
      channel.leave().receive("ok", () => out({ ev: "leave_ok", topic: cmd.topic }));
      break;
    case "exit":
      process.exit(0);
  }
});
rl.on("close", () => process.exit(0));
