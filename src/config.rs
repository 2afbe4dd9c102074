//! Settings of the table and queue strategies, set in code or read from environment
//! variables.

use std::time::Duration;

use crate::backoff::BackoffPolicy;
use crate::error::{Error, Result};

/// Prefix of every environment variable the crate reads.
pub const ENV_PREFIX: &str = "ROOT_ORCHESTRATOR_";

/// Settings of the table strategy's workers.
///
/// Defaults: polling every 5 s, one request at a time, a heartbeat every 10 s extending a
/// 60 s lease, an attempt stopped after 1 h, finished requests pruned after 24 h, 3 retries
/// after 2 s, 4 s, 8 s ...
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use root_orchestrator::TableConfig;
///
/// let mut config = TableConfig::default();
/// config.max_concurrent_requests = 4;
/// config.polling_interval = Duration::from_secs(1);
/// config.validate()?;
///
/// // The same from the environment: every field has a variable.
/// let config = TableConfig::from_lookup(|name| match name {
///     "ROOT_ORCHESTRATOR_MAX_CONCURRENT_REQUESTS" => Some("4".to_owned()),
///     _ => None,
/// })?;
/// assert_eq!(config.max_concurrent_requests, 4);
///
/// let err = TableConfig::from_lookup(|name| {
///     (name == "ROOT_ORCHESTRATOR_POLLING_INTERVAL").then(|| "-1".to_owned())
/// })
/// .unwrap_err();
/// assert!(err.to_string().contains("ROOT_ORCHESTRATOR_POLLING_INTERVAL"));
/// # Ok::<(), root_orchestrator::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TableConfig {
    /// How often idle workers look for work when nothing wakes them. Default 5 s.
    pub polling_interval: Duration,
    /// Requests run at once by this process. Default 1.
    pub max_concurrent_requests: usize,
    /// How often a running request's lease is extended (the heartbeat). Default 10 s.
    pub status_update_interval: Duration,
    /// How long a lease lasts without a heartbeat; an expired lease is rescued.
    /// At least twice `status_update_interval`. Default 60 s.
    pub lease_duration: Duration,
    /// How old a finished request gets before it is pruned. Default 24 h.
    pub cleanup_completed_after: Duration,
    /// How often pruning runs. Default 5 min.
    pub prune_interval: Duration,
    /// How long a shutdown waits for running requests before handing them back. Default 30 s.
    pub shutdown_grace_period: Duration,
    /// How long a cancelled request's executor may take to stop before it is dropped.
    /// Default 10 s.
    pub cancel_grace_period: Duration,
    /// How long one attempt may run before it is stopped: its executor is cancelled, given
    /// `cancel_grace_period` to return, then dropped, and the attempt fails as retryable
    /// ("execution timed out after ..."). An executor may set its own limit per request
    /// ([`WorkflowExecutor::timeout`](crate::WorkflowExecutor::timeout)). Without it, an
    /// executor that never returns would hold its slot for good, since heartbeats keep its
    /// lease alive. Default 1 h.
    pub execution_timeout: Duration,
    /// Retries after the first attempt, for requests that do not set their own. Default 3.
    pub max_retries: u32,
    /// Waits between retries. Default 2 s doubling up to 10 min.
    pub backoff: BackoffPolicy,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            polling_interval: Duration::from_secs(5),
            max_concurrent_requests: 1,
            status_update_interval: Duration::from_secs(10),
            lease_duration: Duration::from_secs(60),
            cleanup_completed_after: Duration::from_secs(86_400),
            prune_interval: Duration::from_secs(300),
            shutdown_grace_period: Duration::from_secs(30),
            cancel_grace_period: Duration::from_secs(10),
            execution_timeout: DEFAULT_EXECUTION_TIMEOUT,
            max_retries: 3,
            backoff: BackoffPolicy::default(),
        }
    }
}

/// A duration setting's accepted range, in seconds.
struct SecondsRange {
    min: f64,
    max: f64,
}

impl SecondsRange {
    const fn new(min: f64, max: f64) -> Self {
        SecondsRange { min, max }
    }

    fn describe(&self) -> String {
        format!("a number of seconds from {} to {}", self.min, self.max)
    }

    fn check(&self, name: &str, value: Duration) -> Result<()> {
        let secs = value.as_secs_f64();
        if secs < self.min || secs > self.max {
            return Err(Error::InvalidConfig {
                name: name.to_owned(),
                value: format!("{secs}"),
                expected: self.describe(),
            });
        }
        Ok(())
    }

    fn parse(&self, variable: &str, raw: &str) -> Result<Duration> {
        let refuse = || Error::InvalidConfig {
            name: variable.to_owned(),
            value: raw.to_owned(),
            expected: self.describe(),
        };
        let secs: f64 = raw.trim().parse().map_err(|_| refuse())?;
        if !secs.is_finite() || secs < self.min || secs > self.max {
            return Err(refuse());
        }
        Ok(Duration::from_secs_f64(secs))
    }
}

const POLLING_INTERVAL: SecondsRange = SecondsRange::new(0.01, 3600.0);
const STATUS_UPDATE_INTERVAL: SecondsRange = SecondsRange::new(0.01, 3600.0);
const LEASE_DURATION: SecondsRange = SecondsRange::new(0.05, 86_400.0);
const CLEANUP_COMPLETED_AFTER: SecondsRange = SecondsRange::new(1.0, 31_536_000.0);
const PRUNE_INTERVAL: SecondsRange = SecondsRange::new(0.01, 86_400.0);
const GRACE_PERIOD: SecondsRange = SecondsRange::new(0.0, 3600.0);
const RETRY_DELAY: SecondsRange = SecondsRange::new(0.0, 86_400.0);
/// Up to a week: longer runs should be split into requests that report their own results.
const EXECUTION_TIMEOUT: SecondsRange = SecondsRange::new(0.05, 604_800.0);
const DEFAULT_EXECUTION_TIMEOUT: Duration = Duration::from_secs(3600);
const MAX_CONCURRENT_REQUESTS: (u64, u64) = (1, 1024);
const MAX_RETRIES: (u64, u64) = (0, 99);

/// Refuses a backoff whose first delay is over its cap: the cap would silently win.
fn check_backoff_order(backoff: &BackoffPolicy) -> Result<()> {
    if backoff.base > backoff.max {
        return Err(Error::InvalidConfig {
            name: "backoff.base".to_owned(),
            value: format!("{}", backoff.base.as_secs_f64()),
            expected: format!(
                "at most backoff.max ({} s): the first retry delay cannot be over the cap",
                backoff.max.as_secs_f64()
            ),
        });
    }
    Ok(())
}

fn check_count(name: &str, value: u64, (min, max): (u64, u64)) -> Result<()> {
    if value < min || value > max {
        return Err(Error::InvalidConfig {
            name: name.to_owned(),
            value: value.to_string(),
            expected: format!("a whole number from {min} to {max}"),
        });
    }
    Ok(())
}

fn parse_count(variable: &str, raw: &str, (min, max): (u64, u64)) -> Result<u64> {
    let value: u64 = raw.trim().parse().map_err(|_| Error::InvalidConfig {
        name: variable.to_owned(),
        value: raw.to_owned(),
        expected: format!("a whole number from {min} to {max}"),
    })?;
    check_count(variable, value, (min, max)).map(|()| value)
}

/// The environment variable that sets `field`, such as `ROOT_ORCHESTRATOR_RETRY_DELAY_BASE`
/// for `backoff.base`.
fn variable_of(field: &str) -> String {
    let suffix = match field {
        "backoff.base" => "RETRY_DELAY_BASE".to_owned(),
        "backoff.max" => "RETRY_DELAY_MAX".to_owned(),
        "backoff.jitter" => "RETRY_JITTER".to_owned(),
        other => other.to_ascii_uppercase(),
    };
    format!("{ENV_PREFIX}{suffix}")
}

/// Restates a validation error about fields in terms of the environment variables that
/// set them, for settings read from the environment.
fn in_variable_terms(err: Error, fields: &[&str]) -> Error {
    match err {
        Error::InvalidConfig {
            name,
            value,
            mut expected,
        } => {
            for field in fields {
                expected = expected.replace(field, &variable_of(field));
            }
            Error::InvalidConfig {
                name: variable_of(&name),
                value,
                expected,
            }
        }
        other => other,
    }
}

fn parse_fraction(variable: &str, raw: &str) -> Result<f64> {
    match raw.trim().parse::<f64>() {
        Ok(fraction) if (0.0..=1.0).contains(&fraction) => Ok(fraction),
        _ => Err(Error::InvalidConfig {
            name: variable.to_owned(),
            value: raw.to_owned(),
            expected: "a fraction from 0.0 to 1.0".to_owned(),
        }),
    }
}

impl TableConfig {
    /// Checks every value against its accepted range.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field, the refused value and the accepted range.
    pub fn validate(&self) -> Result<()> {
        POLLING_INTERVAL.check("polling_interval", self.polling_interval)?;
        check_count(
            "max_concurrent_requests",
            self.max_concurrent_requests as u64,
            MAX_CONCURRENT_REQUESTS,
        )?;
        STATUS_UPDATE_INTERVAL.check("status_update_interval", self.status_update_interval)?;
        LEASE_DURATION.check("lease_duration", self.lease_duration)?;
        if self.lease_duration < self.status_update_interval * 2 {
            return Err(Error::InvalidConfig {
                name: "lease_duration".to_owned(),
                value: format!("{}", self.lease_duration.as_secs_f64()),
                expected: format!(
                    "at least twice status_update_interval ({} s), so one missed heartbeat \
                     does not lose the lease",
                    self.status_update_interval.as_secs_f64() * 2.0
                ),
            });
        }
        CLEANUP_COMPLETED_AFTER.check("cleanup_completed_after", self.cleanup_completed_after)?;
        PRUNE_INTERVAL.check("prune_interval", self.prune_interval)?;
        GRACE_PERIOD.check("shutdown_grace_period", self.shutdown_grace_period)?;
        GRACE_PERIOD.check("cancel_grace_period", self.cancel_grace_period)?;
        EXECUTION_TIMEOUT.check("execution_timeout", self.execution_timeout)?;
        check_count("max_retries", u64::from(self.max_retries), MAX_RETRIES)?;
        RETRY_DELAY.check("backoff.base", self.backoff.base)?;
        RETRY_DELAY.check("backoff.max", self.backoff.max)?;
        check_backoff_order(&self.backoff)?;
        if !(0.0..=1.0).contains(&self.backoff.jitter) {
            return Err(Error::InvalidConfig {
                name: "backoff.jitter".to_owned(),
                value: self.backoff.jitter.to_string(),
                expected: "a fraction from 0.0 to 1.0".to_owned(),
            });
        }
        Ok(())
    }

    /// Reads the settings from `ROOT_ORCHESTRATOR_*` environment variables, using the
    /// default for each one that is not set.
    ///
    /// | variable | field | unit, range |
    /// |---|---|---|
    /// | `ROOT_ORCHESTRATOR_POLLING_INTERVAL` | `polling_interval` | seconds, 0.01 to 3600 |
    /// | `ROOT_ORCHESTRATOR_MAX_CONCURRENT_REQUESTS` | `max_concurrent_requests` | 1 to 1024 |
    /// | `ROOT_ORCHESTRATOR_STATUS_UPDATE_INTERVAL` | `status_update_interval` | 0.01 to 3600 s |
    /// | `ROOT_ORCHESTRATOR_LEASE_DURATION` | `lease_duration` | 0.05 to 86400 s |
    /// | `ROOT_ORCHESTRATOR_CLEANUP_COMPLETED_AFTER` | `cleanup_completed_after` | 1 to 31.5M s |
    /// | `ROOT_ORCHESTRATOR_PRUNE_INTERVAL` | `prune_interval` | seconds, 0.01 to 86400 |
    /// | `ROOT_ORCHESTRATOR_SHUTDOWN_GRACE_PERIOD` | `shutdown_grace_period` | seconds, 0 to 3600 |
    /// | `ROOT_ORCHESTRATOR_CANCEL_GRACE_PERIOD` | `cancel_grace_period` | seconds, 0 to 3600 |
    /// | `ROOT_ORCHESTRATOR_EXECUTION_TIMEOUT` | `execution_timeout` | 0.05 to 604800 s |
    /// | `ROOT_ORCHESTRATOR_MAX_RETRIES` | `max_retries` | 0 to 99 |
    /// | `ROOT_ORCHESTRATOR_RETRY_DELAY_BASE` | `backoff.base` | seconds, 0 to 86400 |
    /// | `ROOT_ORCHESTRATOR_RETRY_DELAY_MAX` | `backoff.max` | seconds, 0 to 86400 |
    /// | `ROOT_ORCHESTRATOR_RETRY_JITTER` | `backoff.jitter` | fraction, 0 to 1 |
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the variable, its value and the accepted range.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`from_env`](Self::from_env), reading variables through `lookup`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the variable, its value and the accepted range.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let mut config = TableConfig::default();
        let var = |suffix: &str| {
            let name = format!("{ENV_PREFIX}{suffix}");
            lookup(&name).map(|value| (name, value))
        };

        if let Some((name, raw)) = var("POLLING_INTERVAL") {
            config.polling_interval = POLLING_INTERVAL.parse(&name, &raw)?;
        }
        if let Some((name, raw)) = var("MAX_CONCURRENT_REQUESTS") {
            config.max_concurrent_requests =
                parse_count(&name, &raw, MAX_CONCURRENT_REQUESTS)? as usize;
        }
        if let Some((name, raw)) = var("STATUS_UPDATE_INTERVAL") {
            config.status_update_interval = STATUS_UPDATE_INTERVAL.parse(&name, &raw)?;
        }
        if let Some((name, raw)) = var("LEASE_DURATION") {
            config.lease_duration = LEASE_DURATION.parse(&name, &raw)?;
        }
        if let Some((name, raw)) = var("CLEANUP_COMPLETED_AFTER") {
            config.cleanup_completed_after = CLEANUP_COMPLETED_AFTER.parse(&name, &raw)?;
        }
        if let Some((name, raw)) = var("PRUNE_INTERVAL") {
            config.prune_interval = PRUNE_INTERVAL.parse(&name, &raw)?;
        }
        if let Some((name, raw)) = var("SHUTDOWN_GRACE_PERIOD") {
            config.shutdown_grace_period = GRACE_PERIOD.parse(&name, &raw)?;
        }
        if let Some((name, raw)) = var("CANCEL_GRACE_PERIOD") {
            config.cancel_grace_period = GRACE_PERIOD.parse(&name, &raw)?;
        }
        if let Some((name, raw)) = var("EXECUTION_TIMEOUT") {
            config.execution_timeout = EXECUTION_TIMEOUT.parse(&name, &raw)?;
        }
        if let Some((name, raw)) = var("MAX_RETRIES") {
            config.max_retries = parse_count(&name, &raw, MAX_RETRIES)? as u32;
        }
        if let Some((name, raw)) = var("RETRY_DELAY_BASE") {
            config.backoff.base = RETRY_DELAY.parse(&name, &raw)?;
        }
        if let Some((name, raw)) = var("RETRY_DELAY_MAX") {
            config.backoff.max = RETRY_DELAY.parse(&name, &raw)?;
        }
        if let Some((name, raw)) = var("RETRY_JITTER") {
            config.backoff.jitter = parse_fraction(&name, &raw)?;
        }

        // Cross-field rules (the lease outlasting two heartbeats) are checked last, so
        // that a single bad variable is always reported by its own name first.
        config
            .validate()
            .map_err(|e| in_variable_terms(e, &["status_update_interval", "backoff.max"]))?;
        Ok(config)
    }

    /// Attempts a request gets when it does not say: one plus `max_retries`.
    pub fn default_max_attempts(&self) -> u32 {
        self.max_retries + 1
    }
}

/// The longest SQS keeps a received message hidden: 12 hours.
const QUEUE_VISIBILITY_TIMEOUT: SecondsRange = SecondsRange::new(0.05, 43_200.0);
/// SQS long polls wait at most 20 s.
const LONG_POLLING_WAIT_TIME: SecondsRange = SecondsRange::new(0.0, 20.0);
/// A retry hides its message for the backoff, which SQS allows up to 12 hours.
const QUEUE_RETRY_DELAY: SecondsRange = SecondsRange::new(0.0, 43_200.0);
const RECONCILE_INTERVAL: SecondsRange = SecondsRange::new(0.01, 86_400.0);
/// Up to SQS's longest message retention, 14 days.
const RECONCILE_AFTER: SecondsRange = SecondsRange::new(0.05, 1_209_600.0);
const MAX_WORKERS: (u64, u64) = (1, 1024);

/// Settings of the queue strategy's consumers.
///
/// Defaults: 5 workers, long polls of 20 s, a 300 s visibility timeout (extended while a
/// request runs), an attempt stopped after 1 h, 3 retries after 2 s, 4 s, 8 s ..., stale
/// `PENDING` requests re-sent after 10 min, finished requests pruned after 24 h.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use root_orchestrator::QueueConfig;
///
/// let mut config = QueueConfig::default();
/// config.max_workers = 8;
/// config.visibility_timeout = Duration::from_secs(120);
/// config.validate()?;
///
/// // The same from the environment: every field has a variable.
/// let config = QueueConfig::from_lookup(|name| match name {
///     "ROOT_ORCHESTRATOR_MAX_WORKERS" => Some("8".to_owned()),
///     _ => None,
/// })?;
/// assert_eq!(config.max_workers, 8);
///
/// let err = QueueConfig::from_lookup(|name| {
///     (name == "ROOT_ORCHESTRATOR_LONG_POLLING_WAIT_TIME").then(|| "30".to_owned())
/// })
/// .unwrap_err();
/// assert!(err.to_string().contains("ROOT_ORCHESTRATOR_LONG_POLLING_WAIT_TIME"));
/// # Ok::<(), root_orchestrator::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct QueueConfig {
    /// Requests run at once by this process; each runs in its own task. Default 5.
    pub max_workers: usize,
    /// How long a received message stays hidden from other consumers. While its request
    /// runs, the message's visibility and the request's lease are extended every third of
    /// this. SQS counts whole seconds and rounds up. Default 300 s.
    pub visibility_timeout: Duration,
    /// How long one receive waits for a message (long polling); 0 polls without waiting.
    /// Default 20 s, the most SQS allows.
    pub long_polling_wait_time: Duration,
    /// Retries after the first attempt, for requests that do not set their own. Default 3.
    pub max_retries: u32,
    /// Waits between retries, during which the message stays hidden. Default 2 s doubling
    /// up to 10 min; at most 12 h, the longest SQS hides a message.
    pub backoff: BackoffPolicy,
    /// How long a shutdown waits for running requests before handing them back. Default 30 s.
    pub shutdown_grace_period: Duration,
    /// How long a cancelled request's executor may take to stop before it is dropped.
    /// Default 10 s.
    pub cancel_grace_period: Duration,
    /// How long one attempt may run before it is stopped: its executor is cancelled, given
    /// `cancel_grace_period` to return, then dropped, and the attempt fails as retryable
    /// ("execution timed out after ..."). An executor may set its own limit per request
    /// ([`WorkflowExecutor::timeout`](crate::WorkflowExecutor::timeout)). Without it, an
    /// executor that never returns would hold its slot for good, since heartbeats keep its
    /// lease alive. Default 1 h.
    pub execution_timeout: Duration,
    /// How often the reconciler looks for `PENDING` requests that no message will deliver
    /// (and for leases lost with their message). Default 60 s.
    pub reconcile_interval: Duration,
    /// How long a request may stay `PENDING` (since its last change, or its scheduled retry)
    /// before the reconciler sends it a new message. At least `visibility_timeout`, since a
    /// message returning from a lapsed consumer takes that long. Default 10 min.
    pub reconcile_after: Duration,
    /// How old a finished request gets before it is pruned. Default 24 h.
    pub cleanup_completed_after: Duration,
    /// How often pruning runs. Default 5 min.
    pub prune_interval: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_workers: 5,
            visibility_timeout: Duration::from_secs(300),
            long_polling_wait_time: Duration::from_secs(20),
            max_retries: 3,
            backoff: BackoffPolicy::default(),
            shutdown_grace_period: Duration::from_secs(30),
            cancel_grace_period: Duration::from_secs(10),
            execution_timeout: DEFAULT_EXECUTION_TIMEOUT,
            reconcile_interval: Duration::from_secs(60),
            reconcile_after: Duration::from_secs(600),
            cleanup_completed_after: Duration::from_secs(86_400),
            prune_interval: Duration::from_secs(300),
        }
    }
}

impl QueueConfig {
    /// Checks every value against its accepted range.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field, the refused value and the accepted range.
    pub fn validate(&self) -> Result<()> {
        check_count("max_workers", self.max_workers as u64, MAX_WORKERS)?;
        QUEUE_VISIBILITY_TIMEOUT.check("visibility_timeout", self.visibility_timeout)?;
        LONG_POLLING_WAIT_TIME.check("long_polling_wait_time", self.long_polling_wait_time)?;
        check_count("max_retries", u64::from(self.max_retries), MAX_RETRIES)?;
        QUEUE_RETRY_DELAY.check("backoff.base", self.backoff.base)?;
        QUEUE_RETRY_DELAY.check("backoff.max", self.backoff.max)?;
        check_backoff_order(&self.backoff)?;
        if !(0.0..=1.0).contains(&self.backoff.jitter) {
            return Err(Error::InvalidConfig {
                name: "backoff.jitter".to_owned(),
                value: self.backoff.jitter.to_string(),
                expected: "a fraction from 0.0 to 1.0".to_owned(),
            });
        }
        GRACE_PERIOD.check("shutdown_grace_period", self.shutdown_grace_period)?;
        GRACE_PERIOD.check("cancel_grace_period", self.cancel_grace_period)?;
        EXECUTION_TIMEOUT.check("execution_timeout", self.execution_timeout)?;
        RECONCILE_INTERVAL.check("reconcile_interval", self.reconcile_interval)?;
        RECONCILE_AFTER.check("reconcile_after", self.reconcile_after)?;
        if self.reconcile_after < self.visibility_timeout {
            return Err(Error::InvalidConfig {
                name: "reconcile_after".to_owned(),
                value: format!("{}", self.reconcile_after.as_secs_f64()),
                expected: format!(
                    "at least visibility_timeout ({} s), so a message that is only in flight \
                     is not sent again: raise reconcile_after or lower visibility_timeout",
                    self.visibility_timeout.as_secs_f64()
                ),
            });
        }
        CLEANUP_COMPLETED_AFTER.check("cleanup_completed_after", self.cleanup_completed_after)?;
        PRUNE_INTERVAL.check("prune_interval", self.prune_interval)?;
        Ok(())
    }

    /// Reads the settings from `ROOT_ORCHESTRATOR_*` environment variables, using the
    /// default for each one that is not set.
    ///
    /// | variable | field | range |
    /// |---|---|---|
    /// | `ROOT_ORCHESTRATOR_MAX_WORKERS` | `max_workers` | 1 to 1024 |
    /// | `ROOT_ORCHESTRATOR_VISIBILITY_TIMEOUT` | `visibility_timeout` | 0.05 to 43200 s |
    /// | `ROOT_ORCHESTRATOR_LONG_POLLING_WAIT_TIME` | `long_polling_wait_time` | 0 to 20 s |
    /// | `ROOT_ORCHESTRATOR_MAX_RETRIES` | `max_retries` | 0 to 99 |
    /// | `ROOT_ORCHESTRATOR_RETRY_DELAY_BASE` | `backoff.base` | 0 to 43200 s |
    /// | `ROOT_ORCHESTRATOR_RETRY_DELAY_MAX` | `backoff.max` | 0 to 43200 s |
    /// | `ROOT_ORCHESTRATOR_RETRY_JITTER` | `backoff.jitter` | fraction, 0 to 1 |
    /// | `ROOT_ORCHESTRATOR_SHUTDOWN_GRACE_PERIOD` | `shutdown_grace_period` | 0 to 3600 s |
    /// | `ROOT_ORCHESTRATOR_CANCEL_GRACE_PERIOD` | `cancel_grace_period` | 0 to 3600 s |
    /// | `ROOT_ORCHESTRATOR_EXECUTION_TIMEOUT` | `execution_timeout` | 0.05 to 604800 s |
    /// | `ROOT_ORCHESTRATOR_RECONCILE_INTERVAL` | `reconcile_interval` | 0.01 to 86400 s |
    /// | `ROOT_ORCHESTRATOR_RECONCILE_AFTER` | `reconcile_after` | 0.05 to 1209600 s |
    /// | `ROOT_ORCHESTRATOR_CLEANUP_COMPLETED_AFTER` | `cleanup_completed_after` | 1 s to 365 d |
    /// | `ROOT_ORCHESTRATOR_PRUNE_INTERVAL` | `prune_interval` | 0.01 to 86400 s |
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the variable, its value and the accepted range.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`from_env`](Self::from_env), reading variables through `lookup`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the variable, its value and the accepted range.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let mut config = QueueConfig::default();
        let var = |suffix: &str| {
            let name = format!("{ENV_PREFIX}{suffix}");
            lookup(&name).map(|value| (name, value))
        };

        if let Some((name, raw)) = var("MAX_WORKERS") {
            config.max_workers = parse_count(&name, &raw, MAX_WORKERS)? as usize;
        }
        if let Some((name, raw)) = var("VISIBILITY_TIMEOUT") {
            config.visibility_timeout = QUEUE_VISIBILITY_TIMEOUT.parse(&name, &raw)?;
        }
        if let Some((name, raw)) = var("LONG_POLLING_WAIT_TIME") {
            config.long_polling_wait_time = LONG_POLLING_WAIT_TIME.parse(&name, &raw)?;
        }
        if let Some((name, raw)) = var("MAX_RETRIES") {
            config.max_retries = parse_count(&name, &raw, MAX_RETRIES)? as u32;
        }
        if let Some((name, raw)) = var("RETRY_DELAY_BASE") {
            config.backoff.base = QUEUE_RETRY_DELAY.parse(&name, &raw)?;
        }
        if let Some((name, raw)) = var("RETRY_DELAY_MAX") {
            config.backoff.max = QUEUE_RETRY_DELAY.parse(&name, &raw)?;
        }
        if let Some((name, raw)) = var("SHUTDOWN_GRACE_PERIOD") {
            config.shutdown_grace_period = GRACE_PERIOD.parse(&name, &raw)?;
        }
        if let Some((name, raw)) = var("CANCEL_GRACE_PERIOD") {
            config.cancel_grace_period = GRACE_PERIOD.parse(&name, &raw)?;
        }
        if let Some((name, raw)) = var("EXECUTION_TIMEOUT") {
            config.execution_timeout = EXECUTION_TIMEOUT.parse(&name, &raw)?;
        }
        if let Some((name, raw)) = var("RECONCILE_INTERVAL") {
            config.reconcile_interval = RECONCILE_INTERVAL.parse(&name, &raw)?;
        }
        if let Some((name, raw)) = var("RECONCILE_AFTER") {
            config.reconcile_after = RECONCILE_AFTER.parse(&name, &raw)?;
        }
        if let Some((name, raw)) = var("CLEANUP_COMPLETED_AFTER") {
            config.cleanup_completed_after = CLEANUP_COMPLETED_AFTER.parse(&name, &raw)?;
        }
        if let Some((name, raw)) = var("PRUNE_INTERVAL") {
            config.prune_interval = PRUNE_INTERVAL.parse(&name, &raw)?;
        }
        if let Some((name, raw)) = var("RETRY_JITTER") {
            config.backoff.jitter = parse_fraction(&name, &raw)?;
        }

        // Cross-field rules (reconciling no sooner than a visibility timeout) are checked
        // last, so that a single bad variable is always reported by its own name first.
        config.validate().map_err(|e| {
            in_variable_terms(e, &["reconcile_after", "visibility_timeout", "backoff.max"])
        })?;
        Ok(config)
    }

    /// Attempts a request gets when it does not say: one plus `max_retries`.
    pub fn default_max_attempts(&self) -> u32 {
        self.max_retries + 1
    }

    /// How often a running request's message visibility and lease are extended: a third
    /// of the visibility timeout, so that two missed extensions still leave it hidden.
    pub fn heartbeat_interval(&self) -> Duration {
        self.visibility_timeout / 3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = TableConfig::default();
        assert_eq!(config.polling_interval, Duration::from_secs(5));
        assert_eq!(config.max_concurrent_requests, 1);
        assert_eq!(config.status_update_interval, Duration::from_secs(10));
        assert_eq!(config.cleanup_completed_after, Duration::from_secs(86_400));
        assert_eq!(config.execution_timeout, Duration::from_secs(3600));
        assert_eq!(config.default_max_attempts(), 4);
        config.validate().unwrap();
    }

    #[test]
    fn environment_overrides_defaults() {
        let config = TableConfig::from_lookup(lookup(&[
            ("ROOT_ORCHESTRATOR_POLLING_INTERVAL", "0.5"),
            ("ROOT_ORCHESTRATOR_MAX_RETRIES", "0"),
            ("ROOT_ORCHESTRATOR_RETRY_DELAY_BASE", "1"),
            ("ROOT_ORCHESTRATOR_EXECUTION_TIMEOUT", "90.5"),
        ]))
        .unwrap();
        assert_eq!(config.execution_timeout, Duration::from_millis(90_500));
        assert_eq!(config.polling_interval, Duration::from_millis(500));
        assert_eq!(config.max_retries, 0);
        assert_eq!(config.backoff.base, Duration::from_secs(1));
    }

    #[test]
    fn bad_variables_are_named_with_their_range() {
        let cases: &[(&'static str, &'static str, &str)] = &[
            (
                "ROOT_ORCHESTRATOR_MAX_CONCURRENT_REQUESTS",
                "0",
                "from 1 to 1024",
            ),
            (
                "ROOT_ORCHESTRATOR_MAX_CONCURRENT_REQUESTS",
                "many",
                "from 1 to 1024",
            ),
            (
                "ROOT_ORCHESTRATOR_POLLING_INTERVAL",
                "NaN",
                "from 0.01 to 3600",
            ),
            ("ROOT_ORCHESTRATOR_MAX_RETRIES", "100", "from 0 to 99"),
            (
                "ROOT_ORCHESTRATOR_EXECUTION_TIMEOUT",
                "0",
                "from 0.05 to 604800",
            ),
            (
                "ROOT_ORCHESTRATOR_EXECUTION_TIMEOUT",
                "1h",
                "from 0.05 to 604800",
            ),
        ];
        for &(variable, value, range) in cases {
            let pairs: &'static [(&'static str, &'static str)] =
                Box::leak(vec![(variable, value)].into_boxed_slice());
            match TableConfig::from_lookup(lookup(pairs)) {
                Err(Error::InvalidConfig {
                    name,
                    value: refused,
                    expected,
                }) => {
                    assert_eq!(name, variable);
                    assert_eq!(refused, value);
                    assert!(expected.contains(range), "{expected}");
                }
                other => panic!("{variable}={value}: expected InvalidConfig, got {other:?}"),
            }
        }
    }

    #[test]
    fn cross_field_errors_from_the_environment_name_variables() {
        let err = TableConfig::from_lookup(lookup(&[(
            "ROOT_ORCHESTRATOR_STATUS_UPDATE_INTERVAL",
            "40",
        )]))
        .unwrap_err();
        let Error::InvalidConfig { name, expected, .. } = err else {
            panic!("expected InvalidConfig");
        };
        assert_eq!(name, "ROOT_ORCHESTRATOR_LEASE_DURATION");
        assert!(
            expected.contains("ROOT_ORCHESTRATOR_STATUS_UPDATE_INTERVAL"),
            "{expected}"
        );

        let config =
            TableConfig::from_lookup(lookup(&[("ROOT_ORCHESTRATOR_RETRY_JITTER", "0")])).unwrap();
        assert_eq!(config.backoff.jitter, 0.0);
        let err = TableConfig::from_lookup(lookup(&[("ROOT_ORCHESTRATOR_RETRY_JITTER", "1.5")]))
            .unwrap_err();
        assert!(
            err.to_string().contains("ROOT_ORCHESTRATOR_RETRY_JITTER"),
            "{err}"
        );
    }

    #[test]
    fn an_execution_timeout_out_of_range_set_in_code_is_refused_by_name() {
        let table = TableConfig {
            execution_timeout: Duration::ZERO,
            ..TableConfig::default()
        };
        let err = table.validate().unwrap_err();
        assert!(
            matches!(err, Error::InvalidConfig { ref name, .. } if name == "execution_timeout")
        );
        let queue = QueueConfig {
            execution_timeout: Duration::from_secs(8 * 86_400),
            ..QueueConfig::default()
        };
        let err = queue.validate().unwrap_err();
        assert!(
            matches!(err, Error::InvalidConfig { ref name, .. } if name == "execution_timeout")
        );
    }

    #[test]
    fn a_lease_shorter_than_two_heartbeats_is_refused() {
        let config = TableConfig {
            lease_duration: Duration::from_secs(15),
            ..TableConfig::default()
        };
        let err = config.validate().unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { ref name, .. } if name == "lease_duration"));
    }
}

#[cfg(test)]
mod queue_config_tests {
    use super::*;

    #[test]
    fn defaults_are_the_seed_ones() {
        let config = QueueConfig::default();
        assert_eq!(config.max_workers, 5);
        assert_eq!(config.visibility_timeout, Duration::from_secs(300));
        assert_eq!(config.max_retries, 3);
        assert_eq!(config.backoff.base, Duration::from_secs(2));
        assert_eq!(config.long_polling_wait_time, Duration::from_secs(20));
        assert_eq!(config.default_max_attempts(), 4);
        assert_eq!(config.heartbeat_interval(), Duration::from_secs(100));
        assert_eq!(config.execution_timeout, Duration::from_secs(3600));
        config.validate().unwrap();
    }

    #[test]
    fn environment_overrides_defaults() {
        let config = QueueConfig::from_lookup(|name| {
            let value = match name {
                "ROOT_ORCHESTRATOR_MAX_WORKERS" => "12",
                "ROOT_ORCHESTRATOR_VISIBILITY_TIMEOUT" => "45.5",
                "ROOT_ORCHESTRATOR_LONG_POLLING_WAIT_TIME" => "0",
                "ROOT_ORCHESTRATOR_RETRY_DELAY_BASE" => "1",
                "ROOT_ORCHESTRATOR_RECONCILE_AFTER" => "90",
                "ROOT_ORCHESTRATOR_EXECUTION_TIMEOUT" => "7200",
                _ => return None,
            };
            Some(value.to_owned())
        })
        .unwrap();
        assert_eq!(config.max_workers, 12);
        assert_eq!(config.visibility_timeout, Duration::from_millis(45_500));
        assert_eq!(config.long_polling_wait_time, Duration::ZERO);
        assert_eq!(config.backoff.base, Duration::from_secs(1));
        assert_eq!(config.reconcile_after, Duration::from_secs(90));
        assert_eq!(config.execution_timeout, Duration::from_secs(7200));
    }

    #[test]
    fn bad_variables_are_named_with_their_range() {
        let cases = [
            ("ROOT_ORCHESTRATOR_MAX_WORKERS", "0", "from 1 to 1024"),
            (
                "ROOT_ORCHESTRATOR_VISIBILITY_TIMEOUT",
                "50000",
                "from 0.05 to 43200",
            ),
            (
                "ROOT_ORCHESTRATOR_LONG_POLLING_WAIT_TIME",
                "21",
                "from 0 to 20",
            ),
            (
                "ROOT_ORCHESTRATOR_RETRY_DELAY_BASE",
                "86400",
                "from 0 to 43200",
            ),
            ("ROOT_ORCHESTRATOR_MAX_RETRIES", "-1", "from 0 to 99"),
            (
                "ROOT_ORCHESTRATOR_EXECUTION_TIMEOUT",
                "604801",
                "from 0.05 to 604800",
            ),
        ];
        for (variable, value, range) in cases {
            match QueueConfig::from_lookup(|name| (name == variable).then(|| value.to_owned())) {
                Err(Error::InvalidConfig {
                    name,
                    value: refused,
                    expected,
                }) => {
                    assert_eq!(name, variable);
                    assert_eq!(refused, value);
                    assert!(expected.contains(range), "{expected}");
                }
                other => panic!("{variable}={value}: expected InvalidConfig, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_backoff_base_over_its_cap_is_refused() {
        let mut queue = QueueConfig::default();
        queue.backoff.base = Duration::from_secs(700);
        let err = queue.validate().unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { ref name, .. } if name == "backoff.base"));
        let mut table = TableConfig::default();
        table.backoff.base = table.backoff.max + Duration::from_secs(1);
        let err = table.validate().unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { ref name, .. } if name == "backoff.base"));

        let err = QueueConfig::from_lookup(|name| {
            (name == "ROOT_ORCHESTRATOR_RETRY_DELAY_MAX").then(|| "1".to_owned())
        })
        .unwrap_err();
        match err {
            Error::InvalidConfig { name, expected, .. } => {
                assert_eq!(name, "ROOT_ORCHESTRATOR_RETRY_DELAY_BASE");
                assert!(
                    expected.contains("ROOT_ORCHESTRATOR_RETRY_DELAY_MAX"),
                    "{expected}"
                );
            }
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn a_visibility_timeout_over_reconcile_after_names_both_variables() {
        let err = QueueConfig::from_lookup(|name| {
            (name == "ROOT_ORCHESTRATOR_VISIBILITY_TIMEOUT").then(|| "900".to_owned())
        })
        .unwrap_err();
        match err {
            Error::InvalidConfig { name, expected, .. } => {
                assert_eq!(name, "ROOT_ORCHESTRATOR_RECONCILE_AFTER");
                assert!(
                    expected.contains("ROOT_ORCHESTRATOR_VISIBILITY_TIMEOUT"),
                    "{expected}"
                );
                assert!(
                    expected.contains("raise ROOT_ORCHESTRATOR_RECONCILE_AFTER"),
                    "{expected}"
                );
                assert!(!expected.contains("visibility_timeout"), "{expected}");
            }
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn reconciling_sooner_than_a_visibility_timeout_is_refused() {
        let config = QueueConfig {
            visibility_timeout: Duration::from_secs(900),
            ..QueueConfig::default()
        };
        let err = config.validate().unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { ref name, .. } if name == "reconcile_after"));
    }
}
