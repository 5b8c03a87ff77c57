//! What a simulated edge sends: its messages' ids and payloads (derived from edge, queue and seq,
//! so the verifier can recompute them) and the binary batch frame of the link protocol, written
//! here from the protocol's description rather than borrowed from the node's own encoder.
//!
//! ```text
//! "OPB1" | u16 queue_len | queue | u32 count |
//!   count × ( u64 seq | u8 id_len | id | u16 content_type_len | content_type | u32 payload_len | payload )
//! ```
//! All integers big-endian (`outpost_core::wire`, `Batch::encode`).

pub const CONTENT_TYPE: &str = "application/json";

/// The id of message `seq` of (`edge`, `queue`); unique across a run.
pub fn message_id(edge: &str, queue: &str, seq: u64) -> String {
    format!("{edge}.{queue}.{seq}")
}

/// The payload of message `seq` of (`edge`, `queue`): a JSON object naming all three, padded with
/// a field of `x` up to `size` bytes (longer when `size` is smaller than the object itself).
pub fn payload(edge: &str, queue: &str, seq: u64, size: usize) -> Vec<u8> {
    let head = format!("{{\"edge\":\"{edge}\",\"queue\":\"{queue}\",\"seq\":{seq},\"pad\":\"");
    let pad = size.saturating_sub(head.len() + 2);
    let mut out = Vec::with_capacity(head.len() + pad + 2);
    out.extend_from_slice(head.as_bytes());
    out.resize(head.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
    out
}

/// The frame of messages `first_seq..=last_seq` of (`edge`, `queue`).
pub fn encode_batch(edge: &str, queue: &str, first_seq: u64, last_seq: u64, size: usize) -> Vec<u8> {
    assert!(first_seq >= 1 && first_seq <= last_seq, "a batch holds seqs {first_seq}..={last_seq}");
    let count = last_seq - first_seq + 1;
    let mut out = Vec::with_capacity(10 + queue.len() + count as usize * (size + 80));
    out.extend_from_slice(b"OPB1");
    out.extend_from_slice(&(queue.len() as u16).to_be_bytes());
    out.extend_from_slice(queue.as_bytes());
    out.extend_from_slice(&(count as u32).to_be_bytes());
    for seq in first_seq..=last_seq {
        let id = message_id(edge, queue, seq);
        let body = payload(edge, queue, seq, size);
        out.extend_from_slice(&seq.to_be_bytes());
        out.push(u8::try_from(id.len()).expect("simulated ids are short"));
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&(CONTENT_TYPE.len() as u16).to_be_bytes());
        out.extend_from_slice(CONTENT_TYPE.as_bytes());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_has_the_asked_size_and_names_its_message() {
        let p = payload("sim-1", "q0", 42, 200);
        assert_eq!(p.len(), 200);
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(
            (v["edge"].as_str(), v["queue"].as_str(), v["seq"].as_u64()),
            (Some("sim-1"), Some("q0"), Some(42))
        );
        // Smaller than the object: the object, unpadded.
        assert!(serde_json::from_slice::<serde_json::Value>(&payload("e", "q", 1, 3)).is_ok());
    }

    #[test]
    fn frame_layout() {
        let frame = encode_batch("e", "q", 7, 8, 10);
        assert_eq!(&frame[..4], b"OPB1");
        assert_eq!(&frame[4..6], &1u16.to_be_bytes());
        assert_eq!(frame[6], b'q');
        assert_eq!(&frame[7..11], &2u32.to_be_bytes());
        assert_eq!(&frame[11..19], &7u64.to_be_bytes());
        let id = message_id("e", "q", 7);
        assert_eq!(frame[19] as usize, id.len());
    }

    #[test]
    fn the_nodes_decoder_reads_it() {
        let frame = bytes::Bytes::from(encode_batch("sim-1", "q3", 5, 9, 120));
        let batch = outpost_core::wire::Batch::decode(&frame, 1 << 20, 1000).unwrap();
        assert_eq!(batch.queue, "q3");
        assert_eq!(batch.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![5, 6, 7, 8, 9]);
        assert_eq!(batch.messages[2].id, message_id("sim-1", "q3", 7));
        assert_eq!(batch.messages[2].content_type, CONTENT_TYPE);
        assert_eq!(batch.messages[2].payload.as_ref(), payload("sim-1", "q3", 7, 120).as_slice());
    }
}
