//! Host-side build tools, as subcommands of the same binary: the dm-verity hash tree of a
//! root image, newc cpio archives for the initramfs, and a view of a disk's boot-control state.
//! `scripts/build-image` drives them; the standard tools do the rest (mkfs.erofs, mkfs.vfat,
//! mtools, mkfs.ext4, sgdisk).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::BufReader;
use std::path::Path;

use crate::bootctl::{BootControl, GptBootControl, Slot};
use crate::disk::{cpio, gpt::Gpt, verity};

/// `berth verity-format DATA HASH [SALT_HEX]`: write HASH, print the `[verity]` TOML table.
pub fn verity_format(args: &[String]) -> Result<(), String> {
    let [data, hash, rest @ ..] = args else {
        return Err("usage: berth verity-format DATA_IMAGE HASH_OUT [SALT_HEX]".into());
    };
    let salt = match rest.first() {
        Some(s) => hex::decode(s).map_err(|e| format!("salt '{s}' is not hex: {e}"))?,
        None => {
            let mut s = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut s)
                .map_err(|_| "no randomness for the salt")?;
            s.to_vec()
        }
    };
    let f = File::open(data).map_err(|e| format!("{data}: {e}"))?;
    let len = f.metadata().map_err(|e| format!("{data}: {e}"))?.len();
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(hash)
        .map_err(|e| format!("{hash}: {e}"))?;
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&salt_or_hash(&salt)[..16]);
    let p = verity::format(&mut BufReader::with_capacity(1 << 20, f), len, &mut out, 4096, &salt, uuid)
        .map_err(|e| format!("{data}: {e}"))?;
    #[derive(serde::Serialize)]
    struct Wrapper {
        verity: verity::VerityParams,
    }
    print!("{}", toml::to_string(&Wrapper { verity: p }).map_err(|e| e.to_string())?);
    Ok(())
}

fn salt_or_hash(salt: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, salt).as_ref().to_vec()
}

/// `berth mkcpio MANIFEST OUT [NAME=VALUE...]`
pub fn mkcpio(args: &[String]) -> Result<(), String> {
    let [manifest, out, vars @ ..] = args else {
        return Err("usage: berth mkcpio MANIFEST OUT [NAME=VALUE...]".into());
    };
    let text = std::fs::read_to_string(manifest).map_err(|e| format!("{manifest}: {e}"))?;
    let vars = parse_vars(vars)?;
    let mut f = File::create(out).map_err(|e| format!("{out}: {e}"))?;
    cpio::write_archive(&text, &vars, &mut f).map_err(|e| format!("{manifest}: {e}"))
}

/// `berth mkroot MANIFEST DIR [NAME=VALUE...]`: create the manifest's tree under DIR.
pub fn mkroot(args: &[String]) -> Result<(), String> {
    let [manifest, dir, vars @ ..] = args else {
        return Err("usage: berth mkroot MANIFEST DIR [NAME=VALUE...]".into());
    };
    let text = std::fs::read_to_string(manifest).map_err(|e| format!("{manifest}: {e}"))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{dir}: {e}"))?;
    cpio::stage_dir(&text, &parse_vars(vars)?, Path::new(dir)).map_err(|e| format!("{manifest}: {e}"))
}

fn parse_vars(vars: &[String]) -> Result<HashMap<String, String>, String> {
    vars.iter()
        .map(|v| {
            v.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or(format!("'{v}' is not NAME=VALUE"))
        })
        .collect()
}

/// `berth bootctl show DISK` | `berth bootctl set DISK SLOT PRIORITY TRIES SUCCESSFUL` |
/// `berth bootctl autoboot DISK` (the `autoboot.txt` a Raspberry Pi image must carry)
pub fn bootctl(args: &[String]) -> Result<(), String> {
    match args {
        [cmd, disk] if cmd == "show" => {
            let mut f = File::open(disk).map_err(|e| format!("{disk}: {e}"))?;
            let gpt = Gpt::read(&mut f, 512).map_err(|e| format!("{disk}: {e}"))?;
            let mut bc = GptBootControl::new(Path::new(disk), 512);
            for slot in [Slot::A, Slot::B] {
                let s = bc.state(slot).map_err(|e| e.to_string())?;
                println!(
                    "slot={slot} priority={} tries={} successful={}",
                    s.priority, s.tries, s.successful as u8
                );
            }
            for p in gpt.partitions() {
                println!(
                    "part={} name={} first={} last={} attrs={:#x}",
                    p.number, p.name, p.first_lba, p.last_lba, p.attributes
                );
            }
            Ok(())
        }
        [cmd, disk, slot, prio, tries, ok] if cmd == "set" => {
            let slot = Slot::parse(slot).ok_or_else(|| format!("slot '{slot}' is not A or B"))?;
            let num = |s: &str| {
                s.parse::<u8>().ok().filter(|&v| v < 16).ok_or_else(|| format!("'{s}' is not 0..15"))
            };
            let state =
                crate::bootctl::SlotState { priority: num(prio)?, tries: num(tries)?, successful: ok == "1" };
            GptBootControl::new(Path::new(disk), 512).set_state(slot, state).map_err(|e| e.to_string())
        }
        [cmd, disk] if cmd == "autoboot" => {
            // What autoboot.txt must say for the disk's record (Raspberry Pi images).
            let mut f = File::open(disk).map_err(|e| format!("{disk}: {e}"))?;
            let gpt = Gpt::read(&mut f, 512).map_err(|e| format!("{disk}: {e}"))?;
            let number = |slot: Slot| {
                gpt.by_name(&slot.label("BOOT")).map(|p| p.number).ok_or(format!("{disk}: no {}", slot.label("BOOT")))
            };
            let boot = [number(Slot::A)?, number(Slot::B)?];
            let slots = GptBootControl::new(Path::new(disk), 512).states().map_err(|e| e.to_string())?;
            print!("{}", crate::bootctl::rpi::Autoboot::for_slots(slots, boot).render());
            Ok(())
        }
        _ => Err(
            "usage: berth bootctl show DISK | berth bootctl set DISK A|B PRIORITY TRIES 0|1 | berth bootctl autoboot DISK"
                .into(),
        ),
    }
}
