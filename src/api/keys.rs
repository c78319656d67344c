//! Bottlerocket's dotted key names, as its API and `apiclient` use them (docs/compatibility.md):
//! parsing a name, naming the leaves of a JSON tree, selecting a tree's part by a name prefix,
//! and the `key=value` pairs of `PATCH /settings/keypair` with their type inference.
//!
//! A name is segments joined by dots: `settings.kernel.sysctl."vm.max_map_count"`. A bare
//! segment is one or more of `A-Z a-z 0-9 _ / -`; a segment holding anything else (a dot, most
//! often: sysctl names, label keys) is written in double quotes, which are not part of it.
//! Names are at most [`MAX_KEY_LEN`] bytes.
//!
//! Prefixes match names as text, as Bottlerocket's do: `settings.mot` selects
//! `settings.motd`, and `settings.kernel.sysctl.vm` does not select
//! `settings.kernel.sysctl."vm.swappiness"` (its name has a quote there).

use serde_json::{Map, Value};

/// The longest key name accepted (Bottlerocket's limit).
pub const MAX_KEY_LEN: usize = 255;

fn bare_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '/' | '-')
}

/// The segments of the dotted name `key`, quotes removed.
pub fn parse(key: &str) -> Result<Vec<String>, String> {
    let bad = |why: &str| Err(format!("'{key}' is not a valid key name: {why}"));
    if key.is_empty() {
        return bad("it is empty");
    }
    if key.len() > MAX_KEY_LEN {
        return bad(&format!("it is longer than {MAX_KEY_LEN} bytes"));
    }
    let mut segments = Vec::new();
    let mut rest = key;
    loop {
        let segment;
        if let Some(quoted) = rest.strip_prefix('"') {
            let Some(end) = quoted.find('"') else {
                return bad("a quote is not closed");
            };
            segment = &quoted[..end];
            rest = &quoted[end + 1..];
            if segment.is_empty() {
                return bad("a quoted segment is empty");
            }
        } else {
            let end = rest.find('.').unwrap_or(rest.len());
            segment = &rest[..end];
            rest = &rest[end..];
            if segment.is_empty() {
                return bad("a segment is empty (two dots in a row, or a leading dot)");
            }
            if let Some(c) = segment.chars().find(|c| !bare_char(*c)) {
                return bad(&format!("'{c}' needs the segment in double quotes"));
            }
        }
        segments.push(segment.to_string());
        match rest.strip_prefix('.') {
            None if rest.is_empty() => return Ok(segments),
            None => return bad("a quoted segment must be followed by a dot or the end"),
            Some("") => return bad("it ends with a dot"),
            Some(r) => rest = r,
        }
    }
}

/// The name of `segments`, quoting those that need it.
pub fn name<S: AsRef<str>>(segments: &[S]) -> String {
    let quoted: Vec<String> = segments
        .iter()
        .map(|s| {
            let s = s.as_ref();
            if !s.is_empty() && s.chars().all(bare_char) {
                s.to_string()
            } else {
                format!("\"{s}\"")
            }
        })
        .collect();
    quoted.join(".")
}

/// Append `segment` to the name `base`.
fn child(base: &str, segment: &str) -> String {
    let n = name(&[segment]);
    if base.is_empty() {
        n
    } else {
        format!("{base}.{n}")
    }
}

/// The names of the leaves (values that are not objects) of `v`, which is named `base`. An
/// array is one leaf, as a list is one setting.
pub fn leaves(base: &str, v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &str, v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => m.iter().for_each(|(k, v)| walk(&child(base, k), v, out)),
            _ => out.push(base.to_string()),
        }
    }
    walk(base, v, &mut out);
    out
}

/// The part of `v` (named `base`) whose leaves' names start with `prefix`; None when no leaf
/// does.
pub fn filter(base: &str, v: &Value, prefix: &str) -> Option<Value> {
    match v {
        Value::Object(m) => {
            let kept: Map<String, Value> = m
                .iter()
                .filter_map(|(k, v)| filter(&child(base, k), v, prefix).map(|v| (k.clone(), v)))
                .collect();
            (!kept.is_empty()).then_some(Value::Object(kept))
        }
        _ => base.starts_with(prefix).then(|| v.clone()),
    }
}

/// `value` wrapped in objects along `path`.
pub fn wrap<S: AsRef<str>>(path: &[S], value: Value) -> Value {
    path.iter().rev().fold(value, |inner, p| {
        let mut m = Map::new();
        m.insert(p.as_ref().to_string(), inner);
        Value::Object(m)
    })
}

/// The part of `v` at `segments`, wrapped back into its parents. Where a map's own keys hold
/// dots, consecutive segments are tried joined as well, so `kernel.sysctl.vm.swappiness` finds
/// the sysctl `vm.swappiness` as `kernel.sysctl."vm.swappiness"` does.
pub fn lookup(v: &Value, segments: &[String]) -> Option<Value> {
    if segments.is_empty() {
        return Some(v.clone());
    }
    let obj = v.as_object()?;
    (1..=segments.len()).find_map(|n| {
        let key = segments[..n].join(".");
        let inner = lookup(obj.get(&key)?, &segments[n..])?;
        Some(wrap(&[key], inner))
    })
}

/// The JSON value Bottlerocket infers from the text of a `key=value` pair: `true`/`false` are
/// booleans, a JSON integer that fits an unsigned 64-bit number is one, any other JSON number
/// is a float (so `-1` is `-1.0`), and everything else is the text itself. The model then
/// takes the value or refuses its type: `motd=42` and `kernel.sysctl."vm.x"=1` are refused,
/// and `set --json` gives exact types.
pub fn infer(text: &str) -> Value {
    if let Ok(b) = serde_json::from_str::<bool>(text) {
        return Value::Bool(b);
    }
    if let Ok(n) = serde_json::from_str::<u64>(text) {
        return Value::from(n);
    }
    if let Ok(f) = serde_json::from_str::<f64>(text) {
        if let Some(n) = serde_json::Number::from_f64(f) {
            return Value::Number(n);
        }
    }
    Value::String(text.to_string())
}

/// The settings patch of Bottlerocket's keypair body, `["motd=hi", "kernel.sysctl.\"a.b\"=1"]`:
/// each entry split at its first `=`, the key parsed (its `settings.` optional), the value's
/// type inferred ([`infer`]).
pub fn pairs_to_patch(pairs: &[Value]) -> Result<Value, String> {
    let mut patch = Value::Object(Map::new());
    for p in pairs {
        let Some(text) = p.as_str() else {
            return Err(format!("request_payload entries must be \"key=value\" strings, not {p}"));
        };
        let Some((key, value)) = text.split_once('=') else {
            return Err(format!("'{text}' is not key=value"));
        };
        let mut segments = parse(key)?;
        if segments.first().map(String::as_str) == Some("settings") {
            segments.remove(0);
        }
        if segments.is_empty() {
            return Err(format!("'{key}' names no setting"));
        }
        crate::settings::store::merge(&mut patch, &wrap(&segments, infer(value)));
    }
    Ok(patch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_and_names_keys() {
        let ok: &[(&str, &[&str])] = &[
            ("motd", &["motd"]),
            (
                "settings.kernel.sysctl.\"vm.max_map_count\"",
                &["settings", "kernel", "sysctl", "vm.max_map_count"],
            ),
            (
                "kubernetes.node-labels.\"kubernetes.io/role\"",
                &["kubernetes", "node-labels", "kubernetes.io/role"],
            ),
            ("a.\"b c\".d", &["a", "b c", "d"]),
            ("host-containers.admin_1/x", &["host-containers", "admin_1/x"]),
        ];
        for (key, want) in ok {
            let got = parse(key).unwrap_or_else(|e| panic!("{key}: {e}"));
            assert_eq!(&got, want, "{key}");
            assert_eq!(name(&got), *key, "names round-trip");
        }
        let bad = [
            ("", "empty"),
            ("a..b", "empty"),
            (".a", "empty"),
            ("a.", "ends with a dot"),
            ("a.\"b", "not closed"),
            ("a.\"\"", "quoted segment is empty"),
            ("a.\"b\"c", "followed by a dot"),
            ("a b", "' '"),
            ("kernel.sysctl.vm:x", "':'"),
        ];
        for (key, why) in bad {
            let e = parse(key).unwrap_err();
            assert!(e.contains(why), "{key}: {e}");
        }
        assert!(parse(&"a".repeat(256)).unwrap_err().contains("255"));
        assert!(parse(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn infers_types_as_bottlerocket_does() {
        let cases = [
            ("true", json!(true)),
            ("false", json!(false)),
            ("42", json!(42)),
            (" 42 ", json!(42)),
            ("18446744073709551615", json!(18446744073709551615u64)),
            ("-1", json!(-1.0)),
            ("1e3", json!(1000.0)),
            ("1.5", json!(1.5)),
            ("007", json!("007")),
            ("True", json!("True")),
            ("\"quoted\"", json!("\"quoted\"")),
            ("hello world", json!("hello world")),
            ("", json!("")),
            ("NaN", json!("NaN")),
        ];
        for (text, want) in cases {
            assert_eq!(infer(text), want, "{text:?}");
        }
    }

    #[test]
    fn keypairs_become_a_patch() {
        let pairs = json!([
            "motd=a=b",
            "settings.network.hostname=h",
            "kernel.sysctl.\"vm.max_map_count\"=262144",
            "host-containers.admin.enabled=true"
        ]);
        assert_eq!(
            pairs_to_patch(pairs.as_array().unwrap()).unwrap(),
            json!({"motd": "a=b", "network": {"hostname": "h"}, "kernel": {"sysctl": {"vm.max_map_count": 262144}},
                   "host-containers": {"admin": {"enabled": true}}})
        );
        for (bad, why) in [
            (json!(["motd"]), "not key=value"),
            (json!(["settings=1"]), "names no setting"),
            (json!(["a..b=1"]), "not a valid key"),
            (json!([1]), "strings"),
        ] {
            let e = pairs_to_patch(bad.as_array().unwrap()).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn selects_by_prefix_and_by_key() {
        let s = json!({"motd": "m", "kernel": {"sysctl": {"vm.swappiness": "1", "net.ipv4.ip_forward": "1"}},
                       "ntp": {"time-servers": ["a", "b"]}});
        assert_eq!(
            leaves("settings", &s),
            [
                "settings.kernel.sysctl.\"net.ipv4.ip_forward\"",
                "settings.kernel.sysctl.\"vm.swappiness\"",
                "settings.motd",
                "settings.ntp.time-servers"
            ]
        );
        let cases = [
            ("settings", Some(s.clone())),
            ("settings.mot", Some(json!({"motd": "m"}))),
            ("settings.kernel.sysctl.\"vm", Some(json!({"kernel": {"sysctl": {"vm.swappiness": "1"}}}))),
            ("settings.kernel.sysctl.vm", None),
            ("settings.ntp.time-servers", Some(json!({"ntp": {"time-servers": ["a", "b"]}}))),
            ("settings.nothing", None),
        ];
        for (prefix, want) in cases {
            assert_eq!(filter("settings", &s, prefix), want, "{prefix}");
        }
        let find = |k: &str| lookup(&s, &parse(k).unwrap());
        assert_eq!(find("motd"), Some(json!({"motd": "m"})));
        let swappiness = Some(json!({"kernel": {"sysctl": {"vm.swappiness": "1"}}}));
        assert_eq!(find("kernel.sysctl.\"vm.swappiness\""), swappiness);
        assert_eq!(find("kernel.sysctl.vm.swappiness"), swappiness);
        assert_eq!(find("kernel.sysctl.vm"), None);
        assert_eq!(find("kernel"), Some(json!({"kernel": s["kernel"]})));
    }
}
