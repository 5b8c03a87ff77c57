//! The edge ↔ central link protocol: paths, JSON shapes and the binary batch frame.
//!
//! The edge opens every connection (edges sit behind NAT and firewalls; the central never dials an
//! edge):
//!
//! - `POST /v1/link` with a [`Hello`] is the handshake (it may name ranges the edge released
//!   without forwarding, which the central records as released). The answer is a long-lived NDJSON stream of
//!   [`LinkEvent`]s: first `welcome` (the central's id, whether it is in maintenance, and the
//!   highest edge seq it holds per queue of this edge), then `ping` every `ping_interval` the edge
//!   asked for, `transition_online` when an operator triggers it at the central, `maintenance`
//!   when that changes. When the stream ends the edge knows at once that the link is lost.
//! - `POST /v1/link/messages` carries one [`Batch`] of one queue in the binary frame below. The
//!   central stores each (edge, queue, edge seq) exactly once and in order, and answers
//!   [`BatchAck`], or 409 with [`GapError`] when the batch starts past what it holds.
//! - `POST /v1/link/report` sends the edge's [`EdgeReport`] (state, backlog, offline log).
//! - `GET /v1/link/probe` is the cheap reachability check an offline edge makes.
//! - `GET /v1/link/downlink?queue=Q&after_seq=N&limit=L` (downlink, central → edge): the edge
//!   says it durably holds its downlink of `Q` through the central's seq `N` (the central moves
//!   its position for this edge there) and gets the next messages after `N` as a [`Batch`] frame
//!   (200) or 204 when nothing more waits. The central says what waits — a map queue → highest
//!   seq posted — in `welcome.downlink`, in a `downlink` event as soon as something is posted
//!   (whichever central of the cluster it was posted to), and in every `ping` while anything waits.
//!
//! **Compression.** [`Hello::batch_encodings`] offers encodings of batch frames; the welcome's
//! `batch_encoding` names the one the central agreed on. Then batches carry `Content-Encoding:
//! zstd` ([`compress_frame`]) and downlink pulls ask for it with `Accept-Encoding`; the receiver
//! decompresses within the same bound as a plain frame ([`decompress_frame`]). A central answers
//! 415 to an encoding it did not agree on.
//!
//! **Skip entries.** A [`BatchMessage`] with content type [`SKIP_CONTENT_TYPE`] (and no payload)
//! holds a seq without a message: the receiver advances its position over it and stores nothing.
//! The edge's forwarder sends one for every downlink message of a queue (those are never forwarded
//! back up, yet the central needs the edge's seqs without gaps); the central sends one for a
//! downlink message that expired before the edge took it.
//!
//! Every request carries `Authorization: Bearer <edge token>` (when the central lists edges) and
//! the header [`EDGE_ID_HEADER`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::status::OfflineLogEntry;

pub const LINK_PATH: &str = "/v1/link";
pub const LINK_MESSAGES_PATH: &str = "/v1/link/messages";
pub const LINK_REPORT_PATH: &str = "/v1/link/report";
pub const LINK_PROBE_PATH: &str = "/v1/link/probe";
pub const EDGE_ID_HEADER: &str = "outpost-edge-id";
pub const BATCH_CONTENT_TYPE: &str = "application/vnd.outpost.batch.v1";
pub const LINK_DOWNLINK_PATH: &str = "/v1/link/downlink";
/// The content type of a skip entry of a batch (see the module doc).
pub const SKIP_CONTENT_TYPE: &str = "application/vnd.outpost.skip";

/// The handshake an edge sends to open its link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub edge_id: String,
    pub version: String,
    /// How often the edge wants a ping, in milliseconds (its `connectivity.ping_interval`).
    pub ping_interval_ms: u64,
    /// The edge's `connectivity.missed_pings`: the central counts an edge silent for
    /// `missed_pings × ping_interval` as gone. Absent (older edges): the central's own setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed_pings: Option<u32>,
    pub report: EdgeReport,
    /// Per queue, the seq through which this edge released messages it never forwarded (its
    /// routes delivered them while it had no central). The central records that range as the
    /// edge's explicit release instead of waiting for it: see CONTRACT 4.4.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub released_unforwarded: std::collections::BTreeMap<String, u64>,
    /// Encodings of batch frames this edge can send and read, best first (`"zstd"`); a central
    /// that knows none of them (or an older one, which ignores the field) gets plain frames.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub batch_encodings: Vec<String>,
}

/// What an edge tells its central about itself; shown by the central in `GET /v1/edges`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeReport {
    pub state: String,
    pub state_since_ms: i64,
    pub upstream_url: Option<String>,
    pub backlog_messages: u64,
    pub offline_log: Vec<OfflineLogEntry>,
}

/// One line of the link stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LinkEvent {
    Welcome {
        central_id: String,
        maintenance: bool,
        /// Highest edge seq the central holds, per queue of this edge (absent: none).
        positions: BTreeMap<String, u64>,
        /// Downlink waiting for this edge: queue → highest seq posted (absent: nothing waits).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        downlink: BTreeMap<String, u64>,
        /// The encoding of batch frames agreed for this link (one the edge offered), both ways:
        /// batches up carry `Content-Encoding` with it, downlink frames come back in it. Absent:
        /// plain frames.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        batch_encoding: Option<String>,
    },
    Ping {
        at_ms: i64,
        /// Downlink still waiting for this edge (the safety net of the `downlink` event).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        downlink: BTreeMap<String, u64>,
    },
    /// Something was posted for this edge: queue → highest seq posted.
    Downlink {
        queues: BTreeMap<String, u64>,
    },
    TransitionOnline,
    Maintenance {
        enabled: bool,
    },
}

/// The central's answer to a stored batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchAck {
    pub queue: String,
    /// Highest edge seq of this queue the central now holds.
    pub stored_through: u64,
    pub stored: u64,
    pub duplicates: u64,
}

/// The body of a 409 answer: the batch started after a gap; resend from `expected_seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GapError {
    pub expected_seq: u64,
}

/// The body of every error answer of the API, the link's included: `{"error": {"code", "message"}}`.
/// An edge decides on `code` (e.g. [`MAINTENANCE_ERROR_CODE`]), never on the text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorAnswer {
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorAnswer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable and machine-readable.
    pub code: String,
    /// For people: what went wrong and what to do.
    pub message: String,
}

impl ErrorAnswer {
    /// The error of an answer's body; `None` when it is not this shape (a proxy's page, say).
    pub fn parse(body: &[u8]) -> Option<ErrorAnswer> {
        serde_json::from_slice(body).ok()
    }
}

/// The `code` of the 503 a central in maintenance answers to the link's requests.
pub const MAINTENANCE_ERROR_CODE: &str = "maintenance";

/// The probe answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeAnswer {
    pub central_id: String,
    pub maintenance: bool,
    /// An operator asked for this edge to transition to online while it was not connected; the
    /// probe delivers the trigger (so it reaches an edge waiting out `failed_transition_wait`).
    #[serde(default)]
    pub transition_requested: bool,
}

/// One message inside a [`Batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchMessage {
    pub seq: u64,
    pub id: String,
    pub content_type: String,
    pub payload: bytes::Bytes,
}

impl BatchMessage {
    /// A skip entry: `seq` is taken, no message is stored for it.
    pub fn skip(seq: u64, id: String) -> BatchMessage {
        BatchMessage { seq, id, content_type: SKIP_CONTENT_TYPE.to_string(), payload: bytes::Bytes::new() }
    }

    /// True for a skip entry.
    pub fn is_skip(&self) -> bool {
        self.content_type == SKIP_CONTENT_TYPE
    }
}

/// Consecutive messages of one queue of one edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub queue: String,
    pub messages: Vec<BatchMessage>,
}

/// Why a batch frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed batch frame: {0}")]
pub struct FrameError(pub String);

const FRAME_MAGIC: &[u8; 4] = b"OPB1";

/// The batch frame encoding the link may agree on besides plain frames (`Content-Encoding`).
pub const BATCH_ENCODING_ZSTD: &str = "zstd";
/// zstd level for batch frames: level 3 (zstd's default) compresses order-like JSON 5-10x at
/// hundreds of MB/s, far faster than any WAN link it is meant for.
const ZSTD_LEVEL: i32 = 3;

/// Compresses an encoded frame with zstd.
pub fn compress_frame(frame: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(frame, ZSTD_LEVEL).expect("zstd compresses any input into a growing Vec")
}

/// Decompresses a zstd frame, refusing one that would grow past `max_bytes` (a zip bomb costs the
/// receiver at most `max_bytes` of memory before it is refused).
pub fn decompress_frame(compressed: &[u8], max_bytes: u64) -> Result<bytes::Bytes, FrameError> {
    use std::io::Read;
    let decoder =
        zstd::stream::read::Decoder::new(compressed).map_err(|e| FrameError(format!("zstd: {e}")))?;
    let mut out = Vec::new();
    decoder
        .take(max_bytes.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| FrameError(format!("zstd: {e}")))?;
    if out.len() as u64 > max_bytes {
        return Err(FrameError(format!("decompresses to more than {max_bytes} bytes")));
    }
    Ok(bytes::Bytes::from(out))
}

impl Batch {
    /// Encodes the frame:
    ///
    /// ```text
    /// "OPB1" | u16 queue_len | queue | u32 count |
    ///   count × ( u64 seq | u8 id_len | id | u16 content_type_len | content_type | u32 payload_len | payload )
    /// ```
    /// All integers big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let payload_bytes: usize =
            self.messages.iter().map(|m| m.payload.len() + m.id.len() + m.content_type.len() + 15).sum();
        let mut out = Vec::with_capacity(10 + self.queue.len() + payload_bytes);
        out.extend_from_slice(FRAME_MAGIC);
        out.extend_from_slice(&(self.queue.len() as u16).to_be_bytes());
        out.extend_from_slice(self.queue.as_bytes());
        out.extend_from_slice(&(self.messages.len() as u32).to_be_bytes());
        for m in &self.messages {
            out.extend_from_slice(&m.seq.to_be_bytes());
            out.push(m.id.len() as u8);
            out.extend_from_slice(m.id.as_bytes());
            out.extend_from_slice(&(m.content_type.len() as u16).to_be_bytes());
            out.extend_from_slice(m.content_type.as_bytes());
            out.extend_from_slice(&(m.payload.len() as u32).to_be_bytes());
            out.extend_from_slice(&m.payload);
        }
        out
    }

    /// Decodes a frame without copying payloads. Rejects anything malformed, a payload over
    /// `max_message_bytes`, more than `max_messages` messages, and seqs that are not consecutive.
    pub fn decode(
        frame: &bytes::Bytes,
        max_message_bytes: u64,
        max_messages: u32,
    ) -> Result<Batch, FrameError> {
        let mut r = Reader { frame, at: 0 };
        if r.take(4)? != FRAME_MAGIC {
            return Err(FrameError("does not start with OPB1".into()));
        }
        let queue_len = r.u16()? as usize;
        let queue = r.text(queue_len, "queue")?;
        crate::validate_name(&queue).map_err(|e| FrameError(format!("queue {e}")))?;
        let count = r.u32()?;
        if count == 0 || count > max_messages {
            return Err(FrameError(format!("{count} messages: expected 1 to {max_messages}")));
        }
        let mut messages = Vec::with_capacity(count as usize);
        for i in 0..count {
            let seq = r.u64()?;
            if let Some(previous) = messages.last().map(|m: &BatchMessage| m.seq) {
                if seq != previous + 1 {
                    return Err(FrameError(format!(
                        "message {i} has seq {seq} after {previous}: not consecutive"
                    )));
                }
            }
            if seq == 0 {
                return Err(FrameError("seq 0 does not exist".into()));
            }
            let id_len = r.u8()? as usize;
            let id = r.text(id_len, "id")?;
            let content_type_len = r.u16()? as usize;
            let content_type = r.text(content_type_len, "content type")?;
            let payload_len = r.u32()? as u64;
            if payload_len > max_message_bytes {
                return Err(FrameError(format!(
                    "message {i} is {payload_len} bytes, over {max_message_bytes}"
                )));
            }
            let start = r.at;
            r.take(payload_len as usize)?;
            messages.push(BatchMessage { seq, id, content_type, payload: frame.slice(start..r.at) });
        }
        if r.at != frame.len() {
            return Err(FrameError(format!("{} bytes after the last message", frame.len() - r.at)));
        }
        Ok(Batch { queue, messages })
    }
}

struct Reader<'a> {
    frame: &'a bytes::Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], FrameError> {
        let end = self.at.checked_add(n).filter(|end| *end <= self.frame.len()).ok_or_else(|| {
            FrameError(format!(
                "truncated: needed {n} bytes at offset {}, frame is {}",
                self.at,
                self.frame.len()
            ))
        })?;
        let slice = &self.frame[self.at..end];
        self.at = end;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn text(&mut self, n: usize, what: &str) -> Result<String, FrameError> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| FrameError(format!("{what} is not UTF-8")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn sample() -> Batch {
        Batch {
            queue: "orders".into(),
            messages: (5..8)
                .map(|seq| BatchMessage {
                    seq,
                    id: format!("id-{seq}"),
                    content_type: "application/json".into(),
                    payload: Bytes::from(format!("{{\"n\":{seq}}}")),
                })
                .collect(),
        }
    }

    #[test]
    fn zstd_round_trip_and_bomb_bound() {
        let frame = sample().encode();
        let compressed = compress_frame(&frame);
        assert_eq!(&decompress_frame(&compressed, frame.len() as u64).unwrap()[..], &frame[..]);
        // One byte less than the frame: refused, not truncated.
        assert!(decompress_frame(&compressed, frame.len() as u64 - 1).is_err());
        // 64 MiB of zeros compresses to a few KiB; the bound stops it long before.
        let bomb = compress_frame(&vec![0u8; 64 << 20]);
        assert!(bomb.len() < 64 << 10);
        assert!(decompress_frame(&bomb, 1 << 20).is_err());
        assert!(decompress_frame(b"not zstd at all", 1 << 20).is_err());
    }

    #[test]
    fn round_trip() {
        let batch = sample();
        let frame = Bytes::from(batch.encode());
        assert_eq!(Batch::decode(&frame, 1 << 20, 1000).unwrap(), batch);
    }

    #[test]
    fn rejects_malformed_frames_without_panicking() {
        let frame = sample().encode();
        // Every truncation and every single-byte corruption either decodes or errors; never panics.
        for len in 0..frame.len() {
            assert!(Batch::decode(&Bytes::from(frame[..len].to_vec()), 1 << 20, 1000).is_err());
        }
        for i in 0..frame.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut corrupted = frame.clone();
                corrupted[i] ^= flip;
                let _ = Batch::decode(&Bytes::from(corrupted), 1 << 20, 1000);
            }
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let len = (state % 64) as usize;
            let garbage: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let _ = Batch::decode(&Bytes::from(garbage), 1 << 20, 1000);
        }
    }

    #[test]
    fn enforces_limits_and_order() {
        let frame = Bytes::from(sample().encode());
        assert!(Batch::decode(&frame, 5, 1000).unwrap_err().0.contains("over 5"));
        assert!(Batch::decode(&frame, 1 << 20, 2).is_err());
        let mut gap = sample();
        gap.messages[2].seq = 9;
        assert!(Batch::decode(&Bytes::from(gap.encode()), 1 << 20, 1000)
            .unwrap_err()
            .0
            .contains("not consecutive"));
    }

    #[test]
    fn link_events_are_tagged_json() {
        let line = serde_json::to_string(&LinkEvent::Ping { at_ms: 5, downlink: BTreeMap::new() }).unwrap();
        assert_eq!(line, r#"{"type":"ping","at_ms":5}"#);
        let waiting = BTreeMap::from([("prices".to_string(), 7)]);
        let line = serde_json::to_string(&LinkEvent::Ping { at_ms: 5, downlink: waiting.clone() }).unwrap();
        assert_eq!(line, r#"{"type":"ping","at_ms":5,"downlink":{"prices":7}}"#);
        let back: LinkEvent = serde_json::from_str(r#"{"type":"downlink","queues":{"prices":7}}"#).unwrap();
        assert_eq!(back, LinkEvent::Downlink { queues: waiting });
        let back: LinkEvent = serde_json::from_str(r#"{"type":"transition_online"}"#).unwrap();
        assert_eq!(back, LinkEvent::TransitionOnline);
    }
}
