//! The settings an EC2 instance gets from IMDS when the user did not set them (what
//! Bottlerocket's `pluto`, `netdog` and `shibaken` generate on AWS):
//!
//! | setting | from IMDS |
//! |---|---|
//! | `settings.network.hostname` | `meta-data/local-hostname` (its first name; the first label if longer than the kernel's 64 bytes) |
//! | `settings.kubernetes.node-ip` | `meta-data/local-ipv4` |
//! | `settings.kubernetes.provider-id` | `aws:///ZONE/INSTANCE-ID` from the instance identity document |
//! | `settings.aws.region` | the instance identity document's `region` |
//! | `settings.host-containers.admin.user-data` | base64 of `{"ssh":{"authorized-keys":[...]}}`, the instance's OpenSSH public keys (`meta-data/public-keys/N/openssh-key`) |
//!
//! A setting is generated only when it is unset ([`Wanted::unset_in`]); once generated it is an
//! ordinary setting, so later boots do not ask again, and a user's own value always wins.
//!
//! Everything IMDS says is checked before it becomes a setting: a host name must be one, an
//! address an IPv4 unicast address, the identity document JSON with a well-formed region, zone
//! and instance id, each key one line of a known OpenSSH key type whose base64 blob names that
//! type. What fails is a [`Problem`] naming the setting, the request and what was wrong (the
//! answer quoted, escaped and cut to 64 characters, so a hostile answer cannot write to the
//! console); the other settings are generated all the same. A bad key is left out, the good ones
//! kept.
//!
//! Bounds: each answer is capped by the IMDS client ([`super::imds::MAX_METADATA_BYTES`]); at
//! most [`MAX_KEYS`] keys of at most [`MAX_KEY_BYTES`] each are used; the whole generation runs in
//! one IMDS session, bounded in time by the client.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::imds::{ImdsError, ImdsStep, Session};
use crate::settings::model::{self, Settings};

/// The most SSH keys made available to the admin container.
pub const MAX_KEYS: usize = 10;
/// The longest OpenSSH public key line accepted (an 8192-bit RSA key is about 1.4 KB).
pub const MAX_KEY_BYTES: usize = 4096;
/// The longest host name the kernel takes (HOST_NAME_MAX).
pub const MAX_KERNEL_HOSTNAME: usize = 64;

/// OpenSSH public key types accepted from IMDS.
const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Answers to metadata requests (an IMDS [`Session`]; a table in tests).
pub trait Metadata {
    /// `Some` with the answer, `None` when IMDS has no such item (404).
    fn get(&self, step: ImdsStep) -> Result<Option<Vec<u8>>, ImdsError>;
}

impl Metadata for Session<'_> {
    fn get(&self, step: ImdsStep) -> Result<Option<Vec<u8>>, ImdsError> {
        Session::get(self, step)
    }
}

/// Which generated settings are unset, so worth asking IMDS for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wanted {
    pub hostname: bool,
    pub node_ip: bool,
    pub provider_id: bool,
    pub region: bool,
    pub admin_keys: bool,
}

impl Wanted {
    /// What `settings` leaves unset.
    pub fn unset_in(s: &Settings) -> Wanted {
        let k8s = s.kubernetes.as_ref();
        Wanted {
            hostname: s.network.as_ref().and_then(|n| n.hostname.as_ref()).is_none(),
            node_ip: k8s.and_then(|k| k.node_ip.as_ref()).is_none(),
            provider_id: k8s.and_then(|k| k.provider_id.as_ref()).is_none(),
            // settings.aws is the aws variant's alone (another variant on EC2 refuses it).
            region: crate::settings::model::aws_settings_allowed()
                && s.aws.as_ref().and_then(|a| a.region.as_ref()).is_none(),
            admin_keys: s
                .host_containers
                .as_ref()
                .and_then(|h| h.get("admin"))
                .and_then(|a| a.user_data.as_ref())
                .is_none(),
        }
    }

    pub fn any(&self) -> bool {
        self.hostname || self.node_ip || self.provider_id || self.region || self.admin_keys
    }
}

/// A setting that could not be generated, or a key that was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The dotted setting (`settings.kubernetes.node-ip`).
    pub key: &'static str,
    pub error: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.error)
    }
}

/// What [`generate`] found: a settings patch (empty when nothing was generated) and the problems.
#[derive(Debug, Default)]
pub struct Generated {
    pub patch: Value,
    pub problems: Vec<Problem>,
}

/// The instance identity document's fields that settings use.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    pub region: String,
    pub availability_zone: String,
    pub instance_id: String,
}

/// An answer as text for a message: escaped, at most 64 characters.
fn shown(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out: String = text.chars().take(64).flat_map(char::escape_debug).collect();
    if text.chars().count() > 64 {
        out.push_str("...");
    }
    format!("'{out}'")
}

/// A step's answer as one trimmed line of UTF-8 text.
fn text(step: ImdsStep, bytes: &[u8]) -> Result<String, String> {
    let t = std::str::from_utf8(bytes)
        .map_err(|_| format!("{step}: the answer {} is not UTF-8", shown(bytes)))?;
    Ok(t.trim().to_string())
}

/// `local-hostname`: its first name, which must be a valid host name; cut to its first label
/// when longer than the kernel takes.
pub fn parse_hostname(bytes: &[u8]) -> Result<String, String> {
    let step = ImdsStep::MetaData("local-hostname");
    let t = text(step, bytes)?;
    let name = t.split_whitespace().next().unwrap_or("").to_ascii_lowercase();
    if !model::valid_hostname(&name) {
        return Err(format!("{step}: the answer {} is not a host name", shown(bytes)));
    }
    if name.len() > MAX_KERNEL_HOSTNAME {
        return Ok(name.split('.').next().unwrap_or(&name).to_string());
    }
    Ok(name)
}

/// `local-ipv4`: an IPv4 unicast address.
pub fn parse_ipv4(bytes: &[u8]) -> Result<std::net::Ipv4Addr, String> {
    let step = ImdsStep::MetaData("local-ipv4");
    let t = text(step, bytes)?;
    match t.parse::<std::net::Ipv4Addr>() {
        Ok(a) if !(a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast()) => Ok(a),
        _ => Err(format!("{step}: the answer {} is not a unicast IPv4 address", shown(bytes))),
    }
}

/// An AWS region name: `us-west-2`, `us-gov-east-1`, `cn-north-1`.
pub fn valid_region(r: &str) -> bool {
    (4..=32).contains(&r.len())
        && r.starts_with(|c: char| c.is_ascii_lowercase())
        && r.ends_with(|c: char| c.is_ascii_digit())
        && !r.contains("--")
        && r.contains('-')
        && r.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// A zone of `region`: `us-west-2a`, `us-west-2-lax-1a`.
fn valid_zone(zone: &str, region: &str) -> bool {
    zone.strip_prefix(region).is_some_and(|rest| {
        (1..=32).contains(&rest.len())
            && rest.ends_with(|c: char| c.is_ascii_alphanumeric())
            && rest.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    })
}

/// `i-` and 8 or 17 lowercase hex digits.
fn valid_instance_id(id: &str) -> bool {
    id.strip_prefix("i-").is_some_and(|hex| {
        matches!(hex.len(), 8 | 17) && hex.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    })
}

/// The instance identity document: JSON with a valid region, a zone of that region and an
/// instance id.
pub fn parse_identity(bytes: &[u8]) -> Result<Identity, String> {
    let step = ImdsStep::Identity;
    let id: Identity = serde_json::from_slice(bytes)
        .map_err(|e| format!("{step}: not an identity document ({e}): {}", shown(bytes)))?;
    if !valid_region(&id.region) {
        return Err(format!("{step}: region {} is not a region name", shown(id.region.as_bytes())));
    }
    if !valid_zone(&id.availability_zone, &id.region) {
        return Err(format!(
            "{step}: availabilityZone {} is not a zone of {}",
            shown(id.availability_zone.as_bytes()),
            id.region
        ));
    }
    if !valid_instance_id(&id.instance_id) {
        return Err(format!("{step}: instanceId {} is not an instance id", shown(id.instance_id.as_bytes())));
    }
    Ok(id)
}

/// `public-keys/`: lines `N=name`; the indexes, in order, at most [`MAX_KEYS`] (more is an error
/// about the rest, returned beside them).
pub fn parse_key_list(bytes: &[u8]) -> (Vec<u16>, Option<String>) {
    let step = ImdsStep::MetaData("public-keys/");
    let t = match text(step, bytes) {
        Ok(t) => t,
        Err(e) => return (Vec::new(), Some(e)),
    };
    let mut found = Vec::new();
    for line in t.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let index = line.split_once('=').and_then(|(n, _)| n.parse::<u16>().ok());
        match index {
            Some(n) if !found.contains(&n) => found.push(n),
            Some(_) => {}
            None => {
                return (found, Some(format!("{step}: the line {} is not 'N=name'", shown(line.as_bytes()))))
            }
        }
        if found.len() > MAX_KEYS {
            found.truncate(MAX_KEYS);
            return (
                found,
                Some(format!("{step}: more than {MAX_KEYS} keys; the first {MAX_KEYS} are used")),
            );
        }
    }
    (found, None)
}

/// One OpenSSH public key line, `TYPE BASE64 [COMMENT]`, checked and with single spaces.
pub fn parse_openssh_key(n: u16, bytes: &[u8]) -> Result<String, String> {
    let step = ImdsStep::PublicKey(n);
    let bad = |why: &str| format!("{step}: {why}: {}", shown(bytes));
    if bytes.len() > MAX_KEY_BYTES {
        return Err(bad(&format!("longer than {MAX_KEY_BYTES} bytes")));
    }
    let t = text(step, bytes)?;
    if t.chars().any(char::is_control) {
        return Err(bad("not one line of text"));
    }
    let mut words = t.split_whitespace();
    let (Some(kind), Some(b64)) = (words.next(), words.next()) else {
        return Err(bad("not 'TYPE BASE64 [COMMENT]'"));
    };
    if !KEY_TYPES.contains(&kind) {
        return Err(bad(&format!(
            "key type '{}' is not one of {}",
            kind.escape_debug(),
            KEY_TYPES.join(", ")
        )));
    }
    let blob = crate::settings::kubelet::base64_decode(b64).ok_or_else(|| bad("the key is not base64"))?;
    // The blob starts with the key type as an SSH string: a big-endian u32 length, then it.
    let named = blob.get(..4).map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize);
    if named.and_then(|len| blob.get(4..4 + len)) != Some(kind.as_bytes()) {
        return Err(bad(&format!("the key's data is not a {kind} key")));
    }
    let comment: Vec<&str> = words.collect();
    Ok(if comment.is_empty() {
        format!("{kind} {b64}")
    } else {
        format!("{kind} {b64} {}", comment.join(" "))
    })
}

/// The admin container's user data for these keys (Bottlerocket's admin container reads
/// `ssh.authorized-keys`), base64-encoded as `settings.host-containers.NAME.user-data` is.
pub fn admin_user_data(keys: &[String]) -> String {
    use base64::Engine;
    let doc = json!({"ssh": {"authorized-keys": keys}});
    base64::engine::general_purpose::STANDARD.encode(doc.to_string())
}

/// Put `value` at the dotted `path` of `patch`.
fn put(patch: &mut Value, path: &[&str], value: Value) {
    let mut v = patch;
    for k in &path[..path.len() - 1] {
        v = v.as_object_mut().expect("patch levels are objects").entry(*k).or_insert_with(|| json!({}));
    }
    v.as_object_mut().expect("patch levels are objects").insert(path[path.len() - 1].to_string(), value);
}

/// Ask IMDS for what `want` names and build the settings patch; see the module docs.
pub fn generate(md: &dyn Metadata, want: Wanted) -> Generated {
    let mut out = Generated { patch: Value::Object(Map::new()), problems: Vec::new() };
    let mut problems: Vec<Problem> = Vec::new();
    let mut note = |key: &'static str, error: String| problems.push(Problem { key, error });

    // One answer: `Ok(Some)`, `Ok(None)` when IMDS has none (noted), an IMDS failure (noted).
    let ask =
        |key: &'static str, step: ImdsStep, note: &mut dyn FnMut(&'static str, String)| match md.get(step) {
            Ok(Some(b)) => Some(b),
            Ok(None) => {
                note(key, format!("{step}: IMDS has no such item (404)"));
                None
            }
            Err(e) => {
                note(key, e.to_string());
                None
            }
        };

    if want.hostname {
        let key = "settings.network.hostname";
        if let Some(b) = ask(key, ImdsStep::MetaData("local-hostname"), &mut note) {
            match parse_hostname(&b) {
                Ok(h) => put(&mut out.patch, &["network", "hostname"], json!(h)),
                Err(e) => note(key, e),
            }
        }
    }
    if want.node_ip {
        let key = "settings.kubernetes.node-ip";
        if let Some(b) = ask(key, ImdsStep::MetaData("local-ipv4"), &mut note) {
            match parse_ipv4(&b) {
                Ok(a) => put(&mut out.patch, &["kubernetes", "node-ip"], json!(a.to_string())),
                Err(e) => note(key, e),
            }
        }
    }
    if want.provider_id || want.region {
        let key = if want.provider_id { "settings.kubernetes.provider-id" } else { "settings.aws.region" };
        let identity = ask(key, ImdsStep::Identity, &mut note).and_then(|b| match parse_identity(&b) {
            Ok(id) => Some(id),
            Err(e) => {
                note(key, e);
                None
            }
        });
        if let Some(id) = identity {
            if want.provider_id {
                let pid = format!("aws:///{}/{}", id.availability_zone, id.instance_id);
                put(&mut out.patch, &["kubernetes", "provider-id"], json!(pid));
            }
            if want.region {
                put(&mut out.patch, &["aws", "region"], json!(id.region));
            }
        } else if want.provider_id && want.region {
            note("settings.aws.region", "see settings.kubernetes.provider-id".into());
        }
    }
    if want.admin_keys {
        let key = "settings.host-containers.admin.user-data";
        // No key pair is not a problem: the instance simply has no keys to offer.
        match md.get(ImdsStep::MetaData("public-keys/")) {
            Ok(None) => {}
            Err(e) => note(key, e.to_string()),
            Ok(Some(list)) => {
                let (indexes, list_problem) = parse_key_list(&list);
                if let Some(e) = list_problem {
                    note(key, e);
                }
                let mut keys = Vec::new();
                for n in indexes {
                    let step = ImdsStep::PublicKey(n);
                    if let Some(b) = ask(key, step, &mut note) {
                        match parse_openssh_key(n, &b) {
                            Ok(k) => keys.push(k),
                            Err(e) => note(key, format!("{e}; this key is left out")),
                        }
                    }
                }
                if !keys.is_empty() {
                    put(
                        &mut out.patch,
                        &["host-containers", "admin", "user-data"],
                        json!(admin_user_data(&keys)),
                    );
                }
            }
        }
    }
    out.problems = problems;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::net::SocketAddr;

    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOc+cLvqSBn1JzS7wyRwfmiy0L10Fq6GiuVduhhsLiin my-key";
    const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBECvgN9RGiDVvBj4XgVlfDNgwjTUUXmJWXjkMQ0JUlyBUYbFcIdH5ccD/1kEzsHkDqihr+DC+VU+lXkTqODPQZ4=";
    const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCiyEOhMq0VMO63Y3Cx8OksKx7SN/jg1fjqSvTjfLwlteyn70R8glsEPagRBrDweArnxkdB6kKF2rsKHIS002KBMPWZ9c4TUmxCEaD1I/l/gX/Pf5XFg1XqCOtbFA85hZjG//u6CXqulLOOyDUQkztpC47s45TzPEwClOgq/99VJJldPdZyE8R+zTCtw6yLGPBKBnh/RJj7Q/1ZKtUj2A2rrUxr9qA4gFQQa/ZlYD7iYs1zEc5IXjUHXeNoH+zBTIPlGq9wXiUflF0ImnvwzY27gKAVbUpCbaGg0IjqFQkC05SdkGzFYWILGro84IG5aIMHH3a+eR5FZDMlBmg+DSzh";
    const IDENTITY: &str = r#"{"accountId":"123456789012","architecture":"x86_64","availabilityZone":"us-west-2b",
        "imageId":"ami-0123","instanceId":"i-0123456789abcdef0","instanceType":"m7i.large",
        "pendingTime":"2026-11-30T10:00:00Z","privateIp":"10.0.1.23","region":"us-west-2","version":"2017-09-30"}"#;

    #[test]
    fn host_names() {
        let long = format!("ip-10-0-1-23.{}.compute.internal", "x".repeat(40));
        let cases: [(&[u8], Result<&str, &str>); 7] = [
            (b"ip-10-0-1-23.us-west-2.compute.internal\n", Ok("ip-10-0-1-23.us-west-2.compute.internal")),
            (b"IP-10-0-1-23.EC2.INTERNAL", Ok("ip-10-0-1-23.ec2.internal")),
            (b"ip-10-0-1-23.example.com ip-10-0-1-23.example.org", Ok("ip-10-0-1-23.example.com")),
            (long.as_bytes(), Ok("ip-10-0-1-23")),
            (b"", Err("is not a host name")),
            (b"evil;rm -rf /", Err("'evil;rm -rf /' is not a host name")),
            (b"\xff\xfe", Err("is not UTF-8")),
        ];
        for (answer, want) in cases {
            let got = parse_hostname(answer);
            match (got, want) {
                (Ok(h), Ok(w)) => assert_eq!(h, w),
                (Err(e), Err(w)) => {
                    assert!(e.contains(w) && e.contains("GET /latest/meta-data/local-hostname"), "{e}")
                }
                (got, want) => panic!("{answer:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_ipv4(b"10.0.1.23\n").unwrap().to_string(), "10.0.1.23");
        assert_eq!(parse_ipv4(b"169.254.2.15").unwrap().to_string(), "169.254.2.15");
        for bad in
            [&b"0.0.0.0"[..], b"127.0.0.1", b"255.255.255.255", b"224.0.0.1", b"10.0.1", b"fd00::1", b"x"]
        {
            let e = parse_ipv4(bad).unwrap_err();
            assert!(e.contains("not a unicast IPv4 address"), "{e}");
        }
    }

    #[test]
    fn identity_documents() {
        let id = parse_identity(IDENTITY.as_bytes()).unwrap();
        assert_eq!(
            (id.region.as_str(), id.availability_zone.as_str(), id.instance_id.as_str()),
            ("us-west-2", "us-west-2b", "i-0123456789abcdef0")
        );
        let with = |k: &str, v: &str| {
            let mut doc: serde_json::Value = serde_json::from_str(IDENTITY).unwrap();
            doc[k] = json!(v);
            doc.to_string()
        };
        let cases = [
            ("not JSON".to_string(), "not an identity document"),
            ("[]".to_string(), "not an identity document"),
            (r#"{"region":"us-west-2"}"#.to_string(), "missing field"),
            (with("region", "US-WEST-2"), "region 'US-WEST-2' is not a region name"),
            (with("region", "us-west-2\n"), "is not a region name"),
            (with("availabilityZone", "eu-north-1a"), "is not a zone of us-west-2"),
            (with("availabilityZone", "us-west-2"), "is not a zone of us-west-2"),
            (with("availabilityZone", "us-west-2a/../x"), "is not a zone"),
            (with("instanceId", "i-0123"), "is not an instance id"),
            (with("instanceId", "i-0123456789abcdefg"), "is not an instance id"),
        ];
        for (doc, want) in cases {
            let e = parse_identity(doc.as_bytes()).unwrap_err();
            assert!(e.contains(want), "{doc}: {e}");
            assert!(e.starts_with("GET /latest/dynamic/instance-identity/document: "), "{e}");
        }
        for zone in ["us-west-2-lax-1a", "us-east-1-wl1-bos-wlz-1"] {
            let region = if zone.starts_with("us-west") { "us-west-2" } else { "us-east-1" };
            let doc = json!({"region": region, "availabilityZone": zone, "instanceId": "i-01234567"});
            assert!(parse_identity(doc.to_string().as_bytes()).is_ok(), "{zone}");
        }
        for (r, ok) in [
            ("us-gov-west-1", true),
            ("cn-north-1", true),
            ("us-west", false),
            ("-us-1", false),
            ("us--1", false),
        ] {
            assert_eq!(valid_region(r), ok, "{r}");
        }
    }

    #[test]
    fn openssh_keys() {
        assert_eq!(parse_openssh_key(0, format!("{ED25519}\n").as_bytes()).unwrap(), ED25519);
        assert_eq!(parse_openssh_key(1, format!("{ECDSA}  ").as_bytes()).unwrap(), ECDSA);
        assert_eq!(parse_openssh_key(2, RSA.as_bytes()).unwrap(), RSA);
        let (kind, b64) = ED25519.split_once(' ').map(|(k, r)| (k, r.split(' ').next().unwrap())).unwrap();
        let cases = [
            (format!("{ED25519}\nssh-ed25519 AAAA injected"), "not one line of text"),
            (format!("{ED25519}\r\nX: 1"), "not one line of text"),
            ("ssh-ed25519".to_string(), "not 'TYPE BASE64 [COMMENT]'"),
            (format!("ssh-dss {b64}"), "key type 'ssh-dss' is not one of"),
            (format!("{kind} not!base64"), "the key is not base64"),
            // An ed25519 blob labelled as RSA: the blob names its own type.
            (format!("ssh-rsa {b64}"), "the key's data is not a ssh-rsa key"),
            (format!("{kind} AAAA"), "the key's data is not a ssh-ed25519 key"),
            (format!("{kind} {b64} {}", "c".repeat(MAX_KEY_BYTES)), "longer than 4096 bytes"),
        ];
        for (key, want) in cases {
            let e = parse_openssh_key(3, key.as_bytes()).unwrap_err();
            assert!(e.contains(want), "{key:?}: {e}");
            assert!(e.starts_with("GET /latest/meta-data/public-keys/3/openssh-key: "), "{e}");
            assert!(!e.contains('\n') && !e.contains('\r'), "the message must stay on one line: {e:?}");
        }
    }

    #[test]
    fn key_lists() {
        assert_eq!(parse_key_list(b"0=my-key"), (vec![0], None));
        assert_eq!(parse_key_list(b"0=a\n1=b\n0=a\n"), (vec![0, 1], None));
        let (keys, e) = parse_key_list(b"0=a\nnonsense\n1=b");
        assert_eq!(keys, vec![0]);
        assert!(e.unwrap().contains("the line 'nonsense' is not 'N=name'"));
        let many: String = (0..50).map(|i| format!("{i}=k{i}\n")).collect();
        let (keys, e) = parse_key_list(many.as_bytes());
        assert_eq!(keys.len(), MAX_KEYS);
        assert!(e.unwrap().contains("more than 10 keys"));
    }

    /// IMDS as a table: path -> answer (absent: 404); `fail` paths fail as IMDS errors.
    struct Table {
        answers: BTreeMap<String, Vec<u8>>,
        asked: std::cell::RefCell<Vec<String>>,
    }

    impl Table {
        fn new(answers: &[(&str, &[u8])]) -> Table {
            Table {
                answers: answers.iter().map(|(p, a)| (p.to_string(), a.to_vec())).collect(),
                asked: Default::default(),
            }
        }
    }

    impl Metadata for Table {
        fn get(&self, step: ImdsStep) -> Result<Option<Vec<u8>>, ImdsError> {
            let path = step.path();
            self.asked.borrow_mut().push(path.clone());
            match self.answers.get(&path) {
                Some(a) if a == b"FAIL" => Err(ImdsError::Status {
                    addr: SocketAddr::from(([169, 254, 169, 254], 80)),
                    step,
                    status: 500,
                    reason: "Internal Server Error".into(),
                }),
                other => Ok(other.cloned()),
            }
        }
    }

    fn ec2_instance(keys: &[u8], key0: &[u8], key1: &[u8]) -> Table {
        Table::new(&[
            ("/latest/meta-data/local-hostname", b"ip-10-0-1-23.us-west-2.compute.internal"),
            ("/latest/meta-data/local-ipv4", b"10.0.1.23"),
            ("/latest/dynamic/instance-identity/document", IDENTITY.as_bytes()),
            ("/latest/meta-data/public-keys/", keys),
            ("/latest/meta-data/public-keys/0/openssh-key", key0),
            ("/latest/meta-data/public-keys/1/openssh-key", key1),
        ])
    }

    const ALL: Wanted =
        Wanted { hostname: true, node_ip: true, provider_id: true, region: true, admin_keys: true };

    fn admin_keys(patch: &Value) -> Vec<String> {
        let b64 = patch["host-containers"]["admin"]["user-data"].as_str().expect("admin user data");
        let doc: Value =
            serde_json::from_slice(&crate::settings::kubelet::base64_decode(b64).unwrap()).unwrap();
        serde_json::from_value(doc["ssh"]["authorized-keys"].clone()).unwrap()
    }

    #[test]
    fn generates_what_is_unset_from_a_healthy_imds() {
        let md = ec2_instance(b"0=my-key\n1=other", ED25519.as_bytes(), ECDSA.as_bytes());
        let g = generate(&md, ALL);
        assert!(g.problems.is_empty(), "{:?}", g.problems);
        assert_eq!(g.patch["network"]["hostname"], "ip-10-0-1-23.us-west-2.compute.internal");
        assert_eq!(g.patch["kubernetes"]["node-ip"], "10.0.1.23");
        assert_eq!(g.patch["kubernetes"]["provider-id"], "aws:///us-west-2b/i-0123456789abcdef0");
        assert_eq!(g.patch["aws"]["region"], "us-west-2");
        assert_eq!(admin_keys(&g.patch), vec![ED25519, ECDSA]);
        // The patch is valid settings.
        model::parse(&g.patch).expect("valid settings");
        assert_eq!(Wanted::unset_in(&model::parse(&g.patch).unwrap()), Wanted::default());

        // Only what is unset is asked for.
        let md = ec2_instance(b"0=k", ED25519.as_bytes(), b"");
        let s =
            model::parse(&json!({"network": {"hostname": "mine"}, "kubernetes": {"provider-id": "x://y"},
            "aws": {"region": "eu-north-1"}, "host-containers": {"admin": {"user-data": "e30="}}}))
            .unwrap();
        let want = Wanted::unset_in(&s);
        assert_eq!(want, Wanted { node_ip: true, ..Wanted::default() });
        let g = generate(&md, want);
        assert_eq!(g.patch, json!({"kubernetes": {"node-ip": "10.0.1.23"}}));
        assert_eq!(*md.asked.borrow(), vec!["/latest/meta-data/local-ipv4"]);
    }

    #[test]
    fn a_hostile_imds_is_reported_and_the_rest_is_generated() {
        // A key with an injected second line, an identity document that is not JSON, and a
        // host name with a control character.
        let md = Table::new(&[
            ("/latest/meta-data/local-hostname", b"node\x1b[2J"),
            ("/latest/meta-data/local-ipv4", b"10.0.1.23"),
            ("/latest/dynamic/instance-identity/document", b"<html>oops</html>"),
            ("/latest/meta-data/public-keys/", b"0=good\n1=bad"),
            ("/latest/meta-data/public-keys/0/openssh-key", ED25519.as_bytes()),
            ("/latest/meta-data/public-keys/1/openssh-key", b"ssh-ed25519 AAAA\nX-Evil: 1"),
        ]);
        let g = generate(&md, ALL);
        assert_eq!(g.patch["kubernetes"], json!({"node-ip": "10.0.1.23"}));
        assert_eq!(admin_keys(&g.patch), vec![ED25519], "the good key is kept");
        assert!(g.patch.get("network").is_none() && g.patch.get("aws").is_none(), "{}", g.patch);
        let text: Vec<String> = g.problems.iter().map(|p| p.to_string()).collect();
        let want = [
            ("settings.network.hostname", "'node\\u{1b}[2J' is not a host name"),
            ("settings.kubernetes.provider-id", "not an identity document"),
            ("settings.aws.region", "see settings.kubernetes.provider-id"),
            (
                "settings.host-containers.admin.user-data",
                "not one line of text: 'ssh-ed25519 AAAA\\nX-Evil: 1'; this key is left out",
            ),
        ];
        assert_eq!(text.len(), want.len(), "{text:#?}");
        for ((key, needle), got) in want.iter().zip(&text) {
            assert!(got.starts_with(key) && got.contains(needle), "{got}\nwant {key}: ...{needle}");
            assert!(!got.contains(['\n', '\r', '\x1b']), "one escaped line: {got:?}");
        }
    }

    #[test]
    fn missing_and_failing_items() {
        // No key pair: nothing to generate, nothing wrong. IMDS failing: named in the problem.
        let md = Table::new(&[
            ("/latest/meta-data/local-hostname", b"FAIL"),
            ("/latest/dynamic/instance-identity/document", IDENTITY.as_bytes()),
        ]);
        let g = generate(&md, ALL);
        assert_eq!(
            g.patch,
            json!({"kubernetes": {"provider-id": "aws:///us-west-2b/i-0123456789abcdef0"},
            "aws": {"region": "us-west-2"}})
        );
        let text: Vec<String> = g.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(text.len(), 2, "{text:#?}");
        assert!(text[0].starts_with("settings.network.hostname: EC2 IMDSv2 at 169.254.169.254:80: GET /latest/meta-data/local-hostname: HTTP 500"), "{}", text[0]);
        assert!(
            text[1].contains(
                "settings.kubernetes.node-ip: GET /latest/meta-data/local-ipv4: IMDS has no such item (404)"
            ),
            "{}",
            text[1]
        );
    }
}
