//! The generated pages of the docs: the API reference, every field of every CRD
//! with its type and validation, from the same schemas the API server enforces;
//! and the CLI reference, each command's help as clap prints it. `make docs`
//! writes them into the book (`sovereign-operator docs --out-dir DIR`), which
//! fails when a field is missing from the reference or has no description.

use std::fmt::Write as _;
use std::path::Path;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

use crate::api::all_crds;

/// One field of a CRD's schema, by its path (`spec.grants[].pool`).
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub path: String,
    pub ty: String,
    pub required: bool,
    pub description: String,
    pub validation: Vec<String>,
}

/// Every field below `spec` and `status` (and the CRD's own rules at the root).
pub fn fields(schema: &Value) -> Vec<Field> {
    let mut out = Vec::new();
    children(schema, "", &mut out);
    out
}

fn children(schema: &Value, prefix: &str, out: &mut Vec<Field>) {
    let required: Vec<&str> =
        schema["required"].as_array().map(|r| r.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    if let Some(props) = schema["properties"].as_object() {
        for (name, sub) in props {
            if prefix.is_empty() && matches!(name.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            let path = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
            field(sub, path, required.contains(&name.as_str()), out);
        }
    }
}

fn field(schema: &Value, path: String, required: bool, out: &mut Vec<Field>) {
    let mut validation = rules(schema);
    let items = &schema["items"];
    let values = &schema["additionalProperties"];
    if items.is_object() {
        validation.extend(rules(items).into_iter().map(|r| format!("each item: {r}")));
    }
    if values.is_object() {
        validation.extend(rules(values).into_iter().map(|r| format!("each value: {r}")));
    }
    out.push(Field {
        path: path.clone(),
        ty: type_name(schema),
        required,
        description: schema["description"].as_str().unwrap_or_default().to_string(),
        validation,
    });
    children(schema, &path, out);
    if items.is_object() {
        children(items, &format!("{path}[]"), out);
    }
    if values.is_object() {
        children(values, &format!("{path}.*"), out);
    }
}

fn type_name(schema: &Value) -> String {
    if schema["x-kubernetes-int-or-string"] == true {
        return "integer or string".into();
    }
    let ty = schema["type"].as_str().unwrap_or("any");
    match ty {
        "array" => format!("[]{}", type_name(&schema["items"])),
        "object" if schema["additionalProperties"].is_object() => {
            format!("map[string]{}", type_name(&schema["additionalProperties"]))
        }
        "object" if schema["x-kubernetes-preserve-unknown-fields"] == true => "object (any fields)".into(),
        _ => match schema["format"].as_str() {
            Some(f) => format!("{ty} ({f})"),
            None => ty.into(),
        },
    }
}

/// The validation a schema node carries, in words.
fn rules(schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let num = |k: &str| schema[k].as_f64().map(|v| v.to_string());
    if let Some(values) = schema["enum"].as_array() {
        let v: Vec<String> = values.iter().map(|v| code(&plain(v))).collect();
        out.push(format!("one of {}", v.join(", ")));
    }
    if let Some(v) = num("minimum") {
        let op = if schema["exclusiveMinimum"] == true { ">" } else { ">=" };
        out.push(format!("{op} {v}"));
    }
    if let Some(v) = num("maximum") {
        let op = if schema["exclusiveMaximum"] == true { "<" } else { "<=" };
        out.push(format!("{op} {v}"));
    }
    for (key, what) in [
        ("minLength", "length >="),
        ("maxLength", "length <="),
        ("minItems", "items >="),
        ("maxItems", "items <="),
        ("minProperties", "entries >="),
        ("maxProperties", "entries <="),
    ] {
        if let Some(v) = num(key) {
            out.push(format!("{what} {v}"));
        }
    }
    if let Some(p) = schema["pattern"].as_str() {
        out.push(format!("matches {}", code(p)));
    }
    if let Some(t) = schema["x-kubernetes-list-type"].as_str() {
        let keys = schema["x-kubernetes-list-map-keys"].as_array().map(|k| {
            let k: Vec<String> = k.iter().map(|k| code(&plain(k))).collect();
            format!(" keyed by {}", k.join(", "))
        });
        out.push(format!("list type {}{}", code(t), keys.unwrap_or_default()));
    }
    if !schema["default"].is_null() {
        out.push(format!("default {}", code(&schema["default"].to_string())));
    }
    for rule in schema["x-kubernetes-validations"].as_array().into_iter().flatten() {
        let message = rule["message"].as_str().map(|m| format!(": \"{}\"", one_line(m))).unwrap_or_default();
        out.push(format!("rule {}{message}", code(rule["rule"].as_str().unwrap_or_default())));
    }
    out
}

fn plain(v: &Value) -> String {
    v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())
}

/// Inline code that may itself hold backticks.
fn code(s: &str) -> String {
    if s.is_empty() {
        return "`\"\"`".into();
    }
    if s.contains('`') { format!("`` {s} ``") } else { format!("`{s}`") }
}

/// A description on one line, with `<` and `>` outside code spans escaped
/// (Kubernetes' own descriptions say `<name>` where Markdown would see HTML).
fn one_line(s: &str) -> String {
    let mut out = String::new();
    for (i, part) in s.split_whitespace().collect::<Vec<_>>().join(" ").split('`').enumerate() {
        if i > 0 {
            out.push('`');
        }
        if i % 2 == 0 {
            out.push_str(&part.replace('<', "&lt;").replace('>', "&gt;"));
        } else {
            out.push_str(part);
        }
    }
    out
}

fn schema_of(crd: &CustomResourceDefinition) -> (String, Value) {
    let version = &crd.spec.versions[0];
    let schema = version.schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref());
    (version.name.clone(), serde_json::to_value(schema).unwrap_or_default())
}

/// The API reference page.
pub fn api_markdown(crds: &[CustomResourceDefinition]) -> String {
    let mut out = String::from(
        "# API reference\n\nEvery field of the custom resources with its type and validation, generated \
         from the CRDs (`sovereign-operator docs`; the same schemas as `crds/`). The API server \
         refuses an object that breaks a rule, with the rule's message. Paths: `a[]` is each item \
         of the list `a`, `m.*` each value of the map `m`.\n",
    );
    for crd in crds {
        let (version, schema) = schema_of(crd);
        let names = &crd.spec.names;
        let _ = write!(
            out,
            "\n## {kind}\n\n`{group}/{version}`, {scope}-scoped; plural `{plural}`",
            kind = names.kind,
            group = crd.spec.group,
            scope = crd.spec.scope.to_lowercase(),
            plural = names.plural
        );
        if let Some(short) = names.short_names.as_ref().filter(|s| !s.is_empty()) {
            let _ = write!(out, ", short names {}", short.iter().map(|s| code(s)).collect::<Vec<_>>().join(", "));
        }
        if let Some(cat) = names.categories.as_ref().filter(|c| !c.is_empty()) {
            let _ = write!(out, ", categories {}", cat.iter().map(|s| code(s)).collect::<Vec<_>>().join(", "));
        }
        out.push_str(".\n\n");
        if let Some(d) = schema["description"].as_str() {
            let _ = writeln!(out, "{}\n", one_line(d));
        }
        let columns = crd.spec.versions[0].additional_printer_columns.iter().flatten();
        let (default, wide): (Vec<_>, Vec<_>) = columns.partition(|c| c.priority.unwrap_or(0) == 0);
        let list = |cols: Vec<
            &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceColumnDefinition,
        >| {
            cols.iter().map(|c| format!("{} ({})", c.name, code(&c.json_path))).collect::<Vec<_>>().join(", ")
        };
        let _ = writeln!(out, "`kubectl get` columns: {}.", list(default));
        if !wide.is_empty() {
            let _ = writeln!(out, "With `-o wide` also: {}.", list(wide));
        }
        let root = rules(&schema);
        if !root.is_empty() {
            let _ = writeln!(out, "\nObject rules: {}.", root.join("; "));
        }
        let mut section = String::new();
        for f in fields(&schema) {
            let top = f.path.split(['.', '[']).next().unwrap_or_default();
            if top != section {
                let _ = writeln!(out, "\n### {} `{top}`\n", names.kind);
                section = top.to_string();
            }
            out.push_str(&entry(&f));
        }
    }
    out
}

fn entry(f: &Field) -> String {
    let required = if f.required { ", required" } else { "" };
    let mut s = format!("- **`{}`** {}{required}", f.path, code(&f.ty));
    if !f.description.is_empty() {
        let _ = write!(s, ": {}", one_line(&f.description));
    }
    if !f.validation.is_empty() {
        let _ = write!(s, " *Validation:* {}.", f.validation.join("; "));
    }
    s.push('\n');
    s
}

/// Fields of the CRDs that the reference lacks, and fields without a description.
pub fn check(api: &str, crds: &[CustomResourceDefinition]) -> Vec<String> {
    let mut problems = Vec::new();
    for crd in crds {
        let (_, schema) = schema_of(crd);
        for f in fields(&schema) {
            let kind = &crd.spec.names.kind;
            if !api.contains(&format!("- **`{}`** ", f.path)) {
                problems.push(format!("{kind} {}: missing from the API reference", f.path));
            }
            if f.description.trim().is_empty() {
                problems.push(format!("{kind} {}: no description (add a doc comment to the Rust type)", f.path));
            }
        }
    }
    problems
}

/// The CLI reference page: each command's full help.
pub fn cli_markdown() -> String {
    let mut cmd = crate::cli::command("sovereign-operator");
    cmd.build();
    let mut out = String::from(
        "# CLI reference\n\nOne binary: the operator's image runs `sovereign-operator run`; installed on the \
         PATH as `kubectl-sovereign` it is a kubectl plugin (`kubectl sovereign report`, \
         `kubectl sovereign plan`), whose usage lines say so. Generated from the command line's \
         definition (`sovereign-operator docs`).\n",
    );
    let _ =
        write!(out, "\n## `sovereign-operator`\n\n```text\n{}```\n", hide_env_values(cmd.clone()).render_long_help());
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let _ = write!(
            out,
            "\n## `sovereign-operator {}`\n\n```text\n{}```\n",
            sub.get_name(),
            hide_env_values(sub.clone()).render_long_help()
        );
    }
    out
}

/// The help shows which environment variable sets a flag, never its value here.
fn hide_env_values(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|a| a.hide_env_values(true))
}

/// `docs --out-dir DIR`: writes `api.md` and `cli.md`; fails when a CRD field is
/// missing from the reference or undocumented.
pub fn write(dir: &Path) -> anyhow::Result<()> {
    let crds = all_crds();
    let api = api_markdown(&crds);
    let problems = check(&api, &crds);
    if !problems.is_empty() {
        anyhow::bail!("the API reference is incomplete:\n  {}", problems.join("\n  "));
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("api.md"), api)?;
    std::fs::write(dir.join("cli.md"), cli_markdown())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_field_of_every_crd_is_in_the_reference_with_a_description() {
        let crds = all_crds();
        let api = api_markdown(&crds);
        assert_eq!(check(&api, &crds), Vec::<String>::new());
        for path in ["spec.grants[].pool", "spec.placement.pools", "status.conditions[].type", "spec.nodeSelector"] {
            assert!(api.contains(&format!("- **`{path}`** ")), "{path}");
        }
    }

    #[test]
    fn a_field_left_out_is_found() {
        let crds = all_crds();
        let api = api_markdown(&crds).replace("- **`spec.grants[].pool`** ", "- ");
        assert!(check(&api, &crds).iter().any(|p| p.contains("spec.grants[].pool: missing")));
    }

    #[test]
    fn validation_is_spelled_out() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "required": ["n"], "properties": {
            "n": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 4096, "description": "Workers."},
            "mode": {"type": "string", "enum": ["Shared", "Dedicated"], "default": "Shared", "description": "M."},
            "names": {"type": "array", "maxItems": 8, "items": {"type": "string", "pattern": "^[a-z]+$"},
                      "x-kubernetes-validations": [{"rule": "self.size() > 0", "message": "not empty"}], "description": "N."},
        }}}});
        let f = fields(&schema);
        let by = |p: &str| f.iter().find(|x| x.path == p).unwrap().clone();
        let n = by("spec.n");
        assert_eq!((n.ty.as_str(), n.required), ("integer (int32)", true));
        assert_eq!(n.validation, [">= 1", "<= 4096"]);
        assert_eq!(by("spec.mode").validation, ["one of `Shared`, `Dedicated`", "default `\"Shared\"`"]);
        let names = by("spec.names");
        assert_eq!(names.ty, "[]string");
        assert_eq!(
            names.validation,
            ["items <= 8", "rule `self.size() > 0`: \"not empty\"", "each item: matches `^[a-z]+$`"]
        );
    }

    #[test]
    fn descriptions_escape_angle_brackets_outside_code() {
        assert_eq!(one_line("a <name>\n  b `<x>`"), "a &lt;name&gt; b `<x>`");
    }

    #[test]
    fn the_cli_reference_has_every_visible_command_and_no_env_values() {
        let text = cli_markdown();
        for sub in ["run", "crd", "report", "plan", "completion", "version"] {
            assert!(text.contains(&format!("## `sovereign-operator {sub}`")), "{sub}");
        }
        assert!(!text.contains("## `sovereign-operator docs`"));
        assert!(text.contains("--namespace") && text.contains("[env: SOVEREIGN_KUBECONFIG]"), "{text}");
    }
}
