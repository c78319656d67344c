//! The updater's persisted state: one JSON file on PRIVATE, replaced atomically.

use std::fs;
use std::path::Path;

use log::{error, warn};
use serde::{Deserialize, Serialize};

use super::manifest::Update;
use crate::bootctl::Slot;

const FILE: &str = "state.json";

/// Bottlerocket's update states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum State {
    /// No update chosen.
    #[default]
    Idle,
    /// An update was chosen by the last refresh.
    Available,
    /// The chosen update is written and checked in the inactive slot.
    Staged,
    /// The inactive slot boots next, on trial.
    Ready,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateInfo {
    pub version: String,
    pub variant: String,
    pub arch: String,
    pub max_version: String,
}

impl UpdateInfo {
    pub fn of(u: &Update) -> UpdateInfo {
        UpdateInfo {
            version: u.version.to_string(),
            variant: u.variant.clone(),
            arch: u.arch.clone(),
            max_version: u.max_version.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    pub slot: Slot,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activated {
    pub slot: Slot,
    pub version: String,
    pub from_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub from: String,
    pub to: String,
    pub at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollback {
    /// The version that was left (it failed to boot, or was rolled back by request).
    pub failed_version: String,
    pub failed_slot: Slot,
    /// The version running (or booting next) instead.
    pub running_version: String,
    pub detected_at: String,
    /// true: boot control fell back by itself; false: `POST /actions/rollback`.
    pub automatic: bool,
}

/// How the most recent command ended, in Bottlerocket's terms. A command that is still
/// running has no record yet (`GET /updates/status` answers 423 meanwhile), so there is no
/// "Running": a state file written by an older Berth that says so reads as `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CmdStatus {
    Success,
    Failed,
    #[serde(other)]
    Unknown,
}

/// `most_recent_command` of `/updates/status`: Bottlerocket's fields (what its update operator
/// requires, all present and non-null) plus Berth's `message`. Bottlerocket runs a helper
/// process per command and reports its exit code and stderr; Berth runs commands in its own
/// thread, so `exit_status` is 0 for Success and 1 otherwise, and `stderr` is the error
/// message ("" on success).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRecord {
    pub cmd_type: String,
    pub cmd_status: CmdStatus,
    /// When the command finished (RFC 3339, UTC).
    pub timestamp: String,
    #[serde(default)]
    pub exit_status: u32,
    /// The error of a failed command ("" otherwise). Older state files call it `error`.
    #[serde(default, alias = "error")]
    pub stderr: String,
    /// What a successful command did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl CommandRecord {
    pub fn finished(cmd: &str, result: &Result<String, String>) -> CommandRecord {
        let (cmd_status, exit_status, stderr, message) = match result {
            Ok(m) => (CmdStatus::Success, 0, String::new(), Some(m.clone())),
            Err(e) => (CmdStatus::Failed, 1, e.clone(), None),
        };
        CommandRecord {
            cmd_type: cmd.into(),
            cmd_status,
            timestamp: jiff::Timestamp::now().to_string(),
            exit_status,
            stderr,
            message,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Persisted {
    pub state: State,
    pub available: Vec<String>,
    pub chosen: Option<UpdateInfo>,
    pub staged: Option<Staged>,
    /// Set while a prepare writes this slot; still set after a power cut.
    pub writing: Option<Slot>,
    pub activated: Option<Activated>,
    pub last_update: Option<Applied>,
    pub last_rollback: Option<Rollback>,
    pub last_refresh: Option<String>,
    pub most_recent_command: Option<CommandRecord>,
    pub note: Option<String>,
}

/// The state in `dir`; a missing file is a fresh Idle state, a corrupt one is set aside
/// (renamed `state.json.corrupt`) and replaced by a fresh state.
pub fn load(dir: &Path) -> Persisted {
    let path = dir.join(FILE);
    match fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice::<Persisted>(&bytes) {
            Ok(p) => p,
            Err(e) => {
                error!(
                    "{}: {e}; starting from Idle (the old file is kept as {FILE}.corrupt)",
                    path.display()
                );
                let _ = fs::rename(&path, dir.join(format!("{FILE}.corrupt")));
                Persisted {
                    note: Some(format!("the update state file was unreadable ({e}) and was reset")),
                    ..Persisted::default()
                }
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Persisted::default(),
        Err(e) => {
            warn!("{}: {e}", path.display());
            Persisted::default()
        }
    }
}

pub fn save(dir: &Path, p: &Persisted) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(p).map_err(|e| e.to_string())?;
    crate::settings::store::write_atomic(&dir.join(FILE), &bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_sets_aside_a_corrupt_file() {
        let dir = std::env::temp_dir().join(format!("berth-upstate-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(load(&dir), Persisted::default());
        let p = Persisted {
            state: State::Staged,
            staged: Some(Staged { slot: Slot::B, version: "0.2.0".into() }),
            writing: Some(Slot::B),
            ..Persisted::default()
        };
        save(&dir, &p).unwrap();
        assert_eq!(load(&dir), p);
        fs::write(dir.join(FILE), b"{\"state\": \"Stag").unwrap();
        let reset = load(&dir);
        assert_eq!(reset.state, State::Idle);
        assert!(reset.note.unwrap().contains("unreadable"));
        assert!(dir.join("state.json.corrupt").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A state file of an older Berth: its record said `Running` and called the error `error`.
    #[test]
    fn reads_the_command_record_of_an_older_state_file() {
        let old = r#"{"state": "Available", "most_recent_command": {"cmd_type": "prepare",
            "cmd_status": "Running", "timestamp": "2026-01-01T00:00:00Z", "error": "cut"}}"#;
        let p: Persisted = serde_json::from_str(old).unwrap();
        let r = p.most_recent_command.unwrap();
        assert_eq!((r.cmd_status, r.exit_status, r.stderr.as_str()), (CmdStatus::Unknown, 0, "cut"));
        let done = CommandRecord::finished("refresh", &Err("no repository".into()));
        let v = serde_json::to_value(&done).unwrap();
        assert_eq!(v["cmd_status"], "Failed");
        assert_eq!(v["exit_status"], 1);
        assert_eq!(v["stderr"], "no repository");
        assert!(v.get("message").is_none(), "{v}");
    }
}
