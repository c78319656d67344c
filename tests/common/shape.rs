//! Compare an answer of Berth's API with an example of Bottlerocket's documented shape
//! (tests/data/bottlerocket/). Shared by the host tests (tests/compat.rs) and the updater's
//! unit tests (src/update/tests.rs, through `#[path]`).
//!
//! The rules: an object in the example must be an object in the answer holding each of its
//! keys (the answer may hold more: Berth's own fields); an array must be an array whose every
//! element has the shape of the example's first; a string, a boolean or a number must be one
//! too (an unsigned integer must be one); `null` in the example allows anything, even no key
//! at all. A path in
//! `skip` (dotted keys; `*` stands for any one key, `[]` for the elements of an array) is not
//! compared: the caller says there why Berth differs.

use serde_json::Value;

/// The paths at which `got` does not have the shape of `want`, each with what is wrong; empty
/// when it has.
pub fn mismatches(want: &Value, got: &Value, skip: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    walk("", want, got, skip, &mut out);
    out
}

fn skipped(path: &str, skip: &[&str]) -> bool {
    skip.iter().any(|pattern| {
        let p: Vec<&str> = pattern.split('.').collect();
        let q: Vec<&str> = path.split('.').collect();
        p.len() == q.len() && p.iter().zip(&q).all(|(a, b)| *a == "*" || a == b)
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_u64() => "an unsigned integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn walk(path: &str, want: &Value, got: &Value, skip: &[&str], out: &mut Vec<String>) {
    if skipped(path, skip) {
        return;
    }
    let at = |k: &str| if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
    match (want, got) {
        (Value::Null, _) => {}
        (Value::Object(w), Value::Object(g)) => {
            for (k, wv) in w {
                match g.get(k) {
                    Some(gv) => walk(&at(k), wv, gv, skip, out),
                    None if wv.is_null() || skipped(&at(k), skip) => {}
                    None => out.push(format!("{}: missing", at(k))),
                }
            }
        }
        (Value::Array(w), Value::Array(g)) => {
            if let Some(first) = w.first() {
                for gv in g {
                    walk(&at("[]"), first, gv, skip, out);
                }
            }
        }
        (Value::Number(w), Value::Number(g)) if !w.is_u64() || g.is_u64() => {}
        (Value::String(_), Value::String(_)) | (Value::Bool(_), Value::Bool(_)) => {}
        _ => out.push(format!(
            "{}: {} where Bottlerocket has {} ({got})",
            if path.is_empty() { "(top)" } else { path },
            kind(got),
            kind(want)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shapes_compare_as_documented() {
        let want = json!({"a": "s", "b": [{"c": 1}], "d": null, "e": {"f": true}});
        assert!(mismatches(&want, &json!({"a": "x", "b": [], "d": 5, "e": {"f": false}, "extra": 1}), &[])
            .is_empty());
        let got = json!({"a": 1, "b": [{"c": -1}, {}], "e": {"f": "no"}});
        let m = mismatches(&want, &got, &[]);
        assert_eq!(
            m,
            [
                "a: an unsigned integer where Bottlerocket has a string (1)",
                "b.[].c: a number where Bottlerocket has an unsigned integer (-1)",
                "b.[].c: missing",
                "e.f: a string where Bottlerocket has a boolean (\"no\")",
            ],
            "{m:?}"
        );
        assert_eq!(mismatches(&want, &got, &["a", "b.[].c", "e.*"]), Vec::<String>::new());
    }
}
