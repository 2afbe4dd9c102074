//! 200 submits from 20 concurrent clients over HTTP, on SQLite: every one accepted,
//! processed once, listed exactly once, and counted by the metrics.
//!
//! The only test in its process, so the metric values it reads are its own.

mod http_support;

use std::collections::BTreeSet;
use std::time::Duration;

use http_support::{COLLECTION, Options, Server, body, client, fast_config, list_all};
use reqwest::StatusCode;
use root_orchestrator::SqliteStore;
use root_orchestrator::http::StaticTokens;
use serde_json::{Value, json};

const CLIENTS: usize = 20;
const PER_CLIENT: usize = 10;
const TOTAL: usize = CLIENTS * PER_CLIENT;

/// The value of the one series of `name` whose labels contain `labels`.
fn metric(text: &str, name: &str, labels: &str) -> f64 {
    let values: Vec<f64> = text
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) && line.contains(labels))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse().ok())
        .collect();
    assert_eq!(
        values.len(),
        1,
        "one series {name} with {labels} in:\n{text}"
    );
    values[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_submits_are_all_processed_and_listed_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("requests.db"))
        .await
        .unwrap();
    // Four analysts on two projects, and a lead who sees both.
    let tokens = StaticTokens::parse(
        "t0=analyst-0:glp1;t1=analyst-1:glp1;t2=analyst-2:oncology;t3=analyst-3:oncology;\
         lead=lead:glp1,oncology",
    )
    .unwrap();
    let options = Options {
        config: fast_config(8),
        tokens,
        ..Options::default()
    };
    let server = Server::start(store, options).await;

    // 20 clients, each with its own connection pool, submit at once.
    let clients = (0..CLIENTS).map(|c| {
        let url = format!("{}{COLLECTION}", server.base);
        tokio::spawn(async move {
            let http = client();
            let (token, project) = match c % 4 {
                0 => ("t0", "glp1"),
                1 => ("t1", "glp1"),
                2 => ("t2", "oncology"),
                _ => ("t3", "oncology"),
            };
            let mut ids = Vec::new();
            for n in 0..PER_CLIENT {
                let mut request = body(project, json!({"sleep_ms": 5}));
                request["request_id"] = json!(format!("load-{c:02}-{n:02}"));
                let response = http
                    .post(&url)
                    .bearer_auth(token)
                    .json(&request)
                    .send()
                    .await
                    .expect("the server answers");
                assert_eq!(response.status(), StatusCode::ACCEPTED);
                let answer: Value = response.json().await.expect("a JSON answer");
                assert_eq!(answer["replayed"], false, "{answer}");
                ids.push(answer["request_id"].as_str().unwrap().to_owned());
            }
            ids
        })
    });
    let mut submitted = BTreeSet::new();
    for handle in clients.collect::<Vec<_>>() {
        submitted.extend(handle.await.expect("a client finished"));
    }
    assert_eq!(submitted.len(), TOTAL);

    // Every request completes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (completed, _) = list_all(
            &server,
            "lead",
            &format!("{COLLECTION}?status=COMPLETED&limit=100"),
        )
        .await;
        if completed.len() == TOTAL {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {TOTAL} completed",
            completed.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Small pages, followed to the end, return each request exactly once, newest first.
    let (listed, pages) = list_all(&server, "lead", &format!("{COLLECTION}?limit=7")).await;
    assert_eq!(listed.len(), TOTAL);
    assert_eq!(pages, TOTAL.div_ceil(7));
    assert_eq!(listed.iter().cloned().collect::<BTreeSet<_>>(), submitted);
    let reply = server.get(&format!("{COLLECTION}?limit=100"), "lead").await;
    let created: Vec<chrono::DateTime<chrono::FixedOffset>> = reply.json["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| chrono::DateTime::parse_from_rfc3339(r["created_at"].as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(created.len(), 100);
    assert!(created.windows(2).all(|w| w[0] >= w[1]), "newest first");

    // Each analyst lists only their own project's share.
    let (own, _) = list_all(&server, "t2", &format!("{COLLECTION}?limit=100")).await;
    assert_eq!(
        own.len(),
        TOTAL / 2,
        "analyst-2 and analyst-3 share oncology"
    );

    // Every request ran once and succeeded the first time.
    for id in listed.iter().step_by(17) {
        let status = server
            .get(&format!("{COLLECTION}/{id}/status"), "lead")
            .await;
        assert_eq!(status.json["attempts"], 1, "{}", status.text);
    }

    // The metrics saw the same.
    let scrape = server
        .call(reqwest::Method::GET, "/metrics", None, None)
        .await;
    let text = &scrape.text;
    let labels = "request_type=\"semaglutide_intelligence\"";
    let submitted_total = metric(text, "root_orchestrator_requests_submitted_total", labels);
    assert_eq!(submitted_total, TOTAL as f64);
    let completed_total = metric(text, "root_orchestrator_requests_completed_total", labels);
    assert_eq!(completed_total, TOTAL as f64);
    let runs = metric(text, "root_orchestrator_processing_seconds_count", labels);
    assert_eq!(runs, TOTAL as f64);
    let fast_runs = metric(
        text,
        "root_orchestrator_processing_seconds_bucket",
        "le=\"0.05\"",
    );
    assert!(fast_runs > 0.0 && fast_runs <= TOTAL as f64, "{fast_runs}");
    assert_eq!(
        metric(text, "root_orchestrator_queue_depth", "strategy=\"table\""),
        0.0
    );
    assert!(
        !text.contains("root_orchestrator_requests_failed_total{"),
        "{text}"
    );
    // The per-status gauge the workers publish is described like every other metric.
    assert!(
        text.contains("# HELP root_orchestrator_requests Requests in the store per `status`"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE root_orchestrator_requests gauge"),
        "{text}"
    );

    server.stop().await;
}
