//! User data: the settings a machine is given from outside at first boot.
//!
//! Berth takes its initial configuration the way Bottlerocket does: a TOML document whose only
//! top-level table is `[settings]`, optionally gzip-compressed (recognised by the gzip magic
//! `1f 8b`, not by a file name). This module finds that document and decodes it into a JSON
//! object; applying it as one settings transaction belongs to the settings module.
//!
//! Providers, tried in this order; the first that has data wins and the others are not asked:
//!
//! 1. [`Source::FwCfg`]: QEMU's firmware config entry `opt/berth/user-data`
//!    (`-fw_cfg name=opt/berth/user-data,file=user-data.toml`), read from
//!    `/sys/firmware/qemu_fw_cfg/by_name/opt/berth/user-data/raw`.
//! 2. [`Source::BootPartition`]: `user-data.toml`, else `user-data`, in the BOOT partition,
//!    which the caller has mounted (how a bare-metal or image-flashing user supplies it).
//! 3. [`Source::Imds`]: EC2's instance metadata service, IMDSv2 (token first), only when the
//!    caller passes its address; PID 1 does so only when [`is_ec2`] says so, because elsewhere
//!    169.254.169.254 answers nothing and would cost the whole timeout. On EC2, PID 1 brings
//!    the network up before it asks (`init::ec2`).
//!
//! On EC2 the instance's own settings (host name, Kubernetes node IP and provider ID, region,
//! SSH keys for the admin container) also come from IMDS, when unset: see [`ec2`].
//!
//! A provider that is present but fails (unreadable file, IMDS error, bad TOML) is an error,
//! not a reason to fall through to the next: applying a different provider's settings than
//! the one the operator meant would be worse than stopping. An empty document is valid and
//! means "no settings".
//!
//! Limits: user data is at most [`MAX_BYTES`] (1 MiB) as read and after decompression
//! (EC2 itself caps it at 16 KiB). The IMDS client ([`imds`]) uses the shared HTTP client and
//! needs no TLS: IMDS is link-local plain HTTP; its time is bounded per request and per session.

mod decode;
pub mod ec2;
pub mod imds;

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use decode::{decode, DecodeError};
pub use imds::{from_imds, Imds, ImdsError, DEFAULT_TIMEOUT, IMDS_ADDR};

/// The most user data Berth accepts, compressed or not.
pub const MAX_BYTES: usize = 1 << 20;

/// The fw_cfg entry name QEMU is given with `-fw_cfg name=...`.
pub const FW_CFG_NAME: &str = "opt/berth/user-data";

/// File names looked for in the BOOT partition, in order.
pub const BOOT_FILES: [&str; 2] = ["user-data.toml", "user-data"];

/// Where user data came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    FwCfg,
    BootPartition,
    Imds,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::FwCfg => "qemu fw_cfg opt/berth/user-data",
            Source::BootPartition => "boot partition user-data.toml",
            Source::Imds => "EC2 IMDSv2",
        })
    }
}

/// Decoded user data.
#[derive(Debug, Clone, PartialEq)]
pub struct UserData {
    pub source: Source,
    /// Length of the data as fetched (before any decompression).
    pub raw_len: usize,
    /// The object under `[settings]`, as JSON (TOML datetimes as strings).
    pub settings: serde_json::Value,
}

/// Why user data could not be fetched or decoded.
#[derive(Debug)]
pub enum Error {
    /// A provider's file exists but could not be read.
    Read { source: Source, path: PathBuf, cause: io::Error },
    /// A provider's file is larger than [`MAX_BYTES`].
    TooLarge { source: Source, path: PathBuf, limit: usize },
    /// IMDS failed to give the user data (unreachable, silent, an error status, garbage).
    Imds(ImdsError),
    /// The data was fetched but is not valid user data.
    Decode { source: Source, cause: DecodeError },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Read { source, path, cause } => {
                write!(f, "user data from {source}: reading {}: {cause}", path.display())
            }
            Error::TooLarge { source, path, limit } => write!(
                f,
                "user data from {source}: {} is larger than {limit} bytes; compress it with gzip",
                path.display()
            ),
            Error::Imds(e) => write!(f, "user data from {e}"),
            Error::Decode { source, cause } => write!(f, "user data from {source}: {cause}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Read { cause, .. } => Some(cause),
            Error::Imds(e) => Some(e),
            Error::Decode { cause, .. } => Some(cause),
            _ => None,
        }
    }
}

/// Path of the fw_cfg entry's contents under a sysfs root (`/sys` in production).
pub fn fw_cfg_path(sysfs_root: &Path) -> PathBuf {
    sysfs_root.join("firmware/qemu_fw_cfg/by_name").join(FW_CFG_NAME).join("raw")
}

/// The user data QEMU passed as fw_cfg `opt/berth/user-data`, if any.
///
/// Absent when the entry (or the whole fw_cfg sysfs tree, as on non-QEMU machines) is missing.
pub fn from_fw_cfg(sysfs_root: &Path) -> Result<Option<Vec<u8>>, Error> {
    read_capped(Source::FwCfg, &fw_cfg_path(sysfs_root))
}

/// The user data in an already-mounted BOOT partition: `user-data.toml`, else `user-data`.
pub fn from_boot_partition(mount_dir: &Path) -> Result<Option<Vec<u8>>, Error> {
    for name in BOOT_FILES {
        if let Some(data) = read_capped(Source::BootPartition, &mount_dir.join(name))? {
            return Ok(Some(data));
        }
    }
    Ok(None)
}

/// Read a whole file of at most [`MAX_BYTES`]; `None` if it does not exist.
fn read_capped(source: Source, path: &Path) -> Result<Option<Vec<u8>>, Error> {
    let read_err = |cause| Error::Read { source, path: path.to_path_buf(), cause };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_err(e)),
    };
    let mut data = Vec::new();
    file.take(MAX_BYTES as u64 + 1).read_to_end(&mut data).map_err(read_err)?;
    if data.len() > MAX_BYTES {
        return Err(Error::TooLarge { source, path: path.to_path_buf(), limit: MAX_BYTES });
    }
    Ok(Some(data))
}

/// DMI files (under `<sysfs>/class/dmi/id/`) and what marks EC2 in them.
///
/// Nitro instances report `Amazon EC2` as system and board vendor; Xen-based instances report
/// vendor `Xen` but a BIOS version such as `4.11.amazon`.
const EC2_MARKERS: [(&str, &str); 3] =
    [("sys_vendor", "Amazon EC2"), ("board_vendor", "Amazon EC2"), ("bios_version", "amazon")];

/// Whether this machine is an EC2 instance, judged from DMI (no network access).
///
/// True when `sys_vendor` or `board_vendor` contains `Amazon EC2` (Nitro) or `bios_version`
/// contains `amazon` (Xen). Unreadable files count as "not EC2", so QEMU and bare metal never
/// wait on IMDS.
pub fn is_ec2(sysfs_root: &Path) -> bool {
    let dmi = sysfs_root.join("class/dmi/id");
    EC2_MARKERS
        .iter()
        .any(|(file, marker)| std::fs::read_to_string(dmi.join(file)).is_ok_and(|text| text.contains(marker)))
}

/// Fetch and decode user data from the first provider that has some (see the module docs).
///
/// `boot_dir` is the mounted BOOT partition, if there is one; `imds` is IMDS's address
/// ([`IMDS_ADDR`]) when IMDS should be asked, which is only on EC2 (see [`is_ec2`]).
/// `Ok(None)` means no provider had user data.
pub fn fetch(
    sysfs_root: &Path,
    boot_dir: Option<&Path>,
    imds: Option<SocketAddr>,
) -> Result<Option<UserData>, Error> {
    let found = match from_fw_cfg(sysfs_root)? {
        Some(data) => Some((Source::FwCfg, data)),
        None => match boot_dir.map(from_boot_partition).transpose()?.flatten() {
            Some(data) => Some((Source::BootPartition, data)),
            None => {
                match imds.map(|addr| from_imds(addr, DEFAULT_TIMEOUT)).transpose().map_err(Error::Imds)? {
                    Some(Some(data)) => Some((Source::Imds, data)),
                    _ => None,
                }
            }
        },
    };
    let Some((source, data)) = found else {
        log::info!("no user data (fw_cfg, boot partition{})", imds_note(imds));
        return Ok(None);
    };
    let settings = decode(&data).map_err(|cause| Error::Decode { source, cause })?;
    log::info!("user data from {source}: {} bytes", data.len());
    Ok(Some(UserData { source, raw_len: data.len(), settings }))
}

fn imds_note(imds: Option<SocketAddr>) -> &'static str {
    if imds.is_some() {
        ", IMDS"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::fs;

    /// A fresh directory for one test, removed when dropped.
    pub(super) struct TempDir(pub(super) PathBuf);

    impl TempDir {
        pub(super) fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("berth-userdata-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("create temp dir");
            TempDir(dir)
        }

        pub(super) fn write(&self, rel: &str, data: &[u8]) {
            let path = self.0.join(rel);
            fs::create_dir_all(path.parent().expect("has parent")).expect("mkdir");
            fs::write(path, data).expect("write fixture");
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const FW_CFG_RAW: &str = "firmware/qemu_fw_cfg/by_name/opt/berth/user-data/raw";

    #[test]
    fn fw_cfg_reader() {
        let sys = TempDir::new("fwcfg");
        assert!(from_fw_cfg(&sys.0).expect("absent is fine").is_none());
        // fw_cfg present but without our entry.
        sys.write("firmware/qemu_fw_cfg/by_name/etc/other/raw", b"x");
        assert!(from_fw_cfg(&sys.0).expect("absent is fine").is_none());
        sys.write(FW_CFG_RAW, b"[settings]\nmotd = \"fw\"\n");
        assert_eq!(
            from_fw_cfg(&sys.0).expect("readable").as_deref(),
            Some(&b"[settings]\nmotd = \"fw\"\n"[..])
        );
    }

    /// Files to create: (relative path, contents).
    type Files<'a> = &'a [(&'a str, &'a [u8])];

    #[test]
    fn boot_partition_reader_prefers_toml_name() {
        let cases: [(Files, Option<&[u8]>); 4] = [
            (&[], None),
            (&[("user-data", b"plain")], Some(b"plain")),
            (&[("user-data.toml", b"toml")], Some(b"toml")),
            (&[("user-data", b"plain"), ("user-data.toml", b"toml")], Some(b"toml")),
        ];
        for (i, (files, want)) in cases.iter().enumerate() {
            let dir = TempDir::new(&format!("boot{i}"));
            for (name, data) in *files {
                dir.write(name, data);
            }
            let got = from_boot_partition(&dir.0).expect("readable");
            assert_eq!(got.as_deref(), *want, "case {i}: {files:?}");
        }
    }

    #[test]
    fn readers_report_path_on_failure() {
        let dir = TempDir::new("errors");
        // A directory where a file is expected: open succeeds, read fails with EISDIR.
        fs::create_dir_all(dir.0.join("user-data.toml")).expect("mkdir");
        let err = from_boot_partition(&dir.0).expect_err("directory is not user data");
        assert!(matches!(err, Error::Read { source: Source::BootPartition, .. }), "{err:?}");
        assert!(err.to_string().contains("user-data.toml"), "{err}");

        let sys = TempDir::new("big");
        sys.write(FW_CFG_RAW, &vec![b'#'; MAX_BYTES + 1]);
        let err = from_fw_cfg(&sys.0).expect_err("too large");
        assert!(matches!(err, Error::TooLarge { source: Source::FwCfg, .. }), "{err:?}");
        assert!(err.to_string().contains("opt/berth/user-data/raw"), "{err}");
    }

    #[test]
    fn is_ec2_reads_dmi() {
        let cases: [(&[(&str, &str)], bool); 6] = [
            (&[], false),
            (&[("sys_vendor", "QEMU\n"), ("board_vendor", "\n")], false),
            (&[("sys_vendor", "Amazon EC2\n")], true),
            (&[("sys_vendor", "QEMU\n"), ("board_vendor", "Amazon EC2\n")], true),
            (&[("sys_vendor", "Xen\n"), ("bios_version", "4.11.amazon\n")], true),
            (&[("sys_vendor", "Xen\n"), ("bios_version", "4.11\n")], false),
        ];
        for (i, (files, want)) in cases.iter().enumerate() {
            let sys = TempDir::new(&format!("dmi{i}"));
            for (name, text) in *files {
                sys.write(&format!("class/dmi/id/{name}"), text.as_bytes());
            }
            assert_eq!(is_ec2(&sys.0), *want, "case {i}: {files:?}");
        }
    }

    #[test]
    fn fetch_takes_first_provider_with_data() {
        let sys = TempDir::new("fetch-sys");
        let boot = TempDir::new("fetch-boot");
        assert_eq!(fetch(&sys.0, Some(&boot.0), None).expect("nothing is fine"), None);
        assert_eq!(fetch(&sys.0, None, None).expect("nothing is fine"), None);

        boot.write("user-data", b"[settings]\nmotd = \"boot\"\n");
        let got = fetch(&sys.0, Some(&boot.0), None).expect("boot data").expect("some");
        assert_eq!(got.source, Source::BootPartition);
        assert_eq!(got.settings, json!({"motd": "boot"}));
        assert_eq!(got.raw_len, 25);

        // fw_cfg wins over the boot partition, and an empty entry is valid and wins too.
        sys.write(FW_CFG_RAW, b"");
        let got = fetch(&sys.0, Some(&boot.0), None).expect("fw_cfg data").expect("some");
        assert_eq!((got.source, got.raw_len), (Source::FwCfg, 0));
        assert_eq!(got.settings, json!({}));
    }

    #[test]
    fn fetch_errors_name_the_source() {
        let sys = TempDir::new("fetch-bad");
        sys.write(FW_CFG_RAW, b"[network]\nhostname = \"x\"\n");
        let boot = TempDir::new("fetch-bad-boot");
        boot.write("user-data.toml", b"[settings]\n");
        let err = fetch(&sys.0, Some(&boot.0), None).expect_err("bad fw_cfg data");
        assert!(
            matches!(err, Error::Decode { source: Source::FwCfg, cause: DecodeError::UnexpectedKeys(_) }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "user data from qemu fw_cfg opt/berth/user-data: unexpected top-level key(s) \
             network: everything must be under [settings]"
        );
    }

    #[test]
    fn source_display() {
        let cases = [
            (Source::FwCfg, "qemu fw_cfg opt/berth/user-data"),
            (Source::BootPartition, "boot partition user-data.toml"),
            (Source::Imds, "EC2 IMDSv2"),
        ];
        for (source, want) in cases {
            assert_eq!(source.to_string(), want);
        }
    }
}
