//! A CRD's structural `openAPIV3Schema` applied to a written object, as the real API server
//! does: unknown fields are pruned (kept under `x-kubernetes-preserve-unknown-fields:
//! true`), `null` in a non-nullable field is dropped, and a value of the wrong type or a
//! missing required field makes the write invalid (422). `apiVersion`, `kind` and
//! `metadata` at the root are the server's own and are left alone.
use serde_json::{json, Value};

/// One invalid field (a `Status` cause).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}

impl Cause {
    pub fn to_json(&self) -> Value {
        json!({"reason": self.reason, "message": self.message, "field": self.field})
    }
}

/// Prunes `obj` per `schema` (the root `openAPIV3Schema`) and returns what is invalid.
pub fn prune_and_check(schema: &Value, obj: &mut Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let Some(map) = obj.as_object_mut() else {
        causes.push(type_cause("", "object", obj));
        return causes;
    };
    let keys: Vec<String> = map.keys().cloned().collect();
    for k in keys {
        if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        match schema["properties"].get(&k) {
            Some(s) if !map[&k].is_null() => {
                walk(s, map.get_mut(&k).expect("key"), &k, &mut causes)
            }
            Some(s) if s["nullable"] == true => {}
            _ if schema["x-kubernetes-preserve-unknown-fields"] == true && !map[&k].is_null() => {}
            _ => {
                map.remove(&k);
            }
        }
    }
    required(schema, obj, "", &mut causes);
    causes
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_cause(path: &str, want: &str, v: &Value) -> Cause {
    let got = type_name(v);
    let field = if path.is_empty() { "<root>" } else { path };
    Cause {
        reason: "FieldValueTypeInvalid",
        field: field.to_owned(),
        message: format!(
            "Invalid value: \"{got}\": {field} in body must be of type {want}: \"{got}\""
        ),
    }
}

fn type_ok(schema: &Value, v: &Value) -> Result<(), &'static str> {
    if schema["x-kubernetes-int-or-string"] == true {
        return match v {
            Value::String(_) => Ok(()),
            Value::Number(n) if !n.is_f64() => Ok(()),
            _ => Err("integer-or-string"),
        };
    }
    let ok = match schema["type"].as_str() {
        None => return Ok(()),
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        Some(_) => true,
    };
    match (ok, schema["type"].as_str()) {
        (true, _) => Ok(()),
        (false, Some("object")) => Err("object"),
        (false, Some("array")) => Err("array"),
        (false, Some("string")) => Err("string"),
        (false, Some("integer")) => Err("integer"),
        (false, Some("number")) => Err("number"),
        (false, _) => Err("boolean"),
    }
}

fn required(schema: &Value, obj: &Value, path: &str, causes: &mut Vec<Cause>) {
    for r in schema["required"].as_array().into_iter().flatten() {
        let Some(r) = r.as_str() else { continue };
        if obj.get(r).is_none_or(Value::is_null) {
            let field = if path.is_empty() {
                r.to_owned()
            } else {
                format!("{path}.{r}")
            };
            causes.push(Cause {
                reason: "FieldValueRequired",
                message: "Required value".into(),
                field,
            });
        }
    }
}

fn walk(schema: &Value, v: &mut Value, path: &str, causes: &mut Vec<Cause>) {
    if let Err(want) = type_ok(schema, v) {
        causes.push(type_cause(path, want, v));
        return;
    }
    match v {
        Value::Object(map) => {
            let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
            let addl = schema["additionalProperties"]
                .is_object()
                .then(|| &schema["additionalProperties"]);
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                let child = schema["properties"].get(&k).or(addl);
                let is_null = map[&k].is_null();
                match child {
                    Some(s) if !is_null => walk(
                        s,
                        map.get_mut(&k).expect("key"),
                        &format!("{path}.{k}"),
                        causes,
                    ),
                    Some(s) if s["nullable"] == true => {}
                    None if preserve && !is_null => {}
                    _ => {
                        map.remove(&k);
                    }
                }
            }
            required(schema, v, path, causes);
        }
        Value::Array(items) => {
            if let Some(item) = schema.get("items").filter(|s| s.is_object()) {
                for (i, e) in items.iter_mut().enumerate() {
                    walk(item, e, &format!("{path}[{i}]"), causes);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prunes_unknown_and_checks_types() {
        let schema = json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["a"], "properties": {
                "a": {"type": "string"},
                "n": {"type": "integer"},
                "p": {"type": "integer", "x-kubernetes-int-or-string": true},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "list": {"type": "array", "items": {"type": "object",
                                                     "properties": {"x": {"type": "string"}}}},
                "m": {"type": "object", "additionalProperties": {"type": "string"}},
            }},
        }});
        let mut o = json!({"apiVersion": "g/v1", "kind": "K", "metadata": {"name": "x", "z": 1},
            "extra": 1,
            "spec": {"a": "s", "n": 2, "p": "80%", "bogus": true, "free": {"any": {"thing": 1}},
                     "list": [{"x": "1", "y": 2}], "m": {"k": "v"}, "nul": null}});
        assert!(prune_and_check(&schema, &mut o).is_empty());
        assert_eq!(
            o,
            json!({"apiVersion": "g/v1", "kind": "K", "metadata": {"name": "x", "z": 1},
                "spec": {"a": "s", "n": 2, "p": "80%", "free": {"any": {"thing": 1}},
                         "list": [{"x": "1"}], "m": {"k": "v"}}})
        );
        let mut bad = json!({"spec": "nope"});
        let c = prune_and_check(&schema, &mut bad);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].field, "spec");
        assert_eq!(c[0].reason, "FieldValueTypeInvalid");
        let mut missing = json!({"spec": {"n": "x"}});
        let c = prune_and_check(&schema, &mut missing);
        let fields: Vec<_> = c.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, ["spec.n", "spec.a"]);
    }
}
