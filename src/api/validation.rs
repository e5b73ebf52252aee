//! Apply-time validation of the Kubernetes types embedded in the CRDs (label
//! selectors, tolerations, the pod fields of a worker template), so that the API
//! server refuses an object it would refuse in a pod or a selector, with the
//! field's path. The schemas of these types come from k8s-openapi without any
//! bound; CEL rules need bounds (`maxItems`, `maxLength`, `maxProperties`) for the
//! API server to estimate their cost, so each transform adds both.

use schemars::Schema;
use serde_json::{Map, Value, json};

/// A label key (qualified name): an optional DNS subdomain prefix and `/`, then
/// a name of at most 63 characters (alphanumerics, `-`, `_`, `.`, alphanumeric at
/// both ends).
pub const QUALIFIED_NAME: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";
/// A label value: empty, or at most 63 alphanumerics, `-`, `_`, `.` with an
/// alphanumeric at both ends.
pub const LABEL_VALUE: &str = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$";
/// A DNS-1123 label (volume names, namespaces).
pub const DNS_LABEL: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// A DNS-1123 subdomain (object names).
pub const DNS_SUBDOMAIN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// An environment variable name as the API server accepts it.
pub const ENV_VAR_NAME: &str = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$";

/// Longest label key (253 prefix + `/` + 63 name).
const MAX_KEY: u64 = 317;

fn rule(rule: String, message: &str) -> Value {
    json!({ "rule": rule, "message": message })
}

fn add_rules(schema: &mut Map<String, Value>, rules: impl IntoIterator<Item = Value>) {
    let list = schema.entry("x-kubernetes-validations").or_insert_with(|| json!([]));
    if let Value::Array(list) = list {
        list.extend(rules);
    }
}

fn property<'a>(schema: &'a mut Map<String, Value>, name: &str) -> &'a mut Map<String, Value> {
    schema
        .get_mut("properties")
        .and_then(|p| p.get_mut(name))
        .and_then(Value::as_object_mut)
        .unwrap_or_else(|| panic!("schema has no property {name}"))
}

fn items(schema: &mut Map<String, Value>) -> &mut Map<String, Value> {
    schema.get_mut("items").and_then(Value::as_object_mut).expect("array schema has items")
}

fn object(schema: &mut Schema) -> &mut Map<String, Value> {
    schema.as_object_mut().expect("an object schema")
}

/// Bounds and checks a label map (`matchLabels`, template labels): keys are
/// label keys, values label values. `what` names the field in the message.
fn label_map(map: &mut Map<String, Value>, what: &str, max: u64) {
    map.insert("maxProperties".into(), json!(max));
    if let Some(values) = map.get_mut("additionalProperties").and_then(Value::as_object_mut) {
        values.insert("maxLength".into(), json!(63));
    }
    add_rules(
        map,
        [
            rule(
                format!("self.all(k, size(k) <= {MAX_KEY} && k.matches('{QUALIFIED_NAME}'))"),
                &format!(
                    "{what} keys must be label keys: an optional DNS prefix and '/', then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
                ),
            ),
            rule(
                format!("self.all(k, self[k].matches('{LABEL_VALUE}'))"),
                &format!(
                    "{what} values must be label values: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
                ),
            ),
        ],
    );
}

/// A label key string field (selector keys, topology keys).
pub fn label_key(schema: &mut Schema) {
    let s = object(schema);
    s.insert("maxLength".into(), json!(MAX_KEY));
    add_rules(
        s,
        [rule(
            format!("self.matches('{QUALIFIED_NAME}')"),
            "must be a label key: an optional DNS prefix and '/', then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
        )],
    );
}

/// A list of label keys.
pub fn label_keys(schema: &mut Schema) {
    let item = items(object(schema));
    add_rules(
        item,
        [rule(
            format!("self.matches('{QUALIFIED_NAME}')"),
            "topologyKeys must be label keys: an optional DNS prefix and '/', then at most 63 letters, digits, '-', '_' or '.'",
        )],
    );
}

/// A metav1.LabelSelector as the API server validates one (`ValidateLabelSelector`).
pub fn label_selector(schema: &mut Schema) {
    let s = object(schema);
    label_map(property(s, "matchLabels"), "matchLabels", 64);
    let exprs = property(s, "matchExpressions");
    exprs.insert("maxItems".into(), json!(32));
    let req = items(exprs);
    let key = property(req, "key");
    key.insert("maxLength".into(), json!(MAX_KEY));
    add_rules(
        key,
        [rule(
            format!("self.matches('{QUALIFIED_NAME}')"),
            "matchExpressions key must be a label key: an optional DNS prefix and '/', then at most 63 letters, digits, '-', '_' or '.'",
        )],
    );
    property(req, "operator").insert("enum".into(), json!(["In", "NotIn", "Exists", "DoesNotExist"]));
    let values = property(req, "values");
    values.insert("maxItems".into(), json!(64));
    let value = items(values);
    value.insert("maxLength".into(), json!(63));
    add_rules(
        value,
        [rule(
            format!("self.matches('{LABEL_VALUE}')"),
            "matchExpressions values must be label values: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
        )],
    );
    add_rules(
        req,
        [
            rule(
                "!(self.operator in ['In', 'NotIn']) || (has(self.values) && size(self.values) > 0)".into(),
                "matchExpressions with operator In or NotIn need at least one value",
            ),
            rule(
                "!(self.operator in ['Exists', 'DoesNotExist']) || !has(self.values) || size(self.values) == 0".into(),
                "matchExpressions with operator Exists or DoesNotExist must have no values",
            ),
        ],
    );
}

/// A list of core/v1 Tolerations as the API server validates them in a pod.
pub fn tolerations(schema: &mut Schema) {
    let t = items(object(schema));
    let key = property(t, "key");
    key.insert("maxLength".into(), json!(MAX_KEY));
    add_rules(
        key,
        [rule(
            format!("self == '' || self.matches('{QUALIFIED_NAME}')"),
            "toleration key must be a label key: an optional DNS prefix and '/', then at most 63 letters, digits, '-', '_' or '.'",
        )],
    );
    property(t, "operator").insert("enum".into(), json!(["", "Exists", "Equal"]));
    property(t, "effect").insert("enum".into(), json!(["", "NoSchedule", "PreferNoSchedule", "NoExecute"]));
    let value = property(t, "value");
    value.insert("maxLength".into(), json!(63));
    add_rules(
        value,
        [rule(
            format!("self.matches('{LABEL_VALUE}')"),
            "toleration value must be a label value: at most 63 letters, digits, '-', '_' or '.'",
        )],
    );
    add_rules(
        t,
        [
            rule(
                "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''".into(),
                "a toleration with operator Exists must not have a value",
            ),
            rule(
                "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')".into(),
                "a toleration without a key must have operator Exists (it then tolerates every taint)",
            ),
            rule(
                "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')".into(),
                "tolerationSeconds applies only to effect NoExecute",
            ),
        ],
    );
}

/// Worker pod labels.
pub fn pod_labels(schema: &mut Schema) {
    label_map(object(schema), "template.labels", 64);
}

/// Worker pod annotations: keys are label keys.
pub fn pod_annotations(schema: &mut Schema) {
    let s = object(schema);
    s.insert("maxProperties".into(), json!(64));
    add_rules(
        s,
        [rule(
            format!("self.all(k, size(k) <= {MAX_KEY} && k.matches('{QUALIFIED_NAME}'))"),
            "template.annotations keys must be label keys: an optional DNS prefix and '/', then at most 63 letters, digits, '-', '_' or '.'",
        )],
    );
}

/// Container env: names as the API server accepts them.
pub fn env(schema: &mut Schema) {
    let s = object(schema);
    s.insert("maxItems".into(), json!(256));
    let name = property(items(s), "name");
    name.insert("maxLength".into(), json!(256));
    add_rules(
        name,
        [rule(
            format!("self.matches('{ENV_VAR_NAME}')"),
            "env names must consist of letters, digits, '_', '-' or '.' and must not start with a digit",
        )],
    );
}

/// Pod volumes: DNS-label names, unique.
pub fn volumes(schema: &mut Schema) {
    let s = object(schema);
    s.insert("x-kubernetes-list-type".into(), json!("map"));
    s.insert("x-kubernetes-list-map-keys".into(), json!(["name"]));
    let name = property(items(s), "name");
    name.insert("maxLength".into(), json!(63));
    add_rules(
        name,
        [rule(
            format!("self.matches('{DNS_LABEL}')"),
            "volume names must be DNS labels: at most 63 lowercase letters, digits or '-', starting and ending with a letter or digit",
        )],
    );
}

/// Container volume mounts: one per path, names bounded (their volume is
/// checked on the template).
pub fn volume_mounts(schema: &mut Schema) {
    let s = object(schema);
    s.insert("x-kubernetes-list-type".into(), json!("map"));
    s.insert("x-kubernetes-list-map-keys".into(), json!(["mountPath"]));
    let m = items(s);
    property(m, "name").insert("maxLength".into(), json!(63));
    property(m, "mountPath").insert("maxLength".into(), json!(4096));
    add_rules(
        property(m, "mountPath"),
        [rule("self.startsWith('/')".into(), "volumeMounts mountPath must be an absolute path")],
    );
}

/// Container resources: quantities that parse, requests not above limits.
pub fn resources(schema: &mut Schema) {
    let s = object(schema);
    for map in ["requests", "limits"] {
        let m = property(s, map);
        m.insert("maxProperties".into(), json!(32));
        if let Some(values) = m.get_mut("additionalProperties").and_then(Value::as_object_mut) {
            values.insert("maxLength".into(), json!(64));
        }
        add_rules(
            m,
            [rule(
                "self.all(k, isQuantity(string(self[k])))".into(),
                &format!("template.resources.{map} values must be quantities such as 500m, 2, 16Gi"),
            )],
        );
    }
    // `claims` (dynamic resource allocation) is not passed to the worker pod.
    add_rules(
        s,
        [rule(
            "!has(self.requests) || !has(self.limits) || self.requests.all(k, !(k in self.limits) || !isQuantity(string(self.requests[k])) || !isQuantity(string(self.limits[k])) || quantity(string(self.requests[k])).compareTo(quantity(string(self.limits[k]))) <= 0)".into(),
            "template.resources.requests must not exceed template.resources.limits for the same resource",
        )],
    );
}

/// Status conditions as metav1.Condition's own markers make them: a list map
/// keyed by `type` (one entry per type, merged by it under server-side apply),
/// each field bounded, `status` one of True, False, Unknown. (The number of
/// conditions is bounded where the field is declared.)
pub fn conditions(schema: &mut Schema) {
    let list = object(schema);
    list.insert("x-kubernetes-list-type".into(), json!("map"));
    list.insert("x-kubernetes-list-map-keys".into(), json!(["type"]));
    let c = items(list);
    property(c, "type").insert("maxLength".into(), json!(316));
    property(c, "status").insert("enum".into(), json!(["True", "False", "Unknown"]));
    property(c, "reason").insert("maxLength".into(), json!(1024));
    property(c, "message").insert("maxLength".into(), json!(32768));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn re(pattern: &str) -> regex::Regex {
        regex::Regex::new(pattern).unwrap()
    }

    #[test]
    fn patterns_agree_with_the_api_server_on_edges() {
        let key = re(QUALIFIED_NAME);
        for ok in ["a", "app", "sovereign.ai/pool", "kubernetes.io/hostname", "A_b.c-D", &"x".repeat(63)] {
            assert!(key.is_match(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "a/b/c", "Sovereign.ai/pool", "a b", &"x".repeat(64), "/a", "a/"] {
            assert!(!key.is_match(bad), "{bad}");
        }
        let value = re(LABEL_VALUE);
        for ok in ["", "h200", "NVIDIA-H200", "a.b_c"] {
            assert!(value.is_match(ok), "{ok}");
        }
        for bad in ["-a", "a b", "a/b", &"x".repeat(64)] {
            assert!(!value.is_match(bad), "{bad}");
        }
        let env = re(ENV_VAR_NAME);
        assert!(env.is_match("MASTER_ADDR") && env.is_match("my.var-1") && !env.is_match("1X") && !env.is_match("A=B"));
    }
}
