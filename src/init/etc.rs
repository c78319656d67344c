//! /etc is a tmpfs, rendered on every boot. This renders the base files every Linux program
//! expects; files that depend on settings (motd, hostname, hosts, ...) come from
//! `settings::render` in a later phase.

use std::fs;

use super::Ctx;
use crate::boot::BootError;

pub fn render(ctx: &mut Ctx) -> Result<(), BootError> {
    let h = &ctx.handoff;
    let files: [(&str, String); 4] = [
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
        ("nsswitch.conf", "passwd: files\ngroup: files\nhosts: files dns\n".into()),
    ];
    for (name, text) in files {
        let p = format!("/etc/{name}");
        fs::write(&p, text).map_err(BootError::io("write", &p))?;
    }
    let _ = std::os::unix::fs::symlink("/proc/self/mounts", "/etc/mtab");
    Ok(())
}
