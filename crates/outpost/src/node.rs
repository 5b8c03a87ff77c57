//! Running a node: open the store, start the tasks, serve the API, stop cleanly on SIGTERM/SIGINT.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use outpost_core::metrics::Metrics;
use outpost_core::status::{LinkStatus, OfflineLogEntry};
use outpost_core::time::{now_unix_ms, rfc3339_from_unix_ms};
use outpost_core::{Config, Role};
use outpost_store::{Store, StoreError, StoreOptions};
use tokio::sync::watch;

use crate::exit;

/// How often TLS files are checked for changes (SIGHUP re-reads them at once).
const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// How long the writer may take to answer a health round trip before systemd's watchdog pings stop.
const WRITER_HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

pub fn run(config: Config) -> ExitCode {
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outpost: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FATAL);
        }
    };
    runtime.block_on(serve(config))
}

fn init_tracing() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("OUTPOST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: never in files, pipes or the journal, and never
    // when NO_COLOR is set (the NO_COLOR convention: any value but the empty string).
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour);
    if std::env::var("OUTPOST_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Starts the node, serves until SIGTERM or SIGINT, then stops in order: the HTTP server drains
/// its in-flight requests, the tasks stop, the routes commit their cursors, and the store commits
/// what is still queued and closes.
async fn serve(mut config: Config) -> ExitCode {
    config.limits.max_connections = crate::fds::connection_budget(config.limits.max_connections);
    let config = Arc::new(config);
    tracing::info!(
        version = outpost_core::VERSION,
        sources = ?config.sources,
        config = %config.redacted_summary(),
        "outpost {} starting",
        config.role.as_str()
    );
    let tls = match load_tls(&config) {
        Ok(tls) => tls,
        Err(code) => return code,
    };
    // The address first: a node that cannot serve must not create or migrate a store either.
    let listener = match bind_listener(&config).await {
        Ok(listener) => listener,
        Err(code) => return code,
    };
    let metrics = Arc::new(Metrics::new());
    let store = match open_store(&config, &metrics).await {
        Ok(store) => store,
        Err(code) => return code,
    };
    if config.auth.is_none() && !config.listen.ip().is_loopback() {
        tracing::warn!(listen = %config.listen, "no [auth] section: anyone who can reach this address may send and administer");
    }
    let (link_tx, link_rx) = watch::channel(initial_link_status(&config));
    let mut state = outpost_api::ApiState::new(config.clone(), store.clone(), metrics.clone(), link_rx);
    let tasks = match start_tasks(&mut state, link_tx, &tls).await {
        Ok(tasks) => tasks,
        Err(code) => return code,
    };
    let served = serve_until_stop_requested(listener, state, &tls).await;
    tasks.stop().await;
    outpost_ha::notify_stopping();
    // In-flight requests have finished (graceful shutdown); commit whatever is still queued.
    store.shutdown().await;
    exit_code(served)
}

/// Reads every certificate, key and CA file before anything else starts: a bad one is a
/// configuration error (exit 2) that names the file and what is wrong with it.
fn load_tls(config: &Config) -> Result<outpost_tls::TlsSetup, ExitCode> {
    let tls = outpost_tls::TlsSetup::load(config).map_err(|e| {
        tracing::error!("{e}");
        eprintln!("outpost: {e}");
        ExitCode::from(exit::USAGE)
    })?;
    tls.log_effective();
    Ok(tls)
}

async fn bind_listener(config: &Config) -> Result<tokio::net::TcpListener, ExitCode> {
    tokio::net::TcpListener::bind(config.listen).await.map_err(|e| {
        tracing::error!(listen = %config.listen, "cannot listen: {e}; is another process using this address?");
        ExitCode::from(exit::FATAL)
    })
}

/// Opens the store of the data directory, or of PostgreSQL on a central of a cluster (the data
/// directory then holds only what the HA watcher writes); its commits feed the commit-time metric.
async fn open_store(config: &Config, metrics: &Arc<Metrics>) -> Result<Store, ExitCode> {
    let observer_metrics = metrics.clone();
    let observer: outpost_store::CommitObserver = Arc::new(move |elapsed: Duration, _ops: usize| {
        observer_metrics.store_commit_seconds.observe(elapsed.as_secs_f64());
    });
    let opened = match &config.postgres {
        Some(url) => Store::open_postgres(url, store_options(config), Some(observer)).await,
        None => Store::open(&config.data_dir, store_options(config), Some(observer)),
    };
    opened.map_err(|e| match e {
        e @ StoreError::DirectoryInUse(_) => {
            tracing::error!("{e}; stop the other node or choose another --data-dir");
            ExitCode::from(exit::DATA_DIR_IN_USE)
        }
        e if config.postgres.is_some() => {
            tracing::error!("cannot open the store on PostgreSQL (key `postgres`): {e}");
            ExitCode::from(exit::FATAL)
        }
        e => {
            tracing::error!(data_dir = %config.data_dir.display(), "cannot open the store: {e}");
            ExitCode::from(exit::FATAL)
        }
    })
}

/// The tasks a node runs besides the HTTP server, stopped after it.
struct NodeTasks {
    routes: outpost_forward::route::RouteTasks,
    /// An edge with at least one upstream: the connectivity task.
    edge_link: Option<outpost_forward::edge::EdgeLink>,
}

impl NodeTasks {
    async fn stop(self) {
        if let Some(link) = self.edge_link {
            link.task.abort();
        }
        // Routes commit their cursors before the store closes.
        self.routes.stop().await;
    }
}

/// Starts the routes (both roles, from their durable cursors and modes), then an edge's
/// connectivity task or a central's hub, and hands each to the API. On an error, logged, the store
/// is closed (with what already started still running) and the node exits.
async fn start_tasks(
    state: &mut outpost_api::ApiState,
    link_tx: watch::Sender<LinkStatus>,
    tls: &outpost_tls::TlsSetup,
) -> Result<NodeTasks, ExitCode> {
    let (config, store, metrics) = (state.config.clone(), state.store.clone(), state.metrics.clone());
    let (routes, route_tasks) = match outpost_forward::route::start(
        config.clone(),
        store.clone(),
        metrics.clone(),
        &tls.routes,
    )
    .await
    {
        Ok(started) => started,
        Err(e) => return Err(cannot_start(&store, "start the routes", e).await),
    };
    state.routes = Some(routes);
    let mut edge_link = None;
    if config.role == Role::Edge && !config.upstreams.is_empty() {
        let link = outpost_forward::edge::start(
            config.clone(),
            store.clone(),
            metrics.clone(),
            link_tx,
            &tls.upstreams,
        );
        match link.await {
            Ok(link) => {
                state.edge_trigger = Some(link.trigger.clone());
                edge_link = Some(link);
            }
            Err(e) => return Err(cannot_start(&store, "start the connectivity task", e).await),
        }
    }
    if config.role == Role::Central {
        match outpost_central::CentralHub::start(store.clone(), config.clone(), metrics, now_unix_ms()).await
        {
            Ok(hub) => state.central = Some(hub),
            Err(e) => return Err(cannot_start(&store, "load the edge registry", e).await),
        }
    }
    Ok(NodeTasks { routes: route_tasks, edge_link })
}

async fn cannot_start(store: &Store, what: &str, error: impl std::fmt::Display) -> ExitCode {
    tracing::error!("cannot {what}: {error}");
    store.shutdown().await;
    ExitCode::from(exit::FATAL)
}

/// Serves the API until the first SIGTERM or SIGINT and the end of the in-flight requests, with the
/// TLS reloader and the systemd watchdog running meanwhile.
async fn serve_until_stop_requested(
    listener: tokio::net::TcpListener,
    state: outpost_api::ApiState,
    tls: &outpost_tls::TlsSetup,
) -> Result<std::io::Result<()>, tokio::task::JoinError> {
    let (config, store) = (state.config.clone(), state.store.clone());
    let shutdown = shutdown_signal();
    let reloadable = tls.reloadable();
    let reloader =
        (!reloadable.is_empty()).then(|| outpost_tls::spawn_reloader(reloadable, TLS_RELOAD_INTERVAL));
    let server = tokio::spawn(outpost_api::serve(listener, state, tls.server.clone(), shutdown));
    tracing::info!(listen = %config.listen, data_dir = %config.data_dir.display(), node_id = %config.node_id, "outpost {} ready", config.role.as_str());
    outpost_ha::notify_ready();
    let watchdog = outpost_ha::watchdog_interval().map(|interval| tokio::spawn(watchdog(store, interval)));
    let served = server.await;
    if let Some(task) = watchdog {
        task.abort();
    }
    if let Some(task) = reloader {
        task.abort();
    }
    served
}

/// How the node ends: cleanly, or with the HTTP server's failure.
fn exit_code(served: Result<std::io::Result<()>, tokio::task::JoinError>) -> ExitCode {
    match served {
        Ok(Ok(())) => {
            tracing::info!("outpost stopped cleanly");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            tracing::error!("the HTTP server failed: {e}");
            ExitCode::from(exit::FATAL)
        }
        Err(e) => {
            tracing::error!("the HTTP server task failed: {e}");
            ExitCode::from(exit::FATAL)
        }
    }
}

/// Which readers must take a queue's messages before they are released: a downlink queue's (the
/// central's), else those outpost-forward runs in it (the forwarder, the routes).
fn store_options(config: &Config) -> StoreOptions {
    let forward_readers = outpost_forward::RequiredReaders::new(config);
    StoreOptions {
        max_store_bytes: config.limits.max_store_bytes,
        max_queues: u64::from(config.limits.max_queues),
        idempotency_ttl: config.limits.idempotency_ttl,
        node_id: config.node_id.clone(),
        readers_of: Arc::new(move |queue: &str| {
            outpost_central::downlink_readers(queue).unwrap_or_else(|| forward_readers.of_queue(queue))
        }),
    }
}

fn initial_link_status(config: &Config) -> LinkStatus {
    let now_ms = now_unix_ms();
    match config.role {
        Role::Central => LinkStatus::new("online", now_ms),
        Role::Edge => {
            let mut status = LinkStatus::new("offline", now_ms);
            if config.upstreams.is_empty() {
                status.offline_log.push(OfflineLogEntry {
                    at: rfc3339_from_unix_ms(now_ms),
                    cause: "no_upstream".into(),
                    detail: "no central is configured: add [[upstream]] to the config file or pass --central URL; \
                             messages are stored until then"
                        .into(),
                });
            }
            status
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "stop requested: no new requests; finishing in-flight commits");
}

/// Sends systemd watchdog pings while the store writer answers; a wedged writer stops the pings and
/// systemd restarts the node.
async fn watchdog(store: Store, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        match tokio::time::timeout(WRITER_HEALTH_TIMEOUT, store.ping_writer()).await {
            Ok(Ok(())) => outpost_ha::notify_watchdog(),
            Ok(Err(e)) => tracing::warn!("store writer unavailable, withholding the watchdog ping: {e}"),
            Err(_) => tracing::error!(
                "store writer did not answer within {WRITER_HEALTH_TIMEOUT:?}; withholding the watchdog ping"
            ),
        }
    }
}
