//! Knative's ServerlessService (SKS), `networking.internal.knative.dev/v1alpha1`: the object
//! that says whether a revision's traffic goes to its pods (Serve) or to the activator
//! (Proxy). A hand-written [`Resource`] so that decoding tolerates any missing field (an SKS
//! written by an older or newer Knative, or one not reconciled yet); unknown fields are
//! ignored.
use std::borrow::Cow;

use k8s_openapi::{
    api::core::v1::ObjectReference, apimachinery::pkg::apis::meta::v1::ObjectMeta,
    NamespaceResourceScope,
};
use kube::Resource;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "networking.internal.knative.dev";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "ServerlessService";
pub const PLURAL: &str = "serverlessservices";
pub const SHORT_NAME: &str = "sks";

/// `spec.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SksMode {
    Serve,
    Proxy,
}

/// `spec.protocolType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SksProtocol {
    Http1,
    H2c,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServerlessServiceSpec {
    /// "Serve" or "Proxy".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// The PodScalable (Deployment) behind the revision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object_ref: Option<ObjectReference>,
    /// "http1" or "h2c".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol_type: Option<String>,
    /// How many activators back the revision in Proxy mode; 0 = all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_activators: Option<i32>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServerlessServiceStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<SksCondition>>,
    /// The public Service (VIP) of the revision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// The private Service, selecting the revision's pods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_service_name: Option<String>,
}

/// A Knative condition (knative.dev/pkg/apis.Condition): like [`Condition`] but every field
/// optional and `severity` instead of `observedGeneration`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SksCondition {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A ServerlessService. Serializes with `apiVersion` and `kind`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServerlessService {
    #[serde(deserialize_with = "null_default")]
    pub metadata: ObjectMeta,
    #[serde(deserialize_with = "null_default")]
    pub spec: ServerlessServiceSpec,
    pub status: Option<ServerlessServiceStatus>,
}

/// `null` decodes like an absent field.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl Serialize for ServerlessService {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = ser.serialize_struct(KIND, 5)?;
        s.serialize_field("apiVersion", &format!("{GROUP}/{VERSION}"))?;
        s.serialize_field("kind", KIND)?;
        s.serialize_field("metadata", &self.metadata)?;
        s.serialize_field("spec", &self.spec)?;
        if let Some(st) = &self.status {
            s.serialize_field("status", st)?;
        } else {
            s.skip_field("status")?;
        }
        s.end()
    }
}

impl Resource for ServerlessService {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        PLURAL.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl ServerlessService {
    /// `spec.mode`; Knative's default (Serve) when missing or unknown.
    pub fn mode(&self) -> SksMode {
        match self.spec.mode.as_deref() {
            Some(m) if m.eq_ignore_ascii_case("proxy") => SksMode::Proxy,
            _ => SksMode::Serve,
        }
    }

    /// `spec.protocolType`; http1 when missing or unknown.
    pub fn protocol(&self) -> SksProtocol {
        match self.spec.protocol_type.as_deref() {
            Some(p) if p.eq_ignore_ascii_case("h2c") => SksProtocol::H2c,
            _ => SksProtocol::Http1,
        }
    }

    /// `spec.numActivators`; 0 (all) when missing or negative.
    pub fn num_activators(&self) -> usize {
        self.spec.num_activators.unwrap_or(0).max(0) as usize
    }

    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    /// `namespace/name`: how the agent names the SKS in maps, logs and status.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.namespace(), self.name())
    }

    /// The revision the SKS belongs to: its `serving.knative.dev/revision` label, else its
    /// name (Knative names the SKS after the revision).
    pub fn revision(&self) -> &str {
        self.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("serving.knative.dev/revision"))
            .map(String::as_str)
            .filter(|r| !r.is_empty())
            .unwrap_or(self.name())
    }

    /// The public Service: `status.serviceName`, else the SKS name.
    pub fn public_service(&self) -> &str {
        self.status
            .as_ref()
            .and_then(|s| s.service_name.as_deref())
            .filter(|s| !s.is_empty())
            .unwrap_or(self.name())
    }

    /// The private Service: `status.privateServiceName`, else `<name>-private`.
    pub fn private_service(&self) -> String {
        self.status
            .as_ref()
            .and_then(|s| s.private_service_name.as_deref())
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{}-private", self.name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_with_missing_fields() {
        let s: ServerlessService = serde_json::from_str("{}").unwrap();
        assert_eq!(s.mode(), SksMode::Serve);
        assert_eq!(s.protocol(), SksProtocol::Http1);
        let s: ServerlessService = serde_json::from_str(
            r#"{"apiVersion":"networking.internal.knative.dev/v1alpha1","kind":"ServerlessService",
                "metadata":{"name":"hello-00001","namespace":"default","resourceVersion":"7"},
                "spec":{"mode":"Proxy","protocolType":"h2c","numActivators":3,
                        "objectRef":{"apiVersion":"apps/v1","kind":"Deployment","name":"hello-00001-deployment"},
                        "unknownField":1},
                "status":{"serviceName":"hello-00001","privateServiceName":"hello-00001-private",
                          "conditions":[{"type":"Ready","status":"True"}]}}"#,
        )
        .unwrap();
        assert_eq!(s.mode(), SksMode::Proxy);
        assert_eq!(s.protocol(), SksProtocol::H2c);
        assert_eq!(s.num_activators(), 3);
        assert_eq!(s.full_name(), "default/hello-00001");
        assert_eq!(s.private_service(), "hello-00001-private");
        let s: ServerlessService = serde_json::from_str(
            r#"{"metadata":{"name":"x","namespace":"n"},"spec":null,"status":{}}"#,
        )
        .unwrap();
        assert_eq!(s.private_service(), "x-private");
        assert_eq!(s.public_service(), "x");
    }

    #[test]
    fn round_trips_with_type_meta() {
        let mut s = ServerlessService::default();
        s.metadata.name = Some("a".into());
        s.spec.mode = Some("Serve".into());
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["apiVersion"], "networking.internal.knative.dev/v1alpha1");
        assert_eq!(v["kind"], "ServerlessService");
        let back: ServerlessService = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
        assert_eq!(
            ServerlessService::url_path(&(), None),
            "/apis/networking.internal.knative.dev/v1alpha1/serverlessservices"
        );
    }
}
