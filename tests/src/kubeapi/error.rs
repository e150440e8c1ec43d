//! Why a request to the test API server failed: an HTTP status code, a reason and a
//! message, sent as the `Status` object the real API server sends (404 `NotFound` for what
//! it does not serve, 410 `Expired`, 422 `Invalid` with the schema's causes, ...).
use std::fmt;

use serde_json::{json, Value};

use super::{registry::Res, schema::Cause};

/// Why a request failed, as an HTTP status code and a message (turned into a `Status`).
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    /// `details` of the `Status` (name, group, kind, causes), when there are any.
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }
    /// What the real server answers for a resource (or group/version) it does not serve.
    pub fn not_served() -> Self {
        let mut e = Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
        e.details = Some(json!({}));
        e
    }
    /// 422 Invalid for a write that fails the schema.
    pub fn invalid(res: &Res, kind: &str, name: &str, causes: &[Cause]) -> Self {
        let list: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let qualified = if res.group.is_empty() {
            kind.to_owned()
        } else {
            format!("{kind}.{}", res.group)
        };
        let list = if list.len() == 1 {
            list[0].clone()
        } else {
            format!("[{}]", list.join(", "))
        };
        let mut e = Self::new(
            422,
            "Invalid",
            format!("{qualified} {name:?} is invalid: {list}"),
        );
        e.details = Some(json!({
            "name": name, "group": res.group, "kind": kind,
            "causes": causes.iter().map(Cause::to_json).collect::<Vec<_>>(),
        }));
        e
    }
    pub fn not_found(what: impl fmt::Display) -> Self {
        Self::new(404, "NotFound", format!("{what} not found"))
    }
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// The `Status` object the API server sends for this error.
    pub fn status(&self) -> Value {
        let mut v = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            v["details"] = d.clone();
        }
        v
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}
