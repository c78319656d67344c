//! `settings.bootstrap-commands.NAME` and `settings.bootstrap-containers.NAME`: work done at
//! every boot (or once) before the boot counts as ready (Bottlerocket's keys and meaning).
//!
//! - A bootstrap command is a list of `apiclient` command lines (`[["apiclient", "set",
//!   "motd=hi"], ...]`), run one after the other.
//! - A bootstrap container is an image run to completion as a superpowered container (see
//!   `supervisor::host_container`), with its own persistent directory
//!   `/local/bootstrap-containers/NAME` and optional user data.
//!
//! `mode` is `off` (skipped, the default), `once` (run, then set to `off` by a settings commit)
//! or `always`. `essential = true` makes a failure fail the boot. Commands run first, in name
//! order, then containers, in name order ([`plan`]). `init::bootstrap` runs the plan.
//!
//! Bounds (outside input): names as host containers' (1-63 of `[a-z0-9-]`), at most
//! [`MAX_ENTRIES`] of each kind, [`MAX_COMMANDS`] command lines of at most [`MAX_ARGS`]
//! arguments of at most [`MAX_ARG`] bytes each; user data as a host container's.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::model::{Invalid, Settings, MAX_HOST_CONTAINER_USER_DATA};

/// The most bootstrap commands, and the most bootstrap containers, a node may have.
pub const MAX_ENTRIES: usize = 32;
/// The most command lines in one bootstrap command.
pub const MAX_COMMANDS: usize = 32;
/// The most arguments in one command line (apiclient's longest useful line is short).
pub const MAX_ARGS: usize = 64;
/// The longest argument.
pub const MAX_ARG: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Off,
    Once,
    Always,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BootstrapCommand {
    /// Command lines, each `["apiclient", ARG...]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commands: Option<Vec<Vec<String>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub essential: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BootstrapContainer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub essential: Option<bool>,
    /// Base64, decoded into `/.bottlerocket/bootstrap-containers/current/user-data`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
}

/// One thing to do at boot, in the order [`plan`] gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A bootstrap command: its command lines, without the leading `apiclient`.
    Command {
        name: String,
        lines: Vec<Vec<String>>,
        essential: bool,
        once: bool,
    },
    Container {
        name: String,
        source: String,
        essential: bool,
        once: bool,
        user_data: Option<String>,
    },
}

impl Step {
    pub fn name(&self) -> &str {
        match self {
            Step::Command { name, .. } | Step::Container { name, .. } => name,
        }
    }

    pub fn essential(&self) -> bool {
        match self {
            Step::Command { essential, .. } | Step::Container { essential, .. } => *essential,
        }
    }

    pub fn once(&self) -> bool {
        match self {
            Step::Command { once, .. } | Step::Container { once, .. } => *once,
        }
    }

    /// The settings key of this step's mode, which `once` sets to `off` after the run.
    pub fn mode_key(&self) -> String {
        let group = match self {
            Step::Command { .. } => "bootstrap-commands",
            Step::Container { .. } => "bootstrap-containers",
        };
        format!("settings.{group}.{}.mode", self.name())
    }
}

/// What to run at this boot: the commands whose mode is not off, in name order, then the
/// containers whose mode is not off (and which have a source), in name order.
pub fn plan(settings: &Settings) -> Vec<Step> {
    let on = |m: Option<Mode>| m.unwrap_or_default() != Mode::Off;
    let commands =
        settings.bootstrap_commands.iter().flatten().filter(|(_, c)| on(c.mode)).map(|(name, c)| {
            Step::Command {
                name: name.clone(),
                lines: c.commands.iter().flatten().map(|l| l.iter().skip(1).cloned().collect()).collect(),
                essential: c.essential.unwrap_or(false),
                once: c.mode == Some(Mode::Once),
            }
        });
    let containers =
        settings.bootstrap_containers.iter().flatten().filter(|(_, c)| on(c.mode)).filter_map(|(name, c)| {
            Some(Step::Container {
                name: name.clone(),
                source: c.source.clone()?,
                essential: c.essential.unwrap_or(false),
                once: c.mode == Some(Mode::Once),
                user_data: c.user_data.clone(),
            })
        });
    commands.chain(containers).collect()
}

fn invalid(key: String, message: impl Into<String>) -> Invalid {
    Invalid { key, message: message.into() }
}

fn check_name<T>(group: &str, entries: &BTreeMap<String, T>) -> Result<(), Invalid> {
    if entries.len() > MAX_ENTRIES {
        return Err(invalid(format!("settings.{group}"), format!("more than {MAX_ENTRIES} entries")));
    }
    for name in entries.keys() {
        if name.is_empty()
            || name.len() > 63
            || !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(invalid(format!("settings.{group}.{name}"), "name must be 1-63 of [a-z0-9-]"));
        }
    }
    Ok(())
}

/// Check the bootstrap settings (called from `Settings::validate`).
pub fn validate(settings: &Settings) -> Result<(), Invalid> {
    if let Some(cmds) = &settings.bootstrap_commands {
        check_name("bootstrap-commands", cmds)?;
        for (name, c) in cmds {
            let key = format!("settings.bootstrap-commands.{name}.commands");
            let lines = c.commands.as_deref().unwrap_or_default();
            if lines.len() > MAX_COMMANDS {
                return Err(invalid(key, format!("more than {MAX_COMMANDS} command lines")));
            }
            for (i, line) in lines.iter().enumerate() {
                if line.first().map(String::as_str) != Some("apiclient") {
                    return Err(invalid(
                        key,
                        format!(
                            "command line {i} must start with \"apiclient\" (only apiclient commands run)"
                        ),
                    ));
                }
                if line.len() > MAX_ARGS || line.iter().any(|a| a.len() > MAX_ARG || a.contains('\0')) {
                    return Err(invalid(
                        key,
                        format!(
                            "command line {i}: at most {MAX_ARGS} arguments of at most {} KiB, no NUL",
                            MAX_ARG / 1024
                        ),
                    ));
                }
            }
        }
    }
    if let Some(ctrs) = &settings.bootstrap_containers {
        check_name("bootstrap-containers", ctrs)?;
        for (name, c) in ctrs {
            if let Some(data) = &c.user_data {
                let key = format!("settings.bootstrap-containers.{name}.user-data");
                if data.len() > MAX_HOST_CONTAINER_USER_DATA {
                    return Err(invalid(
                        key,
                        format!("longer than {} KiB", MAX_HOST_CONTAINER_USER_DATA / 1024),
                    ));
                }
                if super::kubelet::base64_decode(data).is_none() {
                    return Err(invalid(key, "not base64"));
                }
            }
            if let Some(s) = &c.source {
                if s.is_empty() || s.len() > 512 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(invalid(
                        format!("settings.bootstrap-containers.{name}.source"),
                        "not an image reference (at most 512 bytes, no spaces)",
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings(v: serde_json::Value) -> Settings {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn commands_run_in_name_order_before_containers_and_off_is_skipped() {
        let s = settings(json!({
            "bootstrap-containers": {
                "b": {"source": "r/b:1", "mode": "always", "essential": true, "user-data": "e30="},
                "a": {"source": "r/a:1", "mode": "once"},
                "off": {"source": "r/o:1", "mode": "off"},
                "nomode": {"source": "r/n:1"},
                "nosource": {"mode": "always"},
            },
            "bootstrap-commands": {
                "z-last": {"commands": [["apiclient", "set", "motd=z"]], "mode": "always"},
                "10-first": {"commands": [["apiclient", "set", "motd=1"], ["apiclient", "get"]], "mode": "once", "essential": true},
            },
        }));
        s.validate().unwrap();
        let steps = plan(&s);
        let names: Vec<&str> = steps.iter().map(Step::name).collect();
        assert_eq!(names, ["10-first", "z-last", "a", "b"]);
        assert_eq!(
            steps[0],
            Step::Command {
                name: "10-first".into(),
                lines: vec![vec!["set".into(), "motd=1".into()], vec!["get".into()]],
                essential: true,
                once: true,
            }
        );
        assert_eq!(steps[0].mode_key(), "settings.bootstrap-commands.10-first.mode");
        assert_eq!(steps[2].mode_key(), "settings.bootstrap-containers.a.mode");
        assert!(steps[2].once() && !steps[2].essential() && steps[3].essential() && !steps[3].once());
        assert!(plan(&Settings::default()).is_empty());
    }

    #[test]
    fn bad_bootstrap_settings_are_refused_with_their_key() {
        let long = "x".repeat(MAX_ARG + 1);
        let many: serde_json::Map<String, serde_json::Value> =
            (0..=MAX_ENTRIES).map(|i| (format!("c{i}"), json!({"mode": "off"}))).collect();
        for (v, key, words) in [
            (
                json!({"bootstrap-commands": {"a": {"commands": [["sh", "-c", "x"]]}}}),
                "settings.bootstrap-commands.a.commands",
                "apiclient",
            ),
            (
                json!({"bootstrap-commands": {"a": {"commands": [[]]}}}),
                "settings.bootstrap-commands.a.commands",
                "apiclient",
            ),
            (
                json!({"bootstrap-commands": {"a": {"commands": [["apiclient", long]]}}}),
                "settings.bootstrap-commands.a.commands",
                "KiB",
            ),
            (json!({"bootstrap-commands": {"A": {}}}), "settings.bootstrap-commands.A", "[a-z0-9-]"),
            (json!({"bootstrap-commands": many}), "settings.bootstrap-commands", "more than"),
            (
                json!({"bootstrap-containers": {"a": {"user-data": "%%"}}}),
                "settings.bootstrap-containers.a.user-data",
                "base64",
            ),
            (
                json!({"bootstrap-containers": {"a": {"source": "r/a b"}}}),
                "settings.bootstrap-containers.a.source",
                "image",
            ),
            (json!({"bootstrap-containers": {"a_b": {}}}), "settings.bootstrap-containers.a_b", "[a-z0-9-]"),
        ] {
            let e = settings(v).validate().unwrap_err();
            assert_eq!(e.key, key);
            assert!(e.message.contains(words), "{e}");
        }
        for bad in [
            json!({"bootstrap-commands": {"a": {"mode": "sometimes"}}}),
            json!({"bootstrap-containers": {"a": {"superpowered": true}}}),
            json!({"bootstrap-commands": {"a": {"commands": "apiclient set motd=x"}}}),
        ] {
            assert!(serde_json::from_value::<Settings>(bad).is_err());
        }
    }
}
