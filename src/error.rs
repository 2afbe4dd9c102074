//! The crate's error type.

use crate::model::{RequestId, RequestType};
use crate::status::RequestStatus;

/// A boxed error from a backend (a database driver, a queue client).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the orchestrator, with the context needed to act on it.
///
/// Backend faults keep their cause in [`std::error::Error::source`]; input faults name the
/// field or environment variable that is wrong and what would have been accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A submitted request is invalid; nothing was stored.
    #[error("invalid request: `{field}` {problem}")]
    InvalidRequest {
        /// Path of the offending field, such as `configuration.quality_threshold`.
        field: String,
        /// What is wrong with it.
        problem: String,
    },

    /// A configuration value is out of range or unparsable.
    #[error("invalid configuration: `{name}` = {value:?} is not accepted; expected {expected}")]
    InvalidConfig {
        /// The setting: a field name when set in code, the variable when read from the environment.
        name: String,
        /// The value that was refused, as given.
        value: String,
        /// The accepted range or format.
        expected: String,
    },

    /// No executor is registered for the request's type, so it would never run.
    #[error("no executor is registered for request type `{request_type}`")]
    UnknownRequestType {
        /// The type that has no executor.
        request_type: RequestType,
    },

    /// No request with this id exists.
    #[error("request `{request_id}` not found")]
    NotFound {
        /// The id that was looked up.
        request_id: RequestId,
    },

    /// The request has no results to give in its current status.
    #[error("request `{request_id}` has no results: its status is {status}")]
    ResultsUnavailable {
        /// The request asked about.
        request_id: RequestId,
        /// Its status when asked.
        status: RequestStatus,
    },

    /// A status name that is not one of [`RequestStatus`].
    #[error("unknown request status `{value}`")]
    UnknownStatus {
        /// The text that was not recognised.
        value: String,
    },

    /// A status change that the lifecycle's transition table does not allow.
    #[error("a request cannot go from {from} to {to}")]
    InvalidTransition {
        /// The status it is in.
        from: RequestStatus,
        /// The status it was asked to enter.
        to: RequestStatus,
    },

    /// A stored record could not be read back into the request model.
    #[error("stored request `{request_id}` has an unreadable `{field}`: {problem}")]
    CorruptRecord {
        /// The request whose record is damaged.
        request_id: String,
        /// The column or field that could not be read.
        field: &'static str,
        /// Why it could not be read.
        problem: String,
    },

    /// A store operation failed in the backend (connection lost, disk full, ...).
    ///
    /// These are usually transient: the workers log them and try again on the next tick.
    #[error("store operation `{operation}` failed")]
    Store {
        /// The [`RequestStore`](crate::RequestStore) method that failed.
        operation: &'static str,
        /// The backend's error.
        #[source]
        source: BoxError,
    },

    /// A queue operation failed in the backend (connection lost, throttled, timed out, a
    /// receipt handle that is no longer valid, ...).
    ///
    /// Usually transient: the consumers log it and try again; a message whose handling was
    /// interrupted comes back when its visibility timeout lapses.
    #[error("queue operation `{operation}` on `{queue}` failed")]
    Queue {
        /// The [`QueueBackend`](crate::QueueBackend) operation that failed, such as `receive`.
        operation: &'static str,
        /// The queue it was made on: its name or URL.
        queue: String,
        /// The backend's error.
        #[source]
        source: BoxError,
    },

    /// A message is larger than the queue accepts; it was not sent.
    #[error("a message of {size} bytes is larger than the queue's limit of {limit} bytes")]
    MessageTooLarge {
        /// The message's size: its body in UTF-8 bytes (plus its attributes, where the
        /// queue counts them).
        size: usize,
        /// The most the queue accepts, in bytes.
        limit: usize,
    },

    /// The store's schema could not be brought up to date.
    #[error("could not apply the store's migrations")]
    Migration {
        /// The backend's error.
        #[source]
        source: BoxError,
    },

    /// The request is no longer held by this worker: it was cancelled, rescued after its
    /// lease expired, or finished. Whatever the attempt does next is discarded.
    #[error("request `{request_id}` is no longer held by this attempt (status now {})",
        crate::executor::describe(*.status))]
    LeaseLost {
        /// The request.
        request_id: RequestId,
        /// Its status when the write was refused; `None` when it no longer exists.
        status: Option<RequestStatus>,
    },

    /// The strategy's workers are already running; a strategy runs one set of workers at a
    /// time (clone the strategy's store into a second strategy for a second set).
    #[error("the {strategy} strategy's workers are already running")]
    AlreadyRunning {
        /// The strategy's name.
        strategy: &'static str,
    },

    /// The orchestrator was built without a required part.
    #[error("the orchestrator builder is missing {what}")]
    Incomplete {
        /// What was not given.
        what: &'static str,
    },
}

impl Error {
    /// Wraps a backend error raised by the store method `operation`.
    pub fn store(operation: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Store {
            operation,
            source: source.into(),
        }
    }

    /// Wraps a backend error raised by the queue operation `operation` on `queue`.
    pub fn queue(
        operation: &'static str,
        queue: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Queue {
            operation,
            queue: queue.into(),
            source: source.into(),
        }
    }

    /// A validation error for `field`.
    pub fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::InvalidRequest {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// Whether trying the same operation again later may succeed.
    ///
    /// A queue error is transient unless the queue said the call can never succeed as
    /// made: the queue does not exist, access is denied, or a parameter is refused.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Store { .. } => true,
            Error::Queue { source, .. } => {
                // The SQS SDK's error codes reach us as text (a backend's error is boxed).
                let text = source.to_string();
                !PERMANENT_QUEUE_ERRORS
                    .iter()
                    .any(|code| text.contains(code))
            }
            _ => false,
        }
    }
}

/// SQS error codes of calls that fail the same way however often they are made.
const PERMANENT_QUEUE_ERRORS: &[&str] = &[
    "QueueDoesNotExist",
    "NonExistentQueue",
    "AccessDenied",
    "InvalidParameterValue",
    "InvalidMessageContents",
    "UnsupportedOperation",
];
