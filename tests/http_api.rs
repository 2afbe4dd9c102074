//! The HTTP API end to end: a server on a loopback port, called with a real HTTP client.

mod http_support;

use std::collections::{BTreeMap, BTreeSet};

use http_support::{COLLECTION, INTEL, Options, Server, WATCH, body, list_all};
use reqwest::{Method, StatusCode};
use root_orchestrator::{MemoryStore, RequestStatus, SqliteStore};
use serde_json::{Value, json};

const ALICE: &str = "alice-token";
const BOB: &str = "bob-token";
const CAROL: &str = "carol-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_answers_202_with_links_and_a_repeated_id_returns_the_first_request() {
    let server = Server::memory_without_workers().await;

    let mut first = body("glp1", json!({}));
    first["request_id"] = json!("idem-1");
    let reply = server.post(COLLECTION, ALICE, &first).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text);
    assert_eq!(reply.json["request_id"], "idem-1");
    assert_eq!(reply.json["status"], "PENDING");
    assert_eq!(reply.json["replayed"], false);
    assert_eq!(
        reply.json["links"],
        json!({
            "status": "/market-intelligence/requests/idem-1/status",
            "results": "/market-intelligence/requests/idem-1/results",
            "cancel": "/market-intelligence/requests/idem-1/cancel",
        })
    );
    assert_eq!(
        reply.headers["location"],
        "/market-intelligence/requests/idem-1/status"
    );
    let created_at = reply.json["created_at"].clone();

    // The same id again, with other keywords: the first request comes back, unchanged.
    let mut again = first.clone();
    again["configuration"]["keywords"] = json!(["insulin"]);
    let reply = server.post(COLLECTION, ALICE, &again).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text);
    assert_eq!(reply.json["replayed"], true);
    assert_eq!(reply.json["created_at"], created_at);

    let status = server
        .get(&format!("{COLLECTION}/idem-1/status"), ALICE)
        .await;
    assert_eq!(
        status.json["configuration"]["keywords"],
        json!(["semaglutide", "tirzepatide"])
    );
    // `user_id` was left out: it is the caller.
    assert_eq!(status.json["user_id"], "alice");
    assert_eq!(status.json["priority"], "high");
    let (ids, _) = list_all(&server, ALICE, COLLECTION).await;
    assert_eq!(ids, ["idem-1"], "stored once");

    // Without an id, each submit is a new request with a generated (UUIDv7) id.
    let a = server.submit(ALICE, &body("glp1", json!({}))).await;
    let b = server.submit(ALICE, &body("glp1", json!({}))).await;
    assert_ne!(a, b);
    assert_eq!(a.len(), 36, "{a}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_follow_the_prefix_the_router_is_nested_under() {
    let options = Options {
        prefix: Some("/api/v1"),
        workers: false,
        ..Options::default()
    };
    let server = Server::start(MemoryStore::new(), options).await;

    let reply = server
        .post(
            "/api/v1/market-intelligence/requests",
            ALICE,
            &body("glp1", json!({})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text);
    let status_link = reply.json["links"]["status"].as_str().unwrap().to_owned();
    assert!(
        status_link.starts_with("/api/v1/market-intelligence/requests/"),
        "{status_link}"
    );

    let status = server.get(&status_link, ALICE).await;
    assert_eq!(status.status, StatusCode::OK, "{}", status.text);
    assert_eq!(status.json["links"]["status"], status_link);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_progress_attempts_timestamps_and_errors() {
    let server = Server::memory().await;

    // Fails its first attempt (retryably), then completes.
    let id = server
        .submit(ALICE, &body("glp1", json!({"fail_attempts": 1})))
        .await;
    let status = server.wait_for_status(ALICE, &id, "COMPLETED").await;

    assert_eq!(status["request_id"], id.as_str());
    assert_eq!(status["project_id"], "glp1");
    assert_eq!(status["request_type"], INTEL);
    assert_eq!(status["attempts"], 2);
    assert_eq!(status["max_attempts"], 4);
    assert_eq!(status["progress"]["percentage"], 100);
    assert_eq!(status["progress"]["urls_found"], 3);
    assert_eq!(status["next_attempt_at"], Value::Null);
    for field in ["created_at", "started_at", "completed_at"] {
        assert!(status[field].is_string(), "{field}: {status}");
    }

    let errors = status["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{status}");
    assert_eq!(errors[0]["attempt"], 1);
    assert_eq!(errors[0]["retryable"], true);
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap()
            .contains("timed out on attempt 1"),
        "{status}"
    );

    let history: Vec<&str> = status["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        history,
        [
            "PENDING",
            "PROCESSING",
            "EXECUTING",
            "PENDING",
            "PROCESSING",
            "EXECUTING",
            "COMPLETED"
        ]
    );
    // Workers' write credentials never leave the server.
    assert!(!status.to_string().contains("lease"), "{status}");

    let unknown = server
        .get(&format!("{COLLECTION}/no-such-id/status"), ALICE)
        .await;
    unknown.problem(404, "not-found");
    // An id that could never have been stored is not found either, not a 4xx of its own.
    let impossible = server
        .get(&format!("{COLLECTION}/a%20b/status"), ALICE)
        .await;
    impossible.problem(404, "not-found");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_200_once_completed_and_409_before_on_failure_and_on_cancel() {
    let server = Server::memory().await;

    let done = server.submit(ALICE, &body("glp1", json!({}))).await;
    server.wait_for_status(ALICE, &done, "COMPLETED").await;
    let reply = server
        .get(&format!("{COLLECTION}/{done}/results"), ALICE)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json["status"], "COMPLETED");
    assert_eq!(
        reply.json["summary"]["keywords"],
        json!(["semaglutide", "tirzepatide"])
    );
    assert_eq!(reply.json["report_path"], format!("reports/{done}.md"));

    // Running: 409 with the current status.
    let slow = server
        .submit(ALICE, &body("glp1", json!({"sleep_ms": 60_000})))
        .await;
    server.wait_for_status(ALICE, &slow, "EXECUTING").await;
    let reply = server
        .get(&format!("{COLLECTION}/{slow}/results"), ALICE)
        .await;
    let problem = reply.problem(409, "results-not-ready");
    assert_eq!(problem["request_status"], "EXECUTING");
    assert_eq!(problem["request_id"], slow.as_str());

    // Cancelled while running; then results say so, and a second cancel is refused.
    let reply = server
        .call(
            Method::POST,
            &format!("{COLLECTION}/{slow}/cancel"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json["status"], "CANCELLED");
    assert_eq!(reply.json["previous_status"], "EXECUTING");
    let reply = server
        .get(&format!("{COLLECTION}/{slow}/results"), ALICE)
        .await;
    assert_eq!(
        reply.problem(409, "request-cancelled")["request_status"],
        "CANCELLED"
    );
    let reply = server
        .call(
            Method::POST,
            &format!("{COLLECTION}/{slow}/cancel"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(
        reply.problem(409, "already-finished")["request_status"],
        "CANCELLED"
    );

    // Failed: 409 with the error record.
    let failing = server
        .submit(ALICE, &body("glp1", json!({"fail": "permanent"})))
        .await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let problem = loop {
        let reply = server
            .get(&format!("{COLLECTION}/{failing}/results"), ALICE)
            .await;
        if reply.json["type"] == "urn:root-orchestrator:problem:request-failed" {
            break reply.problem(409, "request-failed").clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "{}", reply.text);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(problem["request_status"], "FAILED");
    let errors = problem["errors"].as_array().unwrap();
    assert_eq!(
        errors.len(),
        1,
        "a permanent failure is not retried: {problem}"
    );
    assert_eq!(errors[0]["retryable"], false);
    assert_eq!(errors[0]["message"], "the corpus is unreadable");

    // A completed request cannot be cancelled.
    let reply = server
        .call(
            Method::POST,
            &format!("{COLLECTION}/{done}/cancel"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(
        reply.problem(409, "already-finished")["request_status"],
        "COMPLETED"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_request_is_cancelled_at_once() {
    let server = Server::memory_without_workers().await;
    let id = server.submit(ALICE, &body("glp1", json!({}))).await;

    let reply = server
        .get(&format!("{COLLECTION}/{id}/results"), ALICE)
        .await;
    assert_eq!(
        reply.problem(409, "results-not-ready")["request_status"],
        "PENDING"
    );
    let status = server
        .get(&format!("{COLLECTION}/{id}/status"), ALICE)
        .await;
    assert!(
        status.json["next_attempt_at"].is_string(),
        "{}",
        status.text
    );

    let reply = server
        .call(
            Method::POST,
            &format!("{COLLECTION}/{id}/cancel"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json["previous_status"], "PENDING");
    assert_eq!(
        reply.json["links"]["status"],
        format!("{COLLECTION}/{id}/status")
    );
    let status = server
        .get(&format!("{COLLECTION}/{id}/status"), ALICE)
        .await;
    assert_eq!(status.json["status"], "CANCELLED");

    let reply = server
        .call(
            Method::POST,
            &format!("{COLLECTION}/nothing-here/cancel"),
            Some(ALICE),
            None,
        )
        .await;
    reply.problem(404, "not-found");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_filters_newest_first_with_bounded_cursor_pages() {
    let server = Server::memory_without_workers().await;

    // carol may use both projects; alice only glp1.
    let mut submitted = Vec::new();
    for i in 0..9 {
        let project = if i % 3 == 2 { "oncology" } else { "glp1" };
        let mut request = body(project, json!({}));
        if i % 2 == 1 {
            request["request_type"] = json!(WATCH);
        }
        submitted.push(server.submit(CAROL, &request).await);
        // Distinct creation times, so "newest first" has one right answer.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let newest_first: Vec<String> = submitted.iter().rev().cloned().collect();

    let (ids, pages) = list_all(&server, CAROL, &format!("{COLLECTION}?limit=4")).await;
    assert_eq!(ids, newest_first);
    assert_eq!(pages, 3);

    // Filters; the `next` links keep them.
    let (ids, pages) = list_all(
        &server,
        CAROL,
        &format!("{COLLECTION}?project_id=glp1&limit=2"),
    )
    .await;
    let glp1: Vec<String> = (0..9)
        .rev()
        .filter(|i| i % 3 != 2)
        .map(|i| submitted[i].clone())
        .collect();
    assert_eq!(ids, glp1);
    assert_eq!(pages, 3);

    let (ids, _) = list_all(
        &server,
        CAROL,
        &format!("{COLLECTION}?request_type={WATCH}&project_id=glp1&limit=1"),
    )
    .await;
    let watch_glp1: Vec<String> = (0..9)
        .rev()
        .filter(|i| i % 2 == 1 && i % 3 != 2)
        .map(|i| submitted[i].clone())
        .collect();
    assert_eq!(ids, watch_glp1);

    let cancel = &submitted[4];
    let reply = server
        .call(
            Method::POST,
            &format!("{COLLECTION}/{cancel}/cancel"),
            Some(CAROL),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let (ids, _) = list_all(&server, CAROL, &format!("{COLLECTION}?status=cancelled")).await;
    assert_eq!(ids, [cancel.as_str()]);
    let (ids, _) = list_all(&server, CAROL, &format!("{COLLECTION}?status=PENDING")).await;
    assert_eq!(ids.len(), 8);

    // The default page is 20; a page is never larger than 100.
    let reply = server.get(COLLECTION, CAROL).await;
    assert_eq!(reply.json["requests"].as_array().unwrap().len(), 9);
    assert_eq!(reply.json["next"], Value::Null);
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=ten", "limit"),
        ("status=DONE", "status"),
        ("cursor=not-a-cursor", "cursor"),
        ("request_type=a%2Fb", "request_type"),
        ("project=glp1", "project"),
    ] {
        let reply = server.get(&format!("{COLLECTION}?{query}"), CAROL).await;
        assert_eq!(
            reply.problem(422, "invalid-request")["field"],
            field,
            "{query}"
        );
    }
    let reply = server.get(&format!("{COLLECTION}?limit=100"), CAROL).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_see_list_and_cancel_only_their_own_and_their_projects_requests() {
    let server = Server::memory_without_workers().await;
    let bobs = server.submit(BOB, &body("oncology", json!({}))).await;
    let alices = server.submit(ALICE, &body("glp1", json!({}))).await;

    // alice cannot see bob's request: 404, answered exactly as for an id that does not exist.
    for route in ["status", "results"] {
        let hidden = server
            .get(&format!("{COLLECTION}/{bobs}/{route}"), ALICE)
            .await;
        let missing = server
            .get(&format!("{COLLECTION}/{bobs}x/{route}"), ALICE)
            .await;
        let hidden = hidden.problem(404, "not-found");
        let missing = missing.problem(404, "not-found");
        assert_eq!(hidden["title"], missing["title"]);
        assert_eq!(hidden.get("request_status"), None);
    }
    let reply = server
        .call(
            Method::POST,
            &format!("{COLLECTION}/{bobs}/cancel"),
            Some(ALICE),
            None,
        )
        .await;
    reply.problem(404, "not-found");
    let still = server
        .get(&format!("{COLLECTION}/{bobs}/status"), BOB)
        .await;
    assert_eq!(
        still.json["status"], "PENDING",
        "alice's cancel changed nothing"
    );

    // Listing: each sees their own; filtering on another's project finds nothing.
    let (ids, _) = list_all(&server, ALICE, COLLECTION).await;
    assert_eq!(ids, [alices.as_str()]);
    let (ids, _) = list_all(&server, ALICE, &format!("{COLLECTION}?project_id=oncology")).await;
    assert!(ids.is_empty(), "{ids:?}");
    let (ids, _) = list_all(&server, BOB, COLLECTION).await;
    assert_eq!(ids, [bobs.as_str()]);

    // carol may use both projects, so she sees (and may cancel) both requests.
    let (ids, _) = list_all(&server, CAROL, COLLECTION).await;
    assert_eq!(ids, [alices.clone(), bobs.clone()]);
    let reply = server
        .call(
            Method::POST,
            &format!("{COLLECTION}/{bobs}/cancel"),
            Some(CAROL),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);

    // A request of alice's own in a project she has since lost stays hers to see.
    let tokens = root_orchestrator::http::StaticTokens::parse("alice-token=alice:").unwrap();
    let restricted = Server::start(
        server_store_copy(&server).await,
        Options {
            workers: false,
            tokens,
            ..Options::default()
        },
    )
    .await;
    let (ids, _) = list_all(&restricted, ALICE, COLLECTION).await;
    assert_eq!(ids, [alices.as_str()]);
    restricted.stop().await;

    // Submitting as someone else, or into another's project, is refused and stores nothing.
    let mut as_bob = body("glp1", json!({}));
    as_bob["user_id"] = json!("bob");
    let reply = server.post(COLLECTION, ALICE, &as_bob).await;
    assert_eq!(reply.problem(403, "forbidden")["field"], "user_id");
    let reply = server
        .post(COLLECTION, ALICE, &body("oncology", json!({})))
        .await;
    assert_eq!(reply.problem(403, "forbidden")["field"], "project_id");

    // Reusing the id of a request alice may not see is refused: that the id is in use
    // shows (ids are one namespace), nothing else about bob's request does.
    let mut taken = body("glp1", json!({}));
    taken["request_id"] = json!(bobs);
    let reply = server.post(COLLECTION, ALICE, &taken).await;
    let problem = reply.problem(409, "request-id-taken");
    assert_eq!(problem["field"], "request_id");
    let members: BTreeSet<&str> = problem
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        members,
        BTreeSet::from(["type", "title", "status", "detail", "field"]),
        "{}",
        reply.text
    );
    for secret in ["oncology", "bob", bobs.as_str(), "PENDING"] {
        assert!(!reply.text.contains(secret), "{secret}: {}", reply.text);
    }

    let (ids, _) = list_all(&server, CAROL, COLLECTION).await;
    assert_eq!(
        ids.len(),
        2,
        "nothing stored by the refused submits: {ids:?}"
    );
    server.stop().await;
}

/// A memory store holding the same requests as `server`'s, submitted anew by their owners.
async fn server_store_copy(server: &Server) -> MemoryStore {
    let store = MemoryStore::new();
    let page = server
        .orchestrator
        .list(&root_orchestrator::ListFilter::new())
        .await
        .unwrap();
    for request in page.requests {
        let new = root_orchestrator::NewRequest::new(
            request.project_id.clone(),
            request.user_id.clone(),
            request.request_type.clone(),
            request.configuration.clone(),
        )
        .with_id(request.id.clone());
        root_orchestrator::RequestStore::insert(&store, new, 1)
            .await
            .unwrap();
    }
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_problems_and_stores_nothing() {
    let server = Server::memory_without_workers().await;
    let url = format!("{}{COLLECTION}", server.base);
    let valid = body("glp1", json!({}));

    // 401: no credentials, a wrong token, another scheme.
    let reply = server
        .call(Method::POST, COLLECTION, None, Some(&valid))
        .await;
    reply.problem(401, "unauthenticated");
    assert_eq!(
        reply.headers["www-authenticate"],
        "Bearer realm=\"root-orchestrator\""
    );
    let reply = server
        .call(Method::GET, COLLECTION, Some("wrong"), None)
        .await;
    reply.problem(401, "unauthenticated");
    assert!(
        reply.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    let reply = http_support::Reply::from(
        server
            .client
            .get(&url)
            .basic_auth("alice", Some("alice-token"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    reply.problem(401, "unauthenticated");

    // 415: not sent as JSON.
    let send_raw = |content_type: Option<&'static str>, bytes: Vec<u8>| {
        let mut request = server.client.post(&url).bearer_auth(ALICE).body(bytes);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        async move { http_support::Reply::from(request.send().await.unwrap()).await }
    };
    let json_bytes = serde_json::to_vec(&valid).unwrap();
    send_raw(Some("text/plain"), json_bytes.clone())
        .await
        .problem(415, "unsupported-media-type");
    send_raw(None, json_bytes.clone())
        .await
        .problem(415, "unsupported-media-type");
    // Parameters and structured-syntax suffixes are fine.
    let reply = send_raw(Some("application/json; charset=utf-8"), json_bytes.clone()).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text);
    let reply = send_raw(Some("application/vnd.analyst+json"), json_bytes).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text);

    // 413: over the limit (8 KiB in these tests), declared or streamed.
    let mut huge = valid.clone();
    huge["configuration"]["custom_params"] = json!({"padding": "x".repeat(9 * 1024)});
    send_raw(Some("application/json"), serde_json::to_vec(&huge).unwrap())
        .await
        .problem(413, "body-too-large");

    // 400: not JSON.
    for bytes in [
        b"{\"project_id\":".to_vec(),
        b"not json".to_vec(),
        vec![0xff, 0xfe, 0x00],
        Vec::new(),
        format!("{}{}", "[".repeat(3000), "]".repeat(3000)).into_bytes(),
    ] {
        send_raw(Some("application/json"), bytes)
            .await
            .problem(400, "malformed-json");
    }

    // 422: JSON with a value that is not accepted, the field named.
    let positional = json!([null, "glp1", "alice", INTEL, "high", valid["configuration"]]);
    let cases: Vec<(Value, &str)> = vec![
        (json!("a string"), "."),
        (positional, "."),
        (json!({"request_type": INTEL}), "project_id"),
        (
            json!({"project_id": "glp1", "request_type": INTEL, "configuration": {}}),
            "configuration.keywords",
        ),
        (
            with(&valid, "/configuration/quality_threshold", json!("high")),
            "configuration.quality_threshold",
        ),
        (
            with(&valid, "/configuration/quality_threshold", json!(1.5)),
            "configuration.quality_threshold",
        ),
        (
            with(&valid, "/configuration/sources", json!([{"name": "FDA"}])),
            "configuration.sources[0].type",
        ),
        (
            with(&valid, "/configuration/keywords", json!([])),
            "configuration.keywords",
        ),
        (with(&valid, "/priority", json!("urgent")), "priority"),
        (
            with(&valid, "/request_type", json!("no_such_workflow")),
            "request_type",
        ),
        (
            with(&valid, "/request_id", json!("has/slash")),
            "request_id",
        ),
        (
            with(
                &valid,
                "/metadata",
                json!({"submitted_at": "2026-01-01T00:00:00Z", "max_retries": 500}),
            ),
            "metadata.max_retries",
        ),
    ];
    for (body, field) in cases {
        let reply = server.post(COLLECTION, ALICE, &body).await;
        assert_eq!(
            reply.problem(422, "invalid-request")["field"],
            field,
            "{body}"
        );
        assert!(
            reply.json["detail"].as_str().unwrap().contains(field),
            "{}",
            reply.text
        );
    }

    // Only the two accepted submits were stored.
    let counts = server.orchestrator.store().count_by_status().await.unwrap();
    assert_eq!(counts.get(&RequestStatus::Pending), Some(&2), "{counts:?}");
    assert_eq!(counts.values().sum::<u64>(), 2);
    server.stop().await;
}

/// `value` with the JSON pointer `pointer` set to `new`.
fn with(value: &Value, pointer: &str, new: Value) -> Value {
    let mut value = value.clone();
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    value
        .pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .unwrap()
        .insert(key.to_owned(), new);
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operational_routes_answer_and_readiness_follows_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("requests.db"))
        .await
        .unwrap();
    let server = Server::start(
        store.clone(),
        Options {
            workers: false,
            ..Options::default()
        },
    )
    .await;

    let health = server.call(Method::GET, "/health", None, None).await;
    assert_eq!(
        (health.status, health.json.clone()),
        (StatusCode::OK, json!({"status": "ok"}))
    );
    let ready = server.call(Method::GET, "/ready", None, None).await;
    assert_eq!(
        (ready.status, ready.json.clone()),
        (StatusCode::OK, json!({"status": "ready"}))
    );

    let id = server.submit(ALICE, &body("glp1", json!({}))).await;
    let metrics = server.call(Method::GET, "/metrics", None, None).await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(
        metrics.content_type.starts_with("text/plain"),
        "{}",
        metrics.content_type
    );
    // Other tests in this process share the recorder, so only presence is checked here;
    // tests/http_load.rs checks values.
    assert!(
        metrics
            .text
            .contains("root_orchestrator_queue_depth{strategy=\"table\"} "),
        "{}",
        metrics.text
    );
    assert!(
        metrics
            .text
            .contains("# TYPE root_orchestrator_requests_submitted_total counter"),
        "{}",
        metrics.text
    );

    // Unknown routes and methods are problems too.
    let reply = server.call(Method::GET, "/nowhere", None, None).await;
    reply.problem(404, "no-route");
    let reply = server
        .call(
            Method::DELETE,
            &format!("{COLLECTION}/{id}/status"),
            Some(ALICE),
            None,
        )
        .await;
    reply.problem(405, "no-route");

    // The store goes away: not ready, and request routes answer 503, never 500.
    store.close().await;
    let ready = server.call(Method::GET, "/ready", None, None).await;
    ready.problem(503, "unavailable");
    let status = server
        .get(&format!("{COLLECTION}/{id}/status"), ALICE)
        .await;
    status.problem(503, "unavailable");
    // Both tell clients and probes when to come back.
    for reply in [&ready, &status] {
        assert_eq!(reply.headers["retry-after"], "5", "{:?}", reply.headers);
    }
    // The documented schema and header of a 503 fit what was answered.
    let doc = serde_json::to_value(root_orchestrator::http::openapi()).unwrap();
    let documented = &doc["paths"]["/ready"]["get"]["responses"]["503"];
    assert!(
        documented["headers"]["Retry-After"].is_object(),
        "{documented}"
    );
    let schema = &documented["content"]["application/problem+json"]["schema"];
    http_support::schema::check(&doc, schema, &ready.json).unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_covers_every_route_with_the_answers_it_gives() {
    let server = Server::memory().await;
    let reply = server.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(reply.status, StatusCode::OK);
    let doc = reply.json;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{doc}");
    assert_eq!(
        doc,
        serde_json::to_value(root_orchestrator::http::openapi()).unwrap()
    );

    // Exactly the routes the router serves.
    let served: BTreeSet<(String, String)> = [
        ("post", "/market-intelligence/requests"),
        ("get", "/market-intelligence/requests"),
        ("get", "/market-intelligence/requests/{id}/status"),
        ("get", "/market-intelligence/requests/{id}/results"),
        ("post", "/market-intelligence/requests/{id}/cancel"),
        ("get", "/health"),
        ("get", "/ready"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
    ]
    .into_iter()
    .map(|(m, p)| (m.to_owned(), p.to_owned()))
    .collect();
    let mut documented = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            documented.insert((method.clone(), path.clone()), operation.clone());
        }
    }
    assert_eq!(documented.keys().cloned().collect::<BTreeSet<_>>(), served);

    // Every `$ref` points at a schema the document has.
    let text = doc.to_string();
    for reference in text.split("\"$ref\":\"").skip(1) {
        let name = reference.split('"').next().unwrap();
        let name = name.trim_start_matches("#/components/schemas/");
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "missing schema {name}"
        );
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );

    // Call every route, with and without credentials: each answer's status is documented.
    let id = server.submit(ALICE, &body("glp1", json!({}))).await;
    server.wait_for_status(ALICE, &id, "COMPLETED").await;
    for ((method, path), operation) in &documented {
        let secured = operation["security"].is_array();
        assert_eq!(secured, path.starts_with(COLLECTION), "{method} {path}");
        let responses = operation["responses"].as_object().unwrap();
        let concrete = path.replace("{id}", &id);
        let method: Method = method.to_uppercase().parse().unwrap();
        let body =
            (method == Method::POST && !path.contains("{id}")).then(|| body("glp1", json!({})));

        let mut tokens = vec![Some(ALICE)];
        if secured {
            tokens.extend([None, Some("wrong-token")]);
        }
        for token in tokens {
            let reply = server
                .call(method.clone(), &concrete, token, body.as_ref())
                .await;
            let code = reply.status.as_str().to_owned();
            assert!(
                responses.contains_key(&code),
                "{method} {path} answered {code}, not documented: {}",
                reply.text
            );
            let media = responses[&code]["content"]
                .as_object()
                .map(|c| c.keys().cloned().collect::<Vec<_>>())
                .unwrap_or_default();
            let content_type = reply.content_type.split(';').next().unwrap().to_owned();
            assert!(
                media
                    .iter()
                    .any(|m| m.split(';').next() == Some(content_type.as_str())),
                "{method} {path} {code}: {content_type} not in {media:?}"
            );
            // The body fits its documented schema, and documented headers are sent.
            if content_type.ends_with("json") {
                let schema = &responses[&code]["content"][&content_type]["schema"];
                if let Err(mismatch) = http_support::schema::check(&doc, schema, &reply.json) {
                    panic!("{method} {path} {code}: {mismatch}\n{}", reply.text);
                }
            }
            if let Some(headers) = responses[&code]["headers"].as_object() {
                for header in headers.keys() {
                    assert!(
                        reply
                            .headers
                            .contains_key(header.to_ascii_lowercase().as_str()),
                        "{method} {path} {code}: no {header}"
                    );
                }
            }
        }
    }

    // The documented request body, with only its required fields, is accepted.
    let required: BTreeSet<&str> = doc["components"]["schemas"]["RequestMessage"]["required"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        required,
        BTreeSet::from(["configuration", "project_id", "request_type"])
    );
    let minimal = json!({
        "project_id": "glp1",
        "request_type": INTEL,
        "configuration": {
            "keywords": ["semaglutide"],
            "sources": [{"name": "FDA", "type": "regulatory"}],
        },
    });
    server.submit(ALICE, &minimal).await;
    server.stop().await;
}

/// Sends `request` on a new connection, which the client leaves open without finishing
/// the body, and returns the start of the answer. Fails if none comes within 5 s.
async fn answer_before_the_body_ends(server: &Server, request: Vec<u8>) -> String {
    let address = server.base.trim_start_matches("http://").to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        stream.write_all(&request).unwrap();
        let mut answer = vec![0; 4096];
        let n = stream
            .read(&mut answer)
            .expect("an answer while the body is still being sent");
        String::from_utf8_lossy(&answer[..n]).into_owned()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_checked_before_the_body_is_read() {
    let server = Server::memory_without_workers().await;

    // A declared megabyte of which a few bytes arrive: without valid credentials the
    // answer comes at once, not after the body (which never comes).
    for authorization in ["", "Authorization: Bearer wrong-token\r\n"] {
        let request = format!(
            "POST {COLLECTION} HTTP/1.1\r\nHost: 127.0.0.1\r\n{authorization}\
             Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{{\"project_id\":"
        );
        let answer = answer_before_the_body_ends(&server, request.into_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");
        assert!(answer.contains("application/problem+json"), "{answer}");
    }

    // Every protected route answers 401 before anything else, body or not.
    let some_body = json!({"padding": "x".repeat(100)});
    for (method, path) in [
        (Method::POST, COLLECTION.to_owned()),
        (Method::GET, COLLECTION.to_owned()),
        (Method::GET, format!("{COLLECTION}/some-id/status")),
        (Method::GET, format!("{COLLECTION}/some-id/results")),
        (Method::POST, format!("{COLLECTION}/some-id/cancel")),
    ] {
        let reply = server
            .call(method.clone(), &path, None, Some(&some_body))
            .await;
        reply.problem(401, "unauthenticated");
        assert!(reply.headers.contains_key("www-authenticate"), "{path}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_must_be_one_header_and_may_use_a_tab_after_the_scheme() {
    let server = Server::memory_without_workers().await;
    let url = format!("{}{COLLECTION}", server.base);

    let reply = http_support::Reply::from(
        server
            .client
            .get(&url)
            .header("authorization", "Bearer\talice-token")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);

    // Two headers, whichever comes first, and even when both are valid: refused.
    for (first, second) in [
        ("Bearer alice-token", "Bearer bob-token"),
        ("Bearer wrong", "Bearer alice-token"),
        ("Bearer alice-token", "Bearer alice-token"),
    ] {
        let reply = http_support::Reply::from(
            server
                .client
                .get(&url)
                .header("authorization", first)
                .header("authorization", second)
                .send()
                .await
                .unwrap(),
        )
        .await;
        let problem = reply.problem(401, "unauthenticated");
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("more than one Authorization header"),
            "{}",
            reply.text
        );
        assert!(
            reply.headers["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("invalid_request"),
            "{:?}",
            reply.headers
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_and_overlong_ids_are_not_found_without_echoing_them_whole() {
    let server = Server::memory_without_workers().await;

    for route in ["status", "results"] {
        let path = format!("{COLLECTION}/%FF/{route}");
        let reply = server.get(&path, ALICE).await;
        reply.problem(404, "not-found");
        // Without a token, credentials come first, as on every request route.
        let reply = server.call(Method::GET, &path, None, None).await;
        reply.problem(401, "unauthenticated");
    }
    let reply = server
        .call(
            Method::POST,
            &format!("{COLLECTION}/%C3%28/cancel"),
            Some(ALICE),
            None,
        )
        .await;
    reply.problem(404, "not-found");

    let long = "x".repeat(5000);
    let reply = server
        .get(&format!("{COLLECTION}/{long}/status"), ALICE)
        .await;
    let detail = reply.problem(404, "not-found")["detail"].as_str().unwrap();
    assert!(detail.len() < 300, "{} bytes", detail.len());
    assert!(
        detail.contains(&format!("{}…", "x".repeat(128))),
        "{detail}"
    );
    let reply = server
        .call(Method::GET, &format!("/{long}"), None, None)
        .await;
    let detail = reply.problem(404, "no-route")["detail"].as_str().unwrap();
    assert!(detail.len() < 300, "{} bytes", detail.len());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_takes_empty_values_as_left_out_and_names_a_repeated_parameter() {
    let server = Server::memory_without_workers().await;
    let mut submitted = Vec::new();
    for _ in 0..3 {
        submitted.push(server.submit(CAROL, &body("glp1", json!({}))).await);
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    submitted.reverse();

    let empty = format!("{COLLECTION}?status=&project_id=&request_type=&cursor=&limit=");
    let (ids, _) = list_all(&server, CAROL, &empty).await;
    assert_eq!(ids, submitted);
    // The `next` link does not carry the empty values on.
    let reply = server
        .get(&format!("{COLLECTION}?request_type=&limit=1"), CAROL)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let next = reply.json["next"].as_str().unwrap();
    assert!(!next.contains("request_type"), "{next}");
    let (ids, pages) = list_all(
        &server,
        CAROL,
        &format!("{COLLECTION}?request_type=&limit=1"),
    )
    .await;
    assert_eq!((ids, pages), (submitted.clone(), 3));

    for query in ["limit=1&limit=2", "status=PENDING&status=FAILED"] {
        let reply = server.get(&format!("{COLLECTION}?{query}"), CAROL).await;
        let problem = reply.problem(422, "invalid-request");
        let name = query.split('=').next().unwrap();
        assert_eq!(problem["field"], name, "{query}");
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("more than once"),
            "{}",
            reply.text
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_schema_and_the_server_agree_on_what_a_submit_accepts() {
    let server = Server::memory_without_workers().await;
    let doc = serde_json::to_value(root_orchestrator::http::openapi()).unwrap();
    let schema =
        &doc["paths"][COLLECTION]["post"]["requestBody"]["content"]["application/json"]["schema"];
    let valid = body("glp1", json!({}));

    let mut many = valid.clone();
    many["configuration"]["keywords"] = json!(vec!["k"; 100]);
    let mut cases: Vec<(&str, Value)> = vec![
        ("valid", valid.clone()),
        ("many keywords", many.clone()),
        (
            "an array",
            json!([null, "glp1", "alice", INTEL, "high", valid["configuration"]]),
        ),
        ("a string", json!("text")),
    ];
    many["configuration"]["keywords"] = json!(vec!["k"; 101]);
    cases.push(("too many keywords", many));
    for (pointer, value) in [
        ("/request_id", Value::Null),
        ("/request_id", json!("x".repeat(128))),
        ("/request_id", json!("x".repeat(129))),
        ("/request_id", json!("..")),
        ("/request_id", json!("has/slash")),
        ("/request_id", json!("a:b.c_d-1")),
        ("/user_id", Value::Null),
        ("/user_id", json!("alice")),
        ("/priority", Value::Null),
        ("/priority", json!("HIGH")),
        ("/priority", json!("Low")),
        ("/priority", json!("hIGH")),
        ("/metadata", Value::Null),
        (
            "/metadata",
            json!({"submitted_at": "2026-01-01T00:00:00Z", "max_retries": 99}),
        ),
        (
            "/metadata",
            json!({"submitted_at": "2026-01-01T00:00:00Z", "max_retries": 100}),
        ),
        (
            "/metadata",
            json!({"submitted_at": "2026-01-01T00:00:00Z", "retry_count": null}),
        ),
        (
            "/metadata",
            json!({"submitted_at": "2026-01-01T00:00:00Z", "note": "other"}),
        ),
        ("/metadata", json!({"submitted_at": "yesterday"})),
        ("/unknown", json!(1)),
        ("/configuration/extraction_mode", Value::Null),
        ("/configuration/extraction_mode", json!("summary")),
        ("/configuration/quality_threshold", Value::Null),
        ("/configuration/quality_threshold", json!(1)),
        ("/configuration/quality_threshold", json!(1.01)),
        ("/configuration/custom_params", Value::Null),
        ("/configuration/custom_params", json!([])),
        ("/configuration/unknown", json!(1)),
        ("/configuration/keywords", json!([])),
        ("/configuration/keywords", json!(["k".repeat(257)])),
        ("/configuration/sources", json!([])),
        (
            "/configuration/sources",
            json!([{"name": "FDA", "type": "r", "url": "x"}]),
        ),
        ("/configuration/sources", json!([{"name": "FDA"}])),
    ] {
        cases.push(("", with(&valid, pointer, value)));
    }

    for (i, (name, body)) in cases.into_iter().enumerate() {
        let mut body = body;
        // A fresh id per accepted case, unless the case is about the id.
        if let Some(fields) = body.as_object_mut()
            && !fields.contains_key("request_id")
        {
            fields.insert("request_id".into(), json!(format!("agree-{i}")));
        }
        let documented = http_support::schema::check(&doc, schema, &body);
        let reply = server.post(COLLECTION, ALICE, &body).await;
        let accepted = reply.status == StatusCode::ACCEPTED;
        assert_eq!(
            documented.is_ok(),
            accepted,
            "{name} {body}: the schema says {documented:?}, the server {}",
            reply.text
        );
        if !accepted {
            assert_eq!(
                reply.status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{}",
                reply.text
            );
        }
    }

    // The seed request of the README fits the schema too.
    let seed: Value = serde_json::from_str(include_str!(
        "../examples/requests/semaglutide_intelligence.json"
    ))
    .unwrap();
    http_support::schema::check(&doc, schema, &seed).unwrap();
    server.stop().await;
}
