//! A JSON Schema validator for the `json` scorer: the core keywords of draft 2020-12 / draft-07
//! that describe the shape of a model's structured output — `type`, `enum`, `const`,
//! `properties`, `required`, `additionalProperties`, `items`, `minItems`, `maxItems`,
//! `uniqueItems`, `minLength`, `maxLength`, `pattern`, `minimum`, `maximum`,
//! `exclusiveMinimum`, `exclusiveMaximum`, `multipleOf`, `minProperties`, `maxProperties`,
//! `allOf`, `anyOf`, `oneOf`, `not`, and boolean schemas. `$ref` and the other
//! reference/annotation keywords are refused by [`check_schema`], so a suite never silently
//! passes on a keyword that was not applied.

use serde_json::Value;

const APPLIED: &[&str] = &[
    "type",
    "enum",
    "const",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minLength",
    "maxLength",
    "pattern",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minProperties",
    "maxProperties",
    "allOf",
    "anyOf",
    "oneOf",
    "not",
];
/// Keywords that do not constrain the instance.
const ANNOTATIONS: &[&str] = &[
    "$schema",
    "$id",
    "$comment",
    "title",
    "description",
    "default",
    "examples",
    "format",
    "readOnly",
    "writeOnly",
    "deprecated",
];

/// Refuse schemas that use keywords this validator does not apply, or malformed patterns.
pub fn check_schema(schema: &Value) -> Result<(), String> {
    match schema {
        Value::Bool(_) => Ok(()),
        Value::Object(m) => {
            for (k, v) in m {
                if ANNOTATIONS.contains(&k.as_str()) {
                    continue;
                }
                if !APPLIED.contains(&k.as_str()) {
                    return Err(format!("JSON schema keyword {k:?} is not supported"));
                }
                match k.as_str() {
                    "properties" => {
                        for s in v
                            .as_object()
                            .ok_or("\"properties\" must be an object")?
                            .values()
                        {
                            check_schema(s)?;
                        }
                    }
                    "additionalProperties" | "items" | "not" => check_schema(v)?,
                    "allOf" | "anyOf" | "oneOf" => {
                        for s in v.as_array().ok_or(format!("{k:?} must be an array"))? {
                            check_schema(s)?;
                        }
                    }
                    "pattern" => {
                        regex::Regex::new(v.as_str().ok_or("\"pattern\" must be a string")?)
                            .map_err(|e| format!("pattern: {e}"))?;
                    }
                    _ => {}
                }
            }
            Ok(())
        }
        _ => Err("a JSON schema must be an object or a boolean".into()),
    }
}

fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        _ => false,
    }
}

/// Equality as JSON Schema defines it: numbers compare by value (1 == 1.0).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, a)| y.get(k).is_some_and(|b| json_eq(a, b)))
        }
        _ => a == b,
    }
}

/// Validate `instance` against `schema`; the error names the first failing location.
pub fn validate(schema: &Value, instance: &Value) -> Result<(), String> {
    at(schema, instance, "$")
}

fn at(schema: &Value, v: &Value, path: &str) -> Result<(), String> {
    let m = match schema {
        Value::Bool(true) => return Ok(()),
        Value::Bool(false) => return Err(format!("{path}: no value is allowed here")),
        Value::Object(m) => m,
        _ => return Err("a JSON schema must be an object or a boolean".into()),
    };
    let fail = |msg: String| Err(format!("{path}: {msg}"));
    if let Some(t) = m.get("type") {
        let ok = match t {
            Value::String(s) => type_matches(s, v),
            Value::Array(ts) => ts
                .iter()
                .filter_map(Value::as_str)
                .any(|s| type_matches(s, v)),
            _ => false,
        };
        if !ok {
            return fail(format!("expected type {t}, got {v}"));
        }
    }
    if let Some(Value::Array(options)) = m.get("enum")
        && !options.iter().any(|o| json_eq(o, v))
    {
        return fail(format!(
            "{v} is not one of {}",
            Value::Array(options.clone())
        ));
    }
    if let Some(c) = m.get("const")
        && !json_eq(c, v)
    {
        return fail(format!("{v} is not {c}"));
    }
    if let Some(x) = v.as_f64() {
        let num = |k: &str| m.get(k).and_then(Value::as_f64);
        if let Some(b) = num("minimum")
            && x < b
        {
            return fail(format!("{x} is below the minimum {b}"));
        }
        if let Some(b) = num("maximum")
            && x > b
        {
            return fail(format!("{x} is above the maximum {b}"));
        }
        if let Some(b) = num("exclusiveMinimum")
            && x <= b
        {
            return fail(format!("{x} is not above {b}"));
        }
        if let Some(b) = num("exclusiveMaximum")
            && x >= b
        {
            return fail(format!("{x} is not below {b}"));
        }
        if let Some(d) = num("multipleOf")
            && d > 0.0
            && ((x / d) - (x / d).round()).abs() > 1e-9
        {
            return fail(format!("{x} is not a multiple of {d}"));
        }
    }
    if let Some(s) = v.as_str() {
        let len = s.chars().count() as u64;
        if let Some(b) = m.get("minLength").and_then(Value::as_u64)
            && len < b
        {
            return fail(format!("string is shorter than {b}"));
        }
        if let Some(b) = m.get("maxLength").and_then(Value::as_u64)
            && len > b
        {
            return fail(format!("string is longer than {b}"));
        }
        if let Some(p) = m.get("pattern").and_then(Value::as_str) {
            let re = regex::Regex::new(p).map_err(|e| format!("{path}: pattern: {e}"))?;
            if !re.is_match(s) {
                return fail(format!("{s:?} does not match {p:?}"));
            }
        }
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as u64;
        if let Some(b) = m.get("minItems").and_then(Value::as_u64)
            && n < b
        {
            return fail(format!("fewer than {b} items"));
        }
        if let Some(b) = m.get("maxItems").and_then(Value::as_u64)
            && n > b
        {
            return fail(format!("more than {b} items"));
        }
        if m.get("uniqueItems").and_then(Value::as_bool) == Some(true) {
            for (i, a) in items.iter().enumerate() {
                if items[..i].iter().any(|b| json_eq(a, b)) {
                    return fail(format!("item {i} repeats an earlier item"));
                }
            }
        }
        if let Some(s) = m.get("items") {
            for (i, x) in items.iter().enumerate() {
                at(s, x, &format!("{path}[{i}]"))?;
            }
        }
    }
    if let Some(obj) = v.as_object() {
        let n = obj.len() as u64;
        if let Some(b) = m.get("minProperties").and_then(Value::as_u64)
            && n < b
        {
            return fail(format!("fewer than {b} properties"));
        }
        if let Some(b) = m.get("maxProperties").and_then(Value::as_u64)
            && n > b
        {
            return fail(format!("more than {b} properties"));
        }
        if let Some(Value::Array(req)) = m.get("required") {
            for r in req.iter().filter_map(Value::as_str) {
                if !obj.contains_key(r) {
                    return fail(format!("missing required property {r:?}"));
                }
            }
        }
        let props = m.get("properties").and_then(Value::as_object);
        for (k, x) in obj {
            let sub = format!("{path}.{k}");
            match props.and_then(|p| p.get(k)) {
                Some(s) => at(s, x, &sub)?,
                None => {
                    if let Some(extra) = m.get("additionalProperties") {
                        at(extra, x, &sub).map_err(|e| {
                            if extra == &Value::Bool(false) {
                                format!("{path}: property {k:?} is not allowed")
                            } else {
                                e
                            }
                        })?;
                    }
                }
            }
        }
    }
    if let Some(Value::Array(all)) = m.get("allOf") {
        for s in all {
            at(s, v, path)?;
        }
    }
    if let Some(Value::Array(any)) = m.get("anyOf")
        && !any.iter().any(|s| at(s, v, path).is_ok())
    {
        return fail("matches none of anyOf".into());
    }
    if let Some(Value::Array(one)) = m.get("oneOf") {
        let n = one.iter().filter(|s| at(s, v, path).is_ok()).count();
        if n != 1 {
            return fail(format!("matches {n} of oneOf, not exactly 1"));
        }
    }
    if let Some(not) = m.get("not")
        && at(not, v, path).is_ok()
    {
        return fail("matches the schema under \"not\"".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn objects_types_and_bounds() {
        let s = json!({
            "type": "object",
            "required": ["name", "age"],
            "additionalProperties": false,
            "properties": {
                "name": {"type": "string", "minLength": 1, "pattern": "^[A-Z]"},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "uniqueItems": true},
            }
        });
        check_schema(&s).unwrap();
        assert!(validate(&s, &json!({"name": "Ada", "age": 36})).is_ok());
        assert!(validate(&s, &json!({"name": "Ada", "age": 36.0, "tags": ["a", "b"]})).is_ok());
        let bad = [
            (json!({"name": "Ada"}), "missing required property \"age\""),
            (json!({"name": "ada", "age": 1}), "does not match"),
            (json!({"name": "Ada", "age": -1}), "below the minimum"),
            (json!({"name": "Ada", "age": 1.5}), "expected type"),
            (
                json!({"name": "Ada", "age": 1, "x": 1}),
                "\"x\" is not allowed",
            ),
            (json!({"name": "Ada", "age": 1, "tags": ["c"]}), "$.tags[0]"),
            (
                json!({"name": "Ada", "age": 1, "tags": ["a", "a"]}),
                "repeats",
            ),
            (json!([1]), "expected type"),
        ];
        for (v, needle) in bad {
            let e = validate(&s, &v).unwrap_err();
            assert!(e.contains(needle), "{v}: {e}");
        }
    }

    #[test]
    fn combinators_and_booleans() {
        let s = json!({"oneOf": [{"type": "string"}, {"type": "number", "multipleOf": 2}], "not": {"const": 4}});
        assert!(validate(&s, &json!("x")).is_ok());
        assert!(validate(&s, &json!(6)).is_ok());
        assert!(validate(&s, &json!(3)).is_err());
        assert!(validate(&s, &json!(4)).is_err());
        assert!(
            validate(
                &json!({"anyOf": [{"type": "null"}, {"type": "boolean"}]}),
                &json!(true)
            )
            .is_ok()
        );
        assert!(validate(&json!(false), &json!(1)).is_err());
        assert!(validate(&json!(true), &json!(1)).is_ok());
    }

    #[test]
    fn unsupported_keywords_are_refused() {
        assert!(check_schema(&json!({"$ref": "#/defs/x"})).is_err());
        assert!(check_schema(&json!({"properties": {"a": {"if": {}}}})).is_err());
        assert!(check_schema(&json!({"pattern": "("})).is_err());
        assert!(check_schema(&json!({"title": "t", "format": "email", "type": "string"})).is_ok());
    }
}
