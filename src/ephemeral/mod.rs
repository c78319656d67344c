//! Ephemeral storage: spare local disks (EC2 instance store, a bare-metal server's extra disks)
//! formatted and bound over the directories where containers and pods keep their data, as
//! Bottlerocket's `apiclient ephemeral-storage` does. The API routes are
//! `POST /actions/ephemeral-storage/{init,bind}` and
//! `GET /actions/ephemeral-storage/{list-disks,list-dirs}` (also without `/actions`).
//!
//! - **Which disks** ([`Paths::list_disks`]): whole disks named `vd*` whose virtio serial
//!   starts with `eph` (for local VMs: QEMU's `serial=eph...`), and `nvme*n*` whose model is
//!   "Amazon EC2 NVMe Instance Storage" (the instance store), never one with a partition whose
//!   GPT name starts with `BERTH-` (an OS disk). Bottlerocket's rule; it lists udev links under
//!   `/dev/disk/ephemeral/`, Berth (no udev) lists `/dev/NAME`.
//! - **init** ([`Paths::init`]): the given disks (each must be in the list) or all found; none
//!   is no error and does nothing. One disk is used as it is; several are striped with
//!   device-mapper's `striped` target (256 KiB chunks, each disk's share rounded down to a
//!   chunk, the disks in name order) as `/dev/mapper/ephemeral` (Bottlerocket makes an md
//!   RAID0; the striped target needs no tool and no kernel option beyond device-mapper). The
//!   filesystem (xfs by default, as Bottlerocket, or ext4) is made with the label `ephemeral`
//!   unless the device already has that filesystem and the layout is the one recorded; a
//!   changed layout is always formatted afresh. The layout is recorded in
//!   `/var/lib/berth/ephemeral-storage.json` (PRIVATE).
//! - **bind** ([`Paths::bind`]): mounts the device at `/mnt/.ephemeral` and, for each allowed
//!   directory, binds `/mnt/.ephemeral/.<dir, / as _>` over it (recursive, then shared), skipping
//!   one that is a mount point already. The new directory takes the SELinux label of the one it
//!   covers, so containerd's and kubelet's files get the labels they get on DATA. Allowed:
//!   `/var/lib/containerd`, `/var/lib/kubelet`, `/var/log/pods`.
//! - **After a reboot**, as on Bottlerocket: the filesystem is kept, nothing is mounted; run
//!   `init` and `bind` again (a bootstrap command with mode `always`, before containerd has
//!   data to lose). `init` with the same disks keeps the data; `bind` alone also works: it
//!   stripes the recorded disks again first.
//!
//! Bad input (an unknown disk or directory, an unknown filesystem) is [`Error::BadInput`], 400;
//! Bottlerocket answers 500 for everything here. A layout change while the storage is mounted
//! is refused (409): the data under the bound directories would vanish from under containerd.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::sys;

/// The directories `bind` may cover.
pub const ALLOWED_DIRS: &[&str] = &["/var/lib/containerd", "/var/lib/kubelet", "/var/log/pods"];
/// The device-mapper name of a stripe set.
pub const DM_NAME: &str = "ephemeral";
/// Stripe chunk: 256 KiB, in 512-byte sectors (Bottlerocket's md chunk).
pub const CHUNK_SECTORS: u64 = 512;
/// The most disks one stripe set takes.
pub const MAX_DISKS: usize = 64;
const LABEL: &str = "ephemeral";
const NVME_MODEL: &str = "Amazon EC2 NVMe Instance Storage";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fs {
    Ext4,
    Xfs,
}

impl Fs {
    /// Bottlerocket's names in the API body (`"Ext4"`, `"Xfs"`), any case.
    pub fn parse(s: &str) -> Option<Fs> {
        match s.to_ascii_lowercase().as_str() {
            "ext4" => Some(Fs::Ext4),
            "xfs" => Some(Fs::Xfs),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Fs::Ext4 => "ext4",
            Fs::Xfs => "xfs",
        }
    }

    fn mkfs(self, dev: &str) -> Command {
        let mut c = match self {
            Fs::Ext4 => {
                let mut c = Command::new("/usr/sbin/mke2fs");
                c.args(["-q", "-F", "-t", "ext4"]);
                c
            }
            Fs::Xfs => {
                let mut c = Command::new("/usr/sbin/mkfs.xfs");
                c.args(["-q", "-f"]);
                c
            }
        };
        c.args(["-L", LABEL, dev]);
        c
    }
}

#[derive(Debug)]
pub enum Error {
    /// The request names something that is not there or not allowed (400).
    BadInput(String),
    /// The storage is in use and the request would change it (409).
    InUse(String),
    /// The system failed (500).
    Failed(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::BadInput(m) | Error::InUse(m) | Error::Failed(m) => f.write_str(m),
        }
    }
}

fn failed(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> Error {
    move |e| Error::Failed(format!("{what}: {e}"))
}

/// What `init` made, kept on PRIVATE across reboots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub disks: Vec<String>,
    pub filesystem: Fs,
}

/// Where things are: the real system's places by default, others in tests.
pub struct Paths {
    pub sys_block: PathBuf,
    pub dev: PathBuf,
    pub mnt: PathBuf,
    pub state: PathBuf,
    pub mountinfo: PathBuf,
    /// Where `bind`'s directories are (`/` on the system).
    pub root: PathBuf,
    lock: Mutex<()>,
}

impl Default for Paths {
    fn default() -> Paths {
        Paths {
            sys_block: "/sys/block".into(),
            dev: "/dev".into(),
            mnt: "/mnt/.ephemeral".into(),
            state: "/var/lib/berth/ephemeral-storage.json".into(),
            mountinfo: "/proc/self/mountinfo".into(),
            root: "/".into(),
            lock: Mutex::new(()),
        }
    }
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

/// Whether sysfs dir `disk` (`/sys/block/NAME`) is an ephemeral disk by Bottlerocket's rule.
fn is_ephemeral(disk: &Path, name: &str) -> bool {
    let kind_ok = if name.starts_with("vd") {
        read_trim(&disk.join("serial")).is_some_and(|s| s.starts_with("eph"))
    } else if name.starts_with("nvme") {
        read_trim(&disk.join("device/model")).is_some_and(|m| m.starts_with(NVME_MODEL))
    } else {
        false
    };
    if !kind_ok {
        return false;
    }
    // An OS disk's partitions carry Berth's names: never take it.
    let os_disk = fs::read_dir(disk).into_iter().flatten().flatten().any(|e| {
        let uevent = fs::read_to_string(e.path().join("uevent")).unwrap_or_default();
        uevent.lines().any(|l| l.strip_prefix("PARTNAME=").is_some_and(|n| n.starts_with("BERTH-")))
    });
    !os_disk
}

impl Paths {
    /// The ephemeral disks, `/dev/NAME` in name order.
    pub fn list_disks(&self) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(&self.sys_block)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                is_ephemeral(&e.path(), &name).then(|| self.dev.join(&name).to_string_lossy().into_owned())
            })
            .collect();
        out.sort();
        out
    }

    pub fn list_dirs(&self) -> Vec<String> {
        ALLOWED_DIRS.iter().map(|d| d.to_string()).collect()
    }

    fn layout(&self) -> Option<Layout> {
        serde_json::from_slice(&fs::read(&self.state).ok()?).ok()
    }

    fn save(&self, l: &Layout) -> Result<(), Error> {
        let dir = self.state.parent().unwrap_or(Path::new("/"));
        fs::create_dir_all(dir).map_err(failed(format!("mkdir {}", dir.display())))?;
        let text = serde_json::to_vec_pretty(l).expect("JSON serializes");
        crate::settings::store::write_atomic(&self.state, &text)
            .map_err(|e| Error::Failed(format!("write {}: {e}", self.state.display())))
    }

    /// Whether `path` is a mount point, by the mount table.
    fn mounted(&self, path: &Path) -> bool {
        let table = fs::read_to_string(&self.mountinfo).unwrap_or_default();
        let want = path.to_string_lossy();
        table.lines().any(|l| l.split(' ').nth(4).is_some_and(|m| crate::sys::unescape_mountinfo(m) == want))
    }

    /// The block device of `layout`: the disk, or the stripe set (made again if missing).
    fn device(&self, layout: &Layout) -> Result<String, Error> {
        match layout.disks.as_slice() {
            [] => Err(Error::Failed("the recorded layout has no disks".into())),
            [one] => Ok(one.clone()),
            many => self.stripe(many),
        }
    }

    fn sectors(&self, disk: &str) -> Result<u64, Error> {
        let name = Path::new(disk).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let p = self.sys_block.join(&name).join("size");
        read_trim(&p)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::Failed(format!("the size of {disk} ({})", p.display())))
    }

    /// `/dev/mapper/ephemeral` striping `disks`, made unless it is there with this table.
    fn stripe(&self, disks: &[String]) -> Result<String, Error> {
        let mut sizes = Vec::new();
        for d in disks {
            sizes.push(self.sectors(d)?);
        }
        let target = stripe_target(disks, &sizes)?;
        let node = self.dev.join("mapper").join(DM_NAME);
        // There already (init removes another layout's set first): this layout's.
        if sys::dm::status(DM_NAME).is_ok() && node.exists() {
            return Ok(node.to_string_lossy().into_owned());
        }
        let (major, minor) =
            sys::dm::create(DM_NAME, "BERTH-EPHEMERAL", std::slice::from_ref(&target), false)
                .map_err(failed(format!("stripe {}", disks.join(" "))))?;
        fs::create_dir_all(node.parent().unwrap()).map_err(failed("mkdir /dev/mapper"))?;
        let _ = fs::remove_file(&node);
        sys::mknod_block(&node, major, minor, 0o600).map_err(failed(format!("mknod {}", node.display())))?;
        Ok(node.to_string_lossy().into_owned())
    }

    /// Format (unless kept) the given disks, or all ephemeral disks, with `fs` (default xfs).
    pub fn init(&self, fs: Option<Fs>, disks: Option<Vec<String>>) -> Result<Option<Layout>, Error> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let found = self.list_disks();
        let mut disks = disks.unwrap_or_else(|| found.clone());
        if disks.len() > MAX_DISKS {
            return Err(Error::BadInput(format!("more than {MAX_DISKS} disks")));
        }
        if let Some(d) = disks.iter().find(|d| !found.contains(d)) {
            return Err(Error::BadInput(format!(
                "unknown disk '{d}' (ephemeral disks: {})",
                if found.is_empty() { "none".to_string() } else { found.join(", ") }
            )));
        }
        disks.sort();
        disks.dedup();
        if disks.is_empty() {
            return Ok(None);
        }
        let want = Layout { disks, filesystem: fs.unwrap_or(Fs::Xfs) };
        let old = self.layout();
        let same = old.as_ref() == Some(&want);
        if self.mounted(&self.mnt) {
            if same {
                return Ok(Some(want));
            }
            return Err(Error::InUse(format!(
                "ephemeral storage is mounted at {} with another layout ({}); reboot before changing it",
                self.mnt.display(),
                old.map(|o| format!("{} on {}", o.filesystem.name(), o.disks.join(" "))).unwrap_or_default()
            )));
        }
        if !same && self.dev.join("mapper").join(DM_NAME).exists() {
            // Another layout's stripe set: its disks may be the ones wanted now.
            let _ = sys::dm::remove(DM_NAME);
        }
        let dev = self.device(&want)?;
        if !(same && has_fs(Path::new(&dev), want.filesystem)) {
            // Forget the old layout first: a mkfs cut short must not look like a kept one.
            let _ = fs::remove_file(&self.state);
            run_mkfs(want.filesystem, &dev)?;
        }
        self.save(&want)?;
        Ok(Some(want))
    }

    /// Bind the initialised storage over `dirs` (each in [`ALLOWED_DIRS`]); nothing
    /// initialised: nothing to do. Returns the directories bound now.
    pub fn bind(&self, dirs: &[String]) -> Result<Vec<String>, Error> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if dirs.is_empty() {
            return Err(Error::BadInput("no directories to bind".into()));
        }
        if let Some(d) = dirs.iter().find(|d| !ALLOWED_DIRS.contains(&d.as_str())) {
            return Err(Error::BadInput(format!(
                "'{d}' is not a directory ephemeral storage may cover (allowed: {})",
                ALLOWED_DIRS.join(", ")
            )));
        }
        let Some(layout) = self.layout() else {
            return Ok(vec![]);
        };
        if !self.mounted(&self.mnt) {
            let dev = self.device(&layout)?;
            fs::create_dir_all(&self.mnt).map_err(failed(format!("mkdir {}", self.mnt.display())))?;
            sys::mount(
                Some(dev.as_str()),
                &self.mnt,
                Some(layout.filesystem.name()),
                libc::MS_NOSUID | libc::MS_NODEV,
                None,
            )
            .map_err(failed(format!(
                "mount {dev} ({}) on {}",
                layout.filesystem.name(),
                self.mnt.display()
            )))?;
        }
        let mut bound = vec![];
        for d in dirs {
            let target = self.root.join(d.trim_start_matches('/'));
            if self.mounted(&target) {
                continue;
            }
            let src = self.mnt.join(format!(".{}", d.replace('/', "_")));
            fs::create_dir_all(&src).map_err(failed(format!("mkdir {}", src.display())))?;
            fs::create_dir_all(&target).map_err(failed(format!("mkdir {}", target.display())))?;
            if let Some(label) = crate::init::selinux::get_label(&target) {
                crate::init::selinux::set_label(&src, &label).map_err(failed("label"))?;
            }
            let src_s = src.to_string_lossy();
            sys::mount(Some(src_s.as_ref()), &target, None, libc::MS_BIND | libc::MS_REC, None)
                .map_err(failed(format!("bind {} on {}", src.display(), target.display())))?;
            sys::mount(None, &target, None, libc::MS_SHARED | libc::MS_REC, None)
                .map_err(failed(format!("make {} shared", target.display())))?;
            bound.push(d.clone());
        }
        Ok(bound)
    }
}

/// Run mkfs for `fs` on `dev`: its exit through `sys::wait_awaited` (PID 1's reaper takes
/// every child), its stderr (the first 64 KiB) in the error.
fn run_mkfs(fs: Fs, dev: &str) -> Result<(), Error> {
    let mut cmd = fs.mkfs(dev);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = sys::spawn_awaited(&mut cmd).map_err(failed(format!("run mkfs.{}", fs.name())))?;
    let mut err = Vec::new();
    if let Some(e) = child.stderr.take() {
        let _ = e.take(64 * 1024).read_to_end(&mut err);
    }
    match sys::wait_awaited(child.id()).map_err(failed(format!("wait for mkfs.{}", fs.name())))? {
        sys::Exit::Code(0) => Ok(()),
        exit => Err(Error::Failed(format!(
            "mkfs.{} {dev}: {exit}: {}",
            fs.name(),
            String::from_utf8_lossy(&err).trim()
        ))),
    }
}

/// The `striped` target over `disks` of `sizes` sectors: each disk's share is the smallest
/// size rounded down to a whole chunk.
pub fn stripe_target(disks: &[String], sizes: &[u64]) -> Result<sys::dm::Target, Error> {
    let per = sizes.iter().copied().min().unwrap_or(0) / CHUNK_SECTORS * CHUNK_SECTORS;
    if per == 0 {
        return Err(Error::BadInput(format!(
            "a disk of {} is smaller than one 256 KiB chunk",
            disks.join(" ")
        )));
    }
    let mut params = format!("{} {CHUNK_SECTORS}", disks.len());
    for d in disks {
        params.push_str(&format!(" {d} 0"));
    }
    Ok(sys::dm::Target { start_sector: 0, sectors: per * disks.len() as u64, kind: "striped".into(), params })
}

/// Whether `dev` starts with a superblock of `fs` (ext4: magic 0xEF53 at byte 1080; xfs:
/// `XFSB` at byte 0).
pub fn has_fs(dev: &Path, fs: Fs) -> bool {
    let Ok(mut f) = fs::File::open(dev) else {
        return false;
    };
    let mut buf = [0u8; 4];
    match fs {
        Fs::Ext4 => {
            f.seek(SeekFrom::Start(1080)).is_ok()
                && f.read_exact(&mut buf[..2]).is_ok()
                && buf[..2] == [0x53, 0xEF]
        }
        Fs::Xfs => f.read_exact(&mut buf).is_ok() && &buf == b"XFSB",
    }
}

static SYSTEM: std::sync::OnceLock<Paths> = std::sync::OnceLock::new();

/// Turn ephemeral storage on for the API (PID 1 does, at boot; dev mode does not).
pub fn enable() {
    let _ = SYSTEM.set(Paths::default());
}

/// The system's ephemeral storage, when [`enable`]d.
pub fn get() -> Option<&'static Paths> {
    SYSTEM.get()
}

/// The text or JSON form of a list, Bottlerocket's `format` query: `text` (default, one item a
/// line) or `json` (an array); anything else is `None`.
pub fn format_list(items: &[String], format: Option<&str>) -> Option<(String, &'static str)> {
    match format.unwrap_or("text") {
        "text" => Some((items.iter().map(|i| format!("{i}\n")).collect(), "text/plain")),
        "json" => Some((serde_json::to_string(items).expect("JSON serializes"), "application/json")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::TempDir;

    fn fake_disk(sys: &Path, name: &str, serial: Option<&str>, size: u64, parts: &[&str]) {
        let d = sys.join(name);
        fs::create_dir_all(&d).unwrap();
        if let Some(s) = serial {
            fs::write(d.join("serial"), format!("{s}\n")).unwrap();
        }
        fs::write(d.join("size"), format!("{size}\n")).unwrap();
        for (i, p) in parts.iter().enumerate() {
            let pd = d.join(format!("{name}{}", i + 1));
            fs::create_dir_all(&pd).unwrap();
            fs::write(pd.join("uevent"), format!("MAJOR=253\nPARTN={}\nPARTNAME={p}\n", i + 1)).unwrap();
        }
    }

    fn paths(dir: &Path) -> Paths {
        Paths {
            sys_block: dir.join("sys"),
            dev: dir.join("dev"),
            mnt: dir.join("mnt/.ephemeral"),
            state: dir.join("state/ephemeral-storage.json"),
            mountinfo: dir.join("mountinfo"),
            root: dir.join("root"),
            lock: Mutex::new(()),
        }
    }

    #[test]
    fn only_spare_disks_by_bottlerocket_rule_are_listed() {
        let t = TempDir::new("list");
        let sys = t.path().join("sys");
        fake_disk(&sys, "vda", None, 1 << 22, &["BERTH-BOOT-A", "BERTH-DATA"]);
        fake_disk(&sys, "vdc", Some("eph1"), 1 << 21, &[]);
        fake_disk(&sys, "vdb", Some("eph0"), 1 << 21, &[]);
        fake_disk(&sys, "vdd", Some("data"), 1 << 21, &[]);
        fake_disk(&sys, "vde", Some("eph-os"), 1 << 21, &["BERTH-ROOT-A"]);
        fake_disk(&sys, "sda", Some("eph9"), 1 << 21, &[]);
        fs::create_dir_all(sys.join("nvme0n1/device")).unwrap();
        fs::write(sys.join("nvme0n1/device/model"), "Amazon EC2 NVMe Instance Storage        \n").unwrap();
        fs::create_dir_all(sys.join("nvme1n1/device")).unwrap();
        fs::write(sys.join("nvme1n1/device/model"), "Amazon Elastic Block Store\n").unwrap();
        let p = paths(t.path());
        let dev = |n: &str| t.path().join("dev").join(n).to_string_lossy().into_owned();
        assert_eq!(p.list_disks(), vec![dev("nvme0n1"), dev("vdb"), dev("vdc")]);
    }

    #[test]
    fn init_refuses_unknown_disks_and_does_nothing_without_disks() {
        let t = TempDir::new("refuse");
        fake_disk(&t.path().join("sys"), "vdb", Some("eph0"), 1 << 21, &[]);
        fs::write(t.path().join("mountinfo"), "").unwrap();
        let p = paths(t.path());
        let e = p.init(Some(Fs::Ext4), Some(vec!["/dev/sda".into()])).unwrap_err();
        assert!(matches!(&e, Error::BadInput(m) if m.contains("unknown disk '/dev/sda'")), "{e}");
        assert!(p.init(None, Some(vec![])).unwrap().is_none());
        assert!(!p.state.exists());
        let e = p.bind(&["/etc".into()]).unwrap_err();
        assert!(matches!(&e, Error::BadInput(m) if m.contains("'/etc' is not a directory")), "{e}");
        // Nothing initialised: bind has nothing to do.
        assert_eq!(p.bind(&["/var/lib/containerd".into()]).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn init_of_one_disk_formats_it_and_a_second_init_keeps_it() {
        if !Path::new("/usr/sbin/mke2fs").exists() {
            let why = "no /usr/sbin/mke2fs (scripts/setup installs e2fsprogs)";
            return crate::testing::cannot_run("init_of_one_disk_formats_it_and_a_second_init_keeps_it", why);
        }
        // A file stands in for the disk: mke2fs formats files too.
        let t = TempDir::new("one-disk");
        fake_disk(&t.path().join("sys"), "vdb", Some("eph0"), 1 << 15, &[]);
        fs::write(t.path().join("mountinfo"), "").unwrap();
        fs::create_dir_all(t.path().join("dev")).unwrap();
        let disk = t.path().join("dev/vdb");
        fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
        let p = paths(t.path());
        let d = disk.to_string_lossy().into_owned();
        let l = p.init(Some(Fs::Ext4), None).unwrap().unwrap();
        assert_eq!(l, Layout { disks: vec![d.clone()], filesystem: Fs::Ext4 });
        assert!(has_fs(&disk, Fs::Ext4) && !has_fs(&disk, Fs::Xfs));
        // A marker past the superblock survives a second init with the same layout.
        let mut f = fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        std::io::Write::write_all(&mut f, b"kept").unwrap();
        drop(f);
        p.init(Some(Fs::Ext4), Some(vec![d.clone()])).unwrap();
        let mut buf = [0u8; 4];
        let mut f = fs::File::open(&disk).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"kept");
    }

    #[test]
    fn stripe_table_rounds_each_share_down_to_a_chunk() {
        let disks = vec!["/dev/vdb".to_string(), "/dev/vdc".to_string()];
        let t = stripe_target(&disks, &[2048 + 100, 4096]).unwrap();
        assert_eq!(t.kind, "striped");
        assert_eq!(t.sectors, 2 * 2048);
        assert_eq!(t.params, "2 512 /dev/vdb 0 /dev/vdc 0");
        assert!(matches!(stripe_target(&disks, &[100, 4096]), Err(Error::BadInput(_))));
    }

    #[test]
    fn list_formats() {
        let items = vec!["/dev/vdb".to_string(), "/dev/vdc".to_string()];
        assert_eq!(format_list(&items, None).unwrap().0, "/dev/vdb\n/dev/vdc\n");
        assert_eq!(format_list(&items, Some("json")).unwrap().0, r#"["/dev/vdb","/dev/vdc"]"#);
        assert!(format_list(&items, Some("yaml")).is_none());
        assert_eq!(Fs::parse("Xfs"), Some(Fs::Xfs));
        assert_eq!(Fs::parse("EXT4"), Some(Fs::Ext4));
        assert_eq!(Fs::parse("btrfs"), None);
    }
}
