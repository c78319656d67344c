//! /etc is a tmpfs, rendered on every boot. This renders the base files every Linux program
//! expects; the settings issue adds files rendered from settings.

use std::fs;

use super::Ctx;

pub fn render(ctx: &mut Ctx) -> Result<(), String> {
    let h = &ctx.handoff;
    let files: [(&str, String); 6] = [
        (
            "os-release",
            format!(
                "NAME=Berth\nID=berth\nPRETTY_NAME=\"Berth {v}\"\nVERSION_ID={v}\nVARIANT_ID={}\nBUILD_ID={}\n",
                h.variant,
                &h.root_hash[..h.root_hash.len().min(12)],
                v = h.version
            ),
        ),
        ("passwd", "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n".into()),
        ("group", "root:x:0:\ntty:x:5:\napi:x:274:\nnogroup:x:65534:\n".into()),
        ("hosts", "127.0.0.1 localhost\n::1 localhost\n".into()),
        ("hostname", format!("{}\n", ctx.cmdline.get("hostname").unwrap_or("berth"))),
        ("nsswitch.conf", "passwd: files\ngroup: files\nhosts: files dns\n".into()),
    ];
    for (name, text) in files {
        let p = format!("/etc/{name}");
        fs::write(&p, text).map_err(|e| format!("{p}: {e}"))?;
    }
    let _ = std::os::unix::fs::symlink("/proc/self/mounts", "/etc/mtab");
    Ok(())
}
