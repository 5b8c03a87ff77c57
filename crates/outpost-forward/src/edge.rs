//! The edge's connectivity task: the async driver of the pure state machine and failover of
//! `outpost-link`. It owns both, runs one `select!` loop over timers and a closed enum of events,
//! and carries out the machine's actions: connect (handshake over failover), probe, forward,
//! persist the offline log, report to the central, publish the status and metrics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_core::config::Compression;
use outpost_core::metrics::{Metrics, QueueLabel, TransitionLabel};
use outpost_core::status::{LinkStatus, OfflineLogEntry as StatusLogEntry, UpstreamInfo};
use outpost_core::time::{now_unix_ms, rfc3339_from_unix_ms};
use outpost_core::wire::{EdgeReport, Hello, LinkEvent, BATCH_ENCODING_ZSTD};
use outpost_core::Config;
use outpost_link::connectivity::{
    Action, Connectivity, ConnectivityParams, Event, OfflineLogEntry, State, TransitionId, TriggerSource,
    UpstreamFailure,
};
use outpost_link::failover::{Endpoint, Failover, FailoverParams, FailureOutcome, SuccessOutcome};
use outpost_link::{Jitter, Moment};
use outpost_store::Store;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::client::{CentralClient, EventStream, LinkError, LinkHttp};
use crate::downlink;
use crate::forwarder::{self, Forwarded, LinkSettings};
use crate::pacing::RateMeter;
use crate::UPSTREAM_READER;

/// The document holding the persisted offline log.
const OFFLINE_LOG_DOCUMENT: &str = "edge:offline_log";
/// Idle time before TCP keepalive probes on connections to a central.
const TCP_KEEPALIVE: Duration = Duration::from_secs(15);
/// How long a connection to a central may sit unused in the client's pool before it is closed.
/// Below the central's own idle close (`limits.request_timeout`, 30 s by default), so the edge
/// closes first and never sends a request on a connection the central is closing; and short,
/// because every idle connection is a descriptor at a central serving thousands of edges. Over
/// HTTP/2 the link's connection is never idle while its event stream is open.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections kept per central. Over HTTP/2 (see `client`) every request of the link is a
/// stream of the one connection that carries the event stream, so a central holds one connection
/// per edge. Over HTTP/1.1 (a central that does not speak HTTP/2) batches and control requests
/// share one pooled connection beside the link stream; a control request made while a batch is in
/// flight opens one of its own, which closes when it is done.
const POOL_MAX_IDLE: usize = 1;
/// Bound of the driver's event channel.
const EVENT_CHANNEL_CAPACITY: usize = 256;

/// Handles to the running connectivity task.
pub struct EdgeLink {
    /// Send `()` to start a transition to online now (the admin API's trigger).
    pub trigger: mpsc::Sender<()>,
    pub task: JoinHandle<()>,
}

/// Everything the driver hears about, from its own spawned tasks and the admin API.
enum Input {
    Connected {
        failover: Box<Failover>,
        outcome: Box<Result<Session, ConnectFailure>>,
    },
    Probed(Result<ProbeOk, String>),
    Link {
        session: u64,
        event: LinkEvent,
    },
    LinkLost {
        session: u64,
        error: LinkError,
    },
    Forwarded {
        session: u64,
        progress: Forwarded,
    },
    /// A failback try of the primary finished.
    FailedBack(Box<Result<Session, LinkError>>),
}

struct ProbeOk {
    url: String,
    maintenance: bool,
    transition_requested: bool,
}

/// Why a connect round failed.
enum ConnectFailure {
    Unreachable(String),
    Rejected(String),
    Maintenance(String),
}

/// An open link: its stream reader and forwarder run as tasks; dropping the session stops them.
struct Session {
    id: u64,
    endpoint_index: usize,
    url: String,
    welcome_positions: BTreeMap<String, u64>,
    /// Downlink the welcome said waits.
    welcome_downlink: BTreeMap<String, u64>,
    /// The batch frame encoding the welcome agreed on.
    batch_encoding: Option<String>,
    stream: Option<EventStream>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts the connectivity task of an edge with at least one upstream.
pub async fn start(
    config: Arc<Config>,
    store: Store,
    metrics: Arc<Metrics>,
    status: watch::Sender<LinkStatus>,
    tls: &[Arc<outpost_tls::ClientTls>],
) -> Result<EdgeLink, String> {
    let now = moment();
    let c = &config.connectivity;
    let params = ConnectivityParams {
        ping_interval: c.ping_interval,
        missed_pings: c.missed_pings,
        offline_probe_interval: c.offline_probe_interval,
        transition_to_offline_wait: c.transition_to_offline_wait,
        failed_transition_wait: c.failed_transition_wait,
        block_during_transition: c.block_during_transition,
    };
    // Seeded per edge and start so a thousand edges restarted together spread their retries.
    let seed = config.node_id.bytes().fold(now.unix_ms as u64, |h, b| h.rotate_left(5) ^ u64::from(b));
    let mut machine =
        Connectivity::new(params, Jitter::with_default_spread(seed), now).map_err(|e| e.to_string())?;
    let endpoints =
        config.upstreams.iter().map(|u| Endpoint { url: u.url.clone(), trigger: u.trigger }).collect();
    let failover_params = FailoverParams {
        primary_retries: config.failover.primary_retries,
        primary_retry_delay: config.failover.primary_retry_delay,
        failback_interval: config.failover.failback_interval,
    };
    let failover =
        Failover::new(endpoints, failover_params, Jitter::with_default_spread(seed.rotate_left(17)))
            .map_err(|e| e.to_string())?;

    match store.documents(OFFLINE_LOG_DOCUMENT).await {
        Ok(docs) => {
            if let Some(json) = docs.get(OFFLINE_LOG_DOCUMENT) {
                match serde_json::from_str::<Vec<OfflineLogEntry>>(json) {
                    Ok(entries) => machine.restore_offline_log(entries),
                    Err(e) => tracing::warn!("the stored offline log is unreadable and starts empty: {e}"),
                }
            }
        }
        Err(e) => return Err(format!("cannot read the offline log: {e}")),
    }

    // One HTTP client per upstream: each has its own TLS files (ca_file, client certificate).
    let mut clients = Vec::with_capacity(config.upstreams.len());
    for (i, upstream) in config.upstreams.iter().enumerate() {
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(config.failover.connect_timeout)
                // A central whose host vanished leaves a half-open connection: keepalive probes find it.
                .tcp_keepalive(TCP_KEEPALIVE)
                .tcp_nodelay(true)
                .pool_max_idle_per_host(POOL_MAX_IDLE)
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        };
        let http = LinkHttp::build(&upstream.url, builder, tls.get(i).map(|t| &**t))
            .map_err(|e| format!("upstream[{i}]: cannot build the HTTP client: {e}"))?;
        clients.push(CentralClient::new(http, upstream, &config.node_id, config.forwarding.request_timeout));
    }

    let (trigger_tx, trigger_rx) = mpsc::channel(8);
    let (input_tx, input_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
    let driver = Driver {
        config,
        store,
        metrics,
        status,
        machine,
        failover: Some(Box::new(failover)),
        clients,
        session: None,
        next_session_id: 0,
        pending_transition: None,
        probing: false,
        failback_running: false,
        input_tx,
        forward_rate: RateMeter::default(),
    };
    let task = tokio::spawn(driver.run(trigger_rx, input_rx));
    Ok(EdgeLink { trigger: trigger_tx, task })
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until_option(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

fn moment() -> Moment {
    Moment { instant: Instant::now(), unix_ms: now_unix_ms() }
}

struct Driver {
    config: Arc<Config>,
    store: Store,
    metrics: Arc<Metrics>,
    status: watch::Sender<LinkStatus>,
    machine: Connectivity,
    /// `None` while a connect round owns it.
    failover: Option<Box<Failover>>,
    clients: Vec<CentralClient>,
    session: Option<Session>,
    next_session_id: u64,
    /// The transition whose handshake a connect round is answering.
    pending_transition: Option<TransitionId>,
    probing: bool,
    failback_running: bool,
    input_tx: mpsc::Sender<Input>,
    /// Payload bytes per second the central acknowledged recently (the drain estimate).
    forward_rate: RateMeter,
}

impl Driver {
    async fn run(mut self, mut trigger: mpsc::Receiver<()>, mut inputs: mpsc::Receiver<Input>) {
        self.apply(Event::Started).await;
        loop {
            let deadline =
                self.machine.next_deadline().unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let actions = self.machine.tick(moment());
                    self.carry_out(actions).await;
                }
                Some(()) = trigger.recv() => {
                    self.apply(Event::ManualTrigger { source: TriggerSource::AdminApi }).await;
                }
                Some(input) = inputs.recv() => self.on_input(input).await,
                _ = sleep_until_option(self.failback_due()) => self.spawn_failback(),
                else => return,
            }
            self.ensure_session();
            self.publish_status();
        }
    }

    async fn apply(&mut self, event: Event) {
        let actions = self.machine.handle(moment(), event);
        self.carry_out(actions).await;
    }

    async fn on_input(&mut self, input: Input) {
        match input {
            Input::Connected { failover, outcome } => {
                self.failover = Some(failover);
                let transition = self.pending_transition.take();
                match *outcome {
                    Ok(session) => {
                        let url = session.url.clone();
                        self.begin_session(session);
                        if let Some(transition) = transition {
                            self.apply(Event::HandshakeOk { transition, endpoint: url }).await;
                        }
                    }
                    Err(failure) => {
                        let (failure, detail) = match failure {
                            ConnectFailure::Unreachable(d) => (UpstreamFailure::Unreachable, d),
                            ConnectFailure::Rejected(d) => (UpstreamFailure::Rejected, d),
                            ConnectFailure::Maintenance(url) => {
                                self.apply(Event::Maintenance { endpoint: url }).await;
                                return;
                            }
                        };
                        tracing::warn!(%detail, "could not reach any central");
                        let event = match transition {
                            Some(transition) => Event::HandshakeFailed { transition, failure, detail },
                            None => Event::ForwardFailed { failure, detail },
                        };
                        self.apply(event).await;
                    }
                }
            }
            Input::Probed(result) => {
                self.probing = false;
                match result {
                    Ok(ProbeOk { url, maintenance: true, .. }) => {
                        self.apply(Event::Maintenance { endpoint: url }).await
                    }
                    Ok(ProbeOk { url, transition_requested, .. }) => {
                        if transition_requested {
                            self.apply(Event::ManualTrigger { source: TriggerSource::Central }).await;
                        }
                        self.apply(Event::ProbeSucceeded { endpoint: url }).await;
                    }
                    Err(detail) => self.apply(Event::ProbeFailed { detail }).await,
                }
            }
            Input::Link { session, event } if self.is_current(session) => match event {
                LinkEvent::Ping { .. } => {
                    self.apply(Event::Ping).await;
                    self.send_report();
                }
                LinkEvent::TransitionOnline => {
                    self.apply(Event::ManualTrigger { source: TriggerSource::Central }).await;
                }
                LinkEvent::Maintenance { enabled: true } => {
                    let url = self.session.as_ref().map(|s| s.url.clone()).unwrap_or_default();
                    self.session = None;
                    self.apply(Event::Maintenance { endpoint: url }).await;
                }
                LinkEvent::Maintenance { enabled: false }
                | LinkEvent::Welcome { .. }
                | LinkEvent::Downlink { .. } => {}
            },
            Input::LinkLost { session, error: LinkError::Rejected { url, detail } }
                if self.is_current(session) =>
            {
                // Another endpoint would not change the answer: this is for the machine to judge.
                self.session = None;
                let detail = format!("{url} refused this edge's messages: {detail}");
                tracing::error!(%detail, "forwarding refused");
                self.apply(Event::ForwardFailed { failure: UpstreamFailure::Rejected, detail }).await;
            }
            Input::LinkLost { session, error } if self.is_current(session) => {
                tracing::warn!(%error, "link to the central lost; trying the endpoints again");
                // Reconnect first (failover may find another central); only if every endpoint
                // fails does the machine hear of it.
                self.session = None;
                self.spawn_connect(None);
            }
            Input::Forwarded { session, progress } if self.is_current(session) => {
                // An acknowledgement came back over the link: it is alive, whatever the pings do.
                self.apply(Event::SignOfLife).await;
                self.forward_rate.record(progress.payload_bytes, tokio::time::Instant::now());
                if progress.stored > 0 {
                    self.metrics
                        .messages_forwarded
                        .get_or_create(&QueueLabel { queue: progress.queue.clone() })
                        .inc_by(progress.stored);
                }
                self.apply(Event::Forwarded {
                    queue: progress.queue,
                    forwarded_through_seq: progress.through_seq,
                })
                .await;
            }
            Input::FailedBack(outcome) => {
                self.failback_running = false;
                let Some(failover) = self.failover.as_deref_mut() else { return };
                match *outcome {
                    Ok(session) => {
                        if let SuccessOutcome::Switched { from, to } =
                            failover.report_success(0, Instant::now())
                        {
                            self.metrics.failovers.inc();
                            tracing::info!(from = %self.clients[from].url(), to = %self.clients[to].url(), "failed back to the primary central");
                        }
                        // The old session's tasks stop when it is dropped; the central drops
                        // whatever of its in-flight batches it already holds when they are resent.
                        self.begin_session(session);
                    }
                    Err(error) => {
                        tracing::info!(%error, "the primary central is still unavailable; staying on the alternate");
                        let _ = failover.report_failure(0, Instant::now(), error.detail());
                    }
                }
            }
            // Stale news from a session that is gone.
            Input::Link { .. } | Input::LinkLost { .. } | Input::Forwarded { .. } => {}
        }
    }

    fn is_current(&self, session: u64) -> bool {
        self.session.as_ref().is_some_and(|s| s.id == session)
    }

    async fn carry_out(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::EnterState { from, to, reason } => {
                    tracing::info!(from = from.as_str(), to = to.as_str(), %reason, "edge state changed");
                    self.metrics
                        .state_transitions
                        .get_or_create(&TransitionLabel {
                            from: from.as_str().into(),
                            to: to.as_str().into(),
                        })
                        .inc();
                    self.metrics.set_edge_state(to.as_str());
                    if to == State::Offline {
                        self.session = None;
                    }
                    self.publish_status();
                    self.send_report();
                }
                Action::StartOnlineChecks { transition } => {
                    let drain_target: BTreeMap<String, u64> = self
                        .store
                        .queue_stats()
                        .into_iter()
                        .filter(|q| q.last_seq > self.store.cursor(&q.name, UPSTREAM_READER))
                        .map(|q| (q.name, q.last_seq))
                        .collect();
                    let actions = self.machine.handle(
                        moment(),
                        Event::DrainTargetRecorded { transition, last_seq_by_queue: drain_target },
                    );
                    Box::pin(self.carry_out(actions)).await;
                    match &self.session {
                        // Already linked (e.g. a trigger while reconnecting finished): the handshake holds.
                        Some(session) => {
                            let endpoint = session.url.clone();
                            Box::pin(self.apply(Event::HandshakeOk { transition, endpoint })).await;
                        }
                        None => self.spawn_connect(Some(transition)),
                    }
                }
                Action::Probe => self.spawn_probe(),
                Action::AppendOfflineLog(entry) => {
                    tracing::warn!(cause = entry.cause.as_str(), detail = %entry.detail, "edge went offline");
                    let log: Vec<OfflineLogEntry> = self.machine.offline_log().iter().cloned().collect();
                    let store = self.store.clone();
                    let json = serde_json::to_string(&log).expect("offline log serializes");
                    tokio::spawn(async move {
                        if let Err(e) = store.put_document(OFFLINE_LOG_DOCUMENT, json).await {
                            tracing::error!("cannot persist the offline log: {e}");
                        }
                    });
                }
            }
        }
    }

    /// Keeps a link open whenever the machine wants one and no connect round is running.
    fn ensure_session(&mut self) {
        let wants_link = matches!(self.machine.state(), State::Online);
        if wants_link && self.session.is_none() && self.failover.is_some() {
            self.spawn_connect(None);
        }
    }

    fn hello(&self) -> Hello {
        Hello {
            edge_id: self.config.node_id.clone(),
            version: outpost_core::VERSION.to_string(),
            ping_interval_ms: self.config.connectivity.ping_interval.as_millis() as u64,
            missed_pings: Some(self.config.connectivity.missed_pings),
            report: self.report(),
            released_unforwarded: self.released_unforwarded(),
            batch_encodings: match self.config.forwarding.compression {
                Compression::Zstd => vec![BATCH_ENCODING_ZSTD.to_string()],
                Compression::None => Vec::new(),
            },
        }
    }

    /// Queues whose messages were released past the upstream cursor: the upstream reader was not
    /// required then (no central was configured) and routes took them. The central hears of the
    /// range at handshake and records it, so the forwarder starts after it.
    fn released_unforwarded(&self) -> BTreeMap<String, u64> {
        self.store
            .queue_stats()
            .into_iter()
            .filter_map(|q| {
                let released_through = q.first_seq.saturating_sub(1);
                (released_through > self.store.cursor(&q.name, UPSTREAM_READER))
                    .then_some((q.name, released_through))
            })
            .collect()
    }

    fn report(&self) -> EdgeReport {
        let backlog_messages = self
            .store
            .queue_stats()
            .iter()
            .map(|q| {
                q.last_seq.saturating_sub(self.store.cursor(&q.name, UPSTREAM_READER).max(q.first_seq - 1))
            })
            .sum();
        EdgeReport {
            state: self.machine.state().as_str().to_string(),
            state_since_ms: self.machine.state_since().unix_ms,
            upstream_url: self.session.as_ref().map(|s| s.url.clone()),
            backlog_messages,
            offline_log: self.status_log(),
        }
    }

    fn status_log(&self) -> Vec<StatusLogEntry> {
        self.machine
            .offline_log()
            .iter()
            .map(|e| StatusLogEntry {
                at: rfc3339_from_unix_ms(e.at_unix_ms),
                cause: e.cause.as_str().into(),
                detail: e.detail.clone(),
            })
            .collect()
    }

    /// Runs one failover round of handshakes in a task; the result comes back as `Input::Connected`.
    fn spawn_connect(&mut self, transition: Option<TransitionId>) {
        let Some(mut failover) = self.failover.take() else {
            // A round is already running; its result answers this transition too.
            if transition.is_some() {
                self.pending_transition = transition;
            }
            return;
        };
        self.pending_transition = transition;
        let clients = self.clients.clone();
        let hello = self.hello();
        let inputs = self.input_tx.clone();
        let metrics = self.metrics.clone();
        let session_id = self.next_session_id;
        self.next_session_id += 1;
        tokio::spawn(async move {
            let outcome = loop {
                let attempt = failover.next_attempt(Instant::now());
                tokio::time::sleep_until(attempt.not_before.into()).await;
                let client = &clients[attempt.endpoint_index];
                match client.open_link(&hello).await {
                    Ok((
                        LinkEvent::Welcome { positions, central_id, downlink, batch_encoding, .. },
                        stream,
                    )) => {
                        if let SuccessOutcome::Switched { from, to } =
                            failover.report_success(attempt.endpoint_index, Instant::now())
                        {
                            metrics.failovers.inc();
                            tracing::warn!(from = %clients[from].url(), to = %clients[to].url(), "switched central endpoint");
                        }
                        tracing::info!(url = %client.url(), %central_id, batch_encoding = batch_encoding.as_deref().unwrap_or("none"), "link to the central open");
                        break Ok(Session {
                            id: session_id,
                            endpoint_index: attempt.endpoint_index,
                            url: client.url().to_string(),
                            welcome_positions: positions,
                            welcome_downlink: downlink,
                            batch_encoding,
                            stream: Some(stream),
                            tasks: Vec::new(),
                        });
                    }
                    Ok(_) => unreachable!("open_link returns only a welcome"),
                    Err(LinkError::Maintenance { url }) => break Err(ConnectFailure::Maintenance(url)),
                    Err(LinkError::Rejected { url, detail }) => {
                        break Err(ConnectFailure::Rejected(format!("{url} rejected this edge: {detail}")))
                    }
                    Err(error) => {
                        match failover.report_failure(attempt.endpoint_index, Instant::now(), error.detail())
                        {
                            FailureOutcome::TryNext(_) => continue,
                            FailureOutcome::AllFailed(all) => {
                                break Err(ConnectFailure::Unreachable(all.to_string()))
                            }
                        }
                    }
                }
            };
            let _ = inputs.send(Input::Connected { failover, outcome: Box::new(outcome) }).await;
        });
    }

    /// When a failback try of the primary is due: only while a session runs on an alternate.
    fn failback_due(&self) -> Option<Instant> {
        if self.failback_running || self.session.is_none() || self.machine.state() != State::Online {
            return None;
        }
        self.failover.as_deref().and_then(Failover::next_failback_at)
    }

    /// Tries to open a link to the primary while the current one stays up.
    fn spawn_failback(&mut self) {
        let Some(failover) = self.failover.as_deref_mut() else { return };
        let Some(attempt) = failover.poll_failback(Instant::now()) else { return };
        self.failback_running = true;
        let client = self.clients[attempt.endpoint_index].clone();
        let hello = self.hello();
        let inputs = self.input_tx.clone();
        let session_id = self.next_session_id;
        self.next_session_id += 1;
        tokio::spawn(async move {
            let outcome = client.open_link(&hello).await.map(|(welcome, stream)| {
                let LinkEvent::Welcome { positions, downlink, batch_encoding, .. } = welcome else {
                    unreachable!("open_link returns a welcome")
                };
                Session {
                    id: session_id,
                    endpoint_index: attempt.endpoint_index,
                    url: client.url().to_string(),
                    welcome_positions: positions,
                    welcome_downlink: downlink,
                    batch_encoding,
                    stream: Some(stream),
                    tasks: Vec::new(),
                }
            });
            let _ = inputs.send(Input::FailedBack(Box::new(outcome))).await;
        });
    }

    /// Starts the stream reader and the forwarder of a freshly opened link.
    fn begin_session(&mut self, mut session: Session) {
        let id = session.id;
        let mut stream = session.stream.take().expect("a new session has its stream");
        let inputs = self.input_tx.clone();
        let wanted = Arc::new(downlink::Wanted::default());
        wanted.announce(std::mem::take(&mut session.welcome_downlink));
        let announced = wanted.clone();
        session.tasks.push(tokio::spawn(async move {
            loop {
                match stream.next().await {
                    Ok(LinkEvent::Downlink { queues }) => announced.announce(queues),
                    Ok(event) => {
                        if let LinkEvent::Ping { downlink, .. } = &event {
                            announced.announce(downlink.clone());
                        }
                        if inputs.send(Input::Link { session: id, event }).await.is_err() {
                            return;
                        }
                    }
                    Err(error) => {
                        let _ = inputs.send(Input::LinkLost { session: id, error }).await;
                        return;
                    }
                }
            }
        }));

        let (progress_tx, mut progress_rx) = mpsc::channel(64);
        let inputs = self.input_tx.clone();
        session.tasks.push(tokio::spawn(async move {
            while let Some(progress) = progress_rx.recv().await {
                if inputs.send(Input::Forwarded { session: id, progress }).await.is_err() {
                    return;
                }
            }
        }));
        let client =
            self.clients[session.endpoint_index].clone().with_batch_encoding(session.batch_encoding.clone());
        let store = self.store.clone();
        let settings = LinkSettings { config: self.config.clone(), metrics: self.metrics.clone() };
        let positions = session.welcome_positions.clone();
        let inputs = self.input_tx.clone();
        session.tasks.push(tokio::spawn(async move {
            let error = forwarder::run(store, client, settings, positions, progress_tx).await;
            let _ = inputs.send(Input::LinkLost { session: id, error }).await;
        }));
        let client =
            self.clients[session.endpoint_index].clone().with_batch_encoding(session.batch_encoding.clone());
        let store = self.store.clone();
        let batch_messages = self.config.forwarding.batch_messages;
        let inputs = self.input_tx.clone();
        session.tasks.push(tokio::spawn(async move {
            let error = downlink::run(store, client, wanted, batch_messages).await;
            let _ = inputs.send(Input::LinkLost { session: id, error }).await;
        }));
        self.session = Some(session);
    }

    /// Probes the endpoints in failover order; the first that answers wins.
    fn spawn_probe(&mut self) {
        if self.probing {
            return;
        }
        self.probing = true;
        let clients: Vec<CentralClient> = self
            .config
            .upstreams
            .iter()
            .zip(&self.clients)
            .filter(|(u, _)| u.trigger)
            .map(|(_, c)| c.clone())
            .collect();
        // Worded like a failover round's failure, so that a re-check failing the same way as the
        // failure that started `transition_to_offline` is recognised and not logged twice.
        let which = if clients.len() == self.clients.len() { "upstreams" } else { "trigger upstreams" };
        let inputs = self.input_tx.clone();
        tokio::spawn(async move {
            let mut errors = Vec::new();
            for client in &clients {
                match client.probe().await {
                    Ok(answer) => {
                        let ok = ProbeOk {
                            url: client.url().to_string(),
                            maintenance: answer.maintenance,
                            transition_requested: answer.transition_requested,
                        };
                        let _ = inputs.send(Input::Probed(Ok(ok))).await;
                        return;
                    }
                    Err(e) => errors.push(format!("{}: {}", client.url(), e.detail())),
                }
            }
            let detail = if errors.is_empty() {
                "no upstream has trigger = true".to_string()
            } else {
                format!("all {} {which} failed: {}", errors.len(), errors.join("; "))
            };
            let _ = inputs.send(Input::Probed(Err(detail))).await;
        });
    }

    /// Best effort: tells the central in use this edge's state (also when the link just closed, e.g.
    /// for maintenance, so the central shows why); a lost report is replaced by the next.
    fn send_report(&self) {
        let endpoint_index = match (&self.session, self.failover.as_deref()) {
            (Some(session), _) => session.endpoint_index,
            (None, Some(failover)) => failover.current_endpoint_index(),
            (None, None) => return,
        };
        let client = self.clients[endpoint_index].clone();
        let report = self.report();
        tokio::spawn(async move {
            if let Err(e) = client.report(&report).await {
                tracing::debug!("report to the central failed: {e}");
            }
        });
    }

    fn publish_status(&self) {
        let now = moment();
        let failover = self.failover.as_deref();
        let status = LinkStatus {
            state: self.machine.state().as_str().to_string(),
            state_since_ms: self.machine.state_since().unix_ms,
            upstream: self
                .session
                .as_ref()
                .map(|s| UpstreamInfo { url: s.url.clone(), is_primary: s.endpoint_index == 0 })
                .or_else(|| {
                    failover.map(|f| UpstreamInfo {
                        url: f.current_endpoint().url.clone(),
                        is_primary: f.current_is_primary(),
                    })
                }),
            last_ping_at_ms: self.machine.last_ping_at().map(|m| m.unix_ms),
            offline_log: self.status_log(),
            forward_rate_bytes_per_second: self.forward_rate.bytes_per_second().map(|r| r.round() as u64),
            writes_blocked_retry_after_seconds: if self.machine.writes_blocked() {
                self.machine.retry_after(now.instant).map(|d| d.as_secs().max(1))
            } else {
                None
            },
        };
        self.status.send_if_modified(|current| {
            if *current != status {
                *current = status;
                true
            } else {
                false
            }
        });
    }
}
