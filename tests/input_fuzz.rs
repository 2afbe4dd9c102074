//! Arbitrary input where requests enter: the wire shape through `submit_json`, typed
//! submissions through `submit`, queue message bodies through the consumers, and (with the
//! `http` feature) the HTTP submit route. Each input is stored, or refused with an error
//! that names the offending field; a refusal stores nothing, and nothing panics.

#[cfg(feature = "http")]
mod http_support;

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use root_orchestrator::{
    BackoffPolicy, Configuration, Error, MemoryQueue, NewRequest, Priority, QueueBackend,
    QueueConfig, QueueStrategy, Request, RequestId, RequestMessage, RequestResults, RequestStore,
    RequestType, RootOrchestrator, Source, SqliteStore, TableConfig, TableStrategy,
    WorkflowContext, WorkflowError, WorkflowExecutor,
};
use serde_json::{Value, json};
use tokio::time::Instant;

const TYPE: &str = "semaglutide_intelligence";

struct Succeeds;

#[async_trait::async_trait]
impl WorkflowExecutor for Succeeds {
    async fn execute(
        &self,
        _request: &Request,
        _ctx: &WorkflowContext,
    ) -> Result<RequestResults, WorkflowError> {
        Ok(RequestResults::new(None, json!({})))
    }
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// Values: hostile text, arbitrary JSON, deep nesting.

/// Text as clients get it wrong: empty, blank, control characters and NUL, multibyte,
/// huge, or just arbitrary.
fn wild_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("   \t".to_owned()),
        Just("nul\0inside".to_owned()),
        Just("zero\u{200B}width".to_owned()),
        "[a-z]{1,12}",
        "[é€😀ß中\u{0301}]{1,40}",
        (250usize..=300).prop_map(|n| "ä".repeat(n)),
        (60_000usize..=70_000).prop_map(|n| "k".repeat(n)),
        any::<String>(),
    ]
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        prop_oneof![Just(0.5f64), Just(1.0), Just(-0.0), Just(1e300)].prop_map(Value::from),
        wild_text().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 24, 5, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,8}|[ü中]{1,3}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Arrays or objects nested `depth` deep.
fn deep_json() -> impl Strategy<Value = Value> {
    (10usize..300, any::<bool>()).prop_map(|(depth, arrays)| {
        let mut value = json!(1);
        for _ in 0..depth {
            value = if arrays {
                json!([value])
            } else {
                json!({ "d": value })
            };
        }
        value
    })
}

/// Values that may well be valid where they land, so that some mutated inputs pass.
fn plausible() -> impl Strategy<Value = Value> {
    let now = Utc::now().to_rfc3339();
    prop_oneof![
        Just(json!("low")),
        Just(json!("HIGH")),
        Just(json!("summary")),
        Just(json!(0.25)),
        Just(json!(2)),
        Just(json!(["semaglutide", "Ozempic 😀"])),
        Just(json!([{"name": "PubMed", "type": "academic"}])),
        Just(json!({"name": "EMA", "type": "regulatory"})),
        Just(json!({"stage_delay_ms": 5, "nested": {"ok": [1, 2]}})),
        Just(json!(now)),
        Just(json!("semaglutide")),
        Just(json!("patent_watch")),
    ]
}

fn any_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => arb_json(),
        1 => deep_json(),
        3 => plausible(),
    ]
}

// ---------------------------------------------------------------------------------------
// Mutations of a valid wire-shape message.

const PATHS: &[&str] = &[
    "request_id",
    "project_id",
    "user_id",
    "request_type",
    "priority",
    "configuration",
    "configuration.keywords",
    "configuration.keywords[0]",
    "configuration.sources",
    "configuration.sources[0]",
    "configuration.sources[0].name",
    "configuration.sources[0].type",
    "configuration.extraction_mode",
    "configuration.quality_threshold",
    "configuration.custom_params",
    "configuration.custom_params.filters",
    "metadata",
    "metadata.submitted_at",
    "metadata.retry_count",
    "metadata.max_retries",
];

/// Objects of the wire shape whose fields are fixed (`custom_params` is free-form).
const OBJECTS: &[&str] = &[".", "configuration", "configuration.sources[0]", "metadata"];

#[derive(Debug, Clone)]
enum Mutation {
    Replace(&'static str, Value),
    Remove(&'static str),
    /// A field the object does not have.
    Unknown(&'static str, String, Value),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        5 => (proptest::sample::select(PATHS), any_value())
            .prop_map(|(path, value)| Mutation::Replace(path, value)),
        2 => proptest::sample::select(PATHS).prop_map(Mutation::Remove),
        2 => (
            proptest::sample::select(OBJECTS),
            "[a-z_]{1,10}|[ø中😀]{1,4}",
            arb_json(),
        )
            .prop_map(|(object, key, value)| Mutation::Unknown(object, format!("zz{key}"), value)),
    ]
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Key(String),
    Index(usize),
}

fn segments(path: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    if path == "." {
        return out;
    }
    for part in path.split('.') {
        let (key, rest) = part.split_once('[').unwrap_or((part, ""));
        out.push(Segment::Key(key.to_owned()));
        if let Some(index) = rest.strip_suffix(']') {
            out.push(Segment::Index(index.parse().unwrap()));
        }
    }
    out
}

fn locate<'a>(mut value: &'a mut Value, path: &[Segment]) -> Option<&'a mut Value> {
    for segment in path {
        value = match segment {
            Segment::Key(key) => value.as_object_mut()?.get_mut(key)?,
            Segment::Index(i) => value.as_array_mut()?.get_mut(*i)?,
        };
    }
    Some(value)
}

/// Applies `mutation`; returns the path it touched, or `None` when its place is gone.
fn apply(message: &mut Value, mutation: &Mutation) -> Option<String> {
    match mutation {
        Mutation::Replace(path, _) | Mutation::Remove(path) => {
            let all = segments(path);
            let (last, parent) = all.split_last()?;
            // Removing an element changes the array: an error about it names the array.
            let changed = match (mutation, last) {
                (Mutation::Remove(_), Segment::Index(_)) => path.rsplit_once('[')?.0.to_owned(),
                _ => (*path).to_owned(),
            };
            let parent = locate(message, parent)?;
            let replacement = match mutation {
                Mutation::Replace(_, value) => Some(value.clone()),
                _ => None,
            };
            match (last, parent) {
                (Segment::Key(key), Value::Object(map)) => match replacement {
                    Some(value) => {
                        map.insert(key.clone(), value);
                    }
                    None => {
                        map.remove(key)?;
                    }
                },
                (Segment::Index(i), Value::Array(items)) if *i < items.len() => match replacement {
                    Some(value) => items[*i] = value,
                    None => {
                        items.remove(*i);
                    }
                },
                _ => return None,
            }
            Some(changed)
        }
        Mutation::Unknown(object, key, value) => {
            let target = locate(message, &segments(object))?.as_object_mut()?;
            target.insert(key.clone(), value.clone());
            Some(if *object == "." {
                key.clone()
            } else {
                format!("{object}.{key}")
            })
        }
    }
}

/// A valid message in the wire shape, with a fresh id.
fn valid_message(id: &str, user: &str, project: &str) -> Value {
    json!({
        "request_id": id,
        "project_id": project,
        "user_id": user,
        "request_type": TYPE,
        "priority": "high",
        "configuration": {
            "keywords": ["semaglutide", "tirzepatide"],
            "sources": [{"name": "FDA", "type": "regulatory"}],
            "extraction_mode": "comprehensive",
            "quality_threshold": 0.7,
            "custom_params": {"region": "EU"}
        },
        "metadata": {
            "submitted_at": Utc::now().to_rfc3339(),
            "retry_count": 0,
            "max_retries": 3
        }
    })
}

/// Whether `ancestor` is `path` or one of its enclosing fields.
fn encloses(ancestor: &str, path: &str) -> bool {
    ancestor == "."
        || path == ancestor
        || (path.starts_with(ancestor)
            && matches!(path.as_bytes().get(ancestor.len()), Some(b'.' | b'[')))
}

/// Whether an error about `field` (explained by `text`) points at the mutated `path`:
/// the field itself, a part of the value put there, or an enclosing object whose error
/// names the field (a missing or unknown field). The whole configuration may be named
/// for its size, since the limit is on the whole.
fn points_at(field: &str, text: &str, path: &str) -> bool {
    let leaf = path.rsplit(['.', '[']).next().unwrap_or(path);
    field == path
        || encloses(path, field)
        || (encloses(field, path) && field != "." && text.contains("bytes as JSON"))
        || (encloses(field, path) && text.contains(leaf))
}

/// The error's field and text, for an error that is the caller's fault. The text of an
/// `InvalidRequest` shows its field; an unknown type is an error about `request_type`.
fn refusal(err: &Error) -> (String, String) {
    match err {
        Error::InvalidRequest { field, .. } => {
            let text = err.to_string();
            assert!(
                text.contains(&format!("`{field}`")),
                "the error does not show its field `{field}`: {text}"
            );
            (field.clone(), text)
        }
        Error::UnknownRequestType { request_type } => {
            let text = err.to_string();
            assert!(text.contains(request_type.as_str()), "{text}");
            ("request_type".to_owned(), text)
        }
        other => panic!("not a refusal naming a field: {other:?}"),
    }
}

/// Checks that `field` points at one of the `touched` paths.
fn assert_names_a_mutation(field: &str, text: &str, touched: &[String], input: &str) {
    assert!(
        touched.iter().any(|path| points_at(field, text, path)),
        "`{field}` ({text}) is none of the mutated fields {touched:?}; input {}",
        shorten(input)
    );
}

fn shorten(text: &str) -> String {
    text.chars().take(600).collect()
}

/// The total over `count_by_status`.
async fn stored(store: &dyn RequestStore) -> u64 {
    store.count_by_status().await.unwrap().values().sum()
}

async fn sqlite_orchestrator(dir: &tempfile::TempDir) -> (RootOrchestrator, SqliteStore) {
    let store = SqliteStore::open(dir.path().join("requests.db"))
        .await
        .unwrap();
    let orchestrator = RootOrchestrator::builder()
        .strategy(TableStrategy::new(store.clone(), TableConfig::default()).unwrap())
        .executor(TYPE, Succeeds)
        .build()
        .unwrap();
    (orchestrator, store)
}

// ---------------------------------------------------------------------------------------

#[test]
fn wire_shape_json_is_stored_or_refused_naming_the_field() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (orchestrator, store) = rt.block_on(sqlite_orchestrator(&dir));
    let accepted: RefCell<HashSet<RequestId>> = RefCell::default();
    let refused = Cell::new(0usize);
    let case = Cell::new(0usize);

    // A quarter of the cases change nothing: the valid message must be accepted, and both
    // outcomes are sure to be seen (a mutation seldom leaves a message valid).
    runner(320)
        .run(&proptest::collection::vec(mutation(), 0..4), |mutations| {
            case.set(case.get() + 1);
            let mut message = valid_message(&format!("wire-{}", case.get()), "analyst-1", "glp1");
            let touched: Vec<String> = mutations
                .iter()
                .filter_map(|m| apply(&mut message, m))
                .collect();
            let body = message.to_string();
            rt.block_on(async {
                let before = stored(&store).await;
                match orchestrator.submit_json(&body).await {
                    Ok(request) => {
                        let new = accepted.borrow_mut().insert(request.id.clone());
                        assert_eq!(stored(&store).await, before + u64::from(new));
                        let kept = store.get(&request.id).await.unwrap().unwrap();
                        assert_keeps_the_input(&kept, &message);
                    }
                    Err(err) => {
                        refused.set(refused.get() + 1);
                        let (field, text) = refusal(&err);
                        assert_names_a_mutation(&field, &text, &touched, &body);
                        assert_eq!(stored(&store).await, before, "a refusal stored");
                    }
                }
            });
            Ok(())
        })
        .unwrap();
    // The generator reaches both outcomes.
    let (accepted, refused) = (accepted.into_inner().len(), refused.get());
    assert!(refused > 20, "only {refused} refusals");
    assert!(accepted > 5, "only {accepted} accepted");
}

/// The stored request carries the submitted keywords, sources and custom parameters
/// unchanged (multibyte text included).
fn assert_keeps_the_input(kept: &Request, message: &Value) {
    let configuration = &message["configuration"];
    let keywords: Vec<String> = serde_json::from_value(configuration["keywords"].clone()).unwrap();
    assert_eq!(kept.configuration.keywords, keywords);
    let sources: Vec<Source> = serde_json::from_value(configuration["sources"].clone()).unwrap();
    assert_eq!(kept.configuration.sources, sources);
    let params = configuration
        .get("custom_params")
        .cloned()
        .unwrap_or_else(|| json!({}));
    assert_eq!(kept.configuration.custom_params, params);
    assert_eq!(kept.project_id, message["project_id"].as_str().unwrap());
}

// ---------------------------------------------------------------------------------------

/// A typed submission with some fields set to hostile values; `wild` lists those fields.
#[derive(Debug, Clone)]
struct Typed {
    request: NewRequest,
    wild: Vec<&'static str>,
}

fn typed_submission() -> impl Strategy<Value = Typed> {
    let text = |field: &'static str, valid: &'static str| {
        prop_oneof![
            6 => Just((valid.to_owned(), None)),
            1 => wild_text().prop_map(move |t| (t, Some(field))),
        ]
    };
    let threshold = prop_oneof![
        6 => (0.0f64..=1.0).prop_map(|t| (t, None)),
        1 => prop_oneof![
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(-0.5),
            Just(1.0000001),
            any::<f64>(),
        ]
        .prop_map(|t| (t, Some("configuration.quality_threshold"))),
    ];
    let params = prop_oneof![
        8 => Just((json!({}), None)),
        2 => arb_json().prop_map(|v| (v, Some("configuration.custom_params"))),
        1 => deep_json().prop_map(|v| (json!({ "deep": v }), Some("configuration.custom_params"))),
    ];
    let attempts = prop_oneof![
        6 => Just((None, None)),
        1 => any::<u32>().prop_map(|n| (Some(n), Some("max_attempts"))),
    ];
    let run_after = prop_oneof![
        6 => Just((None, None)),
        1 => (-4_000_000_000i64..400_000_000_000).prop_map(|secs| {
            (DateTime::<Utc>::from_timestamp(secs, 0), Some("run_after"))
        }),
    ];
    let keywords = prop_oneof![
        8 => Just((vec!["semaglutide".to_owned()], None)),
        2 => proptest::collection::vec(wild_text(), 0..4)
            .prop_map(|k| (k, Some("configuration.keywords"))),
        1 => Just((vec!["k".to_owned(); 200], Some("configuration.keywords"))),
    ];
    (
        text("project_id", "glp1"),
        text("user_id", "analyst-1"),
        text("configuration.sources", "FDA"),
        keywords,
        threshold,
        params,
        attempts,
        run_after,
    )
        .prop_map(
            |(project, user, source, keywords, threshold, params, attempts, run_after)| {
                let mut configuration = Configuration::new(keywords.0);
                configuration
                    .sources
                    .push(Source::new(source.0, "regulatory"));
                configuration.quality_threshold = threshold.0;
                configuration.custom_params = params.0;
                let mut request = NewRequest::new(
                    project.0,
                    user.0,
                    RequestType::new(TYPE).unwrap(),
                    configuration,
                )
                .with_priority(Priority::Low);
                request.max_attempts = attempts.0;
                request.run_after = run_after.0;
                let wild = [
                    project.1,
                    user.1,
                    source.1,
                    keywords.1,
                    threshold.1,
                    params.1,
                    attempts.1,
                    run_after.1,
                ]
                .into_iter()
                .flatten()
                .collect();
                Typed { request, wild }
            },
        )
}

#[test]
fn typed_submissions_are_stored_or_refused_naming_a_hostile_field() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (orchestrator, store) = rt.block_on(sqlite_orchestrator(&dir));
    let (accepted, refused) = (Cell::new(0u64), Cell::new(0u64));

    runner(320)
        .run(&typed_submission(), |typed| {
            rt.block_on(async {
                match orchestrator.submit(typed.request.clone()).await {
                    Ok(outcome) => {
                        accepted.set(accepted.get() + 1);
                        let kept = store.get(&outcome.id).await.unwrap().unwrap();
                        assert_eq!(kept.configuration, typed.request.configuration);
                        assert_eq!(kept.project_id, typed.request.project_id);
                    }
                    Err(err) => {
                        refused.set(refused.get() + 1);
                        let (field, text) = refusal(&err);
                        assert!(
                            typed
                                .wild
                                .iter()
                                .any(|wild| encloses(wild, &field) || encloses(&field, wild)),
                            "`{field}` ({text}) is not one of the hostile fields {:?}",
                            typed.wild
                        );
                    }
                }
                // Every accepted submission has a new id: the count is exactly them.
                assert_eq!(stored(&store).await, accepted.get());
            });
            Ok(())
        })
        .unwrap();
    let (accepted, refused) = (accepted.get(), refused.get());
    assert!(
        refused > 20 && accepted > 20,
        "{accepted} accepted, {refused} refused"
    );
}

// ---------------------------------------------------------------------------------------

#[test]
fn arbitrary_text_is_parsed_or_refused_with_a_path() {
    let body = prop_oneof![
        any::<String>(),
        arb_json().prop_map(|v| v.to_string()),
        "\\{[\"a-z:,\\[\\]{} 0-9]{0,80}",
        Just("{\"project_id\":\"p\"".to_owned()),
        Just("\u{feff}{}".to_owned()),
    ];
    runner(1024)
        .run(&body, |body| {
            match RequestMessage::from_json(&body) {
                Ok(message) => {
                    // A parsed message still passes through validation without panicking.
                    if let Err(err) = message.into_new_request() {
                        let (field, _) = refusal(&err);
                        assert!(!field.is_empty());
                    }
                }
                Err(err @ Error::InvalidRequest { .. }) => {
                    let (field, text) = refusal(&err);
                    let names_a_place = field == "." || !(field.is_empty() || field.ends_with('.'));
                    assert!(names_a_place, "{text}");
                }
                Err(other) => panic!("not a field error: {other:?}"),
            }
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------

#[test]
fn queue_bodies_are_run_or_dead_lettered_naming_the_field() {
    let rt = runtime();
    // One batch of generated bodies, from the same mutations as the wire-shape test, plus
    // text that is not a message at all.
    let mut generator = runner(1);
    let mutated = proptest::collection::vec(proptest::collection::vec(mutation(), 1..3), 60);
    let batches = mutated.new_tree(&mut generator).unwrap().current();
    let mut bodies: Vec<String> = batches
        .iter()
        .enumerate()
        .map(|(i, mutations)| {
            let mut message = valid_message(&format!("queued-{i}"), "analyst-1", "glp1");
            for m in mutations {
                apply(&mut message, m);
            }
            message.to_string()
        })
        .collect();
    // (An empty body is not sent: the queue refuses it, as SQS does.)
    bodies.extend(["null", "[]", "{", "\0", "{\"project_id\": 7}", "😀"].map(str::to_owned));
    // Some bodies are surely valid, whatever the mutations drew: a batch with none would
    // check the dead-letter path only.
    bodies.extend(
        (0..5).map(|i| valid_message(&format!("unmutated-{i}"), "analyst-1", "glp1").to_string()),
    );

    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("requests.db"))
            .await
            .unwrap();
        let queue = MemoryQueue::new();
        let mut message_ids = Vec::new();
        for body in &bodies {
            message_ids.push(queue.send(body, Duration::ZERO).await.unwrap());
        }

        // The verdict each body should get, from the parser's own answer; a message
        // without a `request_id` names its request by the message id.
        let mut valid_ids = HashSet::new();
        let mut refusals = Vec::new();
        for (body, message_id) in bodies.iter().zip(&message_ids) {
            match RequestMessage::from_json(body).and_then(RequestMessage::into_new_request) {
                Ok(request) if request.request_type.as_str() == TYPE => {
                    let id = request
                        .request_id
                        .unwrap_or_else(|| RequestId::parse(message_id).unwrap());
                    valid_ids.insert(id);
                }
                Ok(request) => {
                    refusals.push(format!("unknown request type `{}`", request.request_type))
                }
                Err(err) => refusals.push(format!("`{}`", refusal(&err).0)),
            }
        }
        assert!(
            valid_ids.len() >= 5 && refusals.len() >= 10,
            "{valid_ids:?} {refusals:?}"
        );

        let mut config = QueueConfig::default();
        config.max_workers = 4;
        config.visibility_timeout = Duration::from_secs(5);
        config.long_polling_wait_time = Duration::from_millis(200);
        config.backoff = BackoffPolicy::new(Duration::from_millis(50), Duration::from_secs(1));
        config.cleanup_completed_after = Duration::from_secs(365 * 86_400);
        let strategy =
            QueueStrategy::with_shared(Arc::new(store.clone()), Arc::new(queue.clone()), config)
                .unwrap();
        let orchestrator = RootOrchestrator::builder()
            .strategy(strategy)
            .executor(TYPE, Succeeds)
            .build()
            .unwrap();
        let workers = orchestrator.spawn();

        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let depth = queue.depth().await.unwrap();
            let finished = store
                .count_by_status()
                .await
                .unwrap()
                .get(&root_orchestrator::RequestStatus::Completed)
                .copied()
                .unwrap_or(0);
            if depth.visible + depth.in_flight + depth.delayed == 0
                && finished == valid_ids.len() as u64
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "queue never drained: {depth:?}, {finished} completed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        workers.shutdown().await.unwrap();

        // Exactly the valid bodies made requests; every other one is a dead letter whose
        // reason names the field (or the unknown type) the parser names.
        assert_eq!(stored(&store).await, valid_ids.len() as u64);
        for id in &valid_ids {
            assert!(store.get(id).await.unwrap().is_some(), "{id} not stored");
        }
        let letters = queue.dead_letters();
        assert_eq!(letters.len(), refusals.len(), "{letters:?}");
        let mut reasons: Vec<String> = letters.iter().map(|l| l.reason.clone()).collect();
        // A reason names its field first, in backticks; later it may list the expected
        // fields, so matching anywhere in the text could pair a reason with the wrong body.
        let names = |reason: &str, expected: &str| match expected.strip_prefix('`') {
            Some(field) => reason
                .split_once(" `")
                .and_then(|(_, rest)| rest.split_once('`'))
                .is_some_and(|(named, _)| Some(named) == field.strip_suffix('`')),
            None => reason.contains(expected),
        };
        for expected in &refusals {
            let at = reasons
                .iter()
                .position(|reason| names(reason, expected))
                .unwrap_or_else(|| panic!("no dead letter says {expected}: {reasons:?}"));
            reasons.remove(at);
        }
    });
}

// ---------------------------------------------------------------------------------------

#[cfg(feature = "http")]
#[test]
fn http_submit_answers_202_or_a_problem_naming_the_field() {
    use http_support::{COLLECTION, Options, Server};

    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (server, store) = rt.block_on(async {
        let store = SqliteStore::open(dir.path().join("requests.db"))
            .await
            .unwrap();
        let options = Options {
            workers: false,
            body_limit: 256 * 1024,
            ..Options::default()
        };
        (Server::start(store.clone(), options).await, store)
    });
    let accepted: RefCell<HashSet<String>> = RefCell::default();
    let (refused, case) = (Cell::new(0u64), Cell::new(0usize));

    // A third of the cases change nothing, as in the wire-shape test.
    runner(64)
        .run(&proptest::collection::vec(mutation(), 0..3), |mutations| {
            case.set(case.get() + 1);
            // alice may use project glp1 (see the HTTP test tokens).
            let mut message = valid_message(&format!("http-{}", case.get()), "alice", "glp1");
            let touched: Vec<String> = mutations
                .iter()
                .filter_map(|m| apply(&mut message, m))
                .collect();
            rt.block_on(async {
                let reply = server.post(COLLECTION, "alice-token", &message).await;
                match reply.status.as_u16() {
                    202 => {
                        let id = reply.json["request_id"].as_str().unwrap().to_owned();
                        accepted.borrow_mut().insert(id);
                    }
                    403 | 422 => {
                        refused.set(refused.get() + 1);
                        assert_eq!(reply.content_type, "application/problem+json");
                        let field = reply.json["field"]
                            .as_str()
                            .unwrap_or_else(|| panic!("a refusal without a field: {}", reply.text));
                        let detail = reply.json["detail"].as_str().unwrap_or_default();
                        let text = format!("{field} {detail}");
                        assert!(
                            touched.iter().any(|path| points_at(field, &text, path)),
                            "`{field}` ({detail}) is none of the mutated {touched:?}"
                        );
                    }
                    // Nesting deeper than the JSON reader's limit is refused before any
                    // field is looked at.
                    400 => {
                        refused.set(refused.get() + 1);
                        let detail = reply.json["detail"].as_str().unwrap_or_default();
                        assert!(detail.contains("recursion limit"), "{}", reply.text);
                    }
                    other => panic!("unexpected {other}: {}", reply.text),
                }
                assert_eq!(
                    stored(&store).await,
                    accepted.borrow().len() as u64,
                    "a refusal stored"
                );
            });
            Ok(())
        })
        .unwrap();
    let (accepted, refused) = (accepted.into_inner().len(), refused.get());
    assert!(
        refused > 10 && accepted > 2,
        "{accepted} accepted, {refused} refused"
    );
    rt.block_on(server.stop());
}
