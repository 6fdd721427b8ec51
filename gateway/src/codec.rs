//! The Phoenix Channels wire format, v2 arrays and v1 objects: decode client frames, encode
//! replies, pushes and deliveries.
//!
//! Pure functions. Refs and payloads are kept as raw JSON text and echoed verbatim, as
//! Phoenix does; only topic and event must be strings.

use serde::Deserialize;
use serde_json::value::RawValue;

/// The serializer a socket speaks, chosen by the `vsn` query parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Vsn {
    /// `{"topic","event","payload","ref","join_ref"}` objects (`vsn` absent or `1.0.0`).
    V1,
    /// `[join_ref, ref, topic, event, payload]` arrays (`vsn=2.0.0`).
    V2,
}

impl Vsn {
    /// Maps the `vsn` query parameter; any other value is refused.
    pub fn from_query(vsn: Option<&str>) -> Result<Vsn, String> {
        match vsn {
            None | Some("1.0.0") => Ok(Vsn::V1),
            Some("2.0.0") => Ok(Vsn::V2),
            Some(other) => Err(format!(
                "unsupported serializer vsn {other:?}; use 2.0.0 or 1.0.0"
            )),
        }
    }
}

/// A raw JSON value as text (a ref, join_ref or topic echoed back as the client sent it).
pub type Raw = Box<str>;

/// A decoded client frame. `None` refs were absent or JSON `null`.
#[derive(Debug, Clone, PartialEq)]
pub struct InFrame<'a> {
    pub join_ref: Option<&'a str>,
    pub msg_ref: Option<&'a str>,
    pub topic: String,
    pub event: String,
    /// Raw JSON text of the payload: any JSON value.
    pub payload: &'a str,
}

/// A frame that could not be decoded, with whatever could be read for an error reply.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Malformed<'a> {
    pub join_ref: Option<&'a str>,
    pub msg_ref: Option<&'a str>,
    /// Raw JSON of the topic, when the frame had one.
    pub topic: Option<&'a str>,
}

fn non_null(raw: &RawValue) -> Option<&str> {
    let text = raw.get();
    (text != "null").then_some(text)
}

/// Decodes one text frame.
pub fn decode(vsn: Vsn, text: &str) -> Result<InFrame<'_>, Malformed<'_>> {
    match vsn {
        Vsn::V2 => decode_v2(text),
        Vsn::V1 => decode_v1(text),
    }
}

fn decode_v2(text: &str) -> Result<InFrame<'_>, Malformed<'_>> {
    let items: Vec<&RawValue> = serde_json::from_str(text).map_err(|_| Malformed::default())?;
    let malformed = || Malformed {
        join_ref: items.first().and_then(|r| non_null(r)),
        msg_ref: items.get(1).and_then(|r| non_null(r)),
        topic: items.get(2).map(|r| r.get()),
    };
    if items.len() < 5 {
        return Err(malformed());
    }
    let (Ok(topic), Ok(event)) = (
        serde_json::from_str::<String>(items[2].get()),
        serde_json::from_str::<String>(items[3].get()),
    ) else {
        return Err(malformed());
    };
    Ok(InFrame {
        join_ref: non_null(items[0]),
        msg_ref: non_null(items[1]),
        topic,
        event,
        payload: items[4].get(),
    })
}

#[derive(Deserialize)]
struct V1Frame<'a> {
    #[serde(borrow, default)]
    topic: Option<&'a RawValue>,
    #[serde(borrow, default)]
    event: Option<&'a RawValue>,
    /// `null` is a payload like any other: present-but-null must not read as absent.
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "ref")]
    msg_ref: Option<&'a RawValue>,
    #[serde(borrow, default)]
    join_ref: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

fn decode_v1(text: &str) -> Result<InFrame<'_>, Malformed<'_>> {
    // serde would also read a struct from an array; v1 frames are objects only.
    if !text.trim_start().starts_with('{') {
        return Err(Malformed::default());
    }
    let frame: V1Frame<'_> = serde_json::from_str(text).map_err(|_| Malformed::default())?;
    let msg_ref = frame.msg_ref.and_then(non_null);
    // v1 clients may omit join_ref: the server uses `join_ref || ref`.
    let join_ref = frame.join_ref.and_then(non_null).or(msg_ref);
    let malformed = Malformed {
        join_ref,
        msg_ref,
        topic: frame.topic.map(|t| t.get()),
    };
    let string =
        |raw: Option<&RawValue>| raw.and_then(|r| serde_json::from_str::<String>(r.get()).ok());
    match (string(frame.topic), string(frame.event), frame.payload) {
        (Some(topic), Some(event), Some(payload)) => Ok(InFrame {
            join_ref,
            msg_ref,
            topic,
            event,
            payload: payload.get(),
        }),
        _ => Err(malformed),
    }
}

/// Removes the insignificant whitespace of valid JSON text, keeping key order and number
/// spelling, so deliveries carry compact JSON (as Phoenix's re-encoding does).
pub fn compact(json: &str) -> std::borrow::Cow<'_, str> {
    let bytes = json.as_bytes();
    let is_ws = |b: u8| matches!(b, b' ' | b'\n' | b'\r' | b'\t');
    if !bytes.iter().copied().any(is_ws) {
        return std::borrow::Cow::Borrowed(json);
    }
    // Works on bytes: every byte JSON gives meaning to is ASCII, and the bytes of a
    // multi-byte UTF-8 character are all >= 0x80, so they are copied untouched.
    let mut out = Vec::with_capacity(bytes.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if b == b'"' {
            in_string = true;
        } else if is_ws(b) {
            continue;
        }
        out.push(b);
    }
    std::borrow::Cow::Owned(String::from_utf8(out).expect("only ASCII whitespace was removed"))
}

/// JSON text of a string.
pub fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("strings always serialize")
}

fn or_null(raw: Option<&str>) -> &str {
    raw.unwrap_or("null")
}

/// Encodes a server message with raw JSON parts: `topic` is raw JSON too.
fn message(
    vsn: Vsn,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    event: &str,
    payload: &str,
) -> String {
    let event = json_string(event);
    match vsn {
        Vsn::V2 => format!(
            "[{},{},{topic},{event},{payload}]",
            or_null(join_ref),
            or_null(msg_ref)
        ),
        Vsn::V1 => format!(
            r#"{{"topic":{topic},"event":{event},"payload":{payload},"ref":{}}}"#,
            or_null(msg_ref)
        ),
    }
}

/// `phx_reply` to a request: `status` is `ok` or `error`, `response` raw JSON.
pub fn reply(
    vsn: Vsn,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    status: &str,
    response: &str,
) -> String {
    let payload = format!(
        r#"{{"status":{},"response":{response}}}"#,
        json_string(status)
    );
    message(
        vsn,
        join_ref,
        msg_ref,
        &json_string(topic),
        "phx_reply",
        &payload,
    )
}

/// The `{"reason": reason}` object of error replies and `phx_error`.
/// A topic position as join and publish replies carry it: `{"epoch":"<16 hex>","offset":N}`,
/// plus `"recovered"` when the join asked to recover.
pub fn position(epoch: u64, offset: u64, recovered: Option<bool>) -> String {
    match recovered {
        Some(recovered) => {
            format!(r#"{{"epoch":"{epoch:016x}","offset":{offset},"recovered":{recovered}}}"#)
        }
        None => format!(r#"{{"epoch":"{epoch:016x}","offset":{offset}}}"#),
    }
}

fn reason_object(reason: &str) -> String {
    format!(r#"{{"reason":{}}}"#, json_string(reason))
}

/// An error reply carrying `{"reason": reason}`.
pub fn error_reply(
    vsn: Vsn,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    reason: &str,
) -> String {
    reply(
        vsn,
        join_ref,
        msg_ref,
        topic,
        "error",
        &reason_object(reason),
    )
}

/// The error reply to a malformed frame, echoing what could be read of it.
pub fn malformed_reply(vsn: Vsn, frame: &Malformed<'_>) -> Option<String> {
    let msg_ref = frame.msg_ref?;
    let payload = r#"{"status":"error","response":{"reason":"malformed frame"}}"#;
    Some(message(
        vsn,
        frame.join_ref,
        Some(msg_ref),
        frame.topic.unwrap_or("null"),
        "phx_reply",
        payload,
    ))
}

/// `phx_close` for a channel: `[join_ref, join_ref, topic, "phx_close", {}]`.
pub fn close(vsn: Vsn, join_ref: Option<&str>, topic: &str) -> String {
    message(
        vsn,
        join_ref,
        join_ref,
        &json_string(topic),
        "phx_close",
        "{}",
    )
}

/// `phx_error` for an interrupted channel: `[join_ref, join_ref, topic, "phx_error", {"reason"}]`.
pub fn channel_error(vsn: Vsn, join_ref: Option<&str>, topic: &str, reason: &str) -> String {
    message(
        vsn,
        join_ref,
        join_ref,
        &json_string(topic),
        "phx_error",
        &reason_object(reason),
    )
}

/// One delivered message, encoded once per distinct receiver join_ref: everything after the
/// join_ref is built once and shared.
#[derive(Debug)]
pub struct DeliveryFrame {
    /// v2: `,null,"topic","event",payload]`.
    v2_tail: String,
    topic: String,
    event: String,
    payload_len: usize,
}

impl DeliveryFrame {
    pub fn new(topic: &str, event: &str, payload: &str) -> Self {
        let topic = json_string(topic);
        let event = json_string(event);
        let mut v2_tail = String::with_capacity(topic.len() + event.len() + payload.len() + 9);
        v2_tail.push_str(",null,");
        v2_tail.push_str(&topic);
        v2_tail.push(',');
        v2_tail.push_str(&event);
        v2_tail.push(',');
        v2_tail.push_str(payload);
        v2_tail.push(']');
        DeliveryFrame {
            v2_tail,
            topic,
            event,
            payload_len: payload.len(),
        }
    }

    /// The frame for receivers whose channel joined with `join_ref` (raw JSON), or for v1
    /// receivers when `vsn` is V1 (which carry no join_ref).
    pub fn encode(&self, vsn: Vsn, join_ref: Option<&str>) -> String {
        match vsn {
            Vsn::V2 => {
                let join_ref = or_null(join_ref);
                let mut out = String::with_capacity(1 + join_ref.len() + self.v2_tail.len());
                out.push('[');
                out.push_str(join_ref);
                out.push_str(&self.v2_tail);
                out
            }
            Vsn::V1 => {
                let payload = &self.v2_tail
                    [self.v2_tail.len() - 1 - self.payload_len..self.v2_tail.len() - 1];
                format!(
                    r#"{{"topic":{},"event":{},"payload":{payload},"ref":null}}"#,
                    self.topic, self.event
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).unwrap_or_else(|e| panic!("server frame is not JSON ({e}): {s}"))
    }

    #[test]
    fn compact_strips_only_insignificant_whitespace() {
        assert_eq!(
            compact(r#"{ "message": "red pill or blue pill?"}"#),
            r#"{"message":"red pill or blue pill?"}"#
        );
        assert_eq!(compact("[1, 2,\n 3]"), "[1,2,3]");
        assert_eq!(compact(r#" "a \" b " "#), r#""a \" b ""#);
        assert_eq!(compact(r#"{"z":1,"a":[ ]}"#), r#"{"z":1,"a":[]}"#);
        assert!(matches!(compact("[1,2]"), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn vsn_selection() {
        assert_eq!(Vsn::from_query(None), Ok(Vsn::V1));
        assert_eq!(Vsn::from_query(Some("1.0.0")), Ok(Vsn::V1));
        assert_eq!(Vsn::from_query(Some("2.0.0")), Ok(Vsn::V2));
        assert!(Vsn::from_query(Some("3.0.0")).is_err());
        assert!(Vsn::from_query(Some("")).is_err());
    }

    #[test]
    fn decodes_the_seed_frames() {
        let join = decode(Vsn::V2, r#"["1","1","topics:matrix","phx_join",{}]"#).unwrap();
        assert_eq!(join.join_ref, Some(r#""1""#));
        assert_eq!(join.msg_ref, Some(r#""1""#));
        assert_eq!(join.topic, "topics:matrix");
        assert_eq!(join.event, "phx_join");
        assert_eq!(join.payload, "{}");
        let hb = decode(Vsn::V2, r#"[null,"3","phoenix","heartbeat",{}]"#).unwrap();
        assert_eq!(hb.join_ref, None);
        let publish = decode(
            Vsn::V2,
            r#"["1", "2", "topics:matrix", "publish", ["event", { "message": "red pill or blue pill?"}]]"#,
        )
        .unwrap();
        assert_eq!(
            publish.payload,
            r#"["event", { "message": "red pill or blue pill?"}]"#
        );
    }

    #[test]
    fn extra_elements_are_ignored() {
        let f = decode(Vsn::V2, r#"["1","2","t","e",{},"extra",7]"#).unwrap();
        assert_eq!(f.payload, "{}");
    }

    #[test]
    fn v1_uses_join_ref_or_ref() {
        let f = decode(
            Vsn::V1,
            r#"{"topic":"t","event":"phx_join","payload":{},"ref":"5"}"#,
        )
        .unwrap();
        assert_eq!((f.join_ref, f.msg_ref), (Some(r#""5""#), Some(r#""5""#)));
        let f = decode(
            Vsn::V1,
            r#"{"topic":"t","event":"e","payload":1,"ref":"6","join_ref":"2"}"#,
        )
        .unwrap();
        assert_eq!(
            (f.join_ref, f.msg_ref, f.payload),
            (Some(r#""2""#), Some(r#""6""#), "1")
        );
    }

    #[test]
    fn every_malformed_case() {
        let cases: &[(Vsn, &str, Option<&str>)] = &[
            (Vsn::V2, "not json", None),
            (Vsn::V2, "", None),
            (Vsn::V2, r#"{"topic":"t"}"#, None),
            (Vsn::V2, r#"["1","2","t","e"]"#, Some(r#""2""#)),
            (Vsn::V2, r#"["1"]"#, None),
            (Vsn::V2, r#"[]"#, None),
            (Vsn::V2, r#"["1","2",5,"e",{}]"#, Some(r#""2""#)),
            (Vsn::V2, r#"["1","2","t",null,{}]"#, Some(r#""2""#)),
            (Vsn::V2, r#"["1","2",["t"],"e",{}]"#, Some(r#""2""#)),
            (Vsn::V2, r#"["1","2","t","e",{}"#, None),
            (Vsn::V1, r#"["1","2","t","e",{}]"#, None),
            (
                Vsn::V1,
                r#"{"topic":"t","event":"e","ref":"1"}"#,
                Some(r#""1""#),
            ),
            (
                Vsn::V1,
                r#"{"topic":1,"event":"e","payload":{},"ref":"1"}"#,
                Some(r#""1""#),
            ),
            (Vsn::V1, r#"{"event":"e","payload":{}}"#, None),
        ];
        for (vsn, text, msg_ref) in cases {
            let err = decode(*vsn, text).expect_err(text);
            assert_eq!(err.msg_ref, *msg_ref, "{text}");
            match malformed_reply(*vsn, &err) {
                Some(reply) => {
                    let v = parse(&reply);
                    let payload = if *vsn == Vsn::V2 {
                        &v[4]
                    } else {
                        &v["payload"]
                    };
                    assert_eq!(
                        payload,
                        &json!({"status":"error","response":{"reason":"malformed frame"}})
                    );
                }
                None => assert!(msg_ref.is_none()),
            }
        }
    }

    #[test]
    fn encodes_the_seed_transcript() {
        let j = Some(r#""1""#);
        assert_eq!(
            reply(Vsn::V2, j, Some(r#""3""#), "topics:matrix", "ok", "{}"),
            r#"["1","3","topics:matrix","phx_reply",{"status":"ok","response":{}}]"#
        );
        assert_eq!(
            close(Vsn::V2, j, "topics:matrix"),
            r#"["1","1","topics:matrix","phx_close",{}]"#
        );
        let d = DeliveryFrame::new(
            "topics:matrix",
            "event",
            r#"{"message":"red pill or blue pill?"}"#,
        );
        assert_eq!(
            d.encode(Vsn::V2, j),
            r#"["1",null,"topics:matrix","event",{"message":"red pill or blue pill?"}]"#
        );
        assert_eq!(
            d.encode(Vsn::V1, j),
            r#"{"topic":"topics:matrix","event":"event","payload":{"message":"red pill or blue pill?"},"ref":null}"#
        );
        assert_eq!(
            channel_error(Vsn::V2, j, "t", "owner lost"),
            r#"["1","1","t","phx_error",{"reason":"owner lost"}]"#
        );
        assert_eq!(
            error_reply(Vsn::V1, j, Some(r#""9""#), "t", "unmatched topic"),
            r#"{"topic":"t","event":"phx_reply","payload":{"status":"error","response":{"reason":"unmatched topic"}},"ref":"9"}"#
        );
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            ".*".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(".*", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn client_ref() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            "[0-9]{1,6}".prop_map(Value::String),
            ".*".prop_map(Value::String)
        ]
    }

    proptest! {
        #[test]
        fn v2_frames_round_trip(join_ref in client_ref(), msg_ref in client_ref(), topic in ".*", event in ".*", payload in json_value()) {
            let text = serde_json::to_string(&json!([join_ref, msg_ref, topic, event, payload])).unwrap();
            let f = decode(Vsn::V2, &text).unwrap();
            prop_assert_eq!(&f.topic, &topic);
            prop_assert_eq!(&f.event, &event);
            prop_assert_eq!(parse(f.payload), payload.clone());
            prop_assert_eq!(f.join_ref.map(parse), (!join_ref.is_null()).then_some(join_ref.clone()));
            // What the server sends back decodes to the same parts.
            let out = DeliveryFrame::new(&f.topic, &f.event, f.payload).encode(Vsn::V2, f.join_ref);
            prop_assert_eq!(parse(&out), json!([join_ref, null, topic, event, payload]));
            let pretty = serde_json::to_string_pretty(&payload).unwrap();
            prop_assert_eq!(parse(&compact(&pretty)), payload.clone());
            prop_assert_eq!(compact(&pretty), serde_json::to_string(&payload).unwrap());
        }

        #[test]
        fn v1_frames_round_trip(msg_ref in client_ref(), topic in ".*", event in ".*", payload in json_value()) {
            let text = serde_json::to_string(&json!({"topic": topic, "event": event, "payload": payload, "ref": msg_ref})).unwrap();
            let f = decode(Vsn::V1, &text).unwrap();
            prop_assert_eq!((&f.topic, &f.event), (&topic, &event));
            let out = DeliveryFrame::new(&f.topic, &f.event, f.payload).encode(Vsn::V1, f.join_ref);
            prop_assert_eq!(parse(&out), json!({"topic": topic, "event": event, "payload": payload, "ref": null}));
            let r = reply(Vsn::V1, f.join_ref, f.msg_ref, &f.topic, "ok", "{}");
            prop_assert_eq!(parse(&r)["ref"].clone(), msg_ref);
        }

        #[test]
        fn arbitrary_text_never_panics(text in ".*") {
            for vsn in [Vsn::V1, Vsn::V2] {
                if let Err(m) = decode(vsn, &text)
                    && let Some(r) = malformed_reply(vsn, &m)
                {
                    parse(&r);
                }
            }
        }
    }
}
