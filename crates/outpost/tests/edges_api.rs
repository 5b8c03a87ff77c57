//! `GET /v1/edges` pages and filters (`?state=offline&limit=100&after=ID`) on a real central:
//! edges with open links (online, transitioning), edges that only reported offline, and listed
//! edges that never connected (`unknown`). Paging through any filter yields exactly the unpaged
//! answer's edges of that state, in id order, each once; the unpaged answer stays a plain array.
//! On a cluster, reports that change no state are written in groups, with no cluster event per
//! report, and both centrals still show every edge's newest report.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use testkit::postgres::TestDatabase;
use testkit::{wait_until_async, Node};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");
const NEXT_AFTER: &str = "outpost-next-after";

fn report(state: &str) -> Value {
    report_with_backlog(state, 0)
}

fn report_with_backlog(state: &str, backlog: u64) -> Value {
    json!({"state": state, "state_since_ms": 1_700_000_000_000i64, "upstream_url": null,
           "backlog_messages": backlog, "offline_log": []})
}

async fn post_report(http: &reqwest::Client, central: &str, id: &str, report: &Value) {
    let response = http
        .post(format!("{central}/v1/link/report"))
        .header("outpost-edge-id", id)
        .json(report)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204, "report of {id}");
}

/// Opens edge `id`'s link with `state` in its handshake and reads the welcome; the link stays
/// open while the returned response lives.
async fn open_link(http: &reqwest::Client, central: &str, id: &str, state: &str) -> reqwest::Response {
    let hello = json!({"edge_id": id, "version": env!("CARGO_PKG_VERSION"), "ping_interval_ms": 60_000,
                       "report": report(state)});
    let mut response = http
        .post(format!("{central}/v1/link"))
        .header("outpost-edge-id", id)
        .json(&hello)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "handshake of {id}");
    let first =
        tokio::time::timeout(Duration::from_secs(30), response.chunk()).await.unwrap().unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("welcome"), "{id}: {first:?}");
    response
}

async fn get(http: &reqwest::Client, url: &str) -> (u16, Option<String>, Value) {
    let response = http.get(url).send().await.unwrap();
    let status = response.status().as_u16();
    let next = response.headers().get(NEXT_AFTER).map(|v| v.to_str().unwrap().to_string());
    (status, next, response.json().await.unwrap())
}

fn ids(edges: &Value) -> Vec<String> {
    edges.as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_string()).collect()
}

/// Every page of `query` (without `limit`/`after`), `limit` at a time, concatenated.
async fn all_pages(http: &reqwest::Client, central: &str, query: &str, limit: usize) -> Vec<String> {
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..1000 {
        let mut url = format!("{central}/v1/edges?limit={limit}{query}");
        if let Some(after) = &after {
            url.push_str(&format!("&after={after}"));
        }
        let (status, next, page) = get(http, &url).await;
        assert_eq!(status, 200, "{url}: {page}");
        let page = ids(&page);
        assert!(page.len() <= limit, "{url}: {} edges", page.len());
        match next {
            Some(next) => {
                assert_eq!(page.len(), limit, "{url}: a page with more after it is full");
                assert_eq!(
                    Some(&next),
                    page.last(),
                    "{url}: the next page starts after this one's last edge"
                );
                seen.extend(page);
                after = Some(next);
            }
            None => {
                seen.extend(page);
                return seen;
            }
        }
    }
    panic!("{query}: paging did not end");
}

#[tokio::test]
async fn edges_page_and_filter_by_state() {
    // Every edge is listed (a central with [[edge]] refuses others); three never connect.
    let listed = ["never-a", "never-b", "never-c"];
    let config: String = (0..30)
        .map(|i| format!("e-{i:02}"))
        .chain(listed.iter().map(|id| id.to_string()))
        .map(|id| format!("[[edge]]\nid = \"{id}\"\ntoken = \"\"\n\n"))
        .collect();
    let central = Node::builder(BIN).role("central").config(&config).start().await;
    let url = central.url();
    let http = reqwest::Client::new();

    // 30 edges: every third online (link open), every third transitioning (link open), the rest
    // reported offline without a link. Ids e-00..e-29 interleave the states.
    let mut links = Vec::new();
    let mut want_state = BTreeMap::new();
    for i in 0..30 {
        let id = format!("e-{i:02}");
        let state = ["online", "transition_to_online", "offline"][i % 3];
        if state == "offline" {
            let response = http
                .post(format!("{url}/v1/link/report"))
                .header("outpost-edge-id", &id)
                .json(&report("offline"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 204);
        } else {
            links.push(open_link(&http, &url, &id, "transition_to_online").await);
            if state == "online" {
                let response = http
                    .post(format!("{url}/v1/link/report"))
                    .header("outpost-edge-id", &id)
                    .json(&report("online"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 204);
            }
        }
        want_state.insert(id, state.to_string());
    }
    for id in listed {
        want_state.insert(id.to_string(), "unknown".to_string());
    }

    // Unpaged: the plain array of every edge, by id, no paging header.
    let (status, next, everything) = get(&http, &format!("{url}/v1/edges")).await;
    assert_eq!(status, 200);
    assert_eq!(next, None);
    let all_ids = ids(&everything);
    assert_eq!(all_ids, want_state.keys().cloned().collect::<Vec<_>>());
    for edge in everything.as_array().unwrap() {
        let id = edge["id"].as_str().unwrap();
        assert_eq!(edge["state"], want_state[id].as_str(), "{edge}");
    }

    // Paging with every page size walks the same list.
    for limit in [1, 4, 7, 32, 33, 1000] {
        assert_eq!(all_pages(&http, &url, "", limit).await, all_ids, "limit {limit}");
    }
    // Each state, paged and unpaged.
    for state in ["online", "offline", "transition_to_online", "transition_to_offline", "unknown"] {
        let want: Vec<String> =
            want_state.iter().filter(|(_, s)| s.as_str() == state).map(|(id, _)| id.clone()).collect();
        let (status, next, unpaged) = get(&http, &format!("{url}/v1/edges?state={state}")).await;
        assert_eq!((status, next), (200, None));
        assert_eq!(ids(&unpaged), want, "state {state}");
        for limit in [1, 3, 100] {
            assert_eq!(
                all_pages(&http, &url, &format!("&state={state}"), limit).await,
                want,
                "{state} by {limit}"
            );
        }
    }
    // `after` alone: everything after that id; after the last one, nothing.
    let (_, _, rest) = get(&http, &format!("{url}/v1/edges?after=e-17")).await;
    assert_eq!(ids(&rest), all_ids.iter().filter(|id| id.as_str() > "e-17").cloned().collect::<Vec<_>>());
    let (_, next, rest) = get(&http, &format!("{url}/v1/edges?after=zzz&limit=5")).await;
    assert_eq!((ids(&rest).len(), next), (0, None));
    // `after` an id that is not an edge: starts after where it would sort.
    let (_, _, rest) = get(&http, &format!("{url}/v1/edges?after=e-05x&state=offline&limit=2")).await;
    assert_eq!(ids(&rest), vec!["e-08", "e-11"]);

    // Bad queries are refused and say why.
    for bad in ["state=sleeping", "limit=0", "limit=1001", "limit=ten", "after=a/b", "after=", "page=2"] {
        let (status, _, body) = get(&http, &format!("{url}/v1/edges?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{bad}: {body}");
    }
    drop(links);
}

/// The cluster events (`NOTIFY outpost_events` payloads) sent on `database` from now on, while the
/// returned client lives.
async fn listen_to_cluster_events(
    database: &TestDatabase,
) -> (tokio_postgres::Client, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let (client, mut connection) =
        tokio_postgres::connect(&database.url, tokio_postgres::NoTls).await.unwrap();
    let (sender, events) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(notification) = message {
                let _ = sender.send(notification.payload().to_string());
            }
        }
    });
    client.batch_execute("LISTEN outpost_events").await.unwrap();
    (client, events)
}

#[tokio::test]
async fn on_a_cluster_reports_are_written_in_groups_and_both_centrals_show_the_newest() {
    const EDGES: usize = 50;
    const ROUNDS: u64 = 6;
    let database = TestDatabase::create().await;
    let start = |id: &'static str| {
        Node::builder(BIN).role("central").args(["--node-id", id, "--postgres", &database.url]).start()
    };
    let (a, b) = (start("hq-a").await, start("hq-b").await);
    let http = reqwest::Client::new();
    let ids: Vec<String> = (0..EDGES).map(|i| format!("r-{i:02}")).collect();
    let backlogs = |central: &Node| {
        let http = http.clone();
        let url = central.url();
        async move {
            let (status, _, edges) = get(&http, &format!("{url}/v1/edges")).await;
            assert_eq!(status, 200);
            edges
                .as_array()
                .unwrap()
                .iter()
                .map(|e| (e["id"].as_str().unwrap().to_string(), e["backlog_messages"].as_u64()))
                .collect::<BTreeMap<_, _>>()
        }
    };

    // A first report is a new state: written at once, and the other central hears of it.
    for id in &ids {
        post_report(&http, &a.url(), id, &report_with_backlog("offline", 0)).await;
    }
    wait_until_async(Duration::from_secs(15), "every edge on the other central", || async {
        backlogs(&b).await.len() == EDGES
    })
    .await;

    // Reports that change no state, only the backlog: no cluster event each, and both centrals
    // show the newest within the group write plus the other's re-read.
    let (_listening, mut events) = listen_to_cluster_events(&database).await;
    for round in 1..=ROUNDS {
        let reports = ids.iter().map(|id| {
            let (http, url) = (http.clone(), a.url());
            async move { post_report(&http, &url, id, &report_with_backlog("offline", round)).await }
        });
        futures_util::future::join_all(reports).await;
    }
    let newest: BTreeMap<String, Option<u64>> = ids.iter().map(|id| (id.clone(), Some(ROUNDS))).collect();
    assert_eq!(backlogs(&a).await, newest, "the central the edges report to shows their newest report");
    wait_until_async(
        Duration::from_secs(20),
        "the newest report of every edge on the other central",
        || async { backlogs(&b).await == newest },
    )
    .await;
    let mut edge_events = 0;
    while let Ok(event) = events.try_recv() {
        edge_events += usize::from(event.contains("edge_updated"));
    }
    assert_eq!(
        edge_events,
        0,
        "{} reports that changed no state sent no cluster event",
        EDGES as u64 * ROUNDS
    );
}
