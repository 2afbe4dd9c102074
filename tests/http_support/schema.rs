//! Just enough JSON Schema (2020-12, as OpenAPI 3.1 uses it) to check answers and request
//! bodies against the API's own document. Keywords it does not know fail the check, so a
//! schema that grows a new keyword cannot pass unchecked.

use serde_json::Value;

/// Keywords that describe without constraining.
const ANNOTATIONS: &[&str] = &["description", "title", "example", "examples", "default"];

/// Checks `value` against `schema`, resolving `$ref`s in `document`. The error names the
/// JSON path of the first mismatch.
pub fn check(document: &Value, schema: &Value, value: &Value) -> Result<(), String> {
    check_at(document, schema, value, "$")
}

fn check_at(document: &Value, schema: &Value, value: &Value, path: &str) -> Result<(), String> {
    let Some(keywords) = schema.as_object() else {
        return match schema {
            Value::Bool(true) => Ok(()),
            Value::Bool(false) => Err(format!("{path}: nothing is allowed here")),
            other => panic!("{path}: not a schema: {other}"),
        };
    };
    for (keyword, argument) in keywords {
        match keyword.as_str() {
            "$ref" => {
                let target = resolve(document, argument);
                check_at(document, target, value, path)?;
            }
            "type" => {
                let types: Vec<&str> = match argument {
                    Value::String(one) => vec![one.as_str()],
                    Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
                    other => panic!("{path}: bad `type` {other}"),
                };
                if !types.iter().any(|t| has_type(value, t)) {
                    return Err(format!("{path}: {value} is not of type {types:?}"));
                }
            }
            "enum" => {
                let allowed = argument.as_array().expect("`enum` is an array");
                if !allowed.contains(value) {
                    return Err(format!("{path}: {value} is not one of {argument}"));
                }
            }
            "oneOf" => {
                let matching = alternatives(argument)
                    .filter(|s| check_at(document, s, value, path).is_ok())
                    .count();
                if matching != 1 {
                    return Err(format!("{path}: {value} matches {matching} of `oneOf`"));
                }
            }
            "anyOf" => {
                if !alternatives(argument).any(|s| check_at(document, s, value, path).is_ok()) {
                    return Err(format!("{path}: {value} matches nothing in `anyOf`"));
                }
            }
            "allOf" => {
                for s in alternatives(argument) {
                    check_at(document, s, value, path)?;
                }
            }
            "properties" => {
                let Some(fields) = value.as_object() else {
                    continue;
                };
                for (name, property) in argument.as_object().expect("`properties` is an object") {
                    if let Some(field) = fields.get(name) {
                        check_at(document, property, field, &format!("{path}.{name}"))?;
                    }
                }
            }
            "required" => {
                let Some(fields) = value.as_object() else {
                    continue;
                };
                for name in argument.as_array().expect("`required` is an array") {
                    let name = name.as_str().expect("required names are strings");
                    if !fields.contains_key(name) {
                        return Err(format!("{path}: `{name}` is required"));
                    }
                }
            }
            "additionalProperties" => {
                let Some(fields) = value.as_object() else {
                    continue;
                };
                let known = keywords.get("properties").and_then(Value::as_object);
                for (name, field) in fields {
                    if known.is_some_and(|k| k.contains_key(name)) {
                        continue;
                    }
                    check_at(document, argument, field, &format!("{path}.{name}"))
                        .map_err(|_| format!("{path}: `{name}` is not a known field"))?;
                }
            }
            "items" => {
                let Some(items) = value.as_array() else {
                    continue;
                };
                for (i, item) in items.iter().enumerate() {
                    check_at(document, argument, item, &format!("{path}[{i}]"))?;
                }
            }
            "minItems" | "maxItems" => {
                let Some(items) = value.as_array() else {
                    continue;
                };
                bound(keyword, argument, items.len() as f64, path)?;
            }
            "minLength" | "maxLength" => {
                let Some(text) = value.as_str() else {
                    continue;
                };
                bound(keyword, argument, text.chars().count() as f64, path)?;
            }
            "minimum" | "maximum" => {
                let Some(number) = value.as_f64() else {
                    continue;
                };
                bound(keyword, argument, number, path)?;
            }
            "pattern" => {
                let Some(text) = value.as_str() else {
                    continue;
                };
                let pattern = argument.as_str().expect("`pattern` is a string");
                let regex = regex_lite::Regex::new(pattern).expect("a valid pattern");
                if !regex.is_match(text) {
                    return Err(format!("{path}: {text:?} does not match {pattern}"));
                }
            }
            "format" => {
                let Some(text) = value.as_str() else {
                    continue;
                };
                if argument == "date-time" && chrono::DateTime::parse_from_rfc3339(text).is_err() {
                    return Err(format!("{path}: {text:?} is not a date-time"));
                }
                // Number formats (int32, double, ...) only restate `type`.
            }
            known if ANNOTATIONS.contains(&known) => {}
            unknown => panic!("{path}: the checker does not know `{unknown}`"),
        }
    }
    Ok(())
}

fn resolve<'d>(document: &'d Value, reference: &Value) -> &'d Value {
    let reference = reference.as_str().expect("`$ref` is a string");
    let pointer = reference
        .strip_prefix('#')
        .unwrap_or_else(|| panic!("only local references: {reference}"));
    document
        .pointer(pointer)
        .unwrap_or_else(|| panic!("unresolved reference {reference}"))
}

fn alternatives(argument: &Value) -> impl Iterator<Item = &Value> {
    argument.as_array().expect("a list of schemas").iter()
}

fn has_type(value: &Value, name: &str) -> bool {
    match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => value.is_i64() || value.is_u64(),
        other => panic!("unknown type {other}"),
    }
}

fn bound(keyword: &str, limit: &Value, actual: f64, path: &str) -> Result<(), String> {
    let limit = limit.as_f64().expect("a numeric limit");
    let fine = if keyword.starts_with("min") {
        actual >= limit
    } else {
        actual <= limit
    };
    if fine {
        Ok(())
    } else {
        Err(format!("{path}: {actual} breaks `{keyword}: {limit}`"))
    }
}
