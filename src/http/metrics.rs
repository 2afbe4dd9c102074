//! `GET /metrics`: the `metrics` facade's values in the Prometheus text format.
//!
//! The library records counters and a histogram through the `metrics` facade wherever it
//! runs; this module installs a Prometheus recorder (no listener, no push gateway: the
//! router serves the scrape) and adds the depth of the request table at scrape time.

use std::sync::Mutex;

use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::{Error, Result};
use crate::orchestrator::RootOrchestrator;
use crate::status::RequestStatus;

/// The histogram of how long each attempt's workflow ran.
pub const PROCESSING_SECONDS: &str = "root_orchestrator_processing_seconds";

/// Requests waiting for a worker, refreshed at every scrape.
pub const QUEUE_DEPTH: &str = "root_orchestrator_queue_depth";

/// The gauges the strategies publish as they run, with what each shows. A gauge without a
/// description renders with no `# HELP` line, which leaves dashboards guessing.
const GAUGES: &[(&str, &str)] = &[
    (
        "root_orchestrator_requests",
        "Requests in the store per `status`, as the strategy last counted them.",
    ),
    (
        "root_orchestrator_queue_dead_letter_depth",
        "Messages in the dead-letter queue (queue strategies).",
    ),
];

/// Bucket bounds of [`PROCESSING_SECONDS`], in seconds: workflows take from well under a
/// second to an hour.
pub const PROCESSING_SECONDS_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// The counters the library increments, with what each counts.
const COUNTERS: &[(&str, &str)] = &[
    (
        "root_orchestrator_requests_submitted_total",
        "Requests stored by a submit (repeated ids not counted).",
    ),
    (
        "root_orchestrator_requests_completed_total",
        "Requests whose workflow completed and whose results were stored.",
    ),
    (
        "root_orchestrator_requests_failed_total",
        "Requests that ended FAILED after their last attempt.",
    ),
    (
        "root_orchestrator_requests_retried_total",
        "Failed attempts for which a retry was scheduled.",
    ),
    (
        "root_orchestrator_requests_rescued_total",
        "In-flight requests taken back after their worker's lease expired.",
    ),
    (
        "root_orchestrator_requests_dead_lettered_total",
        "Queue messages moved to the dead-letter queue (queue strategies).",
    ),
];

/// The handle of the recorder [`install_recorder`] installed, once per process.
static INSTALLED: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// Installs a Prometheus recorder as the process's global `metrics` recorder, once, and
/// returns its handle; later calls return the same handle.
///
/// The recorder renders [`PROCESSING_SECONDS`] as a histogram with
/// [`PROCESSING_SECONDS_BUCKETS`]. A host that installs its own recorder instead passes
/// its handle to [`HttpApi::with_metrics`](super::HttpApi::with_metrics).
///
/// # Errors
///
/// [`Error::InvalidConfig`] when another global recorder was installed first.
///
/// # Examples
///
/// ```
/// let first = root_orchestrator::http::install_recorder()?;
/// let again = root_orchestrator::http::install_recorder()?;
/// metrics::counter!("example_total").increment(1);
/// assert!(again.render().contains("example_total 1"));
/// # drop(first);
/// # Ok::<(), root_orchestrator::Error>(())
/// ```
pub fn install_recorder() -> Result<PrometheusHandle> {
    let mut installed = INSTALLED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    let refuse = |problem: String| Error::InvalidConfig {
        name: "metrics recorder".into(),
        value: problem,
        expected: "no other global `metrics` recorder; pass yours with HttpApi::with_metrics"
            .into(),
    };
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(PROCESSING_SECONDS.into()),
            PROCESSING_SECONDS_BUCKETS,
        )
        .map_err(|e| refuse(e.to_string()))?
        .install_recorder()
        .map_err(|e| refuse(e.to_string()))?;
    describe();
    *installed = Some(handle.clone());
    Ok(handle)
}

/// Gives each key metric its help text, so that a scrape explains it.
fn describe() {
    for (name, help) in COUNTERS {
        metrics::describe_counter!(*name, Unit::Count, *help);
    }
    metrics::describe_histogram!(
        PROCESSING_SECONDS,
        Unit::Seconds,
        "How long each attempt's workflow ran, whatever its outcome."
    );
    metrics::describe_gauge!(
        QUEUE_DEPTH,
        Unit::Count,
        "Requests waiting for a worker (PENDING), counted at scrape time; queue strategies \
         also report their messages per `state`."
    );
    for (name, help) in GAUGES {
        metrics::describe_gauge!(*name, Unit::Count, *help);
    }
}

/// Refreshes the gauges that are read from the store, then renders every metric.
pub(crate) async fn scrape(handle: &PrometheusHandle, orchestrator: &RootOrchestrator) -> String {
    match orchestrator.store().count_by_status().await {
        Ok(counts) => {
            let pending = counts.get(&RequestStatus::Pending).copied().unwrap_or(0);
            metrics::gauge!(QUEUE_DEPTH, "strategy" => orchestrator.strategy_name())
                .set(pending as f64);
        }
        // The last known depth stays; the scrape itself must not fail with the store.
        Err(err) => tracing::warn!(error = %err, "queue depth not refreshed for this scrape"),
    }
    // The recorder leaves draining its histograms' buffers to its owner.
    handle.run_upkeep();
    handle.render()
}
