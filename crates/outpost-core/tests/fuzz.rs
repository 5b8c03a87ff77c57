//! Property-based fuzzing of what reaches a node from outside (issue 11, step 6): the link's batch
//! frame decoder, the link's JSON messages and events, and the configuration loader. Nightly-only
//! `cargo fuzz` cannot build with this project's stable toolchain, so these run as proptest
//! properties on every `cargo test`: arbitrary bytes, and valid inputs mutated (bytes flipped,
//! truncated, extended). `PROPTEST_CASES=N` runs more; docs/reliability.md says what ran.
//!
//! Every target checks the same promise: bad input is refused with an error, never a panic, and
//! what is accepted means exactly what it says (a decoded frame encodes back to the same bytes).

use bytes::Bytes;
use outpost_core::config::{Config, Flags, Role};
use outpost_core::wire::{Batch, BatchAck, BatchMessage, EdgeReport, GapError, Hello, LinkEvent};
use proptest::prelude::*;

const MAX_MESSAGE_BYTES: u64 = 4096;
const MAX_MESSAGES: u32 = 64;

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9._-]{0,20}"
}

fn batch() -> impl Strategy<Value = Batch> {
    (
        name(),
        1u64..u64::MAX / 2,
        prop::collection::vec(
            ("[a-zA-Z0-9-]{1,40}", "[a-z/+.-]{0,30}", prop::collection::vec(any::<u8>(), 0..200)),
            1..8,
        ),
    )
        .prop_map(|(queue, first_seq, messages)| Batch {
            queue,
            messages: messages
                .into_iter()
                .enumerate()
                .map(|(i, (id, content_type, payload))| BatchMessage {
                    seq: first_seq + i as u64,
                    id,
                    content_type,
                    payload: Bytes::from(payload),
                })
                .collect(),
        })
}

/// A way to damage a valid input.
#[derive(Debug, Clone)]
enum Mutation {
    Set { at: usize, byte: u8 },
    Truncate { at: usize },
    Extend { bytes: Vec<u8> },
    Splice { at: usize, bytes: Vec<u8> },
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let one = prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        1 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        1 => prop::collection::vec(any::<u8>(), 1..16).prop_map(|bytes| Mutation::Extend { bytes }),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Mutation::Splice { at, bytes }),
    ];
    prop::collection::vec(one, 1..4)
}

fn mutate(mut input: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        match m {
            Mutation::Set { at, byte } if !input.is_empty() => {
                let at = at % input.len();
                input[at] = *byte;
            }
            Mutation::Truncate { at } if !input.is_empty() => input.truncate(at % input.len()),
            Mutation::Extend { bytes } => input.extend_from_slice(bytes),
            Mutation::Splice { at, bytes } => {
                let at = at % (input.len() + 1);
                input.splice(at..at, bytes.iter().copied());
            }
            _ => {}
        }
    }
    input
}

/// Decodes and, when accepted, checks that the frame says exactly what was decoded.
fn decode_checked(frame: &[u8]) {
    let frame = Bytes::copy_from_slice(frame);
    if let Ok(batch) = Batch::decode(&frame, MAX_MESSAGE_BYTES, MAX_MESSAGES) {
        assert!(!batch.messages.is_empty() && batch.messages.len() <= MAX_MESSAGES as usize);
        assert!(batch.messages.windows(2).all(|w| w[1].seq == w[0].seq + 1), "consecutive seqs");
        assert!(batch.messages.iter().all(|m| m.seq > 0 && m.payload.len() as u64 <= MAX_MESSAGE_BYTES));
        assert_eq!(batch.encode(), frame.to_vec(), "an accepted frame is canonical");
    }
}

proptest! {
    #![proptest_config(cases(2_000))]

    #[test]
    fn valid_frames_decode_to_what_was_encoded(batch in batch()) {
        let frame = Bytes::from(batch.encode());
        let decoded = Batch::decode(&frame, MAX_MESSAGE_BYTES, MAX_MESSAGES).unwrap();
        prop_assert_eq!(decoded, batch);
    }

    #[test]
    fn damaged_frames_are_refused_or_mean_what_they_say(batch in batch(), damage in mutations()) {
        decode_checked(&mutate(batch.encode(), &damage));
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_frame_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_checked(&bytes);
        // With the magic in front the decoder gets past the first check.
        let mut framed = b"OPB1".to_vec();
        framed.extend_from_slice(&bytes);
        decode_checked(&framed);
    }

    #[test]
    fn damaged_link_json_is_refused_without_panicking(damage in mutations(), pick in 0usize..4) {
        let ping = LinkEvent::Ping { at_ms: 1_700_000_000_000, downlink: [("prices".to_string(), 3)].into() };
        let samples = [
            serde_json::to_vec(&ping).unwrap(),
            br#"{"type":"welcome","central_id":"hq","maintenance":false,"positions":{"orders":12}}"#.to_vec(),
            br#"{"stored_through":10,"stored":5,"duplicates":0}"#.to_vec(),
            br#"{"expected_seq":7}"#.to_vec(),
        ];
        let input = mutate(samples[pick].clone(), &damage);
        let _ = serde_json::from_slice::<LinkEvent>(&input);
        let _ = serde_json::from_slice::<Hello>(&input);
        let _ = serde_json::from_slice::<EdgeReport>(&input);
        let _ = serde_json::from_slice::<BatchAck>(&input);
        let _ = serde_json::from_slice::<GapError>(&input);
    }
}

/// Keys of every section with values of every type, some valid and most not.
fn config_text() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "listen",
        "data_dir",
        "node_id",
        "upstream",
        "[auth] token",
        "[auth] admin_token",
        "[limits] max_message_bytes",
        "[limits] max_batch_messages",
        "[limits] max_store_bytes",
        "[limits] message_ttl",
        "[limits] max_queues",
        "[limits] idempotency_ttl",
        "[limits] max_connections",
        "[limits] request_timeout",
        "[connectivity] ping_interval",
        "[connectivity] missed_pings",
        "[connectivity] failed_transition_wait",
        "[failover] connect_timeout",
        "[forwarding] batch_max_messages",
        "[tls] cert_file",
        "[[upstream]] url",
        "[[route]] name",
        "[[route]] urls",
        "[[route]] max_attempts",
        "[[edge]] id",
        "[[queue]] name",
        "[postgres] url",
        "[unknown] key",
    ]);
    let value = prop_oneof![
        Just("\"1s\"".to_string()),
        Just("\"10GiB\"".to_string()),
        Just("\"-5m\"".to_string()),
        Just("\"http://127.0.0.1:7401\"".to_string()),
        Just("\"\"".to_string()),
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("18446744073709551615".to_string()),
        Just("true".to_string()),
        Just("[\"a\", 1]".to_string()),
        Just("{ x = 1 }".to_string()),
        Just("1.5".to_string()),
        "\"[ -~]{0,12}\"".prop_map(|s| s.replace('\\', "/")),
        "[0-9]{1,25}",
    ];
    prop::collection::vec((key, value), 0..8).prop_map(|pairs| {
        let mut text = String::new();
        for (key, value) in pairs {
            match key.split_once(' ') {
                Some((section, key)) => text.push_str(&format!("\n{section}\n{key} = {value}\n")),
                None => text.insert_str(0, &format!("{key} = {value}\n")),
            }
        }
        text
    })
}

proptest! {
    #![proptest_config(cases(500))]

    #[test]
    fn the_config_loader_refuses_bad_files_with_a_message_never_a_panic(
        text in prop_oneof![config_text(), "[ -~\n]{0,200}"],
        central in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outpost.toml");
        std::fs::write(&path, &text).unwrap();
        let flags = Flags { config_file: Some(path), ..Flags::default() };
        let role = if central { Role::Central } else { Role::Edge };
        if let Err(error) = Config::load_from(role, &flags, &[]) {
            let message = error.to_string();
            prop_assert!(!message.trim().is_empty());
            // Internal type names (RawLimits, RawRoute, ...) must not leak; the file's own path may
            // contain anything.
            let leaked = message.match_indices("Raw").any(|(at, _)| {
                message[at + 3..].starts_with(|c: char| c.is_ascii_uppercase())
            });
            prop_assert!(!leaked, "an internal type name leaked: {}", message);
        }
    }
}
