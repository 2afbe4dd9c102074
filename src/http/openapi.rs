//! The OpenAPI document, generated from the handlers' annotations.
//!
//! The handlers' response bodies derive their schemas. The model's types (in the wire
//! shape) get theirs here: enums list the values their serde names produce, and structs
//! describe themselves through documentation twins whose fields the tests compare with
//! what the real types serialise. The twins say what a submit accepts: a field that may be
//! left out is optional, `null` is allowed only where the server takes it as left out, and
//! objects whose unknown fields are refused say `additionalProperties: false`. Limits that
//! JSON Schema cannot state exactly (bytes rather than characters, no blank text) are in
//! the descriptions; tests/http_api.rs checks the schema against the server's verdicts.

use std::borrow::Cow;
use std::sync::OnceLock;

use serde::Deserialize;
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, Type};
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
            "Claim priority, as answered: always lower case",
            all_priorities().map(Priority::as_str),
        )
    }
}

/// Every spelling of a priority a submit accepts: the lower-case name, and the upper-case
/// and capitalised aliases the model takes from other producers.
pub(crate) fn priority_spellings() -> Vec<String> {
    all_priorities()
        .into_iter()
        .flat_map(|p| {
            let name = p.as_str();
            let capitalised = name[..1].to_ascii_uppercase() + &name[1..];
            [name.to_owned(), name.to_ascii_uppercase(), capitalised]
        })
        .collect()
}

/// The priority of a submit: any spelling in [`priority_spellings`].
fn priority_input() -> RefOr<Schema> {
    let spellings = priority_spellings();
    string_enum(
        "Claim priority: `high`, `medium` (when left out) or `low`; the upper-case \
         (`HIGH`) and capitalised (`High`) spellings are accepted too. Not `null`.",
        spellings.iter().map(String::as_str),
    )
}

/// A request's or a type's id: what `RequestId::parse` and `RequestType::new` accept.
fn identifier(description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
        .min_length(Some(1))
        .max_length(Some(128))
        .pattern(Some(ID_PATTERN))
}

/// ASCII letters, digits and `- _ . :`, with at least one letter or digit (ids travel in
/// URL paths, where `.` and `..` mean something else).
pub(crate) const ID_PATTERN: &str = "^[A-Za-z0-9._:-]*[A-Za-z0-9][A-Za-z0-9._:-]*$";

fn request_id_input() -> RefOr<Schema> {
    identifier(
        "A caller-chosen id (ASCII letters, digits and `- _ . :`, at least one letter or \
         digit, at most 128 bytes); submitting it again answers with the first request. \
         Generated (UUIDv7) when left out or `null`. Ids are one namespace across users: \
         an id another user already used answers 409, so choose random ids such as UUIDs.",
    )
    .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
        Type::String,
        Type::Null,
    ]))
    .into()
}

fn request_type_input() -> RefOr<Schema> {
    identifier("Which workflow runs it, such as `semaglutide_intelligence`").into()
}

/// Free text the model checks with its text rules: at most 256 bytes, not blank, without
/// control or invisible formatting characters.
fn text(description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(format!(
            "{description} Not blank; at most 256 bytes in UTF-8 (`maxLength` counts \
             characters, so it is an upper bound); no control or invisible formatting \
             characters."
        )))
        .min_length(Some(1))
        .max_length(Some(256))
}

fn keywords_input() -> RefOr<Schema> {
    ArrayBuilder::new()
        .description(Some("Terms to look for: 1 to 100"))
        .items(text("A term."))
        .min_items(Some(1))
        .max_items(Some(100))
        .into()
}

fn project_id_input() -> RefOr<Schema> {
    text("The project the request belongs to; one of the caller's projects.").into()
}

fn user_id_input() -> RefOr<Schema> {
    text(
        "The submitting user: the caller when left out; any other user is refused (403). \
         Not `null`.",
    )
    .into()
}

fn source_name_input() -> RefOr<Schema> {
    text("The source's name, such as `FDA` or `PubMed`.").into()
}

fn source_type_input() -> RefOr<Schema> {
    text("What kind of source it is, such as `regulatory`, `academic` or `clinical`.").into()
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

/// A request in the wire shape, as submitted: a JSON object.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(crate) struct RequestMessageDoc {
    #[serde(default)]
    #[schema(schema_with = request_id_input)]
    request_id: Option<String>,
    #[schema(schema_with = project_id_input)]
    project_id: String,
    #[serde(default)]
    #[schema(schema_with = user_id_input)]
    user_id: String,
    #[schema(schema_with = request_type_input)]
    request_type: String,
    #[serde(default)]
    #[schema(schema_with = priority_input)]
    priority: Priority,
    /// What to search for and how.
    configuration: Configuration,
    /// Submission time and retry budget; `null` is the same as leaving it out.
    #[serde(default)]
    metadata: Option<MessageMetadata>,
}

/// What a market-intelligence request searches for and how. Its JSON is at most 64 KiB.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(crate) struct ConfigurationDoc {
    #[schema(schema_with = keywords_input)]
    keywords: Vec<String>,
    /// Where to look: 1 to 100 sources.
    #[schema(min_items = 1, max_items = 100)]
    sources: Vec<Source>,
    /// How much text to keep per match (`standard` when left out). Not `null`.
    #[serde(default)]
    extraction_mode: ExtractionMode,
    /// Documents scored below this are ignored; 0.0 to 1.0 (0.0 when left out). Not `null`.
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 1.0)]
    quality_threshold: f64,
    /// Free-form parameters for the workflow: a JSON object (`{}` when left out; not
    /// `null`), nested at most 32 levels, without NUL characters.
    #[serde(default)]
    #[schema(value_type = Object)]
    custom_params: serde_json::Value,
}

/// One place to search.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(crate) struct SourceDoc {
    #[schema(schema_with = source_name_input)]
    name: String,
    #[serde(rename = "type")]
    #[schema(schema_with = source_type_input)]
    source_type: String,
}

/// Submission time and retry budget of a request in the wire shape.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(crate) struct MessageMetadataDoc {
    /// When the producer submitted the request.
    submitted_at: chrono::DateTime<chrono::Utc>,
    /// Retries already made (0 when left out). Not `null`.
    #[serde(default)]
    retry_count: u32,
    /// Retries allowed after the first attempt, 0 to 99 (3 when left out). Not `null`.
    #[serde(default)]
    #[schema(maximum = 99)]
    max_retries: u32,
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
    fn every_priority_spelling_the_schema_lists_is_accepted_and_no_other() {
        let document = serde_json::to_value(document()).unwrap();
        let listed =
            &document["components"]["schemas"]["RequestMessage"]["properties"]["priority"]["enum"];
        let listed: Vec<String> = serde_json::from_value(listed.clone()).unwrap();
        assert_eq!(listed.len(), 9, "{listed:?}");
        for spelling in &listed {
            let parsed: Result<Priority, _> = serde_json::from_value(spelling.as_str().into());
            assert!(parsed.is_ok(), "{spelling} is listed but refused");
        }
        for unlisted in ["hIGH", "HiGh", "urgent", ""] {
            let parsed: Result<Priority, _> = serde_json::from_value(unlisted.into());
            assert!(parsed.is_err(), "{unlisted} is accepted but not listed");
        }
    }

    #[test]
    fn the_id_pattern_agrees_with_the_model() {
        let pattern = regex_lite::Regex::new(ID_PATTERN).unwrap();
        for id in [
            "req-1",
            "a",
            ".a.",
            "..",
            ".",
            "-_.:",
            "a/b",
            "é",
            "a b",
            "A:1_b.c-d",
        ] {
            let model = crate::model::RequestId::parse(id).is_ok();
            assert_eq!(pattern.is_match(id), model, "{id}");
        }
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
