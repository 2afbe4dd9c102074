//! The store conformance suite: written once, run against every `RequestStore` backend.
//!
//! A backend's test file implements [`Harness`] and calls [`store_suite!`], which expands
//! to one `#[test]` per behaviour below.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use root_orchestrator::{
    AttemptError, CancelOutcome, Configuration, InsertOutcome, LeaseRef, ListFilter, NewRequest,
    Priority, Progress, RequestId, RequestResults, RequestStatus, RequestStore, RequestType,
    Source, Visibility, WriteOutcome,
};

/// Opens stores over one backing database; each test gets a fresh harness.
#[async_trait]
pub trait Harness: Send + Sync + 'static {
    /// Opens (or reopens) the store.
    async fn open(&self) -> Arc<dyn RequestStore>;

    /// Closes every store opened so far, as a process exit would.
    async fn close_all(&self);

    /// Whether the data outlives `close_all` (false only for the in-memory store, whose
    /// "reopen" is another handle on the same map).
    fn durable(&self) -> bool;

    /// Releases what the harness created (a database schema, say) once a test is done.
    async fn finish(&self) {}

    /// Cases for the state-machine property test (fewer for slow backends).
    fn property_cases(&self) -> u32 {
        64
    }

    /// Cases for the concurrent-actors property test (fewer for slow backends).
    fn concurrent_cases(&self) -> u32 {
        16
    }
}

/// Expands to one test per behaviour, each with a fresh harness from `$make`.
#[macro_export]
macro_rules! store_suite {
    ($make:expr) => {
        $crate::store_suite!(@tests $make;
            claims_by_priority_then_age_then_insertion,
            claim_order_ignores_id_text_order,
            concurrent_claimers_never_share_a_request,
            fenced_writes_refuse_a_stale_token,
            writes_after_a_terminal_status_change_nothing,
            cancel_voids_the_running_lease,
            rescue_returns_expired_leases_with_the_attempt_counted,
            rescue_fails_a_request_whose_attempts_are_spent,
            completion_committed_first_beats_the_rescuer,
            rescue_racing_completion_applies_exactly_one,
            attempts_and_errors_survive_a_reopen,
            progress_never_decreases_within_an_attempt,
            run_after_is_respected,
            release_returns_a_request_without_counting_the_attempt,
            prune_removes_only_old_finished_requests,
            caller_given_id_makes_insert_idempotent,
            list_filters_and_pages_newest_first,
            list_visibility_is_filtered_in_the_store,
            history_explains_every_transition,
            claiming_one_request_takes_it_only_when_pending,
            concurrent_claims_of_one_request_have_one_winner,
            insert_many_keeps_order_and_reports_repeats,
            insert_many_of_nothing_stores_nothing,
            write_batch_applies_each_write_as_its_single_method_would,
        );

        #[test]
        fn random_interleavings_keep_the_state_machine() {
            conformance::random_interleavings_keep_the_state_machine(|| $make);
        }

        #[test]
        fn concurrent_actors_keep_the_invariants() {
            conformance::concurrent_actors_keep_the_invariants(|| $make);
        }
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let harness = $make;
                conformance::$name(&harness).await;
                conformance::Harness::finish(&harness).await;
            }
        )*
    };
}

pub fn configuration() -> Configuration {
    let mut configuration = Configuration::new(["semaglutide"]);
    configuration.sources.push(Source::new("FDA", "regulatory"));
    configuration
}

pub fn new_request(id: &str, priority: Priority) -> NewRequest {
    NewRequest::new(
        "project-a",
        "analyst-1",
        RequestType::new("semaglutide_intelligence").unwrap(),
        configuration(),
    )
    .with_id(RequestId::parse(id).unwrap())
    .with_priority(priority)
}

async fn insert(store: &dyn RequestStore, id: &str, priority: Priority) -> RequestId {
    match store.insert(new_request(id, priority), 3).await.unwrap() {
        InsertOutcome::Inserted(r) => r.id,
        InsertOutcome::Existing(r) => panic!("{} existed already", r.id),
    }
}

const LONG: Duration = Duration::from_secs(3600);

async fn claim_one(store: &dyn RequestStore, lease: Duration) -> (RequestId, LeaseRef) {
    let mut claimed = store.claim("worker-test", 1, lease).await.unwrap();
    assert_eq!(claimed.len(), 1, "expected one claimable request");
    let request = claimed.remove(0);
    let lease = LeaseRef::of(&request).expect("a claimed request carries a lease");
    (request.id, lease)
}

fn results() -> RequestResults {
    RequestResults::new(
        Some("report.md".into()),
        serde_json::json!({"documents": 3}),
    )
}

fn attempt_error(attempt: u32) -> AttemptError {
    AttemptError {
        attempt,
        message: "source timed out".into(),
        retryable: true,
        at: Utc::now(),
    }
}

async fn status(store: &dyn RequestStore, id: &RequestId) -> RequestStatus {
    store.get(id).await.unwrap().expect("request exists").status
}

pub async fn claims_by_priority_then_age_then_insertion(h: &impl Harness) {
    let store = h.open().await;
    insert(&*store, "low-1", Priority::Low).await;
    insert(&*store, "medium-1", Priority::Medium).await;
    insert(&*store, "high-1", Priority::High).await;
    insert(&*store, "medium-2", Priority::Medium).await;
    insert(&*store, "high-2", Priority::High).await;

    let first_two = store.claim("w", 2, LONG).await.unwrap();
    let ids: Vec<_> = first_two.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["high-1", "high-2"]);

    let mut rest = Vec::new();
    while let Some(r) = store.claim("w", 1, LONG).await.unwrap().pop() {
        rest.push(r.id.to_string());
    }
    assert_eq!(rest, ["medium-1", "medium-2", "low-1"]);
}

pub async fn claim_order_ignores_id_text_order(h: &impl Harness) {
    let store = h.open().await;
    // Inserted in numeric order; text order would put 10 before 9 and 100 before 99.
    let ids = [
        "req-8", "req-9", "req-10", "req-11", "req-98", "req-99", "req-100", "req-101",
    ];
    for id in ids {
        insert(&*store, id, Priority::Medium).await;
    }

    let mut claimed = Vec::new();
    while let Some(r) = store.claim("w", 1, LONG).await.unwrap().pop() {
        claimed.push(r.id.to_string());
    }
    assert_eq!(claimed, ids);
}

pub async fn concurrent_claimers_never_share_a_request(h: &impl Harness) {
    let store = h.open().await;
    for i in 0..200 {
        insert(&*store, &format!("c-{i}"), Priority::Medium).await;
    }

    let mut claimers = Vec::new();
    for worker in 0..8 {
        let store = store.clone();
        claimers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let batch = store.claim(&format!("w-{worker}"), 3, LONG).await.unwrap();
                if batch.is_empty() {
                    return mine;
                }
                mine.extend(batch.into_iter().map(|r| r.id));
            }
        }));
    }

    let mut seen = HashSet::new();
    let mut total = 0;
    for claimer in claimers {
        for id in claimer.await.unwrap() {
            total += 1;
            assert!(seen.insert(id.clone()), "{id} was claimed twice");
        }
    }
    assert_eq!(total, 200);
    let counts = store.count_by_status().await.unwrap();
    assert_eq!(counts.get(&RequestStatus::Processing), Some(&200));
}

pub async fn fenced_writes_refuse_a_stale_token(h: &impl Harness) {
    let store = h.open().await;
    insert(&*store, "fenced", Priority::Medium).await;
    let (id, lease) = claim_one(&*store, LONG).await;
    let forged = LeaseRef {
        token: "not-the-token".into(),
        ..lease.clone()
    };

    let refused = WriteOutcome::Rejected {
        current: Some(RequestStatus::Processing),
    };
    assert_eq!(store.mark_executing(&forged).await.unwrap(), refused);
    assert_eq!(store.extend_lease(&forged, LONG).await.unwrap(), refused);
    assert_eq!(
        store
            .fail_attempt(&forged, &attempt_error(1), None)
            .await
            .unwrap(),
        refused
    );
    assert_eq!(store.release(&forged, "stale").await.unwrap(), refused);
    assert_eq!(status(&*store, &id).await, RequestStatus::Processing);

    assert_eq!(
        store.mark_executing(&lease).await.unwrap(),
        WriteOutcome::Applied
    );
    let refused = WriteOutcome::Rejected {
        current: Some(RequestStatus::Executing),
    };
    assert_eq!(store.complete(&forged, &results()).await.unwrap(), refused);
    assert_eq!(
        store
            .record_progress(&forged, &Progress::at_stage("x", 40))
            .await
            .unwrap(),
        refused
    );
    let request = store.get(&id).await.unwrap().unwrap();
    assert_eq!(request.status, RequestStatus::Executing);
    assert_eq!(request.progress.percentage, 0);
    assert_eq!(request.results, None);

    let unknown = LeaseRef {
        request_id: RequestId::parse("missing").unwrap(),
        ..lease
    };
    assert_eq!(
        store.mark_executing(&unknown).await.unwrap(),
        WriteOutcome::Rejected { current: None }
    );
}

pub async fn writes_after_a_terminal_status_change_nothing(h: &impl Harness) {
    let store = h.open().await;
    insert(&*store, "done", Priority::Medium).await;
    let (id, lease) = claim_one(&*store, LONG).await;
    assert!(store.mark_executing(&lease).await.unwrap().is_applied());
    assert!(
        store
            .complete(&lease, &results())
            .await
            .unwrap()
            .is_applied()
    );

    let refused = WriteOutcome::Rejected {
        current: Some(RequestStatus::Completed),
    };
    let other = RequestResults::new(None, serde_json::json!({"overwritten": true}));
    assert_eq!(store.complete(&lease, &other).await.unwrap(), refused);
    assert_eq!(
        store
            .fail_attempt(&lease, &attempt_error(1), None)
            .await
            .unwrap(),
        refused
    );
    assert_eq!(store.release(&lease, "late").await.unwrap(), refused);
    assert_eq!(store.extend_lease(&lease, LONG).await.unwrap(), refused);
    assert_eq!(
        store.cancel(&id, "too late").await.unwrap(),
        CancelOutcome::AlreadyTerminal(RequestStatus::Completed)
    );

    let request = store.get(&id).await.unwrap().unwrap();
    assert_eq!(request.status, RequestStatus::Completed);
    assert_eq!(request.results, Some(results()));
    assert!(request.errors.is_empty());
    assert_eq!(request.lease, None);
    assert!(request.completed_at.is_some());
}

pub async fn cancel_voids_the_running_lease(h: &impl Harness) {
    let store = h.open().await;
    insert(&*store, "cancel-me", Priority::Medium).await;
    let pending = insert(&*store, "cancel-pending", Priority::Low).await;
    let (id, lease) = claim_one(&*store, LONG).await;
    assert!(store.mark_executing(&lease).await.unwrap().is_applied());

    assert_eq!(
        store
            .cancel(&id, "analyst changed their mind")
            .await
            .unwrap(),
        CancelOutcome::Cancelled {
            previous: RequestStatus::Executing
        }
    );
    assert_eq!(
        store.complete(&lease, &results()).await.unwrap(),
        WriteOutcome::Rejected {
            current: Some(RequestStatus::Cancelled)
        }
    );
    let request = store.get(&id).await.unwrap().unwrap();
    assert_eq!(request.status, RequestStatus::Cancelled);
    assert_eq!(request.results, None);
    assert_eq!(request.lease, None);

    assert_eq!(
        store.cancel(&pending, "not needed").await.unwrap(),
        CancelOutcome::Cancelled {
            previous: RequestStatus::Pending
        }
    );
    assert!(store.claim("w", 5, LONG).await.unwrap().is_empty());
    assert_eq!(
        store.cancel(&id, "again").await.unwrap(),
        CancelOutcome::AlreadyTerminal(RequestStatus::Cancelled)
    );
    assert_eq!(
        store
            .cancel(&RequestId::parse("nobody").unwrap(), "x")
            .await
            .unwrap(),
        CancelOutcome::NotFound
    );
}

pub async fn rescue_returns_expired_leases_with_the_attempt_counted(h: &impl Harness) {
    let store = h.open().await;
    insert(&*store, "stalled", Priority::Medium).await;
    insert(&*store, "healthy", Priority::Low).await;
    let (stalled, stale_lease) = claim_one(&*store, Duration::ZERO).await;
    let (healthy, _) = claim_one(&*store, LONG).await;
    assert!(
        store
            .mark_executing(&stale_lease)
            .await
            .unwrap()
            .is_applied()
    );

    let rescued = store.rescue_expired().await.unwrap();
    assert_eq!(rescued.len(), 1);
    assert_eq!(rescued[0].request_id, stalled);
    assert_eq!(rescued[0].status, RequestStatus::Pending);
    assert_eq!(rescued[0].attempts, 1);
    assert_eq!(rescued[0].previous_owner, "worker-test");

    let request = store.get(&stalled).await.unwrap().unwrap();
    assert_eq!(request.status, RequestStatus::Pending);
    assert_eq!(request.attempts, 1);
    assert_eq!(request.errors.len(), 1);
    assert!(
        request.errors[0].message.contains("expired"),
        "{:?}",
        request.errors
    );
    assert_eq!(request.lease, None);
    assert_eq!(status(&*store, &healthy).await, RequestStatus::Processing);

    // The old lease can no longer write; the next claim counts a second attempt.
    assert!(
        !store
            .complete(&stale_lease, &results())
            .await
            .unwrap()
            .is_applied()
    );
    let again = store.claim("worker-2", 1, LONG).await.unwrap();
    assert_eq!(again[0].id, stalled);
    assert_eq!(again[0].attempts, 2);
}

pub async fn rescue_fails_a_request_whose_attempts_are_spent(h: &impl Harness) {
    let store = h.open().await;
    let request = new_request("one-shot", Priority::Medium).with_max_attempts(1);
    store.insert(request, 3).await.unwrap();
    let (id, _) = claim_one(&*store, Duration::ZERO).await;

    let rescued = store.rescue_expired().await.unwrap();
    assert_eq!(rescued.len(), 1);
    assert_eq!(rescued[0].status, RequestStatus::Failed);

    let request = store.get(&id).await.unwrap().unwrap();
    assert_eq!(request.status, RequestStatus::Failed);
    assert_eq!(request.attempts, 1);
    assert_eq!(request.errors.len(), 1);
    assert!(request.completed_at.is_some());
    assert!(store.claim("w", 1, LONG).await.unwrap().is_empty());
}

pub async fn completion_committed_first_beats_the_rescuer(h: &impl Harness) {
    let store = h.open().await;
    insert(&*store, "finisher", Priority::Medium).await;
    let (id, lease) = claim_one(&*store, Duration::ZERO).await;
    assert!(store.mark_executing(&lease).await.unwrap().is_applied());
    assert!(
        store
            .complete(&lease, &results())
            .await
            .unwrap()
            .is_applied()
    );

    assert!(store.rescue_expired().await.unwrap().is_empty());
    let request = store.get(&id).await.unwrap().unwrap();
    assert_eq!(request.status, RequestStatus::Completed);
    assert_eq!(request.results, Some(results()));
    assert!(request.errors.is_empty());
}

pub async fn rescue_racing_completion_applies_exactly_one(h: &impl Harness) {
    let store = h.open().await;
    let n = 40;
    let mut leases = Vec::new();
    for i in 0..n {
        insert(&*store, &format!("race-{i}"), Priority::Medium).await;
    }
    for _ in 0..n {
        let (_, lease) = claim_one(&*store, Duration::ZERO).await;
        assert!(store.mark_executing(&lease).await.unwrap().is_applied());
        leases.push(lease);
    }

    let rescuer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut rescued = HashSet::new();
            for _ in 0..5 {
                for r in store.rescue_expired().await.unwrap() {
                    rescued.insert(r.request_id);
                }
            }
            rescued
        })
    };
    let completer = {
        let store = store.clone();
        let leases = leases.clone();
        tokio::spawn(async move {
            let mut completed = HashSet::new();
            for lease in leases {
                if store
                    .complete(&lease, &results())
                    .await
                    .unwrap()
                    .is_applied()
                {
                    completed.insert(lease.request_id);
                }
            }
            completed
        })
    };
    let rescued = rescuer.await.unwrap();
    let completed = completer.await.unwrap();

    assert_eq!(
        rescued.len() + completed.len(),
        n,
        "every request went exactly one way"
    );
    for lease in &leases {
        let request = store.get(&lease.request_id).await.unwrap().unwrap();
        if completed.contains(&lease.request_id) {
            assert!(!rescued.contains(&lease.request_id));
            assert_eq!(request.status, RequestStatus::Completed);
            assert!(request.errors.is_empty());
        } else {
            assert_eq!(request.status, RequestStatus::Pending);
            assert_eq!(request.results, None);
            assert_eq!(request.errors.len(), 1);
        }
    }
}

pub async fn attempts_and_errors_survive_a_reopen(h: &impl Harness) {
    let store = h.open().await;
    insert(&*store, "durable", Priority::Medium).await;
    let (id, lease) = claim_one(&*store, LONG).await;
    assert!(store.mark_executing(&lease).await.unwrap().is_applied());
    assert!(
        store
            .fail_attempt(&lease, &attempt_error(1), Some(Utc::now()))
            .await
            .unwrap()
            .is_applied()
    );
    let (_, second) = claim_one(&*store, LONG).await;
    assert!(store.mark_executing(&second).await.unwrap().is_applied());
    drop(store);
    h.close_all().await;

    let store = h.open().await;
    let request = store
        .get(&id)
        .await
        .unwrap()
        .expect("request survived the reopen");
    assert_eq!(request.attempts, 2);
    assert_eq!(request.status, RequestStatus::Executing);
    assert_eq!(request.errors.len(), 1);
    assert_eq!(request.errors[0].attempt, 1);
    assert_eq!(request.errors[0].message, "source timed out");
    assert_eq!(
        request.lease.as_ref().map(|l| &l.token),
        Some(&second.token)
    );
    assert!(
        store
            .complete(&second, &results())
            .await
            .unwrap()
            .is_applied()
    );
}

pub async fn progress_never_decreases_within_an_attempt(h: &impl Harness) {
    let store = h.open().await;
    insert(&*store, "progress", Priority::Medium).await;
    let (id, lease) = claim_one(&*store, LONG).await;
    assert!(store.mark_executing(&lease).await.unwrap().is_applied());

    let ahead = Progress::at_stage("extraction", 60).with_urls_found(7);
    assert!(
        store
            .record_progress(&lease, &ahead)
            .await
            .unwrap()
            .is_applied()
    );
    let behind = Progress::at_stage("aggregation", 30).with_content_extracted(12);
    assert!(
        store
            .record_progress(&lease, &behind)
            .await
            .unwrap()
            .is_applied()
    );

    let request = store.get(&id).await.unwrap().unwrap();
    assert_eq!(request.progress.percentage, 60);
    assert_eq!(
        request.progress.current_stage.as_deref(),
        Some("aggregation")
    );
    assert_eq!(request.progress.content_extracted, 12);

    // A new attempt starts from zero.
    assert!(
        store
            .fail_attempt(&lease, &attempt_error(1), Some(Utc::now()))
            .await
            .unwrap()
            .is_applied()
    );
    let (_, second) = claim_one(&*store, LONG).await;
    assert!(store.mark_executing(&second).await.unwrap().is_applied());
    let request = store.get(&id).await.unwrap().unwrap();
    assert_eq!(request.progress.percentage, 0);
    assert!(
        store
            .record_progress(&second, &Progress::at_stage("discovery", 10))
            .await
            .unwrap()
            .is_applied()
    );
    assert_eq!(
        store.get(&id).await.unwrap().unwrap().progress.percentage,
        10
    );
}

pub async fn run_after_is_respected(h: &impl Harness) {
    let store = h.open().await;
    let later = Utc::now() + chrono::Duration::hours(1);
    store
        .insert(
            new_request("later", Priority::High).with_run_after(later),
            3,
        )
        .await
        .unwrap();
    insert(&*store, "now", Priority::Low).await;

    let claimed = store.claim("w", 10, LONG).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id.as_str(), "now");

    // A retry scheduled in the future is not claimable either.
    let lease = LeaseRef::of(&claimed[0]).unwrap();
    assert!(
        store
            .fail_attempt(&lease, &attempt_error(1), Some(later))
            .await
            .unwrap()
            .is_applied()
    );
    assert!(store.claim("w", 10, LONG).await.unwrap().is_empty());
    let request = store.get(&claimed[0].id).await.unwrap().unwrap();
    assert_eq!(request.status, RequestStatus::Pending);
    assert_eq!(
        request.run_after.timestamp_micros(),
        later.timestamp_micros()
    );
}

pub async fn release_returns_a_request_without_counting_the_attempt(h: &impl Harness) {
    let store = h.open().await;
    insert(&*store, "handed-back", Priority::Medium).await;
    let (id, lease) = claim_one(&*store, LONG).await;
    assert!(store.mark_executing(&lease).await.unwrap().is_applied());

    assert!(
        store
            .release(&lease, "shutdown")
            .await
            .unwrap()
            .is_applied()
    );
    let request = store.get(&id).await.unwrap().unwrap();
    assert_eq!(request.status, RequestStatus::Pending);
    assert_eq!(request.attempts, 0);
    assert_eq!(request.lease, None);
    assert!(request.errors.is_empty());

    let (_, again) = claim_one(&*store, LONG).await;
    assert_eq!(again.request_id, id);
    assert_eq!(store.get(&id).await.unwrap().unwrap().attempts, 1);
}

pub async fn prune_removes_only_old_finished_requests(h: &impl Harness) {
    let store = h.open().await;
    insert(&*store, "completed", Priority::High).await;
    insert(&*store, "failed", Priority::Medium).await;
    insert(&*store, "cancelled", Priority::Low).await;
    insert(&*store, "pending", Priority::Low).await;

    let mut claimed = store.claim("w", 2, LONG).await.unwrap();
    let failed = LeaseRef::of(&claimed.pop().unwrap()).unwrap();
    let completed = LeaseRef::of(&claimed.pop().unwrap()).unwrap();
    assert!(store.mark_executing(&completed).await.unwrap().is_applied());
    assert!(
        store
            .complete(&completed, &results())
            .await
            .unwrap()
            .is_applied()
    );
    assert!(
        store
            .fail_attempt(&failed, &attempt_error(1), None)
            .await
            .unwrap()
            .is_applied()
    );
    let cancelled = RequestId::parse("cancelled").unwrap();
    assert!(matches!(
        store.cancel(&cancelled, "x").await.unwrap(),
        CancelOutcome::Cancelled { .. }
    ));

    let an_hour_ago = Utc::now() - chrono::Duration::hours(1);
    assert_eq!(store.prune_finished(an_hour_ago).await.unwrap(), 0);

    let soon = Utc::now() + chrono::Duration::seconds(1);
    assert_eq!(store.prune_finished(soon).await.unwrap(), 3);
    let counts = store.count_by_status().await.unwrap();
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        [(RequestStatus::Pending, 1)]
    );
    assert!(store.get(&cancelled).await.unwrap().is_none());
}

pub async fn caller_given_id_makes_insert_idempotent(h: &impl Harness) {
    let store = h.open().await;
    let first = store
        .insert(new_request("same-id", Priority::High), 3)
        .await
        .unwrap();
    assert!(matches!(first, InsertOutcome::Inserted(_)));

    let mut changed = new_request("same-id", Priority::Low);
    changed.project_id = "another-project".into();
    let second = store.insert(changed, 3).await.unwrap();
    let InsertOutcome::Existing(existing) = second else {
        panic!("the second insert must return the first request");
    };
    assert_eq!(existing.priority, Priority::High);
    assert_eq!(existing.project_id, "project-a");
    assert_eq!(existing.created_at, first.request().created_at);

    let counts = store.count_by_status().await.unwrap();
    assert_eq!(counts.get(&RequestStatus::Pending), Some(&1));
}

pub async fn list_filters_and_pages_newest_first(h: &impl Harness) {
    let store = h.open().await;
    for i in 0..7 {
        let mut request = new_request(&format!("list-{i}"), Priority::Medium);
        if i % 2 == 1 {
            request.project_id = "project-b".into();
        }
        store.insert(request, 3).await.unwrap();
        // Distinct creation times, so "newest first" has one right answer.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    store
        .cancel(&RequestId::parse("list-6").unwrap(), "x")
        .await
        .unwrap();

    let mut seen = Vec::new();
    let mut filter = ListFilter::new().with_project("project-a").with_limit(2);
    loop {
        let page = store.list(&filter).await.unwrap();
        assert!(page.requests.len() <= 2);
        seen.extend(page.requests.iter().map(|r| r.id.to_string()));
        match page.next {
            Some(cursor) => {
                // Cursors travel as text.
                filter.after = Some(cursor.to_string().parse().unwrap());
            }
            None => break,
        }
    }
    assert_eq!(seen, ["list-6", "list-4", "list-2", "list-0"]);

    let cancelled = store
        .list(&ListFilter::new().with_status(RequestStatus::Cancelled))
        .await
        .unwrap();
    assert_eq!(cancelled.requests.len(), 1);
    assert_eq!(cancelled.requests[0].id.as_str(), "list-6");
    assert_eq!(cancelled.next, None);

    let by_user = store
        .list(&ListFilter::new().with_user("nobody"))
        .await
        .unwrap();
    assert!(by_user.requests.is_empty());
}

/// Every page of a listing, followed through its cursors; the ids newest first and the
/// size of each page.
async fn list_all(store: &dyn RequestStore, mut filter: ListFilter) -> (Vec<String>, Vec<usize>) {
    let (mut ids, mut sizes) = (Vec::new(), Vec::new());
    loop {
        let page = store.list(&filter).await.unwrap();
        sizes.push(page.requests.len());
        ids.extend(page.requests.iter().map(|r| r.id.to_string()));
        match page.next {
            Some(cursor) => filter.after = Some(cursor.to_string().parse().unwrap()),
            None => return (ids, sizes),
        }
    }
}

pub async fn list_visibility_is_filtered_in_the_store(h: &impl Harness) {
    let store = h.open().await;
    // Invisible requests sit between the visible ones, so a store that filtered fetched
    // pages afterwards would return short or empty pages.
    let owners = [
        ("vis-0", "alice", "proj-a"),
        ("vis-1", "bob", "proj-a"),
        ("vis-2", "bob", "proj-b"),
        ("vis-3", "carol", "proj-c"),
        ("vis-4", "alice", "proj-c"),
        ("vis-5", "bob", "proj-b"),
        ("vis-6", "carol", "proj-d"),
        ("vis-7", "carol", "proj-b"),
        ("vis-8", "dave", "proj-d"),
    ];
    for (id, user, project) in owners {
        let mut request = new_request(id, Priority::Medium);
        request.user_id = user.into();
        request.project_id = project.into();
        store.insert(request, 3).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    store
        .cancel(&RequestId::parse("vis-5").unwrap(), "x")
        .await
        .unwrap();

    // alice sees her own requests (any project) and every request of proj-b.
    let alice = Visibility::new("alice", ["proj-b"]);
    let (ids, sizes) = list_all(
        &*store,
        ListFilter::new().visible_to(alice.clone()).with_limit(2),
    )
    .await;
    assert_eq!(ids, ["vis-7", "vis-5", "vis-4", "vis-2", "vis-0"]);
    assert_eq!(sizes, [2, 2, 1], "pages are full until the last");

    // Other filters narrow what is visible; they never widen it.
    let (ids, _) = list_all(
        &*store,
        ListFilter::new()
            .visible_to(alice.clone())
            .with_project("proj-c"),
    )
    .await;
    assert_eq!(ids, ["vis-4"], "carol's proj-c request stays hidden");
    let (ids, _) = list_all(
        &*store,
        ListFilter::new()
            .visible_to(alice.clone())
            .with_status(RequestStatus::Cancelled),
    )
    .await;
    assert_eq!(ids, ["vis-5"]);
    let (ids, _) = list_all(
        &*store,
        ListFilter::new().visible_to(alice).with_user("carol"),
    )
    .await;
    assert_eq!(ids, ["vis-7"]);

    // No projects: only one's own requests. Several projects: all of them.
    let (ids, _) = list_all(
        &*store,
        ListFilter::new().visible_to(Visibility::new("dave", Vec::<String>::new())),
    )
    .await;
    assert_eq!(ids, ["vis-8"]);
    let (ids, _) = list_all(
        &*store,
        ListFilter::new()
            .visible_to(Visibility::new("erin", ["proj-a", "proj-d"]))
            .with_limit(1),
    )
    .await;
    assert_eq!(ids, ["vis-8", "vis-6", "vis-1", "vis-0"]);

    // Project names are bound as values, never spliced into the query.
    let sneaky = Visibility::new("nobody", ["x' OR '1'='1", "proj-z"]);
    let (ids, _) = list_all(&*store, ListFilter::new().visible_to(sneaky)).await;
    assert!(ids.is_empty(), "{ids:?}");
}

pub async fn history_explains_every_transition(h: &impl Harness) {
    let store = h.open().await;
    insert(&*store, "history", Priority::Medium).await;
    let (id, lease) = claim_one(&*store, LONG).await;
    assert!(store.mark_executing(&lease).await.unwrap().is_applied());
    assert!(
        store
            .fail_attempt(&lease, &attempt_error(1), Some(Utc::now()))
            .await
            .unwrap()
            .is_applied()
    );
    let (_, lease) = claim_one(&*store, LONG).await;
    assert!(store.mark_executing(&lease).await.unwrap().is_applied());
    assert!(
        store
            .complete(&lease, &results())
            .await
            .unwrap()
            .is_applied()
    );

    let request = store.get(&id).await.unwrap().unwrap();
    let statuses: Vec<_> = request.history.iter().map(|c| c.status).collect();
    use RequestStatus::*;
    assert_eq!(
        statuses,
        [
            Pending, Processing, Executing, Pending, Processing, Executing, Completed
        ]
    );
    for pair in request.history.windows(2) {
        assert!(pair[0].status.can_transition_to(pair[1].status));
        assert!(pair[0].at <= pair[1].at);
    }
    assert_eq!(request.history[1].worker.as_deref(), Some("worker-test"));
    assert!(request.history.iter().all(|c| !c.reason.is_empty()));
}

pub async fn claiming_one_request_takes_it_only_when_pending(h: &impl Harness) {
    let store = h.open().await;
    let later = Utc::now() + chrono::Duration::hours(1);
    store
        .insert(
            new_request("queued", Priority::Low).with_run_after(later),
            3,
        )
        .await
        .unwrap();
    let id = RequestId::parse("queued").unwrap();

    // The queue decides when to deliver, so run_after does not hold a direct claim back.
    let claimed = store
        .claim_request(&id, "consumer-1", LONG)
        .await
        .unwrap()
        .expect("a pending request is claimed");
    assert_eq!(claimed.status, RequestStatus::Processing);
    assert_eq!(claimed.attempts, 1);
    let lease = LeaseRef::of(&claimed).unwrap();
    assert_eq!(lease.owner, "consumer-1");

    // In flight, then finished: no second claim.
    assert_eq!(
        store.claim_request(&id, "consumer-2", LONG).await.unwrap(),
        None
    );
    assert!(store.mark_executing(&lease).await.unwrap().is_applied());
    assert!(
        store
            .complete(&lease, &results())
            .await
            .unwrap()
            .is_applied()
    );
    assert_eq!(
        store.claim_request(&id, "consumer-2", LONG).await.unwrap(),
        None
    );

    let missing = RequestId::parse("never-stored").unwrap();
    assert_eq!(
        store
            .claim_request(&missing, "consumer-2", LONG)
            .await
            .unwrap(),
        None
    );
}

pub async fn concurrent_claims_of_one_request_have_one_winner(h: &impl Harness) {
    let store = h.open().await;
    let id = insert(&*store, "contended", Priority::Medium).await;

    let claimers: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            let id = id.clone();
            tokio::spawn(async move {
                store
                    .claim_request(&id, &format!("consumer-{i}"), LONG)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut winners = 0;
    for claimer in claimers {
        if claimer.await.unwrap().is_some() {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
    assert_eq!(store.get(&id).await.unwrap().unwrap().attempts, 1);
}

// ---------------------------------------------------------------------------------------
// Random interleavings against a model of what each write must do.

#[derive(Debug, Clone)]
enum Op {
    Insert,
    Claim { expired: bool },
    ClaimRequest { request: usize },
    MarkExecuting { lease: usize },
    Progress { lease: usize, percentage: u8 },
    Complete { lease: usize },
    Fail { lease: usize, retry: bool },
    Release { lease: usize },
    Cancel { request: usize },
    Rescue,
}

fn op_strategy() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        2 => Just(Op::Insert),
        3 => any::<bool>().prop_map(|expired| Op::Claim { expired }),
        3 => (0usize..8).prop_map(|lease| Op::MarkExecuting { lease }),
        1 => (0usize..8, 0u8..=100)
            .prop_map(|(lease, percentage)| Op::Progress { lease, percentage }),
        2 => (0usize..8).prop_map(|lease| Op::Complete { lease }),
        2 => (0usize..8, any::<bool>()).prop_map(|(lease, retry)| Op::Fail { lease, retry }),
        1 => (0usize..8).prop_map(|lease| Op::Release { lease }),
        1 => (0usize..8).prop_map(|request| Op::Cancel { request }),
        1 => Just(Op::Rescue),
        1 => (0usize..8).prop_map(|request| Op::ClaimRequest { request }),
    ]
}

/// Drives random sequences of claims, completions, failures, cancels, rescues and late
/// writes (leases are reused long after they stopped being valid) and checks after each
/// step that: a write is applied exactly when its lease is the current one and the status
/// allows it; terminal statuses never change; every history step is in the transition
/// table; leases exist exactly while in flight; results exist exactly when completed.
pub fn random_interleavings_keep_the_state_machine<H: Harness>(make: impl Fn() -> H) {
    use proptest::test_runner::{Config, TestRunner};

    let cases = make().property_cases();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    runner
        .run(&proptest::collection::vec(op_strategy(), 1..40), |ops| {
            let harness = make();
            runtime.block_on(check_interleaving(&harness, &ops));
            Ok(())
        })
        .unwrap();
}

async fn check_interleaving(h: &impl Harness, ops: &[Op]) {
    let store = h.open().await;
    let mut ids: Vec<RequestId> = Vec::new();
    let mut leases: Vec<LeaseRef> = Vec::new();
    let mut terminal: HashMap<RequestId, RequestStatus> = HashMap::new();

    for op in ops {
        let before: HashMap<RequestId, root_orchestrator::Request> = {
            let mut map = HashMap::new();
            for id in &ids {
                if let Some(r) = store.get(id).await.unwrap() {
                    map.insert(id.clone(), r);
                }
            }
            map
        };
        // Whether `lease` is the live lease of a request in one of `statuses`.
        let live = |lease: &LeaseRef, statuses: &[RequestStatus]| {
            before.get(&lease.request_id).is_some_and(|r| {
                statuses.contains(&r.status)
                    && r.lease.as_ref().is_some_and(|l| l.token == lease.token)
            })
        };
        let pick = |i: usize| leases.get(i % leases.len().max(1)).cloned();

        match op {
            Op::Insert => {
                let id = format!("p-{}", ids.len());
                let outcome = store
                    .insert(new_request(&id, Priority::Medium).with_max_attempts(2), 2)
                    .await
                    .unwrap();
                ids.push(outcome.into_request().id);
            }
            Op::Claim { expired } => {
                let lease = if *expired { Duration::ZERO } else { LONG };
                for r in store.claim("w", 1, lease).await.unwrap() {
                    assert_eq!(r.status, RequestStatus::Processing);
                    assert_eq!(before[&r.id].status, RequestStatus::Pending);
                    assert_eq!(r.attempts, before[&r.id].attempts + 1);
                    leases.push(LeaseRef::of(&r).unwrap());
                }
            }
            Op::ClaimRequest { request } => {
                if let Some(id) = ids.get(request % ids.len().max(1)) {
                    let got = store.claim_request(id, "q", LONG).await.unwrap();
                    assert_eq!(got.is_some(), before[id].status == RequestStatus::Pending);
                    if let Some(r) = got {
                        assert_eq!(r.attempts, before[id].attempts + 1);
                        leases.push(LeaseRef::of(&r).unwrap());
                    }
                }
            }
            Op::MarkExecuting { lease } => {
                if let Some(lease) = pick(*lease) {
                    let expect = live(&lease, &[RequestStatus::Processing]);
                    let got = store.mark_executing(&lease).await.unwrap();
                    assert_eq!(got.is_applied(), expect, "mark_executing {lease:?}");
                }
            }
            Op::Progress { lease, percentage } => {
                if let Some(lease) = pick(*lease) {
                    let expect = live(&lease, &[RequestStatus::Executing]);
                    let progress = Progress::at_stage("s", *percentage);
                    let got = store.record_progress(&lease, &progress).await.unwrap();
                    assert_eq!(got.is_applied(), expect, "record_progress {lease:?}");
                    if expect {
                        let now = store.get(&lease.request_id).await.unwrap().unwrap();
                        let old = before[&lease.request_id].progress.percentage;
                        assert_eq!(now.progress.percentage, old.max(*percentage));
                    }
                }
            }
            Op::Complete { lease } => {
                if let Some(lease) = pick(*lease) {
                    let expect = live(&lease, &[RequestStatus::Executing]);
                    let got = store.complete(&lease, &results()).await.unwrap();
                    assert_eq!(got.is_applied(), expect, "complete {lease:?}");
                }
            }
            Op::Fail { lease, retry } => {
                if let Some(lease) = pick(*lease) {
                    let expect = live(&lease, &RequestStatus::IN_FLIGHT);
                    let retry_at = retry.then(Utc::now);
                    let got = store
                        .fail_attempt(&lease, &attempt_error(1), retry_at)
                        .await
                        .unwrap();
                    assert_eq!(got.is_applied(), expect, "fail_attempt {lease:?}");
                }
            }
            Op::Release { lease } => {
                if let Some(lease) = pick(*lease) {
                    let expect = live(&lease, &RequestStatus::IN_FLIGHT);
                    let got = store.release(&lease, "shutdown").await.unwrap();
                    assert_eq!(got.is_applied(), expect, "release {lease:?}");
                }
            }
            Op::Cancel { request } => {
                if let Some(id) = ids.get(request % ids.len().max(1)) {
                    let was = before[id].status;
                    let got = store.cancel(id, "x").await.unwrap();
                    if was.is_terminal() {
                        assert_eq!(got, CancelOutcome::AlreadyTerminal(was));
                    } else {
                        assert_eq!(got, CancelOutcome::Cancelled { previous: was });
                    }
                }
            }
            Op::Rescue => {
                for r in store.rescue_expired().await.unwrap() {
                    let was = &before[&r.request_id];
                    assert!(was.status.is_in_flight());
                    let expected = if was.attempts >= was.max_attempts {
                        RequestStatus::Failed
                    } else {
                        RequestStatus::Pending
                    };
                    assert_eq!(r.status, expected);
                }
            }
        }

        for id in &ids {
            let r = store.get(id).await.unwrap().unwrap();
            if let Some(done) = terminal.get(id) {
                assert_eq!(r.status, *done, "{id} left a terminal status");
            }
            if r.status.is_terminal() {
                terminal.insert(id.clone(), r.status);
                assert!(r.completed_at.is_some());
            }
            assert_eq!(
                r.lease.is_some(),
                r.status.is_in_flight(),
                "{id}: lease vs status"
            );
            assert_eq!(
                r.results.is_some(),
                r.status == RequestStatus::Completed,
                "{id}: results vs status"
            );
            assert!(
                r.attempts <= r.max_attempts,
                "{id}: attempts over the limit"
            );
            assert_eq!(
                r.history.first().map(|c| c.status),
                Some(RequestStatus::Pending)
            );
            assert_eq!(r.history.last().map(|c| c.status), Some(r.status));
            for pair in r.history.windows(2) {
                assert!(
                    pair[0].status.can_transition_to(pair[1].status),
                    "{id}: {} -> {} is not in the transition table",
                    pair[0].status,
                    pair[1].status
                );
            }
        }
    }
    drop(store);
    h.close_all().await;
    h.finish().await;
}

// ---------------------------------------------------------------------------------------
// Concurrent actors against one store, watched by an observer that reads while they run.

/// How long a claim or a heartbeat makes a lease last.
#[derive(Debug, Clone, Copy)]
enum LeaseLength {
    /// Expired at once: the next rescue takes it.
    Lapsed,
    /// Long enough to race a rescue now and then.
    Short,
    Long,
}

impl LeaseLength {
    fn duration(self) -> Duration {
        match self {
            LeaseLength::Lapsed => Duration::ZERO,
            LeaseLength::Short => Duration::from_millis(15),
            LeaseLength::Long => LONG,
        }
    }
}

#[derive(Debug, Clone)]
enum ActorOp {
    Claim { length: LeaseLength },
    ClaimRequest { request: usize, length: LeaseLength },
    MarkExecuting { lease: usize },
    Heartbeat { lease: usize, length: LeaseLength },
    Progress { lease: usize, percentage: u8 },
    Complete { lease: usize },
    Fail { lease: usize, retry: bool },
    Cancel { request: usize },
    Rescue,
    Pause { micros: u16 },
}

fn actor_op_strategy() -> impl proptest::strategy::Strategy<Value = ActorOp> {
    use proptest::prelude::*;
    let length = prop_oneof![
        Just(LeaseLength::Lapsed),
        Just(LeaseLength::Short),
        Just(LeaseLength::Long),
    ];
    prop_oneof![
        3 => length.clone().prop_map(|length| ActorOp::Claim { length }),
        1 => (0usize..6, length.clone())
            .prop_map(|(request, length)| ActorOp::ClaimRequest { request, length }),
        3 => (0usize..12).prop_map(|lease| ActorOp::MarkExecuting { lease }),
        2 => (0usize..12, length).prop_map(|(lease, length)| ActorOp::Heartbeat { lease, length }),
        3 => (0usize..12, 0u8..=100)
            .prop_map(|(lease, percentage)| ActorOp::Progress { lease, percentage }),
        2 => (0usize..12).prop_map(|lease| ActorOp::Complete { lease }),
        2 => (0usize..12, any::<bool>()).prop_map(|(lease, retry)| ActorOp::Fail { lease, retry }),
        1 => (0usize..6).prop_map(|request| ActorOp::Cancel { request }),
        2 => Just(ActorOp::Rescue),
        1 => (0u16..2000).prop_map(|micros| ActorOp::Pause { micros }),
    ]
}

/// A write that made a request terminal, as the actor that made it saw it.
#[derive(Debug, Clone)]
struct TerminalWrite {
    request_id: RequestId,
    status: RequestStatus,
    by: String,
}

/// 2 or 3 actors, each a real task issuing its random operations against one store at the
/// same time: claims, heartbeats, progress, completions, failures, cancels, rescues, and
/// writes under leases that other actors hold or that went stale long ago. An observer
/// reads every request throughout. Checked: no request leaves a terminal status; attempts
/// never go down; progress never goes down within an attempt; every terminal status is
/// entered by exactly one write (the actors' applied writes and the history agree); the
/// final records are consistent (lease exactly while in flight, results exactly when
/// completed, every history step in the transition table).
pub fn concurrent_actors_keep_the_invariants<H: Harness>(make: impl Fn() -> H) {
    use proptest::test_runner::{Config, TestRunner};

    let cases = make().concurrent_cases();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(3)
        .enable_all()
        .build()
        .unwrap();
    let actors =
        proptest::collection::vec(proptest::collection::vec(actor_op_strategy(), 1..24), 2..=3);
    runner
        .run(&(2usize..6, actors), |(requests, actors)| {
            let harness = make();
            runtime.block_on(check_concurrent_actors(&harness, requests, actors));
            Ok(())
        })
        .unwrap();
}

async fn check_concurrent_actors(h: &impl Harness, requests: usize, actors: Vec<Vec<ActorOp>>) {
    let store = h.open().await;
    let mut ids = Vec::new();
    for i in 0..requests {
        let request = new_request(&format!("c-{i}"), Priority::Medium).with_max_attempts(3);
        ids.push(store.insert(request, 3).await.unwrap().into_request().id);
    }
    let ids = Arc::new(ids);
    let leases: Arc<std::sync::Mutex<Vec<LeaseRef>>> = Arc::default();
    let terminal_writes: Arc<std::sync::Mutex<Vec<TerminalWrite>>> = Arc::default();
    let stop_observing = root_orchestrator::CancellationToken::new();

    let observer = tokio::spawn(observe(store.clone(), ids.clone(), stop_observing.clone()));
    let tasks: Vec<_> = actors
        .into_iter()
        .enumerate()
        .map(|(n, ops)| {
            tokio::spawn(run_actor(
                format!("actor-{n}"),
                ops,
                store.clone(),
                ids.clone(),
                leases.clone(),
                terminal_writes.clone(),
            ))
        })
        .collect();
    for task in tasks {
        task.await.expect("an actor panicked");
    }
    stop_observing.cancel();
    let reads = observer.await.expect("the observer found a violation");
    assert!(reads >= 1);

    let writes = terminal_writes.lock().unwrap().clone();
    for id in ids.iter() {
        let r = store.get(id).await.unwrap().unwrap();
        let terminal_entries: Vec<_> = r
            .history
            .iter()
            .filter(|c| c.status.is_terminal())
            .map(|c| c.status)
            .collect();
        let mine: Vec<_> = writes.iter().filter(|w| w.request_id == *id).collect();
        assert!(
            mine.len() <= 1,
            "{id}: several writes made it terminal: {mine:?}"
        );
        if let Some(write) = mine.first() {
            assert_eq!(r.status, write.status, "{id}: {write:?} was overwritten");
        }
        if r.status.is_terminal() {
            assert_eq!(terminal_entries, [r.status], "{id}: {:?}", r.history);
        } else {
            assert!(terminal_entries.is_empty(), "{id}: {:?}", r.history);
        }
        assert_eq!(r.lease.is_some(), r.status.is_in_flight(), "{id}: lease");
        assert_eq!(
            r.results.is_some(),
            r.status == RequestStatus::Completed,
            "{id}: results"
        );
        assert!(
            r.attempts <= r.max_attempts,
            "{id}: attempts over the limit"
        );
        assert_eq!(r.history.last().map(|c| c.status), Some(r.status));
        for pair in r.history.windows(2) {
            assert!(
                pair[0].status.can_transition_to(pair[1].status),
                "{id}: {} -> {}",
                pair[0].status,
                pair[1].status
            );
        }
    }
    drop(store);
    h.close_all().await;
    h.finish().await;
}

async fn run_actor(
    name: String,
    ops: Vec<ActorOp>,
    store: Arc<dyn RequestStore>,
    ids: Arc<Vec<RequestId>>,
    leases: Arc<std::sync::Mutex<Vec<LeaseRef>>>,
    terminal_writes: Arc<std::sync::Mutex<Vec<TerminalWrite>>>,
) {
    // Any lease any actor ever held: current ones, other actors' ones, stale ones.
    let pick = |i: usize| {
        let leases = leases.lock().unwrap();
        (!leases.is_empty()).then(|| leases[i % leases.len()].clone())
    };
    let record = |request_id: &RequestId, status: RequestStatus| {
        terminal_writes.lock().unwrap().push(TerminalWrite {
            request_id: request_id.clone(),
            status,
            by: name.clone(),
        });
    };
    for op in ops {
        match op {
            ActorOp::Claim { length } => {
                for r in store.claim(&name, 1, length.duration()).await.unwrap() {
                    assert_eq!(r.status, RequestStatus::Processing);
                    leases.lock().unwrap().push(LeaseRef::of(&r).unwrap());
                }
            }
            ActorOp::ClaimRequest { request, length } => {
                let id = &ids[request % ids.len()];
                if let Some(r) = store
                    .claim_request(id, &name, length.duration())
                    .await
                    .unwrap()
                {
                    assert_eq!(r.status, RequestStatus::Processing);
                    leases.lock().unwrap().push(LeaseRef::of(&r).unwrap());
                }
            }
            ActorOp::MarkExecuting { lease } => {
                if let Some(lease) = pick(lease) {
                    let _ = store.mark_executing(&lease).await.unwrap();
                }
            }
            ActorOp::Heartbeat { lease, length } => {
                if let Some(lease) = pick(lease) {
                    let _ = store.extend_lease(&lease, length.duration()).await.unwrap();
                }
            }
            ActorOp::Progress { lease, percentage } => {
                if let Some(lease) = pick(lease) {
                    let progress = Progress::at_stage("concurrent", percentage);
                    let _ = store.record_progress(&lease, &progress).await.unwrap();
                }
            }
            ActorOp::Complete { lease } => {
                if let Some(lease) = pick(lease)
                    && store
                        .complete(&lease, &results())
                        .await
                        .unwrap()
                        .is_applied()
                {
                    record(&lease.request_id, RequestStatus::Completed);
                }
            }
            ActorOp::Fail { lease, retry } => {
                if let Some(lease) = pick(lease) {
                    // Without a retry time the failure is final; with one it may be too
                    // (attempts spent), which only the record can tell, so only the first
                    // kind is counted as a terminal write.
                    let retry_at = retry.then(Utc::now);
                    let applied = store
                        .fail_attempt(&lease, &attempt_error(1), retry_at)
                        .await
                        .unwrap()
                        .is_applied();
                    if applied && !retry {
                        record(&lease.request_id, RequestStatus::Failed);
                    }
                }
            }
            ActorOp::Cancel { request } => {
                let id = &ids[request % ids.len()];
                if let CancelOutcome::Cancelled { .. } = store.cancel(id, "x").await.unwrap() {
                    record(id, RequestStatus::Cancelled);
                }
            }
            ActorOp::Rescue => {
                for r in store.rescue_expired().await.unwrap() {
                    if r.status == RequestStatus::Failed {
                        record(&r.request_id, RequestStatus::Failed);
                    }
                }
            }
            ActorOp::Pause { micros } => {
                tokio::time::sleep(Duration::from_micros(u64::from(micros))).await;
            }
        }
    }
}

/// Reads every request until `stop`, then once more; panics on a violation. Returns how
/// many rounds of reads it made.
async fn observe(
    store: Arc<dyn RequestStore>,
    ids: Arc<Vec<RequestId>>,
    stop: root_orchestrator::CancellationToken,
) -> usize {
    // Per request: the last status, attempts and percentage seen.
    let mut seen: HashMap<RequestId, (RequestStatus, u32, u8)> = HashMap::new();
    let mut rounds = 0;
    loop {
        let last_round = stop.is_cancelled();
        for id in ids.iter() {
            let r = store.get(id).await.unwrap().unwrap();
            let now = (r.status, r.attempts, r.progress.percentage);
            if let Some(&(status, attempts, percentage)) = seen.get(id) {
                if status.is_terminal() {
                    assert_eq!(r.status, status, "{id} left {status}");
                }
                assert!(
                    r.attempts >= attempts,
                    "{id}: attempts went from {attempts} to {}",
                    r.attempts
                );
                if r.attempts == attempts {
                    assert!(
                        r.progress.percentage >= percentage,
                        "{id}: progress went from {percentage} to {} in attempt {attempts}",
                        r.progress.percentage
                    );
                }
            }
            seen.insert(id.clone(), now);
        }
        rounds += 1;
        if last_round {
            return rounds;
        }
        tokio::task::yield_now().await;
    }
}

pub async fn insert_many_keeps_order_and_reports_repeats(h: &impl Harness) {
    let store = h.open().await;
    insert(&*store, "stored-before", Priority::High).await;

    let mut batch: Vec<NewRequest> = ["b-1", "b-2", "stored-before", "b-1", "b-3"]
        .into_iter()
        .map(|id| new_request(id, Priority::Medium))
        .collect();
    // A different body under a repeated id must not replace what the first one stored.
    batch[3].project_id = "another-project".into();
    batch.push(new_request("b-4", Priority::Low).with_max_attempts(7));
    let outcomes = store.insert_many(batch, 3).await.unwrap();

    let summary: Vec<(&str, bool)> = outcomes
        .iter()
        .map(|o| {
            (
                o.request().id.as_str(),
                matches!(o, InsertOutcome::Inserted(_)),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("b-1", true),
            ("b-2", true),
            ("stored-before", false),
            ("b-1", false),
            ("b-3", true),
            ("b-4", true),
        ]
    );
    assert_eq!(outcomes[2].request().priority, Priority::High);
    assert_eq!(outcomes[3].request().project_id, "project-a");
    assert_eq!(outcomes[5].request().max_attempts, 7);
    assert_eq!(outcomes[0].request().max_attempts, 3);
    assert!(
        outcomes[..2]
            .iter()
            .all(|o| o.request().status == RequestStatus::Pending)
    );

    // The batch is claimed in the order given, behind the higher-priority request.
    let mut claimed = Vec::new();
    while let Some(r) = store.claim("w", 1, LONG).await.unwrap().pop() {
        claimed.push(r.id.to_string());
    }
    assert_eq!(claimed, ["stored-before", "b-1", "b-2", "b-3", "b-4"]);
}

pub async fn insert_many_of_nothing_stores_nothing(h: &impl Harness) {
    let store = h.open().await;
    let outcomes = store.insert_many(Vec::new(), 3).await.unwrap();
    assert!(outcomes.is_empty());
    assert!(store.count_by_status().await.unwrap().is_empty());
}

pub async fn write_batch_applies_each_write_as_its_single_method_would(h: &impl Harness) {
    use root_orchestrator::FencedWrite;

    let store = h.open().await;
    for id in ["w-start", "w-done", "w-stale", "w-cancelled"] {
        insert(&*store, id, Priority::Medium).await;
    }
    let mut leases = HashMap::new();
    for _ in 0..4 {
        let (id, lease) = claim_one(&*store, LONG).await;
        leases.insert(id.to_string(), lease);
    }
    let done = leases["w-done"].clone();
    assert_eq!(
        store.mark_executing(&done).await.unwrap(),
        WriteOutcome::Applied
    );
    store
        .cancel(&RequestId::parse("w-cancelled").unwrap(), "x")
        .await
        .unwrap();
    let mut stale = leases["w-stale"].clone();
    stale.token = "not-the-token".into();
    let missing = LeaseRef {
        request_id: RequestId::parse("w-missing").unwrap(),
        owner: "worker-test".into(),
        token: "t".into(),
    };

    let outcomes = store
        .write_batch(&[
            FencedWrite::MarkExecuting(leases["w-start"].clone()),
            FencedWrite::Complete(done.clone(), results()),
            FencedWrite::MarkExecuting(stale),
            FencedWrite::Complete(leases["w-cancelled"].clone(), results()),
            FencedWrite::MarkExecuting(missing),
        ])
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        [
            WriteOutcome::Applied,
            WriteOutcome::Applied,
            WriteOutcome::Rejected {
                current: Some(RequestStatus::Processing)
            },
            WriteOutcome::Rejected {
                current: Some(RequestStatus::Cancelled)
            },
            WriteOutcome::Rejected { current: None },
        ]
    );

    let started = store
        .get(&leases["w-start"].request_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(started.status, RequestStatus::Executing);
    assert_eq!(
        started.history.last().map(|c| c.status),
        Some(RequestStatus::Executing)
    );
    let finished = store.get(&done.request_id).await.unwrap().unwrap();
    assert_eq!(finished.status, RequestStatus::Completed);
    assert_eq!(finished.results, Some(results()));
    assert!(finished.lease.is_none());
    assert!(finished.completed_at.is_some());
    assert_eq!(finished.progress.percentage, 100);

    // A write already applied is refused the second time, like any fenced write.
    let again = store
        .write_batch(&[FencedWrite::Complete(done, results())])
        .await
        .unwrap();
    assert_eq!(
        again,
        [WriteOutcome::Rejected {
            current: Some(RequestStatus::Completed)
        }]
    );
    assert!(store.write_batch(&[]).await.unwrap().is_empty());
}
