//! The client-facing parsers fed generated input at scale: the frame decoder (v1 and v2),
//! a join's recovery position, what a push broadcasts, and payload compaction. No input may
//! panic, and what is accepted must be consistent: a decoded frame's parts come from the
//! text, a compacted payload is the same JSON value.
//!
//! `RINGCAST_FUZZ_CASES` sets the number of generated inputs per property (default 250,000:
//! a million in all, some seconds here); the closing notes report runs of more.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use ringcast_gateway::codec::{self, Vsn};
use ringcast_gateway::session::{broadcast_of, parse_recover};

fn cases() -> u32 {
    std::env::var("RINGCAST_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(250_000)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

/// JSON-ish values: what a client might put in a frame, well formed or not.
fn json_value() -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| n.to_string()),
        "[a-z0-9:_\\\\\"\u{0}-\u{1f}\u{e9}\u{1F600}]{0,12}".prop_map(|s| format!("\"{s}\"")),
        "[\\[\\]{}:,\" a-z0-9]{0,8}",
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec(("[a-z]{0,6}", inner), 0..5).prop_map(|kv| {
                let fields: Vec<String> = kv
                    .into_iter()
                    .map(|(k, v)| format!("\"{k}\":{v}"))
                    .collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    })
    .boxed()
}

/// Frames shaped like Phoenix frames (v2 arrays, v1 objects), with any parts.
fn frame_like() -> BoxedStrategy<String> {
    let event: BoxedStrategy<String> = prop_oneof![
        Just("phx_join".to_owned()),
        Just("phx_leave".to_owned()),
        Just("publish".to_owned()),
        Just("heartbeat".to_owned()),
        "[a-z_]{0,10}",
    ]
    .boxed();
    let part = json_value();
    prop_oneof![
        (
            part.clone(),
            part.clone(),
            "[a-z:0-9]{0,10}",
            event.clone(),
            part.clone()
        )
            .prop_map(|(j, r, t, e, p)| format!("[{j},{r},\"{t}\",\"{e}\",{p}]")),
        ("[a-z:0-9]{0,10}", event, part.clone(), part).prop_map(|(t, e, p, r)| format!(
            r#"{{"topic":"{t}","event":"{e}","payload":{p},"ref":{r}}}"#
        )),
    ]
    .boxed()
}

/// Any text at all, frame-shaped text, and frame-shaped text cut or spliced.
fn input() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        frame_like(),
        (frame_like(), any::<prop::sample::Index>()).prop_map(|(f, cut)| {
            let mut at = cut.index(f.len() + 1);
            while !f.is_char_boundary(at) {
                at -= 1;
            }
            f[..at].to_owned()
        }),
    ]
}

#[test]
fn the_frame_decoder_takes_anything_without_panicking() {
    let decoded = std::sync::atomic::AtomicU64::new(0);
    runner()
        .run(&input(), |text| {
            for vsn in [Vsn::V1, Vsn::V2] {
                match codec::decode(vsn, &text) {
                    Ok(frame) => {
                        decoded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        // Every part it hands on was in the text.
                        prop_assert!(text.contains(frame.payload));
                    }
                    Err(malformed) => {
                        if let Some(reply) = codec::malformed_reply(vsn, &malformed) {
                            prop_assert!(serde_json::from_str::<serde_json::Value>(&reply).is_ok());
                        }
                    }
                }
            }
            Ok(())
        })
        .unwrap();
    let decoded = decoded.into_inner();
    eprintln!("{} inputs, {decoded} decoded as frames, 0 panics", cases());
}

#[test]
fn join_and_publish_parsing_takes_anything_without_panicking() {
    runner()
        .run(
            &(json_value(), "[a-z_]{0,12}", any::<String>()),
            |(payload, event, junk)| {
                for text in [payload.as_str(), junk.as_str()] {
                    let _ = parse_recover(text);
                    if let Ok((event, body)) = broadcast_of(&event, text) {
                        prop_assert!(!event.starts_with("phx_"));
                        // What is broadcast compacts to the same JSON value.
                        let compact = codec::compact(body);
                        let (a, b) = (
                            serde_json::from_str::<serde_json::Value>(body),
                            serde_json::from_str::<serde_json::Value>(&compact),
                        );
                        if let Ok(a) = a {
                            prop_assert_eq!(Ok(a), b.map_err(|_| ()));
                        }
                    }
                    let wrapped = format!(r#"{{"recover":{text}}}"#);
                    let _ = parse_recover(&wrapped);
                    let publish = format!(r#"["{event}",{text}]"#);
                    let _ = broadcast_of("publish", &publish);
                }
                Ok(())
            },
        )
        .unwrap();
    eprintln!(
        "{} inputs through join and publish parsing, 0 panics",
        cases()
    );
}
