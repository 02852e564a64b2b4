//! Which OTLP resources belong to the gateway layer (SPEC §1.2) and which service and instance
//! they describe (SPEC §1.3).

use crate::attributes;
use crate::point::{RejectReason, Rejection};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde::{Deserialize, Serialize};
use std::fmt;
use xxhash_rust::xxh3::Xxh3;

/// The layer every entity of this crate belongs to.
pub const LAYER: &str = "ENVOY_AI_GATEWAY";

/// One condition on a resource attribute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttributeMatch {
    /// Resource attribute key, dots included (`job_name`, `service.name`).
    pub attribute: String,
    /// The value it must have, compared as text, case-sensitive.
    pub equals: String,
}

/// How resources are routed to the gateway layer and mapped to entities.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingRules {
    /// A resource is ours when ANY of these matches.
    #[serde(default = "default_match_any")]
    pub match_any: Vec<AttributeMatch>,
    /// The service is the first of these attributes that is present and non-empty.
    #[serde(default = "default_service_attributes")]
    pub service_attributes: Vec<String>,
    /// The instance is the first of these attributes that is present and non-empty; none means
    /// the data feeds service-level metrics only.
    #[serde(default = "default_instance_attributes")]
    pub instance_attributes: Vec<String>,
}

fn default_match_any() -> Vec<AttributeMatch> {
    vec![
        AttributeMatch { attribute: "job_name".into(), equals: "envoy-ai-gateway".into() },
        AttributeMatch { attribute: "service.name".into(), equals: "envoy-ai-gateway".into() },
        AttributeMatch { attribute: "service.layer".into(), equals: LAYER.into() },
    ]
}

fn default_service_attributes() -> Vec<String> {
    vec!["aigw.service".into(), "service.name".into()]
}

fn default_instance_attributes() -> Vec<String> {
    vec!["service.instance.id".into()]
}

impl Default for RoutingRules {
    fn default() -> Self {
        RoutingRules {
            match_any: default_match_any(),
            service_attributes: default_service_attributes(),
            instance_attributes: default_instance_attributes(),
        }
    }
}

impl RoutingRules {
    /// Checks the rules make sense; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.service_attributes.is_empty() {
            return Err("routing.service_attributes: must name at least one attribute".into());
        }
        for (index, rule) in self.match_any.iter().enumerate() {
            if rule.attribute.is_empty() {
                return Err(format!("routing.match_any[{index}].attribute: must not be empty"));
            }
        }
        for (field, list) in
            [("service_attributes", &self.service_attributes), ("instance_attributes", &self.instance_attributes)]
        {
            if let Some(index) = list.iter().position(|a| a.is_empty()) {
                return Err(format!("routing.{field}[{index}]: must not be empty"));
            }
        }
        Ok(())
    }

    /// Decides whether `resource` is a gateway resource and which entity it describes.
    pub fn select(&self, resource: Option<&Resource>) -> Selection {
        let attributes: &[KeyValue] = resource.map(|r| r.attributes.as_slice()).unwrap_or(&[]);
        let ours = self.match_any.iter().any(|rule| {
            attributes::find_text(attributes, &rule.attribute).is_some_and(|value| value == rule.equals.as_str())
        });
        if !ours {
            return Selection::NotOurs;
        }
        let Some(service) = first_non_empty(attributes, &self.service_attributes) else {
            return Selection::Rejected(self.missing_service());
        };
        let instance = first_non_empty(attributes, &self.instance_attributes);
        for (what, name) in [("service", Some(&service)), ("instance", instance.as_ref())] {
            if let Some(name) = name.filter(|name| name.len() > MAX_NAME_BYTES) {
                return Selection::Rejected(Rejection::new(
                    RejectReason::NameTooLong,
                    format!("{what} name of {} bytes is longer than {MAX_NAME_BYTES}", name.len()),
                ));
            }
        }
        Selection::Ours(Entity { service, instance })
    }

    /// A gateway resource without any of the service attributes, named as configured.
    fn missing_service(&self) -> Rejection {
        Rejection::new(
            RejectReason::MissingService,
            format!("gateway resource without {}", self.service_attributes.join(" or ")),
        )
    }
}

fn first_non_empty(attributes: &[KeyValue], keys: &[String]) -> Option<String> {
    keys.iter()
        .filter_map(|key| attributes::find_text(attributes, key))
        .find(|value| !value.is_empty())
        .map(|value| value.into_owned())
}

/// The outcome of routing one resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    /// A gateway resource and the entity it maps to.
    Ours(Entity),
    /// Not a gateway resource: accepted and dropped.
    NotOurs,
    /// A gateway resource whose data is rejected, and why: without any service attribute
    /// (`missing_service`), or with a service or instance name longer than [`MAX_NAME_BYTES`]
    /// (`name_too_long`, saying which and how long).
    Rejected(Rejection),
}

/// The longest service or instance name accepted, in bytes. Names are query parameters: one of
/// 100 000 bytes was stored, listed by `GET /api/v1/services`, and could never be queried (its
/// URL was refused as too long, 414, before any handler ran). Kubernetes names are at most 253.
pub const MAX_NAME_BYTES: usize = 1024;

/// A gateway service and, optionally, one of its instances (pods).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Entity {
    /// Service name (`aigw.service` or `service.name`).
    pub service: String,
    /// Instance name (`service.instance.id`), if the resource has one.
    pub instance: Option<String>,
}

impl Entity {
    /// An entity from borrowed names.
    pub fn new(service: &str, instance: Option<&str>) -> Entity {
        Entity { service: service.to_string(), instance: instance.map(str::to_string) }
    }

    /// The stable 64-bit hash of the partition key `(service, instance)` (SPEC §6): the same on
    /// every node, architecture and release, so the vnode of a series never changes.
    pub fn partition_hash(&self) -> u64 {
        partition_hash(&self.service, self.instance.as_deref())
    }
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.instance {
            Some(instance) => write!(f, "{}/{}", self.service, instance),
            None => write!(f, "{}", self.service),
        }
    }
}

/// xxh3-64 over a length-prefixed encoding of `(service, instance)`.
pub fn partition_hash(service: &str, instance: Option<&str>) -> u64 {
    let mut hasher = Xxh3::new();
    hash_str(&mut hasher, service);
    match instance {
        Some(instance) => {
            hasher.update(&[1]);
            hash_str(&mut hasher, instance);
        }
        None => hasher.update(&[0]),
    }
    hasher.digest()
}

fn hash_str(hasher: &mut Xxh3, value: &str) {
    hasher.update(&(value.len() as u64).to_le_bytes());
    hasher.update(value.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue};

    fn resource(pairs: &[(&str, &str)]) -> Resource {
        Resource {
            attributes: pairs
                .iter()
                .map(|(k, v)| KeyValue {
                    key: k.to_string(),
                    value: Some(AnyValue { value: Some(Value::StringValue(v.to_string())) }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn test_select_proposal_convention_uses_aigw_service() {
        let rules = RoutingRules::default();
        let r = resource(&[
            ("service.name", "envoy-ai-gateway"),
            ("aigw.service", "my-ai-gateway"),
            ("service.instance.id", "pod-1"),
        ]);
        assert_eq!(rules.select(Some(&r)), Selection::Ours(Entity::new("my-ai-gateway", Some("pod-1"))));
    }

    #[test]
    fn test_select_merged_skywalking_convention_uses_service_name() {
        let rules = RoutingRules::default();
        let r = resource(&[
            ("job_name", "envoy-ai-gateway"),
            ("service.name", "e2e-ai-gateway"),
            ("service.instance.id", "aigw-1"),
        ]);
        assert_eq!(rules.select(Some(&r)), Selection::Ours(Entity::new("e2e-ai-gateway", Some("aigw-1"))));
    }

    #[test]
    fn test_select_by_layer_without_instance() {
        let rules = RoutingRules::default();
        let r = resource(&[("service.layer", "ENVOY_AI_GATEWAY"), ("service.name", "gw")]);
        assert_eq!(rules.select(Some(&r)), Selection::Ours(Entity::new("gw", None)));
    }

    #[test]
    fn test_select_empty_aigw_service_falls_back_to_service_name() {
        let rules = RoutingRules::default();
        let r = resource(&[
            ("job_name", "envoy-ai-gateway"),
            ("aigw.service", ""),
            ("service.name", "gw"),
            ("service.instance.id", ""),
        ]);
        assert_eq!(rules.select(Some(&r)), Selection::Ours(Entity::new("gw", None)));
    }

    #[test]
    fn test_select_refuses_names_too_long_to_query() {
        let rules = RoutingRules::default();
        let longest = "p".repeat(MAX_NAME_BYTES);
        let r =
            resource(&[("job_name", "envoy-ai-gateway"), ("service.name", "gw"), ("service.instance.id", &longest)]);
        assert_eq!(rules.select(Some(&r)), Selection::Ours(Entity::new("gw", Some(&longest))));
        let longer = format!("{longest}p");
        let r = resource(&[("job_name", "envoy-ai-gateway"), ("service.name", "gw"), ("service.instance.id", &longer)]);
        assert_eq!(
            rules.select(Some(&r)),
            Selection::Rejected(Rejection::new(
                RejectReason::NameTooLong,
                "instance name of 1025 bytes is longer than 1024"
            ))
        );
    }

    #[test]
    fn test_select_other_resources_are_not_ours() {
        let rules = RoutingRules::default();
        assert_eq!(rules.select(Some(&resource(&[("service.name", "checkout")]))), Selection::NotOurs);
        assert_eq!(rules.select(Some(&resource(&[("job_name", "Envoy-AI-Gateway")]))), Selection::NotOurs);
        assert_eq!(rules.select(None), Selection::NotOurs);
    }

    #[test]
    fn test_select_gateway_resource_without_service_is_reported() {
        let rules = RoutingRules::default();
        let expected =
            Rejection::new(RejectReason::MissingService, "gateway resource without aigw.service or service.name");
        assert_eq!(rules.select(Some(&resource(&[("job_name", "envoy-ai-gateway")]))), Selection::Rejected(expected));
        // The attributes as configured.
        let rules = RoutingRules { service_attributes: vec!["k8s.deployment.name".into()], ..RoutingRules::default() };
        let expected = Rejection::new(RejectReason::MissingService, "gateway resource without k8s.deployment.name");
        assert_eq!(rules.select(Some(&resource(&[("job_name", "envoy-ai-gateway")]))), Selection::Rejected(expected));
    }

    #[test]
    fn test_partition_hash_is_stable_and_separates_fields() {
        // Fixed values: a change here would move every series to another vnode after an upgrade.
        assert_eq!(partition_hash("gw-a", Some("gw-pod-0")), partition_hash("gw-a", Some("gw-pod-0")));
        assert_ne!(partition_hash("gw-a", Some("b")), partition_hash("gw-ab", None));
        assert_ne!(partition_hash("gw", Some("")), partition_hash("gw", None));
        assert_eq!(partition_hash("gw-a", Some("gw-pod-0")), PARTITION_HASH_GW_A_POD_0);
    }

    const PARTITION_HASH_GW_A_POD_0: u64 = 4_837_133_454_143_806_389;
}
