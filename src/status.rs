//! The request lifecycle and the one table that says which status may follow which.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a request is in its lifecycle.
///
/// ```text
/// PENDING -> PROCESSING -> EXECUTING -> COMPLETED
///    ^           |             |------> FAILED
///    +-----------+-------------+   retry scheduled, lease rescued, handed back
/// PENDING | PROCESSING | EXECUTING -> CANCELLED
/// ```
///
/// `COMPLETED`, `FAILED` and `CANCELLED` are terminal: nothing leaves them.
/// [`RequestStatus::can_transition_to`] is the single source of truth for the
/// arrows above; every store checks its writes against the same table.
///
/// # Examples
///
/// ```
/// use root_orchestrator::RequestStatus;
///
/// assert!(RequestStatus::Pending.can_transition_to(RequestStatus::Processing));
/// assert!(!RequestStatus::Pending.can_transition_to(RequestStatus::Completed));
/// assert!(RequestStatus::Cancelled.is_terminal());
/// assert_eq!("EXECUTING".parse::<RequestStatus>()?, RequestStatus::Executing);
/// # Ok::<(), root_orchestrator::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RequestStatus {
    /// Stored and waiting for a worker (first attempt or a scheduled retry).
    Pending,
    /// Claimed by a worker that holds its lease; the executor has not started yet.
    Processing,
    /// The executor is running the workflow.
    Executing,
    /// The workflow finished and its results are stored.
    Completed,
    /// Every attempt failed, or a failure was not worth retrying.
    Failed,
    /// Cancelled by a caller; any later result of a running attempt is discarded.
    Cancelled,
}

impl RequestStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [RequestStatus; 6] = [
        RequestStatus::Pending,
        RequestStatus::Processing,
        RequestStatus::Executing,
        RequestStatus::Completed,
        RequestStatus::Failed,
        RequestStatus::Cancelled,
    ];

    /// The statuses a worker holds a lease in.
    pub const IN_FLIGHT: [RequestStatus; 2] = [RequestStatus::Processing, RequestStatus::Executing];

    /// Whether `next` may follow `self`. This is the lifecycle's transition table.
    pub const fn can_transition_to(self, next: RequestStatus) -> bool {
        use RequestStatus::*;

        matches!(
            (self, next),
            (Pending, Processing)
                | (Pending, Cancelled)
                | (Processing, Executing)
                // Retry scheduled, lease rescued, or handed back at shutdown.
                | (Processing, Pending)
                | (Executing, Pending)
                // A claimed request whose executor cannot even start fails from here.
                | (Processing, Failed)
                | (Processing, Cancelled)
                | (Executing, Completed)
                | (Executing, Failed)
                | (Executing, Cancelled)
        )
    }

    /// Moves to `next` if the transition table allows it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidTransition`](crate::Error::InvalidTransition) naming both statuses.
    pub fn transition(self, next: RequestStatus) -> Result<RequestStatus, crate::Error> {
        if self.can_transition_to(next) {
            Ok(next)
        } else {
            Err(crate::Error::InvalidTransition {
                from: self,
                to: next,
            })
        }
    }

    /// Whether nothing can follow this status.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            RequestStatus::Completed | RequestStatus::Failed | RequestStatus::Cancelled
        )
    }

    /// Whether a worker holds a lease on requests in this status.
    pub const fn is_in_flight(self) -> bool {
        matches!(self, RequestStatus::Processing | RequestStatus::Executing)
    }

    /// The name stored in databases and shown to users, such as `"PENDING"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Pending => "PENDING",
            RequestStatus::Processing => "PROCESSING",
            RequestStatus::Executing => "EXECUTING",
            RequestStatus::Completed => "COMPLETED",
            RequestStatus::Failed => "FAILED",
            RequestStatus::Cancelled => "CANCELLED",
        }
    }
}

impl fmt::Display for RequestStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad` honours width and alignment, so statuses line up in tables.
        f.pad(self.as_str())
    }
}

impl FromStr for RequestStatus {
    type Err = crate::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RequestStatus::ALL
            .into_iter()
            .find(|status| status.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| crate::Error::UnknownStatus {
                value: s.to_owned(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_status() -> impl Strategy<Value = RequestStatus> {
        proptest::sample::select(RequestStatus::ALL.to_vec())
    }

    proptest! {
        /// Whatever transitions are attempted, in any order, a status walked through
        /// `transition` only ever takes steps of the table and never leaves a terminal status.
        #[test]
        fn random_transition_attempts_never_leave_the_table(
            attempts in proptest::collection::vec(any_status(), 0..64)
        ) {
            let mut current = RequestStatus::Pending;
            for next in attempts {
                let was = current;
                match current.transition(next) {
                    Ok(status) => {
                        prop_assert!(!was.is_terminal(), "left terminal {was} for {status}");
                        prop_assert!(was.can_transition_to(status));
                        current = status;
                    }
                    Err(crate::Error::InvalidTransition { from, to }) => {
                        prop_assert_eq!(from, was);
                        prop_assert_eq!(to, next);
                    }
                    Err(other) => prop_assert!(false, "unexpected error {other}"),
                }
            }
        }
    }

    #[test]
    fn every_status_is_reachable_from_pending_and_every_live_one_can_finish() {
        let reachable = |from: RequestStatus| {
            let mut seen = vec![from];
            let mut i = 0;
            while i < seen.len() {
                for next in RequestStatus::ALL {
                    if seen[i].can_transition_to(next) && !seen.contains(&next) {
                        seen.push(next);
                    }
                }
                i += 1;
            }
            seen
        };
        assert_eq!(
            reachable(RequestStatus::Pending).len(),
            RequestStatus::ALL.len()
        );
        for live in RequestStatus::ALL.into_iter().filter(|s| !s.is_terminal()) {
            assert!(
                reachable(live).contains(&RequestStatus::Completed),
                "{live}"
            );
        }
    }

    #[test]
    fn terminal_statuses_have_no_successor() {
        for from in RequestStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in RequestStatus::ALL {
                assert!(!from.can_transition_to(to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn every_non_terminal_status_can_be_cancelled() {
        for from in RequestStatus::ALL.into_iter().filter(|s| !s.is_terminal()) {
            assert!(from.can_transition_to(RequestStatus::Cancelled), "{from}");
        }
    }

    #[test]
    fn names_round_trip_through_text_and_json() {
        for status in RequestStatus::ALL {
            assert_eq!(status.as_str().parse::<RequestStatus>().unwrap(), status);

            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{}\"", status.as_str()));
        }
        assert!("RUNNING".parse::<RequestStatus>().is_err());
    }
}
