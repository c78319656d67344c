//! Turning user-data bytes into the settings object.
//!
//! The bytes are gzip-compressed when they start with the gzip magic `1f 8b` (whatever the file
//! was called), then must be UTF-8 TOML whose only top-level key is `settings`. The table under
//! `settings` is converted to JSON for the settings transaction: TOML datetimes become their
//! RFC 3339 strings; NaN and infinite floats, which JSON cannot hold, are refused.
//!
//! Limits: the input and the decompressed text are each capped at [`MAX_BYTES`] (1 MiB), so a
//! gzip bomb costs at most that much memory. Nesting depth is bounded by the TOML parser's own
//! recursion limit.

use std::fmt;
use std::io::Read;

use serde_json::{Map, Number, Value};

use super::MAX_BYTES;

/// What is wrong with a piece of user data.
#[derive(Debug)]
pub enum DecodeError {
    /// The (possibly compressed) input is larger than the cap.
    TooLarge { len: usize, limit: usize },
    /// The gzip stream is corrupt or truncated.
    Gzip(std::io::Error),
    /// The gzip stream expands beyond the cap.
    DecompressedTooLarge { limit: usize },
    /// The text is not UTF-8; `valid_up_to` is the byte offset of the first bad byte.
    Utf8 { valid_up_to: usize },
    /// TOML syntax or structure error, with its 1-based position when the parser gives one.
    Toml { line: Option<usize>, column: Option<usize>, message: String },
    /// Top-level keys other than `settings`.
    UnexpectedKeys(Vec<String>),
    /// `settings` is not a table.
    SettingsNotTable { found: &'static str },
    /// A float JSON cannot represent (nan, inf), at this dotted key.
    NonFiniteFloat { key: String },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooLarge { len, limit } => {
                write!(f, "{len} bytes is more than the {limit}-byte limit")
            }
            DecodeError::Gzip(e) => write!(f, "starts like gzip but does not decompress: {e}"),
            DecodeError::DecompressedTooLarge { limit } => {
                write!(f, "decompresses to more than the {limit}-byte limit")
            }
            DecodeError::Utf8 { valid_up_to } => {
                write!(f, "not UTF-8: invalid byte at offset {valid_up_to}")
            }
            DecodeError::Toml { line: Some(line), column: Some(column), message } => {
                write!(f, "TOML error at line {line}, column {column}: {message}")
            }
            DecodeError::Toml { message, .. } => write!(f, "TOML error: {message}"),
            DecodeError::UnexpectedKeys(keys) => write!(
                f,
                "unexpected top-level key(s) {}: everything must be under [settings]",
                keys.join(", ")
            ),
            DecodeError::SettingsNotTable { found } => {
                write!(f, "`settings` must be a table, found {found}")
            }
            DecodeError::NonFiniteFloat { key } => {
                write!(f, "{key}: nan and inf cannot be represented in settings; use a finite number")
            }
        }
    }
}

impl std::error::Error for DecodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DecodeError::Gzip(e) => Some(e),
            _ => None,
        }
    }
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Decode user data into the JSON object found under `[settings]`.
///
/// An empty document (or one with no `settings`) gives an empty object.
pub fn decode(bytes: &[u8]) -> Result<Value, DecodeError> {
    if bytes.len() > MAX_BYTES {
        return Err(DecodeError::TooLarge { len: bytes.len(), limit: MAX_BYTES });
    }
    let inflated;
    let bytes = if bytes.starts_with(&GZIP_MAGIC) {
        inflated = gunzip(bytes)?;
        &inflated[..]
    } else {
        bytes
    };
    let text = std::str::from_utf8(bytes).map_err(|e| DecodeError::Utf8 { valid_up_to: e.valid_up_to() })?;
    let mut doc: toml::Table = toml::from_str(text).map_err(|e| toml_error(text, &e))?;

    let mut others: Vec<String> = doc.keys().filter(|k| *k != "settings").cloned().collect();
    if !others.is_empty() {
        others.sort();
        return Err(DecodeError::UnexpectedKeys(others));
    }
    match doc.remove("settings") {
        None => Ok(Value::Object(Map::new())),
        Some(toml::Value::Table(t)) => table_to_json(t, "settings"),
        Some(other) => Err(DecodeError::SettingsNotTable { found: other.type_str() }),
    }
}

/// Inflate all gzip members, reading at most one byte past the cap to detect overflow.
fn gunzip(bytes: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .take(MAX_BYTES as u64 + 1)
        .read_to_end(&mut out)
        .map_err(DecodeError::Gzip)?;
    if out.len() > MAX_BYTES {
        return Err(DecodeError::DecompressedTooLarge { limit: MAX_BYTES });
    }
    Ok(out)
}

fn toml_error(text: &str, e: &toml::de::Error) -> DecodeError {
    let (line, column) = match e.span().map(|s| position(text, s.start)) {
        Some((l, c)) => (Some(l), Some(c)),
        None => (None, None),
    };
    DecodeError::Toml { line, column, message: e.message().trim().to_string() }
}

/// 1-based line and column (in characters) of byte offset `at`, clamped to the text.
fn position(text: &str, at: usize) -> (usize, usize) {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

fn table_to_json(table: toml::Table, path: &str) -> Result<Value, DecodeError> {
    let mut map = Map::with_capacity(table.len());
    for (k, v) in table {
        let child = format!("{path}.{k}");
        let v = to_json(v, &child)?;
        map.insert(k, v);
    }
    Ok(Value::Object(map))
}

fn to_json(value: toml::Value, path: &str) -> Result<Value, DecodeError> {
    Ok(match value {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::Number(i.into()),
        toml::Value::Float(x) => match Number::from_f64(x) {
            Some(n) => Value::Number(n),
            None => return Err(DecodeError::NonFiniteFloat { key: path.to_string() }),
        },
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| to_json(v, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        toml::Value::Table(t) => table_to_json(t, path)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(data).expect("gzip into memory");
        enc.finish().expect("gzip into memory")
    }

    const SAMPLE: &str = r#"
[settings]
motd = "hello"
[settings.network]
hostname = "node1"
[settings.kernel.sysctl]
"net.ipv4.ip_forward" = "1"
"#;

    fn sample_json() -> Value {
        json!({
            "motd": "hello",
            "network": {"hostname": "node1"},
            "kernel": {"sysctl": {"net.ipv4.ip_forward": "1"}},
        })
    }

    #[test]
    fn decodes_valid_documents() {
        let mut two_members = gzip(b"[settings]\na = 1\n");
        two_members.extend(gzip(b"b = 2\n"));
        let cases: Vec<(&str, Vec<u8>, Value)> = vec![
            ("plain", SAMPLE.as_bytes().to_vec(), sample_json()),
            ("gzip", gzip(SAMPLE.as_bytes()), sample_json()),
            ("empty", Vec::new(), json!({})),
            ("gzip of empty", gzip(b""), json!({})),
            ("comments only", b"# nothing yet\n\n".to_vec(), json!({})),
            ("empty settings", b"[settings]\n".to_vec(), json!({})),
            ("byte order mark", b"\xef\xbb\xbf[settings]\nx = 1\n".to_vec(), json!({"x": 1})),
            ("gzip members concatenated", two_members, json!({"a": 1, "b": 2})),
            (
                "dotted keys and inline tables",
                b"settings.a.b = true\nsettings.c = { d = [1, 2.5, \"x\"] }\n".to_vec(),
                json!({"a": {"b": true}, "c": {"d": [1, 2.5, "x"]}}),
            ),
            (
                "datetime becomes a string",
                b"[settings]\nwhen = 1979-05-27T07:32:00Z\nday = 1979-05-27\n".to_vec(),
                json!({"when": "1979-05-27T07:32:00Z", "day": "1979-05-27"}),
            ),
        ];
        for (name, input, want) in cases {
            match decode(&input) {
                Ok(got) => assert_eq!(got, want, "{name}"),
                Err(e) => panic!("{name}: unexpected error: {e}"),
            }
        }
    }

    #[test]
    fn refuses_bad_documents_saying_why() {
        let bomb = gzip(&vec![b' '; MAX_BYTES + 1]);
        assert!(bomb.len() < 64 * 1024, "the bomb should be small compressed");
        let mut truncated = gzip(SAMPLE.as_bytes());
        truncated.truncate(truncated.len() / 2);
        // (name, input, text the message must contain)
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "other top-level keys",
                b"zeta = 1\n[settings]\na = 1\n[extra]\n".to_vec(),
                "unexpected top-level key(s) extra, zeta",
            ),
            ("invalid TOML", b"[settings]\nmotd = \"hi\"\nhostname = = 3\n".to_vec(), "line 3, column 12"),
            ("duplicate key", b"[settings]\na = 1\na = 2\n".to_vec(), "line 3"),
            ("invalid UTF-8", b"[settings]\nmotd = \"\xff\"\n".to_vec(), "offset 19"),
            ("gzip bomb", bomb, "decompresses to more than the 1048576-byte limit"),
            ("truncated gzip", truncated, "does not decompress"),
            ("input too large", vec![b'#'; MAX_BYTES + 1], "more than the 1048576-byte"),
            ("settings is a string", b"settings = \"x\"\n".to_vec(), "found string"),
            ("settings is an array", b"settings = [1]\n".to_vec(), "found array"),
            ("nan", b"[settings.k]\nx = nan\n".to_vec(), "settings.k.x: nan"),
            ("inf in array", b"[settings]\nv = [1.0, inf]\n".to_vec(), "settings.v[1]"),
        ];
        for (name, input, want) in cases {
            match decode(&input) {
                Ok(v) => panic!("{name}: decoded to {v} but should fail"),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains(want), "{name}: {msg:?} lacks {want:?}");
                }
            }
        }
    }

    #[test]
    fn positions_are_one_based_and_clamped() {
        let cases = [
            ("", 0, (1, 1)),
            ("abc", 2, (1, 3)),
            ("a\nbc", 2, (2, 1)),
            ("a\nbc", 4, (2, 3)),
            ("a\nbc", 99, (2, 3)),
            ("é\né", 4, (2, 1)),
            ("é\né", 5, (2, 2)),
            ("é", 1, (1, 1)),
        ];
        for (text, at, want) in cases {
            assert_eq!(position(text, at), want, "{text:?} @ {at}");
        }
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn decode_never_panics_on_gzip(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let mut input = GZIP_MAGIC.to_vec();
            input.extend(bytes);
            let _ = decode(&input);
        }

        #[test]
        fn decode_never_panics_on_near_toml(text in "(\\[settings[.a-z\"]*\\]|[a-z\"=.\\[\\]{}, 0-9\n#]){0,40}") {
            let _ = decode(text.as_bytes());
        }
    }
}
