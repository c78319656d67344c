"""UEFI cases: no `-kernel`. The firmware (OVMF on x86_64, AAVMF on arm64) starts the slot's
signed UKI from its BOOT partition, and A/B goes through the firmware's own Boot####,
BootOrder and BootNext (docs/ab-boot.md). Each VM keeps its firmware variable store (NVRAM)
across its restarts, as a machine does.

Images: the regular image (its BOOT partitions carry the UKIs), the v2 and v3 slot builds of
scripts/test, and on x86_64 a v4 whose signed command line hangs it on trial
(`berth.fault=hang-on-trial berth.watchdog-timeout=15`).
"""

import os
import re
import shutil
import subprocess
import tempfile

from berthvm import VM, gpt_partitions, arch_paths
from cases import case, copy_slot, flip_byte, host_berth
from update_cases import Repo, boot, reboot, run_command, status


def firmware_report(vm):
    st, report = vm.api("GET", "/boot")
    assert st == 200, (st, report)
    fw = report["firmware"]
    assert fw, f"no firmware section in /boot: {report}"
    return fw


def started(vm, slot, timeout=180):
    """Wait until stage 1 says the firmware started `slot`'s UKI; returns the BootCurrent it saw."""
    m = vm.wait_for(rf"UEFI boot of slot {slot}'s UKI \(BootCurrent (\w+)\)", timeout=timeout)
    return m.group(1)


def fat(disk, part):
    """mtools' image argument for the FAT filesystem of partition `part` of `disk`."""
    return f"{disk}@@{gpt_partitions(disk)[part][0]}"


def stage_version(vm, repo, version):
    """Stage `version` from `repo` (pinned with version-lock) and activate it."""
    settings = repo.settings()
    settings["updates"]["version-lock"] = version
    st, _ = vm.api("PATCH", "/settings", settings)
    assert st == 204
    assert vm.api("POST", "/tx/commit_and_apply")[0] == 200
    s = run_command(vm, "refresh-updates", "refresh")
    assert s["chosen_update"]["version"] == version, s
    s = run_command(vm, "prepare-update", "prepare")
    assert s["update_state"] == "Staged" and s["staging_partition"]["image"]["version"] == version, s
    st, s = vm.api("POST", "/actions/activate-update")
    assert st == 200 and s["update_state"] == "Ready", (st, s)
    return s


def uefi_ab(arch, disk_bus):
    builds = ["v2", "v3"] + (["v4-hang"] if arch == "x86_64" else [])
    # settings.boot without Secure Boot: the entries' optional data carries each slot's own line
    # (read from its UKI) and these, from the first boot's entries on.
    ud = ('[settings]\nmotd = "from the BOOT partition"\n'
          '[settings.boot.kernel-parameters]\n"printk.devkmsg" = ["on"]\n"sysctl.vm.overcommit_ratio" = ["50"]\n'
          '[settings.boot.init-parameters]\n"berth.health-timeout" = ["600"]\n')
    params = "printk.devkmsg=on sysctl.vm.overcommit_ratio=50 -- berth.health-timeout=600"
    with Repo(arch, builds) as repo, VM(arch, raw=True, reboot=True, firmware="uefi", disk_bus=disk_bus,
                                       disk_size="4G") as vm:
        # Bare metal style: the image written to a larger disk, user data on its BOOT partition.
        udf = os.path.join(vm.tmp, "user-data.toml")
        with open(udf, "w") as f:
            f.write(ud)
        subprocess.run(["mcopy", "-i", fat(vm.disk, "BERTH-BOOT-A"), udf, "::/user-data.toml"], check=True)

        # v1, first boot: the firmware finds no entries and starts the removable-media path.
        vm.start()
        first = started(vm, "A")
        boot(vm)
        fw = firmware_report(vm)
        a, b = fw["entries"]["A"], fw["entries"]["B"]
        assert first not in (a, b), f"the first boot came through the removable path, not {first}: {fw}"
        assert fw["boot_order"][0] == a and b not in fw["boot_order"], fw
        assert fw["boot_next"] is None and fw["secure_boot"] is False, fw
        st, os_ = vm.api("GET", "/os")
        assert st == 200 and os_["boot"] == {"backend": "uefi", "secure_boot": False}, os_
        assert vm.api("GET", "/settings")[1].get("motd") == "from the BOOT partition"
        # The removable path has no entry, so no parameters this boot; A's entry has them now.
        cl = vm.api("GET", "/boot")[1]["cmdline"]
        assert cl["settable"] is True and params not in cl["current"], cl
        assert cl["next"]["A"] == cl["current"] + " " + params, cl
        assert re.search(r"grew BERTH-DATA from 64 MiB to \d{4} MiB", vm.console()), vm.tail()

        # v2 into B: BootNext is B's entry, one try.
        s = stage_version(vm, repo, "0.2.0")
        fw = firmware_report(vm)
        assert fw["boot_next"] == b and fw["boot_order"][0] == a, fw
        reboot(vm)
        assert started(vm, "B") == b, "BootCurrent must be slot B's entry"
        r = vm.wait_ready(300)
        assert r["slot"] == "B" and r["version"] == "0.2.0", r
        vm.wait_for(r"slot B marked successful")
        vm.wait_for(r"berth: api bridge")
        fw = firmware_report(vm)
        assert fw["boot_order"][:2] == [b, a] and fw["boot_next"] is None, fw
        # B's entry, written when v2 was activated, gave this boot v2's own line (its root
        # hash, berth.slot=B) and the parameters; PID 1 read its init argument.
        cl = vm.api("GET", "/boot")[1]["cmdline"]
        assert cl["current"].endswith(" " + params) and "berth.slot=B " in cl["current"], cl
        assert cl["next"]["B"] == cl["current"], cl
        assert "init arguments (after --): berth.health-timeout=600" in vm.console(), vm.tail()

        # v3 into A, its root corrupted while the machine is off: the trial fails and the
        # firmware falls back to BootOrder's first entry, v2 in B, by itself.
        stage_version(vm, repo, "0.3.0")
        assert firmware_report(vm)["boot_next"] == a
        st, _ = vm.api("POST", "/actions/shutdown")
        assert st == 202
        vm.wait_exit(120)
        flip_byte(vm.disk, gpt_partitions(vm.disk)["BERTH-ROOT-A"][0] + 1024 + 8)
        vm.mark()
        vm.start()
        assert started(vm, "A") == a, "BootCurrent must be slot A's entry"
        vm.wait_for(r"verity.*(data block \d+ is corrupted|corrupt)", timeout=120)
        vm.mark()
        started(vm, "B")
        r = vm.wait_ready(300)
        assert r["slot"] == "B" and r["version"] == "0.2.0", r
        vm.wait_for(r"berth: api bridge")
        s = status(vm)
        assert s["last_rollback"]["failed_version"] == "0.3.0" and s["last_rollback"]["automatic"], s
        fw = firmware_report(vm)
        assert fw["boot_order"][0] == b and a not in fw["boot_order"] and fw["boot_next"] is None, fw

        if arch == "x86_64":
            # v4 hangs on trial; only the watchdog can end it, and B comes back.
            stage_version(vm, repo, "0.4.0")
            reboot(vm)
            assert started(vm, "A") == a
            vm.wait_for(r"fault injection berth.fault=hang-on-trial", timeout=180)
            vm.mark()
            started(vm, "B", timeout=120)
            r = vm.wait_ready(300)
            assert r["slot"] == "B", r
            vm.wait_for(r"berth: api bridge")
            s = status(vm)
            assert s["last_rollback"]["failed_version"] == "0.4.0", s


@case()
def uefi_metal_on_nvme_updates_and_falls_back(arch):
    """UEFI with no boot loader, bare-metal style: the raw image on a larger NVMe disk boots
    from the removable-media path, grows DATA, applies user data from its BOOT partition (with
    settings.boot parameters) and creates its Boot#### entries; v2 is tried through BootNext
    and boots with its own command line plus the parameters, then leads BootOrder; a v3 with a
    corrupt root, and a v4 that hangs (reset by the watchdog), each fall back to v2 by the
    firmware's own BootOrder."""
    uefi_ab(arch, "nvme")


@case(arches=("arm64",))
def uefi_updates_and_falls_back(arch):
    """UEFI (AAVMF) with no boot loader: the image boots its UKI from the removable-media path
    and creates its entries; v2 is tried through BootNext, then leads BootOrder; a v3 with a
    corrupt root falls back to v2 by the firmware's own BootOrder."""
    uefi_ab(arch, "virtio")


def foreign_signed(efi, out):
    """`efi` re-signed with a key the firmware does not know."""
    d = tempfile.mkdtemp(prefix="berth-foreign-")
    subprocess.run(["openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
                    "-subj", "/CN=not Berth/", "-keyout", f"{d}/k", "-out", f"{d}/c"], check=True,
                   capture_output=True)
    unsigned = f"{d}/unsigned.efi"
    shutil.copyfile(efi, unsigned)
    subprocess.run(["sbattach", "--remove", unsigned], check=True, capture_output=True)
    subprocess.run(["sbsign", "--key", f"{d}/k", "--cert", f"{d}/c", "--output", out, unsigned], check=True,
                   capture_output=True)
    shutil.rmtree(d)


@case()
def secure_boot_refuses_tampered_ukis(arch):
    """Secure Boot on, Berth's keys enrolled: the signed UKI boots, locked down; settings.boot is
    refused (Secure Boot authenticates the command line); a root hash
    changed in slot.toml has no effect (the signed command line's is used); a UKI with one
    flipped byte, and one signed with another key, are refused by the firmware, which starts
    the other slot instead."""
    with VM(arch, raw=True, reboot=True, firmware="secure") as vm:
        # Both slots hold v1 and are known good; A leads.
        copy_slot(vm.disk)
        subprocess.run([host_berth(), "bootctl", "set", vm.disk, "B", "1", "0", "1"], check=True)
        boot_a = fat(vm.disk, "BERTH-BOOT-A")
        meta = os.path.join(vm.tmp, "slot.toml")
        subprocess.run(["mcopy", "-i", boot_a, "::/slot.toml", meta], check=True)
        text = open(meta).read()
        forged = re.sub(r'root-hash = "[0-9a-f]{64}"', 'root-hash = "' + "0" * 64 + '"', text)
        assert forged != text
        open(meta, "w").write(forged)
        subprocess.run(["mcopy", "-o", "-i", boot_a, meta, "::/slot.toml"], check=True)
        vm.start()
        started(vm, "A")
        vm.wait_for(r"Secure Boot on")
        vm.wait_for(r"slot.toml says root hash 0{64}, the kernel command line [0-9a-f]{64}; using the command line's")
        boot(vm)
        fw = firmware_report(vm)
        assert fw["secure_boot"] is True and "[integrity]" in (fw["lockdown"] or ""), fw
        st, os_ = vm.api("GET", "/os")
        assert st == 200 and os_["boot"] == {"backend": "uefi", "secure_boot": True}, os_
        assert fw["boot_order"][:2] == [fw["entries"]["A"], fw["entries"]["B"]], fw
        # Secure Boot authenticates the command line: settings.boot is refused with the reason.
        st, e = vm.api("PATCH", "/settings", {"boot": {"kernel-parameters": {"nosmt": []}}})
        assert st == 400 and "Secure Boot" in str(e) and "BERTH_CMDLINE_EXTRA" in str(e), (st, e)
        cl = vm.api("GET", "/boot")[1]["cmdline"]
        assert cl["settable"] is False and "Secure Boot" in cl["why_not"], cl

        uki = os.path.join(vm.tmp, "A.EFI")
        for tamper in ("flipped byte", "foreign key"):
            st, _ = vm.api("POST", "/actions/shutdown")
            assert st == 202
            vm.wait_exit(120)
            subprocess.run(["mcopy", "-o", "-i", boot_a, "::/EFI/BERTH/A.EFI", uki], check=True)
            if tamper == "flipped byte":
                flip_byte(uki, os.path.getsize(uki) // 2)
            else:
                original = os.path.join(arch_paths(arch)["dir"], "uki", "A.EFI")
                foreign_signed(original, uki)
            subprocess.run(["mcopy", "-o", "-i", boot_a, uki, "::/EFI/BERTH/A.EFI"], check=True)
            vm.mark()
            vm.start()
            started(vm, "B")
            r = vm.wait_ready(300)
            assert r["slot"] == "B", (tamper, r)
            assert not re.search(r"UEFI boot of slot A's UKI", "\n".join(vm.out[vm.since:])), \
                f"the firmware started A's {tamper} UKI\n{vm.tail()}"
            vm.wait_for(r"berth: api bridge")
