//! Stage 1 types: the configuration as written. Every section denies unknown keys; every scalar
//! accepts its TOML type or a string holding it, since environment variables always arrive as
//! strings. Nothing here checks ranges or relations between keys: that is [`super::validate`].

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use super::NO_UPSTREAM;
use crate::units::{parse_duration, parse_size};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) node_id: Option<String>,
    pub(super) listen: Option<String>,
    pub(super) data_dir: Option<PathBuf>,
    pub(super) tls: Option<RawTls>,
    pub(super) auth: Option<RawAuth>,
    #[serde(default)]
    pub(super) limits: RawLimits,
    /// `None`: not given (an edge then uses [`DEFAULT_CENTRAL_URL`](super::DEFAULT_CENTRAL_URL)); `Some(empty)`: explicitly none.
    #[serde(default, deserialize_with = "de_upstreams")]
    pub(super) upstream: Option<Vec<RawUpstream>>,
    #[serde(default)]
    pub(super) failover: RawFailover,
    #[serde(default)]
    pub(super) connectivity: RawConnectivity,
    #[serde(default)]
    pub(super) forwarding: RawForwarding,
    pub(super) postgres: Option<String>,
    #[serde(default)]
    pub(super) edge: Vec<RawEdge>,
    #[serde(default)]
    pub(super) ha: RawHa,
    #[serde(default)]
    pub(super) route: Vec<RawRoute>,
    #[serde(default)]
    pub(super) queue: Vec<RawQueue>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQueue {
    pub(super) name: String,
    #[serde(default, deserialize_with = "de_number")]
    pub(super) priority: Option<u64>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) message_ttl: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    #[serde(default)]
    pub(super) cert_file: String,
    #[serde(default)]
    pub(super) key_file: String,
    #[serde(default)]
    pub(super) client_ca_file: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    #[serde(default, deserialize_with = "de_string_list")]
    pub(super) client_tokens: Vec<String>,
    #[serde(default, deserialize_with = "de_string_list")]
    pub(super) admin_tokens: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    #[serde(default, deserialize_with = "de_size")]
    pub(super) max_message_bytes: Option<u64>,
    #[serde(default, deserialize_with = "de_number")]
    pub(super) max_batch_messages: Option<u64>,
    #[serde(default, deserialize_with = "de_size")]
    pub(super) max_store_bytes: Option<u64>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) message_ttl: Option<Duration>,
    #[serde(default, deserialize_with = "de_number")]
    pub(super) max_queues: Option<u64>,
    #[serde(default, deserialize_with = "de_number")]
    pub(super) max_connections: Option<u64>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) request_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) idempotency_ttl: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) url: String,
    #[serde(default)]
    pub(super) token: String,
    #[serde(default, deserialize_with = "de_bool")]
    pub(super) trigger: Option<bool>,
    #[serde(default)]
    pub(super) ca_file: String,
    #[serde(default)]
    pub(super) cert_file: String,
    #[serde(default)]
    pub(super) key_file: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFailover {
    #[serde(default, deserialize_with = "de_number")]
    pub(super) primary_retries: Option<u64>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) primary_retry_delay: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) connect_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) failback_interval: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConnectivity {
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) ping_interval: Option<Duration>,
    #[serde(default, deserialize_with = "de_number")]
    pub(super) missed_pings: Option<u64>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) offline_probe_interval: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) transition_to_offline_wait: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) failed_transition_wait: Option<Duration>,
    #[serde(default, deserialize_with = "de_bool")]
    pub(super) block_during_transition: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawForwarding {
    #[serde(default, deserialize_with = "de_number")]
    pub(super) batch_messages: Option<u64>,
    #[serde(default, deserialize_with = "de_size")]
    pub(super) batch_bytes: Option<u64>,
    #[serde(default, deserialize_with = "de_number")]
    pub(super) in_flight: Option<u64>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) request_timeout: Option<Duration>,
    #[serde(default)]
    pub(super) compression: Option<String>,
    #[serde(default, deserialize_with = "de_size")]
    pub(super) max_bandwidth: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEdge {
    pub(super) id: String,
    #[serde(default)]
    pub(super) token: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHa {
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) restart_delay: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) restart_delay_max: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) min_uptime: Option<Duration>,
    #[serde(default, deserialize_with = "de_number")]
    pub(super) max_restarts: Option<u64>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) restart_window: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) ready_timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) name: String,
    pub(super) queue: String,
    #[serde(deserialize_with = "de_string_list_required")]
    pub(super) urls: Vec<String>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_number")]
    pub(super) max_attempts: Option<u64>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) retry_initial: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) retry_max: Option<Duration>,
    #[serde(default, deserialize_with = "de_string_list_opt")]
    pub(super) service_down: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de_string_list_opt")]
    pub(super) poison: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de_bool")]
    pub(super) auto_forward: Option<bool>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) probe_interval: Option<Duration>,
    #[serde(default, deserialize_with = "de_number")]
    pub(super) max_in_flight: Option<u64>,
    #[serde(default, deserialize_with = "de_number")]
    pub(super) batch: Option<u64>,
    #[serde(default)]
    pub(super) ca_file: String,
    #[serde(default)]
    pub(super) cert_file: String,
    #[serde(default)]
    pub(super) key_file: String,
}

// Lenient deserializers: environment variables always arrive as strings, so every scalar accepts
// its native TOML type or a string holding it.

#[derive(Deserialize)]
#[serde(untagged)]
enum StrOrNum {
    Num(u64),
    Str(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StrOrBool {
    Bool(bool),
    Str(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StrOrList {
    List(Vec<String>),
    Str(String),
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map(Some).map_err(de::Error::custom)
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match StrOrNum::deserialize(d)
        .map_err(|_| de::Error::custom("expected a size such as \"1MiB\" or a number of bytes"))?
    {
        StrOrNum::Num(n) => Ok(Some(n)),
        StrOrNum::Str(s) => parse_size(&s).map(Some).map_err(de::Error::custom),
    }
}

fn de_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match StrOrNum::deserialize(d).map_err(|_| de::Error::custom("expected a non-negative whole number"))? {
        StrOrNum::Num(n) => Ok(Some(n)),
        StrOrNum::Str(s) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| de::Error::custom(format!("expected a non-negative whole number, got {s:?}"))),
    }
}

fn de_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    match StrOrBool::deserialize(d).map_err(|_| de::Error::custom("expected true or false"))? {
        StrOrBool::Bool(b) => Ok(Some(b)),
        StrOrBool::Str(s) => match s.trim() {
            "true" | "1" | "yes" => Ok(Some(true)),
            "false" | "0" | "no" => Ok(Some(false)),
            other => Err(de::Error::custom(format!("expected true or false, got {other:?}"))),
        },
    }
}

fn split_list(text: &str) -> Vec<String> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

/// `[[upstream]]` tables, or the string `"none"` (an edge without a central, e.g. from
/// `OUTPOST_UPSTREAM=none`).
fn de_upstreams<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<RawUpstream>>, D::Error> {
    struct UpstreamsVisitor;
    impl<'de> de::Visitor<'de> for UpstreamsVisitor {
        type Value = Option<Vec<RawUpstream>>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(
                f,
                "[[upstream]] tables each with a `url`, or \"{NO_UPSTREAM}\" for an edge without a central"
            )
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
            if s.trim() == NO_UPSTREAM {
                Ok(Some(Vec::new()))
            } else {
                Err(E::custom(format!("expected [[upstream]] tables or \"{NO_UPSTREAM}\", got {s:?}")))
            }
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            // Deserialized through the given access, so errors keep their path (upstream[0].url).
            Vec::<RawUpstream>::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(Some)
        }
    }
    d.deserialize_any(UpstreamsVisitor)
}

fn de_string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    match StrOrList::deserialize(d)
        .map_err(|_| de::Error::custom("expected a list of strings (or a comma-separated string)"))?
    {
        StrOrList::List(v) => Ok(v),
        StrOrList::Str(s) => Ok(split_list(&s)),
    }
}

fn de_string_list_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    de_string_list(d).map(Some)
}

fn de_string_list_required<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    de_string_list(d)
}
