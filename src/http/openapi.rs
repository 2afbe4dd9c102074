//! The OpenAPI document, generated from the handlers' annotations.
//!
//! The handlers' response bodies derive their schemas. The model's types (in the wire
//! shape) get theirs here: enums list the values their serde names produce, and structs
//! describe themselves through documentation twins whose fields the tests compare with
//! what the real types serialise.

use std::borrow::Cow;
use std::sync::OnceLock;

use serde::Deserialize;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi as Document, RefOr};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use super::problem::Problem;
use super::router;
use super::views::{
    Accepted, AttemptErrorView, CancelledView, HealthView, HistoryEntry, Links, PageView,
    ProgressView, RequestView, ResultsView,
};
use crate::model::{
    Configuration, ExtractionMode, MessageMetadata, Priority, RequestMessage, Source,
};
use crate::status::RequestStatus;

/// The security scheme every request route names.
const BEARER: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "root-orchestrator HTTP API",
        description = "Submit market-intelligence requests, follow them, fetch their \
                       results and cancel them. Errors are `application/problem+json`."
    ),
    paths(
        router::submit,
        router::list,
        router::status,
        router::results,
        router::cancel,
        router::health,
        router::ready,
        router::metrics,
        router::openapi_json,
    ),
    components(schemas(
        Problem, Accepted, Links, RequestView, ProgressView, AttemptErrorView, HistoryEntry,
        ResultsView, CancelledView, PageView, HealthView, RequestStatus, Priority,
        ExtractionMode, RequestMessage, Configuration, Source, MessageMetadata,
    )),
    modifiers(&BearerScheme),
    tags(
        (name = "requests", description = "Market-intelligence requests; bearer token needed"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
    )
)]
struct ApiDoc;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut Document) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI 3.1 document of the router [`HttpApi::router`](super::HttpApi::router)
/// builds, as served at `/openapi.json`.
///
/// # Examples
///
/// ```
/// let document = root_orchestrator::http::openapi();
/// assert!(document.paths.paths.contains_key("/market-intelligence/requests"));
/// ```
pub fn openapi() -> Document {
    document()
}

/// The document, built once.
pub(crate) fn document() -> Document {
    static DOCUMENT: OnceLock<Document> = OnceLock::new();
    DOCUMENT.get_or_init(ApiDoc::openapi).clone()
}

/// A string schema whose values are exactly `values`.
fn string_enum<'a>(description: &str, values: impl IntoIterator<Item = &'a str>) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
        .enum_values(Some(values))
        .into()
}

/// The serde name of a unit variant.
fn serde_name(value: impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        other => format!("{other:?}"),
    }
}

impl PartialSchema for RequestStatus {
    fn schema() -> RefOr<Schema> {
        string_enum(
            "Where a request is in its lifecycle",
            RequestStatus::ALL.map(RequestStatus::as_str),
        )
    }
}

impl ToSchema for RequestStatus {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("RequestStatus")
    }
}

/// Every priority; the match fails to compile when a variant is added.
fn all_priorities() -> [Priority; 3] {
    let all = [Priority::High, Priority::Medium, Priority::Low];
    for p in all {
        match p {
            Priority::High | Priority::Medium | Priority::Low => {}
        }
    }
    all
}

impl PartialSchema for Priority {
    fn schema() -> RefOr<Schema> {
        string_enum(
            "Claim priority (`medium` when left out; upper case accepted too)",
            all_priorities().map(Priority::as_str),
        )
    }
}

impl ToSchema for Priority {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Priority")
    }
}

/// Every extraction mode; the match fails to compile when a variant is added.
fn all_extraction_modes() -> [ExtractionMode; 3] {
    let all = [
        ExtractionMode::Standard,
        ExtractionMode::Comprehensive,
        ExtractionMode::Summary,
    ];
    for mode in all {
        match mode {
            ExtractionMode::Standard | ExtractionMode::Comprehensive | ExtractionMode::Summary => {}
        }
    }
    all
}

impl PartialSchema for ExtractionMode {
    fn schema() -> RefOr<Schema> {
        let names = all_extraction_modes().map(serde_name);
        string_enum(
            "How much text to keep per match (`standard` when left out)",
            names.iter().map(String::as_str),
        )
    }
}

impl ToSchema for ExtractionMode {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ExtractionMode")
    }
}

/// Implements the schema of a model type by the derived schema of its documentation twin.
macro_rules! schema_of_twin {
    ($model:ty, $twin:ty, $name:literal) => {
        impl PartialSchema for $model {
            fn schema() -> RefOr<Schema> {
                <$twin as PartialSchema>::schema()
            }
        }

        impl ToSchema for $model {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }
        }
    };
}

schema_of_twin!(RequestMessage, RequestMessageDoc, "RequestMessage");
schema_of_twin!(Configuration, ConfigurationDoc, "Configuration");
schema_of_twin!(Source, SourceDoc, "Source");
schema_of_twin!(MessageMetadata, MessageMetadataDoc, "MessageMetadata");

/// A request in the wire shape, as submitted.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct RequestMessageDoc {
    /// A caller-chosen id (ASCII letters, digits, `- _ . :`, at most 128 bytes); submitting
    /// it again answers with the first request. Generated (UUIDv7) when left out.
    request_id: Option<String>,
    /// The project the request belongs to; one of the caller's projects.
    project_id: String,
    /// The submitting user: the caller when left out; any other user is refused (403).
    user_id: Option<String>,
    /// Which workflow runs it, such as `semaglutide_intelligence`.
    request_type: String,
    /// Claim priority.
    #[serde(default)]
    priority: Option<Priority>,
    /// What to search for and how.
    configuration: Configuration,
    /// Submission time and retry budget.
    metadata: Option<MessageMetadata>,
}

/// What a market-intelligence request searches for and how.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct ConfigurationDoc {
    /// Terms to look for: 1 to 100, each non-blank.
    keywords: Vec<String>,
    /// Where to look: 1 to 100 sources.
    sources: Vec<Source>,
    /// How much text to keep per match.
    #[serde(default)]
    extraction_mode: Option<ExtractionMode>,
    /// Documents scored below this are ignored; 0.0 to 1.0 (0.0 when left out).
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 1.0)]
    quality_threshold: Option<f64>,
    /// Free-form parameters for the workflow; a JSON object.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    custom_params: Option<serde_json::Value>,
}

/// One place to search.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct SourceDoc {
    /// The source's name, such as `FDA` or `PubMed`.
    name: String,
    /// What kind of source it is, such as `regulatory`, `academic` or `clinical`.
    #[serde(rename = "type")]
    source_type: String,
}

/// Submission time and retry budget of a request in the wire shape.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct MessageMetadataDoc {
    /// When the producer submitted the request.
    submitted_at: chrono::DateTime<chrono::Utc>,
    /// Retries already made (0 for a new request).
    #[serde(default)]
    retry_count: Option<u32>,
    /// Retries allowed after the first attempt, 0 to 99 (3 when left out).
    #[serde(default)]
    #[schema(maximum = 99)]
    max_retries: Option<u32>,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::model::{Configuration, MessageMetadata, Source};

    /// A message with every optional field set, so that it serialises every key.
    fn full_message() -> RequestMessage {
        let mut configuration = Configuration::new(["semaglutide"]);
        configuration.sources.push(Source::new("FDA", "regulatory"));
        RequestMessage {
            request_id: Some("req-1".into()),
            project_id: "p".into(),
            user_id: "u".into(),
            request_type: "t".into(),
            priority: Priority::High,
            configuration,
            metadata: Some(MessageMetadata {
                submitted_at: chrono::Utc::now(),
                retry_count: 0,
                max_retries: 3,
            }),
        }
    }

    fn keys(value: &serde_json::Value) -> BTreeSet<String> {
        value
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn schema_properties(document: &serde_json::Value, name: &str) -> BTreeSet<String> {
        keys(&document["components"]["schemas"][name]["properties"])
    }

    #[test]
    fn twins_document_exactly_the_fields_the_model_serialises() {
        let document = serde_json::to_value(document()).unwrap();
        let message = serde_json::to_value(full_message()).unwrap();

        assert_eq!(
            schema_properties(&document, "RequestMessage"),
            keys(&message)
        );
        assert_eq!(
            schema_properties(&document, "Configuration"),
            keys(&message["configuration"])
        );
        assert_eq!(
            schema_properties(&document, "Source"),
            keys(&message["configuration"]["sources"][0])
        );
        assert_eq!(
            schema_properties(&document, "MessageMetadata"),
            keys(&message["metadata"])
        );
    }

    #[test]
    fn enum_schemas_list_the_serde_names() {
        let document = serde_json::to_value(document()).unwrap();
        let values = |name: &str| document["components"]["schemas"][name]["enum"].clone();
        assert_eq!(
            values("Priority"),
            serde_json::json!(["high", "medium", "low"])
        );
        assert_eq!(
            values("ExtractionMode"),
            serde_json::json!(["standard", "comprehensive", "summary"])
        );
        assert_eq!(
            values("RequestStatus"),
            serde_json::json!([
                "PENDING",
                "PROCESSING",
                "EXECUTING",
                "COMPLETED",
                "FAILED",
                "CANCELLED"
            ])
        );
        for mode in all_extraction_modes() {
            let name = serde_name(mode);
            let back: ExtractionMode = serde_json::from_value(name.clone().into()).unwrap();
            assert_eq!(back, mode, "{name}");
        }
    }
}
