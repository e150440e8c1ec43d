//! Label and field selectors, as the API server applies them to lists and watches.
//!
//! Label selectors: comma-separated requirements `k=v`, `k==v`, `k!=v`, `k`, `!k`,
//! `k in (a,b)`, `k notin (a,b)`. Field selectors: `path=v`, `path==v`, `path!=v` where
//! `path` is a dotted JSON path (`metadata.name`, `metadata.namespace`, `spec.nodeName`, ...).
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Eq(String),
    Ne(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Req {
    key: String,
    op: Op,
}

impl Req {
    fn matches(&self, value: Option<&str>) -> bool {
        match (&self.op, value) {
            (Op::Eq(v), Some(x)) => v == x,
            (Op::Eq(_), None) => false,
            // Kubernetes: `k!=v` also matches objects without the key.
            (Op::Ne(v), x) => x != Some(v.as_str()),
            (Op::In(vs), Some(x)) => vs.iter().any(|v| v == x),
            (Op::In(_), None) => false,
            (Op::NotIn(vs), x) => x.is_none_or(|x| vs.iter().all(|v| v != x)),
            (Op::Exists, x) => x.is_some(),
            (Op::NotExists, x) => x.is_none(),
        }
    }
}

/// Splits on commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let (mut depth, mut start, mut out) = (0i32, 0usize, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn set_values(s: &str) -> Result<Vec<String>, String> {
    let s = s.trim();
    let inner = s
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesized set, got {s:?}"))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect())
}

fn parse_req(term: &str, allow_sets: bool) -> Result<Req, String> {
    let t = term.trim();
    if t.is_empty() {
        return Err("empty requirement".into());
    }
    for (sep, ne) in [("!=", true), ("==", false), ("=", false)] {
        if let Some((k, v)) = t.split_once(sep) {
            let key = k.trim().to_owned();
            if key.is_empty() {
                return Err(format!("no key in {t:?}"));
            }
            let v = v.trim().to_owned();
            let op = if ne { Op::Ne(v) } else { Op::Eq(v) };
            return Ok(Req { key, op });
        }
    }
    if allow_sets {
        for (word, not) in [(" notin ", true), (" in ", false)] {
            if let Some((k, v)) = t.split_once(word) {
                let vals = set_values(v)?;
                let key = k.trim().to_owned();
                let op = if not { Op::NotIn(vals) } else { Op::In(vals) };
                return Ok(Req { key, op });
            }
        }
        if let Some(k) = t.strip_prefix('!') {
            return Ok(Req {
                key: k.trim().to_owned(),
                op: Op::NotExists,
            });
        }
        if !t.contains(char::is_whitespace) {
            return Ok(Req {
                key: t.to_owned(),
                op: Op::Exists,
            });
        }
    }
    Err(format!("unsupported selector requirement {t:?}"))
}

/// A parsed `labelSelector`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Req>);

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Ok(Self::default());
        }
        split_top(s)
            .into_iter()
            .map(|t| parse_req(t, true))
            .collect::<Result<_, _>>()
            .map(Self)
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        self.0.iter().all(|r| r.matches(labels[&r.key].as_str()))
    }
}

/// A parsed `fieldSelector` over dotted JSON paths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<Req>);

/// The value at dotted path `path` as a string (numbers and booleans printed).
fn field(obj: &Value, path: &str) -> Option<String> {
    let mut v = obj;
    for part in path.split('.') {
        v = v.get(part)?;
    }
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Ok(Self::default());
        }
        split_top(s)
            .into_iter()
            .map(|t| parse_req(t, false))
            .collect::<Result<_, _>>()
            .map(Self)
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|r| {
            let v = field(obj, &r.key);
            // Unset metadata.namespace of a cluster-scoped object compares as "".
            let v = v.or_else(|| (r.key == "metadata.namespace").then(String::new));
            r.matches(v.as_deref())
        })
    }
}

/// Both selectors of a request.
#[derive(Debug, Clone, Default)]
pub struct Selectors {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Selectors {
    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors() {
        let o = json!({"metadata": {"name": "x", "namespace": "ns",
            "labels": {"app": "web", "kubernetes.io/service-name": "hello-private", "tier": "a"}}});
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&o);
        assert!(m(""));
        assert!(m("app=web"));
        assert!(m("app==web,tier=a"));
        assert!(!m("app=web,tier=b"));
        assert!(m("kubernetes.io/service-name=hello-private"));
        assert!(m("app!=db"));
        assert!(m("missing!=x"));
        assert!(m("app"));
        assert!(!m("!app"));
        assert!(m("!missing"));
        assert!(m("tier in (a, b)"));
        assert!(!m("tier notin (a,b)"));
        assert!(m("app in (web),tier notin (c)"));
        assert!(LabelSelector::parse("app in web").is_err());
    }

    #[test]
    fn field_selectors() {
        let o = json!({"metadata": {"name": "x", "namespace": "ns"}, "spec": {"port": 80}});
        let m = |s: &str| FieldSelector::parse(s).unwrap().matches(&o);
        assert!(m("metadata.name=x"));
        assert!(m("metadata.name=x,metadata.namespace==ns"));
        assert!(!m("metadata.name!=x"));
        assert!(m("spec.port=80"));
        let c = json!({"metadata": {"name": "n"}});
        assert!(FieldSelector::parse("metadata.namespace=")
            .unwrap()
            .matches(&c));
    }
}
