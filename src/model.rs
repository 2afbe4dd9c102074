//! The request model: what a caller submits, and what the store keeps about each request.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::status::RequestStatus;

/// Longest accepted id, project, user or request type, in bytes.
const MAX_ID_LEN: usize = 128;
/// Most keywords one request may search for.
const MAX_KEYWORDS: usize = 100;
/// Most sources one request may name.
const MAX_SOURCES: usize = 100;
/// Largest accepted configuration, serialized as JSON, in bytes.
pub const MAX_CONFIGURATION_BYTES: usize = 64 * 1024;
/// Deepest nesting accepted in free-form JSON (custom parameters, result summaries).
pub const MAX_JSON_DEPTH: usize = 32;
/// Largest results an executor may return, serialized as JSON, in bytes.
pub const MAX_RESULTS_BYTES: usize = 1024 * 1024;
/// Longest error message kept per failed attempt, in bytes; longer ones are cut.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 8 * 1024;
/// How far ahead a request may be scheduled, in days.
pub const MAX_RUN_AFTER_DAYS: i64 = 3650;
/// Most attempts a request may be given.
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;

fn check_identifier(field: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(Error::invalid(
            field,
            format!(
                "is {} bytes long; at most {MAX_ID_LEN} are accepted",
                value.len()
            ),
        ));
    }
    if !value.chars().any(|c| c.is_ascii_alphanumeric()) {
        // Ids travel in URL paths, where `.` and `..` would be resolved away.
        return Err(Error::invalid(
            field,
            "must contain at least one ASCII letter or digit",
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(Error::invalid(
            field,
            format!("contains {bad:?}; only ASCII letters, digits and - _ . : are accepted"),
        ));
    }
    Ok(())
}

fn check_text(field: &str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(Error::invalid(field, "must not be blank"));
    }
    if value.len() > MAX_ID_LEN * 2 {
        return Err(Error::invalid(
            field,
            format!(
                "is {} bytes long; at most {} are accepted",
                value.len(),
                MAX_ID_LEN * 2
            ),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    if let Some(hidden) = value.chars().find(|&c| is_invisible_formatting(c)) {
        return Err(Error::invalid(
            field,
            format!(
                "contains the invisible formatting character U+{:04X}, which could make it \
                 display as something else",
                u32::from(hidden)
            ),
        ));
    }
    Ok(())
}

/// Zero-width and bidirectional-override characters: they change how text displays
/// without being visible themselves.
fn is_invisible_formatting(c: char) -> bool {
    matches!(
        c,
        '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}'
    )
}

/// Checks free-form JSON: no deeper than [`MAX_JSON_DEPTH`], and no NUL character in a key
/// or string (PostgreSQL's JSON type cannot hold one). `path` names the value in errors.
fn check_json(path: &str, value: &serde_json::Value, depth: usize) -> Result<()> {
    use serde_json::Value;

    if depth > MAX_JSON_DEPTH {
        return Err(Error::invalid(
            path,
            format!("is nested more than {MAX_JSON_DEPTH} levels deep"),
        ));
    }
    let nul = |at: &str| {
        Error::invalid(
            at,
            "contains a NUL character, which stores cannot keep in JSON",
        )
    };
    match value {
        Value::String(text) if text.contains('\0') => Err(nul(path)),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, item)| check_json(&format!("{path}[{i}]"), item, depth + 1)),
        Value::Object(fields) => fields.iter().try_for_each(|(key, item)| {
            let at = format!("{path}.{key}");
            if key.contains('\0') {
                return Err(nul(&at));
            }
            check_json(&at, item, depth + 1)
        }),
        _ => Ok(()),
    }
}

/// A request's unique id.
///
/// Generated ids are UUIDv7 strings, so they sort by creation time. A caller may give its
/// own id (ASCII letters, digits, `- _ . :`, at most 128 bytes) to make a submit idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(String);

impl RequestId {
    /// A new, time-sortable id.
    pub fn generate() -> Self {
        RequestId(uuid::Uuid::now_v7().to_string())
    }

    /// Checks and wraps a caller-given id.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] naming `request_id` when the id is empty, too long or has
    /// characters outside ASCII letters, digits and `- _ . :`.
    pub fn parse(id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        check_identifier("request_id", &id)?;
        Ok(RequestId(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Wraps an id read back from a store, which was checked when it was stored.
    pub(crate) fn from_stored(id: String) -> Self {
        RequestId(id)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for RequestId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        RequestId::parse(s)
    }
}

/// The kind of work a request asks for; executors are registered per type.
///
/// An open set: any name of ASCII letters, digits and `- _ . :` is a type.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestType(String);

impl RequestType {
    /// The first registered type: semaglutide / tirzepatide market intelligence.
    pub const SEMAGLUTIDE_INTELLIGENCE: &'static str = "semaglutide_intelligence";

    /// Checks and wraps a type name.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] naming `request_type` when the name is empty, too long or
    /// has characters outside ASCII letters, digits and `- _ . :`.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        check_identifier("request_type", &name)?;
        Ok(RequestType(name))
    }

    /// The type's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn from_stored(name: String) -> Self {
        RequestType(name)
    }
}

impl fmt::Display for RequestType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How urgent a request is: workers claim `High` before `Medium` before `Low`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Claimed first.
    #[serde(alias = "HIGH", alias = "High")]
    High,
    /// The default.
    #[default]
    #[serde(alias = "MEDIUM", alias = "Medium")]
    Medium,
    /// Claimed last.
    #[serde(alias = "LOW", alias = "Low")]
    Low,
}

impl Priority {
    /// Claim order: lower ranks are claimed first.
    pub const fn rank(self) -> i64 {
        match self {
            Priority::High => 0,
            Priority::Medium => 1,
            Priority::Low => 2,
        }
    }

    /// The priority with the given [`rank`](Self::rank).
    pub fn from_rank(rank: i64) -> Option<Self> {
        [Priority::High, Priority::Medium, Priority::Low]
            .into_iter()
            .find(|p| p.rank() == rank)
    }

    /// The lowercase name, such as `"high"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Medium => "medium",
            Priority::Low => "low",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One place to search, such as `{"name": "FDA", "type": "regulatory"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// The source's name, such as `FDA` or `PubMed`.
    pub name: String,
    /// What kind of source it is, such as `regulatory`, `academic` or `clinical`.
    #[serde(rename = "type")]
    pub source_type: String,
}

impl Source {
    /// A source of the given name and type.
    pub fn new(name: impl Into<String>, source_type: impl Into<String>) -> Self {
        Source {
            name: name.into(),
            source_type: source_type.into(),
        }
    }
}

/// How much text a workflow keeps from each matching document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtractionMode {
    /// The sentences that mention a keyword.
    #[default]
    Standard,
    /// Those sentences with the sentence that follows each, for context.
    Comprehensive,
    /// The first matching sentence of each document.
    Summary,
}

/// What a market-intelligence request searches for and how.
///
/// # Examples
///
/// ```
/// use root_orchestrator::{Configuration, Error, Source};
///
/// let mut configuration = Configuration::new(["semaglutide", "tirzepatide"]);
/// configuration.sources.push(Source::new("FDA", "regulatory"));
/// assert!(configuration.validate().is_ok());
///
/// configuration.quality_threshold = 1.5;
/// let Err(Error::InvalidRequest { field, .. }) = configuration.validate() else {
///     panic!("a threshold above 1.0 must be refused");
/// };
/// assert_eq!(field, "configuration.quality_threshold");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Configuration {
    /// Terms to look for; at least one, each non-blank.
    pub keywords: Vec<String>,
    /// Where to look; at least one.
    #[serde(default)]
    pub sources: Vec<Source>,
    /// How much text to keep per match.
    #[serde(default)]
    pub extraction_mode: ExtractionMode,
    /// Documents scored below this (0.0 to 1.0) are ignored.
    #[serde(default = "default_quality_threshold")]
    pub quality_threshold: f64,
    /// Free-form parameters for the executor; a JSON object.
    #[serde(default = "empty_object")]
    pub custom_params: serde_json::Value,
}

fn default_quality_threshold() -> f64 {
    0.0
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

impl Configuration {
    /// A configuration searching for `keywords`, with no sources yet and default settings.
    pub fn new<K: Into<String>>(keywords: impl IntoIterator<Item = K>) -> Self {
        Configuration {
            keywords: keywords.into_iter().map(Into::into).collect(),
            sources: Vec::new(),
            extraction_mode: ExtractionMode::default(),
            quality_threshold: default_quality_threshold(),
            custom_params: empty_object(),
        }
    }

    /// Checks every field.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] whose `field` is the path of the first bad field, such as
    /// `configuration.keywords` or `configuration.sources[1].type`.
    pub fn validate(&self) -> Result<()> {
        if self.keywords.is_empty() {
            return Err(Error::invalid(
                "configuration.keywords",
                "must list at least one keyword",
            ));
        }
        if self.keywords.len() > MAX_KEYWORDS {
            return Err(Error::invalid(
                "configuration.keywords",
                format!(
                    "lists {} keywords; at most {MAX_KEYWORDS} are accepted",
                    self.keywords.len()
                ),
            ));
        }
        for (i, keyword) in self.keywords.iter().enumerate() {
            check_text(&format!("configuration.keywords[{i}]"), keyword)?;
        }

        if self.sources.is_empty() {
            return Err(Error::invalid(
                "configuration.sources",
                "must list at least one source",
            ));
        }
        if self.sources.len() > MAX_SOURCES {
            return Err(Error::invalid(
                "configuration.sources",
                format!(
                    "lists {} sources; at most {MAX_SOURCES} are accepted",
                    self.sources.len()
                ),
            ));
        }
        for (i, source) in self.sources.iter().enumerate() {
            check_text(&format!("configuration.sources[{i}].name"), &source.name)?;
            check_text(
                &format!("configuration.sources[{i}].type"),
                &source.source_type,
            )?;
        }

        if !(0.0..=1.0).contains(&self.quality_threshold) {
            return Err(Error::invalid(
                "configuration.quality_threshold",
                format!(
                    "must be between 0.0 and 1.0, got {}",
                    self.quality_threshold
                ),
            ));
        }

        if !self.custom_params.is_object() {
            return Err(Error::invalid(
                "configuration.custom_params",
                "must be a JSON object",
            ));
        }
        check_json("configuration.custom_params", &self.custom_params, 1)?;

        let size = serde_json::to_vec(self)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > MAX_CONFIGURATION_BYTES {
            return Err(Error::invalid(
                "configuration",
                format!("is {size} bytes as JSON; at most {MAX_CONFIGURATION_BYTES} are accepted"),
            ));
        }
        Ok(())
    }
}

/// How far a running request has come. Reported by executors through their context.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Progress {
    /// The workflow stage now running, such as `discovery`.
    pub current_stage: Option<String>,
    /// 0 to 100; stores never let it go down within one attempt.
    pub percentage: u8,
    /// Documents or pages found so far.
    pub urls_found: u64,
    /// Pieces of content extracted so far.
    pub content_extracted: u64,
    /// When the executor expects to finish.
    pub estimated_completion: Option<DateTime<Utc>>,
}

impl Progress {
    /// Progress at `stage`, `percentage` percent done (values above 100 count as 100).
    pub fn at_stage(stage: impl Into<String>, percentage: u8) -> Self {
        Progress {
            current_stage: Some(stage.into()),
            percentage: percentage.min(100),
            ..Progress::default()
        }
    }

    /// Sets the number of documents found.
    pub fn with_urls_found(mut self, urls_found: u64) -> Self {
        self.urls_found = urls_found;
        self
    }

    /// Sets the number of content pieces extracted.
    pub fn with_content_extracted(mut self, content_extracted: u64) -> Self {
        self.content_extracted = content_extracted;
        self
    }

    /// Sets the expected completion time.
    pub fn with_estimated_completion(mut self, at: DateTime<Utc>) -> Self {
        self.estimated_completion = Some(at);
        self
    }
}

/// What a completed request produced; stored in the same write as `COMPLETED`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestResults {
    /// Where the workflow wrote its report, if it wrote one.
    pub report_path: Option<String>,
    /// A JSON summary of the findings.
    pub summary: serde_json::Value,
}

impl RequestResults {
    /// Results with a report at `report_path` and a JSON summary.
    pub fn new(report_path: Option<String>, summary: serde_json::Value) -> Self {
        RequestResults {
            report_path,
            summary,
        }
    }

    /// Checks that every store can keep these results: a summary at most
    /// [`MAX_JSON_DEPTH`] deep with no NUL character, [`MAX_RESULTS_BYTES`] at most in all.
    ///
    /// Workers check an executor's results with this before storing them; results that
    /// fail it fail the attempt for good instead of being half-stored.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] naming the offending part, such as `results.summary.items`.
    pub fn validate(&self) -> Result<()> {
        if let Some(path) = &self.report_path
            && path.contains('\0')
        {
            return Err(Error::invalid(
                "results.report_path",
                "contains a NUL character",
            ));
        }
        check_json("results.summary", &self.summary, 1)?;
        let size = serde_json::to_vec(self)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > MAX_RESULTS_BYTES {
            return Err(Error::invalid(
                "results",
                format!("are {size} bytes as JSON; at most {MAX_RESULTS_BYTES} are accepted"),
            ));
        }
        Ok(())
    }
}

/// Why one attempt failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptError {
    /// The attempt, counting from 1.
    pub attempt: u32,
    /// What went wrong.
    pub message: String,
    /// Whether the failure was worth another attempt.
    pub retryable: bool,
    /// When it was recorded.
    pub at: DateTime<Utc>,
}

impl AttemptError {
    /// The error of attempt `attempt`, recorded now. The message is cut to
    /// [`MAX_ERROR_MESSAGE_BYTES`] and NUL characters are replaced, so that every store can
    /// keep it.
    pub fn new(attempt: u32, message: impl Into<String>, retryable: bool) -> Self {
        let mut message = message.into().replace('\0', "\u{FFFD}");
        if message.len() > MAX_ERROR_MESSAGE_BYTES {
            let mut cut = MAX_ERROR_MESSAGE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(" [truncated]");
        }
        AttemptError {
            attempt,
            message,
            retryable,
            at: crate::store::now(),
        }
    }
}

/// One transition in a request's status history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusChange {
    /// The status entered.
    pub status: RequestStatus,
    /// When.
    pub at: DateTime<Utc>,
    /// The worker that made the change, if a worker did.
    pub worker: Option<String>,
    /// Why, in a few words.
    pub reason: String,
}

/// The lease a worker holds on an in-flight request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The worker holding it.
    pub owner: String,
    /// The fencing token every write of that worker must present.
    pub token: String,
    /// When the lease lapses unless a heartbeat extends it.
    pub expires_at: DateTime<Utc>,
}

/// Everything the store keeps about one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Request {
    /// Unique, sortable id.
    pub id: RequestId,
    /// The project the request belongs to.
    pub project_id: String,
    /// The user who submitted it.
    pub user_id: String,
    /// Which executor runs it.
    pub request_type: RequestType,
    /// Claim priority.
    pub priority: Priority,
    /// What to do.
    pub configuration: Configuration,
    /// Where it is in its lifecycle.
    pub status: RequestStatus,
    /// Progress of the current or last attempt.
    pub progress: Progress,
    /// Set together with `COMPLETED`.
    pub results: Option<RequestResults>,
    /// One entry per failed attempt.
    pub errors: Vec<AttemptError>,
    /// Every status change, oldest first.
    pub history: Vec<StatusChange>,
    /// Attempts started so far, the running one included. A lease that expired counts as a
    /// spent attempt; a request handed back at a clean shutdown does not.
    pub attempts: u32,
    /// Attempts allowed before the request is `FAILED`.
    pub max_attempts: u32,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
    /// When its latest attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a terminal status.
    pub completed_at: Option<DateTime<Utc>>,
    /// Earliest time of its next attempt.
    pub run_after: DateTime<Utc>,
    /// The lease while in flight.
    pub lease: Option<Lease>,
}

impl Request {
    /// The request as a store holds it right after accepting `new`: `PENDING`, no attempt
    /// yet, `max_attempts` attempts unless `new` sets its own. Stores build their records
    /// with it; host applications can use it to unit-test an executor with
    /// [`WorkflowContext::detached`](crate::WorkflowContext::detached).
    ///
    /// # Examples
    ///
    /// ```
    /// use root_orchestrator::{Configuration, NewRequest, Request, RequestStatus, RequestType};
    ///
    /// let new = NewRequest::new("p", "u", RequestType::new("t")?, Configuration::new(["x"]));
    /// let request = Request::pending(new, 4);
    /// assert_eq!(request.status, RequestStatus::Pending);
    /// assert_eq!((request.attempts, request.max_attempts), (0, 4));
    /// # Ok::<(), root_orchestrator::Error>(())
    /// ```
    pub fn pending(new: NewRequest, max_attempts: u32) -> Self {
        let created_at = crate::store::now();
        Request {
            id: new.request_id.unwrap_or_else(RequestId::generate),
            project_id: new.project_id,
            user_id: new.user_id,
            request_type: new.request_type,
            priority: new.priority,
            configuration: new.configuration,
            status: RequestStatus::Pending,
            progress: Progress::default(),
            results: None,
            errors: Vec::new(),
            history: vec![StatusChange {
                status: RequestStatus::Pending,
                at: created_at,
                worker: None,
                reason: "submitted".to_owned(),
            }],
            attempts: 0,
            max_attempts: new.max_attempts.unwrap_or(max_attempts),
            created_at,
            started_at: None,
            completed_at: None,
            run_after: new.run_after.unwrap_or(created_at),
            lease: None,
        }
    }
}

/// A request as a caller submits it.
///
/// # Examples
///
/// ```
/// use root_orchestrator::{Configuration, NewRequest, Priority, RequestType, Source};
///
/// let mut configuration = Configuration::new(["semaglutide"]);
/// configuration.sources.push(Source::new("FDA", "regulatory"));
///
/// let request = NewRequest::new(
///     "obesity-market",
///     "analyst-7",
///     RequestType::new(RequestType::SEMAGLUTIDE_INTELLIGENCE)?,
///     configuration,
/// )
/// .with_priority(Priority::High);
/// assert!(request.validate().is_ok());
/// # Ok::<(), root_orchestrator::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct NewRequest {
    /// A caller-chosen id; submitting the same id twice returns the first request.
    pub request_id: Option<RequestId>,
    /// The project it belongs to.
    pub project_id: String,
    /// The submitting user.
    pub user_id: String,
    /// Which executor runs it.
    pub request_type: RequestType,
    /// Claim priority.
    pub priority: Priority,
    /// What to do.
    pub configuration: Configuration,
    /// Attempts allowed; the strategy's default when `None`.
    pub max_attempts: Option<u32>,
    /// Not before this time; at once when `None`.
    pub run_after: Option<DateTime<Utc>>,
}

impl NewRequest {
    /// A request of `request_type` for `project_id` by `user_id`, medium priority.
    pub fn new(
        project_id: impl Into<String>,
        user_id: impl Into<String>,
        request_type: RequestType,
        configuration: Configuration,
    ) -> Self {
        NewRequest {
            request_id: None,
            project_id: project_id.into(),
            user_id: user_id.into(),
            request_type,
            priority: Priority::default(),
            configuration,
            max_attempts: None,
            run_after: None,
        }
    }

    /// Sets a caller-chosen id, which makes submitting idempotent.
    pub fn with_id(mut self, id: RequestId) -> Self {
        self.request_id = Some(id);
        self
    }

    /// Sets the priority.
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Sets how many attempts the request gets.
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = Some(max_attempts);
        self
    }

    /// Delays the first attempt until `at`.
    pub fn with_run_after(mut self, at: DateTime<Utc>) -> Self {
        self.run_after = Some(at);
        self
    }

    /// Checks every field.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        if let Some(id) = &self.request_id {
            check_identifier("request_id", id.as_str())?;
        }
        check_text("project_id", &self.project_id)?;
        check_text("user_id", &self.user_id)?;
        check_identifier("request_type", self.request_type.as_str())?;
        if let Some(at) = self.run_after {
            let earliest = DateTime::<Utc>::UNIX_EPOCH;
            let latest = Utc::now() + chrono::Duration::days(MAX_RUN_AFTER_DAYS);
            if at < earliest || at > latest {
                return Err(Error::invalid(
                    "run_after",
                    format!(
                        "must be between 1970-01-01 and {MAX_RUN_AFTER_DAYS} days from now, \
                         got {at}"
                    ),
                ));
            }
        }
        if let Some(max) = self.max_attempts
            && !(1..=MAX_ATTEMPTS_LIMIT).contains(&max)
        {
            return Err(Error::invalid(
                "max_attempts",
                format!("must be between 1 and {MAX_ATTEMPTS_LIMIT}, got {max}"),
            ));
        }
        self.configuration.validate()
    }
}

/// A JSON path as errors name fields: `.` for the whole document. An empty key renders as
/// nothing, which would leave the path empty or ending in a dot; the enclosing object is
/// named instead, so that an error always points somewhere.
pub(crate) fn field_path(path: &serde_path_to_error::Path) -> String {
    let text = path.to_string();
    match text.trim_end_matches('.') {
        "" => ".".to_owned(),
        trimmed => trimmed.to_owned(),
    }
}

/// The `metadata` block of a [`RequestMessage`]. Unknown fields are refused, as everywhere
/// in the wire shape: a misspelt `max_retries` must not quietly become the default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageMetadata {
    /// When the producer submitted the request.
    pub submitted_at: DateTime<Utc>,
    /// Retries already made (0 for a new request). Informational: the store's attempt
    /// counter is what retries are counted by.
    #[serde(default)]
    pub retry_count: u32,
    /// Retries allowed after the first attempt.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
}

fn default_max_retries() -> u32 {
    3
}

/// A request in the wire shape that producers send: to a queue, over HTTP, or in a file.
///
/// ```json
/// {
///   "request_id": "7f9c0d1e-...",
///   "project_id": "obesity-market",
///   "user_id": "analyst-7",
///   "request_type": "semaglutide_intelligence",
///   "priority": "high",
///   "configuration": {
///     "keywords": ["semaglutide", "tirzepatide"],
///     "sources": [{"name": "FDA", "type": "regulatory"}],
///     "extraction_mode": "standard",
///     "quality_threshold": 0.7,
///     "custom_params": {}
///   },
///   "metadata": {"submitted_at": "2026-12-04T09:00:00Z", "retry_count": 0, "max_retries": 3}
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestMessage {
    /// The request's id; a new one is generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The project it belongs to.
    pub project_id: String,
    /// The submitting user.
    pub user_id: String,
    /// Which executor runs it.
    pub request_type: String,
    /// Claim priority; `medium` when absent.
    #[serde(default)]
    pub priority: Priority,
    /// What to do.
    pub configuration: Configuration,
    /// Submission time and retry budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<MessageMetadata>,
}

impl RequestMessage {
    /// Parses a message from JSON.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] whose `field` is the JSON path where parsing failed (`.`
    /// for a body that is not JSON at all).
    ///
    /// # Examples
    ///
    /// ```
    /// use root_orchestrator::{Error, RequestMessage};
    ///
    /// let body = r#"{"project_id": "p", "user_id": "u", "request_type": "t",
    ///                "configuration": {"keywords": ["x"], "quality_threshold": "high"}}"#;
    /// let Err(Error::InvalidRequest { field, .. }) = RequestMessage::from_json(body) else {
    ///     panic!("a string threshold must be refused");
    /// };
    /// assert_eq!(field, "configuration.quality_threshold");
    /// ```
    pub fn from_json(body: &str) -> Result<Self> {
        // Serde would also take a positional array for a struct; the wire shape is an object.
        if !body.trim_start().starts_with('{') {
            return Err(Error::invalid(".", "must be a JSON object"));
        }
        let mut deserializer = serde_json::Deserializer::from_str(body);
        let message = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
            let path = field_path(err.path());
            let problem = err.into_inner().to_string();
            Error::invalid(path, problem)
        })?;

        // One message per body: anything after it would otherwise be silently dropped.
        deserializer
            .end()
            .map_err(|e| Error::invalid(".", format!("has text after the message: {e}")))?;
        Ok(message)
    }

    /// The message for a stored request, as the queue strategy sends it.
    pub fn from_request(request: &Request) -> Self {
        RequestMessage {
            request_id: Some(request.id.to_string()),
            project_id: request.project_id.clone(),
            user_id: request.user_id.clone(),
            request_type: request.request_type.to_string(),
            priority: request.priority,
            configuration: request.configuration.clone(),
            metadata: Some(MessageMetadata {
                submitted_at: request.created_at,
                retry_count: request.attempts.saturating_sub(1),
                max_retries: request.max_attempts.saturating_sub(1),
            }),
        }
    }

    /// Checks the message and turns it into a submission.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] naming the first bad field.
    pub fn into_new_request(self) -> Result<NewRequest> {
        let request_id = self.request_id.map(RequestId::parse).transpose()?;
        let request_type = RequestType::new(self.request_type)?;
        let max_attempts = match &self.metadata {
            Some(metadata) => {
                if metadata.max_retries >= MAX_ATTEMPTS_LIMIT {
                    return Err(Error::invalid(
                        "metadata.max_retries",
                        format!(
                            "must be between 0 and {}, got {}",
                            MAX_ATTEMPTS_LIMIT - 1,
                            metadata.max_retries
                        ),
                    ));
                }
                Some(metadata.max_retries + 1)
            }
            None => None,
        };
        let request = NewRequest {
            request_id,
            project_id: self.project_id,
            user_id: self.user_id,
            request_type,
            priority: self.priority,
            configuration: self.configuration,
            max_attempts,
            run_after: None,
        };
        request.validate()?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_configuration() -> Configuration {
        let mut configuration = Configuration::new(["semaglutide"]);
        configuration.sources.push(Source::new("FDA", "regulatory"));
        configuration
    }

    fn field_of(result: Result<()>) -> String {
        match result {
            Err(Error::InvalidRequest { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn validation_names_the_bad_field() {
        let mut c = valid_configuration();
        c.keywords.clear();
        assert_eq!(field_of(c.validate()), "configuration.keywords");

        let mut c = valid_configuration();
        c.keywords.push("   ".into());
        assert_eq!(field_of(c.validate()), "configuration.keywords[1]");

        let mut c = valid_configuration();
        c.sources[0].source_type = String::new();
        assert_eq!(field_of(c.validate()), "configuration.sources[0].type");

        let mut c = valid_configuration();
        c.quality_threshold = f64::NAN;
        assert_eq!(field_of(c.validate()), "configuration.quality_threshold");

        let mut c = valid_configuration();
        c.custom_params = serde_json::json!([1, 2]);
        assert_eq!(field_of(c.validate()), "configuration.custom_params");
    }

    #[test]
    fn free_form_json_that_stores_cannot_keep_is_refused_with_its_path() {
        let mut c = valid_configuration();
        let mut deep = serde_json::json!("bottom");
        for _ in 0..40 {
            deep = serde_json::json!([deep]);
        }
        c.custom_params = serde_json::json!({ "nested": deep });
        let field = field_of(c.validate());
        assert!(
            field.starts_with("configuration.custom_params.nested[0]"),
            "{field}"
        );

        let mut c = valid_configuration();
        c.custom_params = serde_json::json!({ "note": ["fine", "nul\u{0}here"] });
        assert_eq!(
            field_of(c.validate()),
            "configuration.custom_params.note[1]"
        );

        let results = RequestResults::new(None, serde_json::json!({ "x": deep }));
        assert!(field_of(results.validate()).starts_with("results.summary.x"));
        let big = RequestResults::new(None, serde_json::json!("x".repeat(MAX_RESULTS_BYTES)));
        assert_eq!(field_of(big.validate()), "results");
    }

    #[test]
    fn invisible_formatting_characters_are_refused() {
        let mut request = NewRequest::new(
            "project",
            "u\u{202E}gnp.exe",
            RequestType::new("t").unwrap(),
            valid_configuration(),
        );
        assert_eq!(field_of(request.validate()), "user_id");

        request.user_id = "analyst".into();
        request.configuration.keywords = vec!["sema\u{200B}glutide".into()];
        assert_eq!(field_of(request.validate()), "configuration.keywords[0]");
    }

    #[test]
    fn run_after_must_be_within_reach() {
        let far = Utc::now() + chrono::Duration::days(MAX_RUN_AFTER_DAYS + 1);
        let request = NewRequest::new(
            "p",
            "u",
            RequestType::new("t").unwrap(),
            valid_configuration(),
        )
        .with_run_after(far);
        assert_eq!(field_of(request.validate()), "run_after");
    }

    #[test]
    fn long_error_messages_are_cut_and_nul_characters_replaced() {
        let error = AttemptError::new(
            1,
            format!("a\0b{}", "é".repeat(MAX_ERROR_MESSAGE_BYTES)),
            true,
        );
        assert!(error.message.starts_with("a\u{FFFD}b"));
        assert!(error.message.ends_with(" [truncated]"));
        assert!(error.message.len() <= MAX_ERROR_MESSAGE_BYTES + " [truncated]".len());
    }

    #[test]
    fn messages_refuse_unknown_fields_and_trailing_text() {
        let good = r#"{"project_id":"p","user_id":"u","request_type":"t",
            "configuration":{"keywords":["x"],"sources":[{"name":"FDA","type":"regulatory"}]}}"#;
        assert!(RequestMessage::from_json(good).is_ok());

        let misspelled = good.replace("\"project_id\"", "\"prority\":\"high\",\"project_id\"");
        let err = RequestMessage::from_json(&misspelled).unwrap_err();
        assert!(err.to_string().contains("prority"), "{err}");

        let typo = good.replace("\"keywords\"", "\"qualty_threshold\":5,\"keywords\"");
        assert!(matches!(
            RequestMessage::from_json(&typo),
            Err(Error::InvalidRequest { ref field, .. }) if field.starts_with("configuration")
        ));

        let in_metadata = good.replace(
            "\"configuration\"",
            "\"metadata\":{\"submitted_at\":\"2026-01-01T00:00:00Z\",\"max_retires\":9},\
             \"configuration\"",
        );
        let err = RequestMessage::from_json(&in_metadata).unwrap_err();
        assert!(
            matches!(err, Error::InvalidRequest { ref field, ref problem }
                if field.starts_with("metadata") && problem.contains("max_retires")),
            "{err}"
        );
        let new_request = r#"{"request_id":null,"project_id":"p","user_id":"u",
            "request_type":"t","priority":"low","max_attempts":null,"run_after":null,
            "configuration":{"keywords":["x"]}}"#;
        assert!(serde_json::from_str::<NewRequest>(new_request).is_ok());
        let extra = new_request.replace("\"priority\"", "\"owner\":\"x\",\"priority\"");
        let err = serde_json::from_str::<NewRequest>(&extra).unwrap_err();
        assert!(err.to_string().contains("owner"), "{err}");

        for (body, named) in [
            (good.replacen('{', "{\"\":1,", 1), "."),
            (
                good.replace("\"keywords\"", "\"\":1,\"keywords\""),
                "configuration",
            ),
        ] {
            let err = RequestMessage::from_json(&body).unwrap_err();
            assert!(
                matches!(err, Error::InvalidRequest { ref field, .. } if field == named),
                "{err}"
            );
        }

        assert!(RequestMessage::from_json(&format!("{good} trailing")).is_err());
        let positional = r#"["id-1","p","u","t","low",{"keywords":["x"]}]"#;
        assert!(matches!(
            RequestMessage::from_json(positional),
            Err(Error::InvalidRequest { ref field, .. }) if field == "."
        ));
        assert!(RequestMessage::from_json(&format!("{good}{good}")).is_err());
    }

    #[test]
    fn ids_refuse_characters_outside_the_safe_set() {
        assert!(RequestId::parse("req-10").is_ok());
        assert!(RequestId::parse("a/b").is_err());
        assert!(RequestId::parse(".").is_err());
        assert!(RequestId::parse("..").is_err());
        assert!(RequestId::parse("-_.:").is_err());
        assert!(RequestId::parse("").is_err());
        assert!(RequestId::parse("x".repeat(129)).is_err());
    }

    #[test]
    fn generated_ids_sort_by_creation() {
        let first = RequestId::generate();
        let second = RequestId::generate();
        assert!(first < second);
    }

    #[test]
    fn message_errors_carry_the_json_path() {
        let body = r#"{"project_id":"p","user_id":"u","request_type":"t",
            "configuration":{"keywords":["x"],"sources":[{"name":"FDA","type":7}]}}"#;
        let err = RequestMessage::from_json(body).unwrap_err();
        assert!(
            matches!(
                &err,
                Error::InvalidRequest { field, .. } if field == "configuration.sources[0].type"
            ),
            "{err}"
        );

        let err = RequestMessage::from_json("not json").unwrap_err();
        assert!(matches!(err, Error::InvalidRequest { .. }));
    }

    #[test]
    fn message_max_retries_becomes_max_attempts() {
        let body = r#"{"project_id":"p","user_id":"u","request_type":"t","priority":"HIGH",
            "configuration":{"keywords":["x"],"sources":[{"name":"FDA","type":"regulatory"}]},
            "metadata":{"submitted_at":"2026-01-01T00:00:00Z","retry_count":0,"max_retries":2}}"#;
        let request = RequestMessage::from_json(body)
            .unwrap()
            .into_new_request()
            .unwrap();
        assert_eq!(request.max_attempts, Some(3));
        assert_eq!(request.priority, Priority::High);
    }
}
