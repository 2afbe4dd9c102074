//! The queue strategy on SQS (moto on loopback) under faults: a consumer process killed
//! mid-request, the endpoint cut off, and single responses lost on the way back.
//!
//! Needs `AWS_ENDPOINT_URL_SQS`: `bash .ci/with-sqs cargo test --features postgres,sqs
//! --test faults`. Without it these tests fail; none is skipped.

use std::net::SocketAddr;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_sqs::config::Credentials;
use root_orchestrator::{QueueBackend, QueueConfig, QueueStrategy, SqsQueue};

use super::*;

/// The local server's endpoint; its absence fails the test.
fn endpoint() -> String {
    let endpoint = std::env::var("AWS_ENDPOINT_URL_SQS").unwrap_or_else(|_| {
        panic!(
            "AWS_ENDPOINT_URL_SQS is not set: these tests need an SQS-compatible server; \
             run them with `bash .ci/with-sqs cargo test --features postgres,sqs --test faults`"
        )
    });
    let address = upstream(&endpoint);
    assert!(address.ip().is_loopback(), "{endpoint} is not on loopback");
    endpoint
}

fn upstream(endpoint: &str) -> SocketAddr {
    let authority = endpoint
        .strip_prefix("http://")
        .expect("a plain-HTTP local endpoint")
        .trim_end_matches('/');
    authority.parse().expect("the endpoint is 127.0.0.1:<port>")
}

/// AWS settings for a loopback endpoint only, with throw-away credentials.
async fn sdk_config(endpoint: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "faults"))
        .endpoint_url(endpoint)
        .load()
        .await
}

/// A fresh queue pair on the server, reached directly.
async fn fresh_queue() -> SqsQueue {
    let name = format!(
        "ro-faults-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    SqsQueue::builder(&name)
        .create_if_missing(10)
        .sdk_config(sdk_config(&endpoint()).await)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("cannot create {name} at {}: {e:?}", endpoint()))
}

fn queue_config() -> QueueConfig {
    let mut config = QueueConfig::default();
    config.max_workers = 3;
    config.visibility_timeout = Duration::from_secs(2);
    config.long_polling_wait_time = Duration::from_secs(1);
    config.shutdown_grace_period = Duration::from_secs(2);
    config.reconcile_interval = Duration::from_secs(1);
    config.reconcile_after = Duration::from_secs(4);
    config
}

async fn wait_drained(queue: &SqsQueue) {
    wait_until("the queue is drained", Duration::from_secs(15), || async {
        let depth = queue.depth().await.unwrap();
        depth.visible + depth.in_flight + depth.delayed == 0
    })
    .await;
    assert_eq!(queue.depth().await.unwrap().dead_lettered, 0);
}

/// An orchestrator whose consumers reach the queue through a proxy; not yet running.
struct Proxied {
    _dir: tempfile::TempDir,
    store: SqliteStore,
    direct: SqsQueue,
    proxy: Proxy,
    orchestrator: RootOrchestrator,
    executor: Counting,
}

async fn proxied() -> Proxied {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("requests.db"))
        .await
        .unwrap();
    let direct = fresh_queue().await;
    let proxy = Proxy::start(upstream(&endpoint()), Mode::Http).await;
    let through = SqsQueue::builder(direct.queue_url())
        .attempt_timeout(Duration::from_secs(2))
        .sdk_config(sdk_config(&format!("http://{}", proxy.address())).await)
        .connect()
        .await
        .expect("connect through the proxy");
    let executor = Counting {
        pause: Duration::from_millis(300),
        ..Counting::default()
    };
    let orchestrator = RootOrchestrator::builder()
        .strategy(QueueStrategy::new(store.clone(), through, queue_config()).unwrap())
        .executor(TYPE, executor.clone())
        .build()
        .unwrap();
    Proxied {
        _dir: dir,
        store,
        direct,
        proxy,
        orchestrator,
        executor,
    }
}

impl Proxied {
    /// Every request ran once and was completed once.
    async fn assert_each_completed_once(&self, ids: &[RequestId]) {
        let executions = self.executor.executions();
        for id in ids {
            assert_eq!(executions.get(id), Some(&1), "{id} ran once");
            let r = get(&self.store, id).await;
            assert_eq!(r.status, RequestStatus::Completed);
            assert_eq!(times_in_history(&r, RequestStatus::Completed), 1);
            assert_eq!(r.attempts, 1, "{:?}", r.errors);
        }
        assert_nothing_running(&self.store).await;
    }

    async fn wait_completed(&self, n: u64) {
        wait_until("the requests complete", Duration::from_secs(30), || async {
            count(&self.store, RequestStatus::Completed).await == n
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_request_of_a_killed_consumer_is_rerun_after_the_visibility_timeout_and_completes_once()
{
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("requests.db");
    let journal_path = dir.path().join("journal");
    let store = SqliteStore::open(&db).await.unwrap();
    let queue = fresh_queue().await;
    // Submits only: its consumers never run.
    let producer = RootOrchestrator::builder()
        .strategy(QueueStrategy::new(store.clone(), queue.clone(), queue_config()).unwrap())
        .executor(TYPE, Counting::default())
        .build()
        .unwrap();
    let id = producer.submit(request("long")).await.unwrap().id;

    let settings = [
        ("VISIBILITY_TIMEOUT", "2"),
        ("LONG_POLLING_WAIT_TIME", "1"),
        ("MAX_WORKERS", "2"),
        ("SHUTDOWN_GRACE_PERIOD", "1"),
    ];
    let worker_args = |long_ms: &str| {
        args(&[
            "--sqlite",
            &path_arg(&db),
            "--sqs-queue",
            queue.queue_url(),
            "--journal",
            &path_arg(&journal_path),
            "--long-ms",
            long_ms,
        ])
    };
    let mut doomed = WorkerProcess::start(WorkerSpec {
        args: worker_args("60000"),
        settings: &settings,
        env: Vec::new(),
    })
    .await;
    wait_until(
        "the first consumer starts the request",
        Duration::from_secs(10),
        || async { journal(&journal_path).len() == 1 },
    )
    .await;
    let running = get(&store, &id).await;
    assert_eq!(running.status, RequestStatus::Executing);
    let lease = running.lease.expect("a running request has a lease");
    assert!(
        lease.owner.starts_with(&doomed.worker_id),
        "{}",
        lease.owner
    );

    doomed.kill();
    let killed_at = unix_ms();
    let rescuer = WorkerProcess::start(WorkerSpec {
        args: worker_args("300"),
        settings: &settings,
        env: Vec::new(),
    })
    .await;
    wait_until("the request completes", Duration::from_secs(20), || async {
        get(&store, &id).await.status == RequestStatus::Completed
    })
    .await;

    let finished = get(&store, &id).await;
    assert_eq!(finished.attempts, 2, "the killed attempt counts");
    assert_eq!(times_in_history(&finished, RequestStatus::Completed), 1);
    assert_eq!(finished.errors.len(), 1, "{:?}", finished.errors);
    assert!(finished.errors[0].message.contains(&doomed.worker_id));
    let executions = journal(&journal_path);
    let starts: Vec<_> = executions.iter().filter(|e| e.started).collect();
    let ends: Vec<_> = executions.iter().filter(|e| !e.started).collect();
    assert_eq!(starts.len(), 2, "{executions:?}");
    assert!(starts[0].worker.starts_with(&doomed.worker_id));
    assert!(starts[1].worker.starts_with(&rescuer.worker_id));
    assert_eq!((starts[0].attempt, starts[1].attempt), (1, 2));
    assert_eq!(ends.len(), 1);
    assert!(ends[0].worker.starts_with(&rescuer.worker_id));
    // Rerun once the message's visibility (2 s, as the lease) had run out, not long after.
    assert!(starts[1].at_ms >= lease.expires_at.timestamp_millis());
    assert!(
        starts[1].at_ms <= killed_at + 2_000 + 4_000,
        "rerun too late"
    );
    assert_nothing_running(&store).await;
    wait_drained(&queue).await;
    rescuer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_endpoint_cut_off_for_three_seconds_loses_nothing_and_consumers_recover() {
    init_logs();
    let setup = proxied().await;
    let running = Running::start(setup.orchestrator.clone());
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(
            setup
                .orchestrator
                .submit(request("short"))
                .await
                .unwrap()
                .id,
        );
    }
    wait_until("work is under way", Duration::from_secs(15), || async {
        count(&setup.store, RequestStatus::Completed).await >= 2
    })
    .await;

    setup.proxy.stop();
    let outage = Instant::now();
    wait_ready(&setup.orchestrator, false, Duration::from_secs(3)).await;
    // Submits while the queue is cut off are stored, and sent later by the outbox.
    let submits = (0..4).map(|_| setup.orchestrator.submit(request("short")));
    for submitted in futures::future::join_all(submits).await {
        ids.push(
            submitted
                .expect("a submit is stored even when the queue is down")
                .id,
        );
    }
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(outage.elapsed())).await;
    assert!(
        !running.run.is_finished(),
        "the consumers gave up during the outage"
    );
    assert!(
        setup.orchestrator.ready().await.is_err(),
        "ready while cut off"
    );
    setup.proxy.resume().await;

    wait_ready(&setup.orchestrator, true, Duration::from_secs(10)).await;
    setup.wait_completed(12).await;
    wait_drained(&setup.direct).await;
    setup.assert_each_completed_once(&ids).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_lost_delete_response_does_not_run_a_completed_request_again() {
    init_logs();
    let setup = proxied().await;
    setup.proxy.drop_next_response("AmazonSQS.DeleteMessage");
    let running = Running::start(setup.orchestrator.clone());
    let id = setup
        .orchestrator
        .submit(request("short"))
        .await
        .unwrap()
        .id;
    setup.wait_completed(1).await;
    wait_drained(&setup.direct).await;
    assert_eq!(setup.proxy.dropped(), 1, "the delete's answer was withheld");
    // Past another visibility timeout: a message left behind would be back by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        setup.proxy.calls("AmazonSQS.DeleteMessage") >= 2,
        "the delete was tried again"
    );
    setup.assert_each_completed_once(&[id]).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_lost_send_response_makes_a_duplicate_message_that_is_dropped() {
    init_logs();
    let setup = proxied().await;
    setup.proxy.drop_next_response("AmazonSQS.SendMessage");
    let running = Running::start(setup.orchestrator.clone());
    let id = setup
        .orchestrator
        .submit(request("short"))
        .await
        .unwrap()
        .id;
    setup.wait_completed(1).await;
    wait_drained(&setup.direct).await;
    assert_eq!(setup.proxy.dropped(), 1, "the send's answer was withheld");
    assert_eq!(
        setup.proxy.calls("AmazonSQS.SendMessage"),
        2,
        "the send was tried again, so the queue got the message twice"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    setup.assert_each_completed_once(&[id]).await;
    running.stop().await;
}
