//! Worker processes, their journals, and loopback proxies that cut a server off.

#![allow(dead_code)]

pub mod proxy;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use root_orchestrator::{Request, RequestStatus};
use tokio::time::Instant;

/// The `fault_worker` example binary, built by `cargo test` beside this test.
pub fn worker_binary() -> PathBuf {
    let test_exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<this test> -> target/<profile>/examples/fault_worker
    let profile_dir = test_exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary sits in target/<profile>/deps");
    let binary = profile_dir.join("examples").join("fault_worker");
    assert!(
        binary.exists(),
        "{} is missing; build it with \
         `cargo build --example fault_worker --features postgres` (add `sqs` for the SQS tests)",
        binary.display()
    );
    binary
}

/// A running `fault_worker` process and the lines it printed so far.
pub struct WorkerProcess {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// The strategy's worker id, the owner of the leases it takes.
    pub worker_id: String,
}

/// How to start a worker process.
pub struct WorkerSpec<'a> {
    pub args: Vec<String>,
    pub settings: &'a [(&'a str, &'a str)],
    pub env: Vec<(String, String)>,
}

impl WorkerProcess {
    /// Starts a worker and waits until its workers run.
    pub async fn start(spec: WorkerSpec<'_>) -> WorkerProcess {
        let mut command = Command::new(worker_binary());
        command
            .args(&spec.args)
            .env("RUST_LOG", "warn,root_orchestrator=info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (name, value) in spec.settings {
            command.env(format!("ROOT_ORCHESTRATOR_{name}"), value);
        }
        for (name, value) in &spec.env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("start a fault_worker process");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        std::thread::spawn({
            let lines = lines.clone();
            move || {
                for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                    lines.lock().unwrap().push(line);
                }
            }
        });
        let mut process = WorkerProcess {
            child,
            lines,
            worker_id: String::new(),
        };
        let running = process
            .wait_for_line("worker ", " running", Duration::from_secs(30))
            .await;
        process.worker_id = running
            .strip_prefix("worker ")
            .and_then(|rest| rest.strip_suffix(" running"))
            .expect("a `worker <id> running` line")
            .to_owned();
        process
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for a line with this prefix and suffix; fails the test if the process exits
    /// or the time runs out first.
    pub async fn wait_for_line(&mut self, prefix: &str, suffix: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self
                .lines()
                .into_iter()
                .find(|l| l.starts_with(prefix) && l.ends_with(suffix))
            {
                return line;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "worker {} exited ({status}) before printing `{prefix}..{suffix}`: {:?}",
                    self.child.id(),
                    self.lines()
                );
            }
            assert!(
                Instant::now() < deadline,
                "worker {} printed no `{prefix}..{suffix}` within {limit:?}: {:?}",
                self.child.id(),
                self.lines()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no shutdown, no hand-back, the lease is simply left to lapse.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL the worker");
        self.child.wait().expect("reap the worker");
    }

    /// SIGTERM: asks for the graceful shutdown.
    pub fn terminate(&self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {} failed", self.child.id());
    }

    /// Waits for the process to exit by itself.
    pub async fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the worker") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "worker {} did not exit within {limit:?}: {:?}",
                    self.child.id(),
                    self.lines()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the worker gracefully and checks that it exited 0.
    pub async fn stop(mut self) {
        self.terminate();
        let status = self.wait(Duration::from_secs(30)).await;
        assert!(status.success(), "worker exited with {status}");
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        // A failed test must not leave a worker behind, holding leases and a database.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One line of a worker's journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Execution {
    pub started: bool,
    pub request_id: String,
    pub worker: String,
    pub attempt: u32,
    pub at_ms: i64,
    /// On `start` lines: the request's `run_after` as the worker read it.
    pub run_after: Option<String>,
}

/// Every journal line so far (none when the file does not exist yet).
pub fn journal(path: &Path) -> Vec<Execution> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            assert!(fields.len() >= 5, "bad journal line: {line}");
            Execution {
                started: match fields[0] {
                    "start" => true,
                    "end" => false,
                    other => panic!("bad journal event {other} in: {line}"),
                },
                request_id: fields[1].to_owned(),
                worker: fields[2].to_owned(),
                attempt: fields[3].parse().expect("attempt"),
                at_ms: fields[4].parse().expect("unix ms"),
                run_after: fields.get(5).map(|s| (*s).to_owned()),
            }
        })
        .collect()
}

/// Starts and ends per request id.
pub fn tally(executions: &[Execution]) -> HashMap<String, (usize, usize)> {
    let mut tally: HashMap<String, (usize, usize)> = HashMap::new();
    for e in executions {
        let entry = tally.entry(e.request_id.clone()).or_default();
        if e.started {
            entry.0 += 1;
        } else {
            entry.1 += 1;
        }
    }
    tally
}

/// How many times the request's history records this status: one `COMPLETED` entry is one
/// completion write.
pub fn times_in_history(request: &Request, status: RequestStatus) -> usize {
    request
        .history
        .iter()
        .filter(|change| change.status == status)
        .count()
}

/// Whether `worker` ever held the request: every claim is recorded with its owner.
pub fn claimed_by(request: &Request, worker: &str) -> bool {
    request.history.iter().any(|change| {
        change.status == RequestStatus::Processing
            && change
                .worker
                .as_deref()
                .is_some_and(|owner| owner.starts_with(worker))
    })
}

/// Polls `check` every 50 ms until it holds; fails the test after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Logs of the in-process workers, filtered by `RUST_LOG` (nothing by default).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}
