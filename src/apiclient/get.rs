//! `apiclient get [PREFIX... | /URI]`, as Bottlerocket's: for each prefix `GET /?prefix=...`,
//! the answers merged (objects key by key, a later value winning over an earlier one), printed
//! as pretty JSON. No argument means the prefixes `os.` and `settings.`; a prefix nothing
//! matches adds nothing (`{}`). One argument starting with `/` is a route of its own to GET.

use serde_json::Value;

use super::{usage, Client, Error, Result};

/// The prefixes of a bare `apiclient get`.
const DEFAULT_PREFIXES: &[&str] = &["os.", "settings."];

pub fn run(client: &Client, args: &[String]) -> Result<()> {
    if let Some(opt) = args.iter().find(|a| a.starts_with('-')) {
        return usage(format!("get: unexpected option '{opt}'"));
    }
    let (uris, prefixes): (Vec<&String>, Vec<&String>) = args.iter().partition(|a| a.starts_with('/'));
    let value = match (uris.as_slice(), prefixes.is_empty()) {
        ([uri], true) => fetch(client, uri)?,
        ([], _) => {
            let prefixes: Vec<&str> = if prefixes.is_empty() {
                DEFAULT_PREFIXES.to_vec()
            } else {
                prefixes.iter().map(|p| p.as_str()).collect()
            };
            let mut merged = Value::Object(Default::default());
            for p in prefixes {
                merge(&mut merged, fetch(client, &format!("/?prefix={}", crate::http::encode_component(p)))?);
            }
            merged
        }
        _ => return usage("get takes prefixes or one /URI, not both or several URIs"),
    };
    println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
    Ok(())
}

fn fetch(client: &Client, uri: &str) -> Result<Value> {
    let body =
        client.call("GET", uri, None).map_err(|e| Error::Failed(format!("Failed to get {uri}: {e}")))?;
    serde_json::from_str(&body).map_err(|e| {
        Error::Failed(format!("the answer to GET {uri} is not JSON ({e}): '{}'", body.trim_end()))
    })
}

/// Merge `b` into `a`: objects key by key, anything else replaced by `b`'s.
fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(old) => merge(old, v),
                    None => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (a, b) => *a = b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers_merge_deeply_and_later_wins() {
        let mut a = json!({"settings": {"motd": "a", "network": {"hostname": "h"}}, "os": {"arch": "x"}});
        merge(&mut a, json!({"settings": {"network": {"hostname": "g"}, "ntp": {"time-servers": ["t"]}}}));
        merge(&mut a, json!({"settings": {"ntp": {"time-servers": ["u"]}}}));
        assert_eq!(
            a,
            json!({"settings": {"motd": "a", "network": {"hostname": "g"}, "ntp": {"time-servers": ["u"]}},
                   "os": {"arch": "x"}})
        );
    }
}
