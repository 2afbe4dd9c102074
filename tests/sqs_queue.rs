//! The queue conformance suite and the consumer scenarios against `SqsQueue` on a real
//! SQS-compatible server, plus what only SQS has: the AWS CLI as a producer, queue
//! discovery, the credential chain, and timeouts on a server that never answers.
//!
//! Needs a server at `AWS_ENDPOINT_URL_SQS` with `AWS_REGION` and credentials set:
//! `bash .ci/with-sqs cargo test --features sqs --test sqs_queue` starts a local one.
//! Without the variable every test fails; none is skipped.

mod queue_conformance;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_sqs::config::Credentials;
use aws_sdk_sqs::types::MessageSystemAttributeName;
use queue_conformance::consumer::{Consumers, config, counting, unique_id, wait_depth, wire};
use queue_conformance::{Letter, QueueHarness};
use root_orchestrator::{Error, QueueBackend, RequestStatus, SqsQueue};
use tokio::time::Instant;

/// The server's endpoint; its absence fails the test.
fn endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL_SQS").unwrap_or_else(|_| {
        panic!(
            "AWS_ENDPOINT_URL_SQS is not set: these tests need an SQS-compatible server; \
             run them with `bash .ci/with-sqs cargo test --features sqs --test sqs_queue`"
        )
    })
}

/// AWS settings for the local server only: explicit throw-away credentials and region, so
/// the credential chain never looks for an instance role (or any other host).
async fn local_config() -> SdkConfig {
    endpoint();
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .load()
        .await
}

/// Fresh, uniquely named queue pairs on the server.
#[derive(Default)]
struct SqsHarness {
    opened: Mutex<Vec<(Arc<dyn QueueBackend>, SqsQueue)>>,
}

impl SqsHarness {
    async fn connect(&self, max_receive_count: u32) -> Arc<dyn QueueBackend> {
        let name = unique_id("ro-test");
        let queue = SqsQueue::builder(&name)
            .create_if_missing(max_receive_count)
            .attempt_timeout(Duration::from_secs(5))
            .sdk_config(local_config().await)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("cannot create {name} at {}: {e:?}", endpoint()));
        assert!(
            queue.queue_url().starts_with(&endpoint()),
            "{} is not on the local server",
            queue.queue_url()
        );
        let shared: Arc<dyn QueueBackend> = Arc::new(queue.clone());
        self.opened.lock().unwrap().push((shared.clone(), queue));
        shared
    }
}

#[async_trait]
impl QueueHarness for SqsHarness {
    async fn open(&self) -> Arc<dyn QueueBackend> {
        self.connect(100).await
    }

    async fn open_with_receive_limit(&self, max_receive_count: u32) -> Arc<dyn QueueBackend> {
        self.connect(max_receive_count).await
    }

    async fn dead_letters(&self, queue: &Arc<dyn QueueBackend>) -> Vec<Letter> {
        let sqs = {
            let opened = self.opened.lock().unwrap();
            opened
                .iter()
                .find(|(shared, _)| Arc::ptr_eq(shared, queue))
                .map(|(_, sqs)| sqs.clone())
                .expect("a queue opened by this harness")
        };
        peek(&sqs, sqs.dead_letter_queue_url()).await
    }

    fn tick(&self) -> Duration {
        Duration::from_secs(1)
    }
}

/// Every message of `queue_url`, read without taking them (visibility 0).
async fn peek(sqs: &SqsQueue, queue_url: &str) -> Vec<Letter> {
    let mut letters = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..5 {
        let output = sqs
            .client()
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .visibility_timeout(0)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .unwrap();
        for message in output.messages() {
            let id = message.message_id().unwrap().to_owned();
            if !seen.insert(id) {
                continue;
            }
            let attribute = |name: &str| {
                message
                    .message_attributes()
                    .and_then(|a| a.get(name))
                    .and_then(|v| v.string_value())
                    .map(str::to_owned)
            };
            letters.push(Letter {
                body: message.body().unwrap_or_default().to_owned(),
                reason: attribute("dead_letter_reason"),
                receive_count: attribute("receive_count").and_then(|n| n.parse().ok()),
            });
        }
    }
    letters
}

queue_suite!(SqsHarness::default());

mod consumers {
    use super::*;

    consumer_suite!(SqsHarness::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_sent_with_the_aws_cli_is_processed() {
    let harness = SqsHarness::default();
    let queue = harness.open().await;
    let url = {
        let opened = harness.opened.lock().unwrap();
        opened[0].1.queue_url().to_owned()
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let consumers = Consumers::start(
        queue.clone(),
        config(harness.tick()),
        counting(calls.clone()),
    )
    .await;

    let id = unique_id("cli");
    let body = wire(&id, "semaglutide", 2);
    let output = Command::new("aws")
        .args(["sqs", "send-message", "--endpoint-url", &endpoint()])
        .args(["--queue-url", &url, "--message-body", &body])
        .output()
        .unwrap_or_else(|e| panic!("the AWS CLI (`aws`) is needed for this test: {e}"));
    assert!(
        output.status.success(),
        "aws sqs send-message failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let sent: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(sent["MessageId"].is_string(), "{sent}");

    let finished = consumers.wait_terminal(&id).await;
    assert_eq!(finished.status, RequestStatus::Completed);
    assert_eq!(finished.max_attempts, 3);
    assert_eq!(finished.project_id, "glp1-market-watch");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    wait_depth(&queue, |d| d.visible + d.in_flight == 0).await;
    consumers.stop().await;
}

#[tokio::test]
async fn the_standard_chain_reads_the_endpoint_region_and_credentials_from_the_environment() {
    // The chain must find everything in the environment, never at a metadata endpoint.
    endpoint();
    for variable in ["AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        assert!(
            std::env::var(variable).is_ok(),
            "{variable} must be set for this test (.ci/with-sqs sets it)"
        );
    }
    assert_eq!(
        std::env::var("AWS_EC2_METADATA_DISABLED").as_deref(),
        Ok("true"),
        "the instance metadata lookup must be off (.ci/with-sqs turns it off)"
    );

    let name = unique_id("ro-chain");
    let created = SqsQueue::builder(&name)
        .create_if_missing(5)
        .connect()
        .await
        .unwrap();
    assert!(created.queue_url().starts_with(&endpoint()));
    assert!(
        created
            .dead_letter_queue_url()
            .ends_with(&format!("{name}-dlq"))
    );

    // By name, without a dead-letter queue: the redrive policy names it.
    let found = SqsQueue::connect(name.clone()).await.unwrap();
    assert_eq!(found.queue_url(), created.queue_url());
    assert_eq!(
        found.dead_letter_queue_url(),
        created.dead_letter_queue_url()
    );
    assert!(found.max_message_bytes() <= 1_048_576);
}

#[tokio::test]
async fn a_queue_without_a_dead_letter_queue_is_refused() {
    let config = local_config().await;
    let name = unique_id("ro-no-dlq");
    let client = aws_sdk_sqs::Client::new(&config);
    client
        .create_queue()
        .queue_name(&name)
        .send()
        .await
        .unwrap();

    let err = SqsQueue::builder(&name)
        .sdk_config(config)
        .connect()
        .await
        .unwrap_err();
    match err {
        Error::InvalidConfig { name, expected, .. } => {
            assert_eq!(name, "dead_letter_queue");
            assert!(expected.contains("redrive policy"), "{expected}");
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }

    let missing = SqsQueue::builder(unique_id("ro-missing"))
        .sdk_config(local_config().await)
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(
            missing,
            Error::Queue {
                operation: "connect",
                ..
            }
        ),
        "{missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_from_a_server_that_never_answers_fails_in_time() {
    // A loopback listener that accepts connections and never writes a byte.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut open = Vec::new();
        for socket in listener.incoming() {
            open.push(socket);
        }
    });

    let silent = format!("http://{address}");
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .endpoint_url(&silent)
        .load()
        .await;
    // Both queues by URL and the size limit given: connecting makes no call.
    let queue = SqsQueue::builder(format!("{silent}/123456789012/silent"))
        .dead_letter_queue(format!("{silent}/123456789012/silent-dlq"))
        .max_message_bytes(262_144)
        .attempt_timeout(Duration::from_secs(1))
        .sdk_config(config)
        .connect()
        .await
        .unwrap();

    let started = Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(60),
        queue.receive(10, Duration::from_secs(1), Duration::from_secs(30)),
    )
    .await
    .expect("the receive hung");
    let took = started.elapsed();
    match outcome {
        Err(Error::Queue { operation, .. }) => assert_eq!(operation, "receive"),
        other => panic!("expected a queue error, got {other:?}"),
    }
    // Each attempt gives up after the wait plus the attempt timeout; the SDK makes three.
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert!(took < Duration::from_secs(20), "{took:?}");
}
