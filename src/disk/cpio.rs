//! Writing newc ("070701") cpio archives, the format the kernel unpacks as an initramfs,
//! from a manifest in the syntax of the kernel's `gen_init_cpio`:
//!
//! ```text
//! dir  /dev 0755 0 0
//! nod  /dev/console 0600 0 0 c 5 1
//! file /init ${BERTH} 0755 0 0
//! slink /sbin/init /init 0777 0 0
//! ```
//! `${NAME}` in a source path is replaced from the given variables. Lines starting with `#`
//! and blank lines are ignored. Every entry gets mtime 0 so the archive is reproducible.

use std::collections::HashMap;
use std::io::{self, Write};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir { path: String, mode: u32 },
    Node { path: String, mode: u32, kind: char, major: u32, minor: u32 },
    File { path: String, data: Vec<u8>, mode: u32 },
    Symlink { path: String, target: String, mode: u32 },
}

fn parse_mode(s: &str, line: usize) -> Result<u32, String> {
    u32::from_str_radix(s, 8).map_err(|_| format!("line {line}: bad mode '{s}'"))
}

fn expand(s: &str, vars: &HashMap<String, String>, line: usize) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find('}').ok_or_else(|| format!("line {line}: unterminated ${{ in '{s}'"))?;
        let name = &rest[i + 2..i + end];
        let v = vars.get(name).ok_or_else(|| format!("line {line}: variable '{name}' is not set"))?;
        out.push_str(v);
        rest = &rest[i + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Parse a manifest; `file` sources are read through `read`.
fn parse(
    manifest: &str,
    vars: &HashMap<String, String>,
    read: &dyn Fn(&str) -> io::Result<Vec<u8>>,
) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    for (i, raw) in manifest.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let want = |k: usize| {
            if f.len() == k {
                Ok(())
            } else {
                Err(format!("line {n}: '{}' takes {} fields, got {}", f[0], k - 1, f.len() - 1))
            }
        };
        let entry = match f[0] {
            "dir" => {
                want(5)?;
                Entry::Dir { path: f[1].into(), mode: parse_mode(f[2], n)? }
            }
            "nod" => {
                want(8)?;
                let kind = match f[5] {
                    "c" => 'c',
                    "b" => 'b',
                    other => return Err(format!("line {n}: node type '{other}' is not c or b")),
                };
                let num = |s: &str| s.parse::<u32>().map_err(|_| format!("line {n}: bad number '{s}'"));
                Entry::Node {
                    path: f[1].into(),
                    mode: parse_mode(f[2], n)?,
                    kind,
                    major: num(f[6])?,
                    minor: num(f[7])?,
                }
            }
            "file" => {
                want(6)?;
                let src = expand(f[2], vars, n)?;
                let data = read(&src).map_err(|e| format!("line {n}: {src}: {e}"))?;
                Entry::File { path: f[1].into(), data, mode: parse_mode(f[3], n)? }
            }
            "slink" => {
                want(6)?;
                Entry::Symlink { path: f[1].into(), target: f[2].into(), mode: parse_mode(f[3], n)? }
            }
            other => return Err(format!("line {n}: unknown entry type '{other}'")),
        };
        entries.push(entry);
    }
    Ok(entries)
}

fn header(out: &mut Vec<u8>, ino: u32, mode: u32, rdev: (u32, u32), name: &str, size: usize) {
    let fields = [ino, mode, 0, 0, 1, 0, size as u32, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
    out.extend_from_slice(b"070701");
    for v in fields {
        out.extend_from_slice(format!("{v:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn push_data(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Build the archive bytes for `manifest`.
pub fn build(
    manifest: &str,
    vars: &HashMap<String, String>,
    read: &dyn Fn(&str) -> io::Result<Vec<u8>>,
) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for (i, e) in parse(manifest, vars, read)?.iter().enumerate() {
        let ino = i as u32 + 1;
        match e {
            Entry::Dir { path, mode } => header(&mut out, ino, 0o040000 | mode, (0, 0), rel(path), 0),
            Entry::Node { path, mode, kind, major, minor } => {
                let t = if *kind == 'c' { 0o020000 } else { 0o060000 };
                header(&mut out, ino, t | mode, (*major, *minor), rel(path), 0)
            }
            Entry::File { path, data, mode } => {
                header(&mut out, ino, 0o100000 | mode, (0, 0), rel(path), data.len());
                push_data(&mut out, data);
            }
            Entry::Symlink { path, target, mode } => {
                header(&mut out, ino, 0o120000 | mode, (0, 0), rel(path), target.len());
                push_data(&mut out, target.as_bytes());
            }
        }
    }
    header(&mut out, 0, 0, (0, 0), "TRAILER!!!", 0);
    Ok(out)
}

fn rel(path: &str) -> &str {
    path.trim_start_matches('/')
}

/// Create the manifest's tree under `root` (for filesystem images such as the EROFS root).
/// Device nodes are refused: the running system gets them from devtmpfs.
pub fn stage_dir(
    manifest: &str,
    vars: &HashMap<String, String>,
    root: &std::path::Path,
) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let io = |p: &std::path::Path, e: io::Error| format!("{}: {e}", p.display());
    for e in parse(manifest, vars, &|p| std::fs::read(p))? {
        let (path, mode) = match &e {
            Entry::Dir { path, mode } | Entry::File { path, mode, .. } => (path, *mode),
            Entry::Symlink { path, target, .. } => {
                let p = root.join(rel(path));
                let _ = std::fs::remove_file(&p);
                std::os::unix::fs::symlink(target, &p).map_err(|e| io(&p, e))?;
                continue;
            }
            Entry::Node { path, .. } => {
                return Err(format!("{path}: device nodes are not allowed in a filesystem tree"))
            }
        };
        let p = root.join(rel(path));
        match &e {
            Entry::Dir { .. } => std::fs::create_dir_all(&p).map_err(|e| io(&p, e))?,
            Entry::File { data, .. } => std::fs::write(&p, data).map_err(|e| io(&p, e))?,
            _ => unreachable!("handled above"),
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).map_err(|e| io(&p, e))?;
    }
    Ok(())
}

/// Build and write the archive.
pub fn write_archive<W: Write>(
    manifest: &str,
    vars: &HashMap<String, String>,
    out: &mut W,
) -> Result<(), String> {
    let bytes = build(manifest, vars, &|p| std::fs::read(p))?;
    out.write_all(&bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> HashMap<String, String> {
        HashMap::from([("BIN".to_string(), "/x/berth".to_string())])
    }

    fn fake_read(p: &str) -> io::Result<Vec<u8>> {
        if p == "/x/berth" {
            Ok(b"ELF!!".to_vec())
        } else {
            Err(io::Error::new(io::ErrorKind::NotFound, "no such file"))
        }
    }

    #[test]
    fn writes_newc_entries() {
        let m = "# comment\ndir /dev 0755 0 0\nnod /dev/console 0600 0 0 c 5 1\nfile /init ${BIN} 0755 0 0\n";
        let a = build(m, &vars(), &fake_read).unwrap();
        assert_eq!(&a[..6], b"070701");
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("dev/console"));
        assert!(text.contains("ELF!!"));
        assert!(text.ends_with("TRAILER!!!\0\0\0\0") || text.contains("TRAILER!!!"));
        // The console node's mode and device numbers.
        let i = text.find("dev/console").unwrap();
        let h = &text[i - 110..i];
        assert_eq!(&h[14..22], "00002180"); // S_IFCHR | 0600
        assert_eq!(&h[78..86], "00000005"); // rdevmajor
        assert_eq!(&h[86..94], "00000001"); // rdevminor
    }

    #[test]
    fn stages_a_tree() {
        let root = std::env::temp_dir().join(format!("berth-stage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let m = "dir /sbin 0755 0 0\nfile /sbin/init ${BIN} 0700 0 0\nslink /init /sbin/init 0777 0 0\n";
        // stage_dir reads real files: a missing source is named in the error.
        assert!(stage_dir(m, &vars(), &root).unwrap_err().contains("/x/berth"));
        let bin = root.join("berth.bin");
        std::fs::write(&bin, b"ELF").unwrap();
        let v = HashMap::from([("BIN".to_string(), bin.to_string_lossy().into_owned())]);
        stage_dir(m, &v, &root).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let md = std::fs::metadata(root.join("sbin/init")).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::read_link(root.join("init")).unwrap(), std::path::PathBuf::from("/sbin/init"));
        assert!(stage_dir("nod /dev/x 0600 0 0 c 1 1", &v, &root).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn errors_name_the_line() {
        for (m, needle) in [
            ("bogus /x", "line 1: unknown entry type"),
            ("dir /x 0755 0", "line 1: 'dir' takes 4 fields"),
            ("\nfile /init ${NOPE} 0755 0 0", "line 2: variable 'NOPE'"),
            ("file /init /missing 0755 0 0", "/missing"),
            ("dir /x 9z9 0 0", "bad mode"),
            ("nod /x 0600 0 0 p 1 1", "not c or b"),
        ] {
            let e = build(m, &vars(), &fake_read).unwrap_err();
            assert!(e.contains(needle), "{m}: {e}");
        }
    }
}
