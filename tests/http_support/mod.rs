//! A real server on a loopback port, and a real HTTP client, for the HTTP API's tests.

#![allow(dead_code)]

pub mod schema;

use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Client, Method, StatusCode};
use root_orchestrator::http::{HttpApi, StaticTokens};
use root_orchestrator::{
    BackoffPolicy, CancellationToken, Request, RequestResults, RequestStore, RootOrchestrator,
    TableConfig, TableStrategy, WorkflowContext, WorkflowError, WorkflowExecutor,
};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

pub const INTEL: &str = "semaglutide_intelligence";
pub const WATCH: &str = "tirzepatide_watch";
pub const COLLECTION: &str = "/market-intelligence/requests";

/// Runs requests by what their `custom_params` ask for:
/// `{"sleep_ms": n}` waits (until cancelled), `{"fail": "permanent"}` fails for good,
/// `{"fail_attempts": n}` fails the first n attempts (retryably); otherwise it succeeds
/// with the keywords as its summary.
pub struct Scripted;

#[async_trait]
impl WorkflowExecutor for Scripted {
    async fn execute(
        &self,
        request: &Request,
        ctx: &WorkflowContext,
    ) -> Result<RequestResults, WorkflowError> {
        let params = &request.configuration.custom_params;
        ctx.report_progress(
            root_orchestrator::Progress::at_stage("discovery", 20).with_urls_found(3),
        )
        .await?;
        if let Some(ms) = params.get("sleep_ms").and_then(Value::as_u64) {
            tokio::select! {
                () = ctx.cancelled() => return Err(WorkflowError::cancelled()),
                () = tokio::time::sleep(Duration::from_millis(ms)) => {}
            }
        }
        if params.get("fail").and_then(Value::as_str) == Some("permanent") {
            return Err(WorkflowError::permanent("the corpus is unreadable"));
        }
        let fail_attempts = params
            .get("fail_attempts")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if u64::from(ctx.attempt()) <= fail_attempts {
            return Err(WorkflowError::retryable(format!(
                "source timed out on attempt {}",
                ctx.attempt()
            )));
        }
        Ok(RequestResults::new(
            Some(format!("reports/{}.md", request.id)),
            json!({ "keywords": request.configuration.keywords }),
        ))
    }
}

/// Fast settings: tests wait for workers, so polls and backoffs are short.
pub fn fast_config(max_concurrent_requests: usize) -> TableConfig {
    let mut config = TableConfig::default();
    config.polling_interval = Duration::from_millis(20);
    config.max_concurrent_requests = max_concurrent_requests;
    config.status_update_interval = Duration::from_millis(100);
    config.lease_duration = Duration::from_secs(5);
    config.cancel_grace_period = Duration::from_millis(500);
    config.shutdown_grace_period = Duration::from_millis(500);
    config.backoff = BackoffPolicy::new(Duration::from_millis(10), Duration::from_millis(50));
    config
}

/// The test users: alice (glp1), bob (oncology), carol (both; a team lead).
pub fn tokens() -> StaticTokens {
    StaticTokens::parse(
        "alice-token=alice:glp1;bob-token=bob:oncology;carol-token=carol:glp1,oncology",
    )
    .expect("test tokens parse")
}

pub struct Server {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    pub client: Client,
    pub orchestrator: RootOrchestrator,
    shutdown: CancellationToken,
    served: JoinHandle<()>,
    workers: Option<JoinHandle<root_orchestrator::Result<()>>>,
}

pub struct Options {
    /// Run workers; without them every request stays PENDING.
    pub workers: bool,
    pub config: TableConfig,
    pub body_limit: usize,
    /// Nest the API under this prefix.
    pub prefix: Option<&'static str>,
    pub tokens: StaticTokens,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            workers: true,
            config: fast_config(4),
            body_limit: 8 * 1024,
            prefix: None,
            tokens: tokens(),
        }
    }
}

pub fn client() -> Client {
    // Loopback only: no proxy from the environment may see these calls.
    Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTP client")
}

impl Server {
    pub async fn start(store: impl RequestStore, options: Options) -> Server {
        let strategy = TableStrategy::new(store, options.config).expect("valid test config");
        let orchestrator = RootOrchestrator::builder()
            .strategy(strategy)
            .executor(INTEL, Scripted)
            .executor(WATCH, Scripted)
            .build()
            .expect("an orchestrator");

        let api = HttpApi::new(orchestrator.clone(), options.tokens)
            .with_body_limit(options.body_limit)
            .router();
        let app = match options.prefix {
            Some(prefix) => axum::Router::new().nest(prefix, api),
            None => api,
        };

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let address = listener.local_addr().expect("a bound address");
        let shutdown = CancellationToken::new();
        let served = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown.cancelled_owned())
                    .await
                    .expect("the server runs");
            }
        });
        let workers = options.workers.then(|| {
            let orchestrator = orchestrator.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { orchestrator.run_with_token(shutdown).await })
        });

        Server {
            base: format!("http://{address}"),
            client: client(),
            orchestrator,
            shutdown,
            served,
            workers,
        }
    }

    pub async fn memory() -> Server {
        Server::start(root_orchestrator::MemoryStore::new(), Options::default()).await
    }

    pub async fn memory_without_workers() -> Server {
        let options = Options {
            workers: false,
            ..Options::default()
        };
        Server::start(root_orchestrator::MemoryStore::new(), options).await
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        if let Some(workers) = self.workers {
            workers
                .await
                .expect("workers joined")
                .expect("workers stopped cleanly");
        }
        self.served.await.expect("server stopped");
    }

    /// A call as `token` (none: unauthenticated), with an optional JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Reply {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        Reply::from(request.send().await.expect("the server answers")).await
    }

    pub async fn get(&self, path: &str, token: &str) -> Reply {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: &Value) -> Reply {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    /// Submits `body` as `token`; panics unless it is accepted. Returns the id.
    pub async fn submit(&self, token: &str, body: &Value) -> String {
        let reply = self.post(COLLECTION, token, body).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text);
        reply.json["request_id"]
            .as_str()
            .expect("an id in the answer")
            .to_owned()
    }

    /// Polls the status until it is `want` (or terminal and not `want`: a failure).
    pub async fn wait_for_status(&self, token: &str, id: &str, want: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let reply = self.get(&format!("{COLLECTION}/{id}/status"), token).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
            let status = reply.json["status"].as_str().unwrap_or_default().to_owned();
            if status == want {
                return reply.json;
            }
            let terminal = ["COMPLETED", "FAILED", "CANCELLED"].contains(&status.as_str());
            assert!(!terminal, "{id} ended {status}, not {want}: {}", reply.text);
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} still {status}, never {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// An answer, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: String,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
    /// The body as JSON; `Null` when it is not JSON.
    pub json: Value,
}

impl Reply {
    pub async fn from(response: reqwest::Response) -> Reply {
        let status = response.status();
        let headers = response.headers().clone();
        let content_type = headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let text = response.text().await.expect("a readable body");
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            content_type,
            headers,
            text,
            json,
        }
    }

    /// Asserts a problem answer of `status` and problem `type` suffix; returns its body.
    pub fn problem(&self, status: u16, kind: &str) -> &Value {
        assert_eq!(self.status.as_u16(), status, "{}", self.text);
        assert_eq!(
            self.content_type, "application/problem+json",
            "{}",
            self.text
        );
        assert_eq!(self.json["status"], status, "{}", self.text);
        assert_eq!(
            self.json["type"],
            format!("urn:root-orchestrator:problem:{kind}"),
            "{}",
            self.text
        );
        &self.json
    }
}

/// A valid body in the wire shape, for `project`, with `custom_params`.
pub fn body(project: &str, custom_params: Value) -> Value {
    json!({
        "project_id": project,
        "request_type": INTEL,
        "priority": "high",
        "configuration": {
            "keywords": ["semaglutide", "tirzepatide"],
            "sources": [{"name": "FDA", "type": "regulatory"}],
            "extraction_mode": "comprehensive",
            "quality_threshold": 0.7,
            "custom_params": custom_params,
        },
    })
}

/// Every page of a listing, following `next` links; the ids in order.
pub async fn list_all(server: &Server, token: &str, first: &str) -> (Vec<String>, usize) {
    let mut ids = Vec::new();
    let mut pages = 0;
    let mut next = Some(first.to_owned());
    while let Some(path) = next {
        let reply = server.get(&path, token).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        pages += 1;
        for request in reply.json["requests"].as_array().expect("a page") {
            ids.push(request["request_id"].as_str().expect("an id").to_owned());
        }
        next = reply.json["next"].as_str().map(str::to_owned);
        assert_eq!(next.is_some(), reply.json["next_cursor"].is_string());
    }
    (ids, pages)
}
