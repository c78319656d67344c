"""Raspberry Pi 4 case: the `rpi` image (scripts/build-image arm64 --platform rpi) checked from
outside, then booted on QEMU's `raspi4b` from its SD-card image.

QEMU 10's raspi4b does not run the VideoCore firmware: it loads the kernel, device tree and
initramfs itself. The case takes all three from the card's BERTH-BOOT-A partition (what the
firmware would load) and applies to the device tree, here and not in the shipped one, what
QEMU needs: the `aon_intr` interrupt controller disabled, the MMC regulators and power
sequence (which the firmware's GPIO mailbox drives, unanswered by QEMU) removed, the DWC2 USB
port in host mode (QEMU's usb-net hangs off it), `clk_ignore_unused` on the command line. It
also adds what the firmware would have reported, `/chosen/bootloader/partition` and `tryboot`,
so stage 1 takes the Raspberry Pi boot-control path as on a Pi. QEMU's raspi4b has no PCIe,
no GENET and no virtio: the network is `-device usb-net` (cdc_ether), and the API is bridged
over `-device usb-serial` (an FTDI FT232BM, ttyUSB0; `berth.api-serial=ttyUSB0`), plugged
always (`always-plugged=on`; else QEMU attaches it only while a host client is connected). Not
over the mini UART (ttyS1): QEMU's bcm2835_aux has no divisor latch, so Linux's baud-rate
writes land in its data and interrupt-enable registers. The bcm2835 watchdog
resets the VM as soon as it is opened, so the case boots with `berth.watchdog=off`.
"""

import os
import re
import subprocess
import tempfile
import time

from berthvm import VM, BUILD, gpt_partitions
from cases import case, host_berth

TRYBOOT_STRING = b"tryboot: the next boot tries the [tryboot] partition once"


def rpi_dir(arch):
    return os.path.join(BUILD, f"{arch}-rpi")


def fat(disk, part):
    return f"{disk}@@{gpt_partitions(disk)[part][0]}"


def mtype(disk, part, name):
    return subprocess.run(["mtype", "-i", fat(disk, part), f"::/{name}"], check=True,
                          capture_output=True).stdout


def mcopy_out(disk, part, name, dest):
    subprocess.run(["mcopy", "-n", "-i", fat(disk, part), f"::/{name}", dest], check=True)


def dt_nodes(dts):
    """{path: set of property names} of a decompiled device tree."""
    nodes, stack = {}, []
    for line in dts.splitlines():
        s = line.strip()
        m = re.match(r"^(?:[\w-]+:\s*)*([\w,.@+-]+|/)\s*\{$", s)
        if m:
            name = m.group(1)
            stack.append(name)
            path = "/" if stack == ["/"] else "/" + "/".join(stack[1:])
            nodes[path] = set()
        elif s.startswith("};"):
            stack.pop()
        elif stack and re.match(r"^[\w,.#+-]+(\s*=.*)?;$", s):
            path = "/" if stack == ["/"] else "/" + "/".join(stack[1:])
            nodes[path].add(re.split(r"[\s=;]", s)[0])
    return nodes


def qemu_dtb(src, dest, boot_partition):
    """The Pi 4 device tree with QEMU's fixes and the firmware's /chosen/bootloader report."""
    subprocess.run(["cp", src, dest], check=True)
    dts = subprocess.run(["dtc", "-q", "-I", "dtb", "-O", "dts", src], check=True,
                         capture_output=True, text=True).stdout
    nodes = dt_nodes(dts)
    fdtput = lambda *a: subprocess.run(["fdtput", dest, *a], check=True)  # noqa: E731
    aon = [p for p in nodes if p.endswith("/interrupt-controller@7ef00100")]
    usb = [p for p in nodes if p.endswith("/usb@7e980000")]
    assert aon and usb, "no aon_intr or DWC2 node in the device tree"
    fdtput("-t", "s", aon[0], "status", "disabled")
    fdtput("-t", "s", usb[0], "dr_mode", "host")
    removed = 0
    for path, props in nodes.items():
        for prop in ("vmmc-supply", "vqmmc-supply", "mmc-pwrseq"):
            if prop in props:
                fdtput("-d", path, prop)
                removed += 1
    assert removed, "no MMC supplies found to remove"
    fdtput("-c", "/chosen/bootloader")
    fdtput("-t", "x", "/chosen/bootloader", "partition", f"{boot_partition:x}")
    fdtput("-t", "x", "/chosen/bootloader", "tryboot", "0")


class Raspi4b(VM):
    """QEMU raspi4b booting the kernel, device tree and initramfs given, the SD card `disk`."""

    def __init__(self, arch, kernel, dtb, initrd, append, disk_size="4G", base=None):
        # VM's own set-up, with the rpi image (or `base`, a raw copy of it) as the card under an
        # overlay: QEMU wants an SD card's size a power of two.
        import threading
        self.arch, self.tmp = arch, tempfile.mkdtemp(prefix=f"berth-raspi4b-{arch}-")
        self.disk, self.format = os.path.join(self.tmp, "disk.qcow2"), "qcow2"
        self.qmp_path = os.path.join(self.tmp, "qmp.sock")
        self.api_sock = os.path.join(self.tmp, "api.sock")
        self.out, self.times, self.since = [], [], 0
        self.lock = threading.Condition()
        self.proc = None
        backing = (base, "raw") if base else (os.path.join(rpi_dir(arch), "disk.qcow2"), "qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing[0], "-F", backing[1],
                        self.disk, disk_size], check=True)
        self.kernel, self.dtb, self.initrd = kernel, dtb, initrd
        self.append = append

    def start(self):
        argv = ["qemu-system-aarch64", "-M", "raspi4b", "-accel", "tcg",
                "-kernel", self.kernel, "-dtb", self.dtb, "-initrd", self.initrd,
                "-append", self.append,
                "-drive", f"file={self.disk},if=sd,format={self.format},cache=unsafe",
                "-netdev", "user,id=net0", "-device", "usb-net,netdev=net0",
                "-display", "none", "-monitor", "none", "-no-reboot",
                "-serial", "stdio",
                "-chardev", f"socket,id=bridge,path={self.api_sock},server=on,wait=off",
                "-device", "usb-serial,chardev=bridge,always-plugged=on",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        self.out, self.times, self.since = [], [], 0
        self.started_at = time.monotonic()
        import threading
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        threading.Thread(target=self._pump, daemon=True).start()
        return self


def check_image(disk, kernel):
    """What the Pi's EEPROM and firmware need, where they look for it."""
    with open(disk, "rb") as f:
        mbr = f.read(512)
        f.seek(512)
        gpt = f.read(8)
    assert mbr[510:512] == b"\x55\xaa" and mbr[446 + 4] == 0xEE, "no protective MBR"
    assert gpt == b"EFI PART", "no GPT header at LBA 1"
    out = subprocess.run(["sgdisk", "-p", disk], check=True, capture_output=True, text=True).stdout
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    names = [r[-1] for r in rows]
    assert names[0] == "BERTH-AUTOBOOT", f"autoboot.txt's partition is not the first: {names}"
    assert rows[0][5] == "0700", f"BERTH-AUTOBOOT is type {rows[0][5]}, not basic data (0700)"
    assert names[1:4] == ["BERTH-BOOT-A", "BERTH-ROOT-A", "BERTH-HASH-A"], names
    boot_a = int(rows[1][0])
    for part in ("BERTH-AUTOBOOT", "BERTH-BOOT-A"):
        off = gpt_partitions(disk)[part][0]
        with open(disk, "rb") as f:
            f.seek(off)
            bs = f.read(512)
        assert bs[510:512] == b"\x55\xaa" and b"FAT" in bs[54:90], f"{part} is not FAT"
    autoboot = mtype(disk, "BERTH-AUTOBOOT", "autoboot.txt").decode()
    assert len(autoboot) <= 512, "autoboot.txt is longer than the firmware reads"
    assert re.search(rf"\[all\]\ntryboot_a_b=1\nboot_partition={boot_a}\n\[tryboot\]\n"
                     rf"boot_partition={boot_a}\n", autoboot), autoboot
    config = mtype(disk, "BERTH-BOOT-A", "config.txt").decode()
    for line in ("arm_64bit=1", "enable_uart=1", "upstream_kernel=1", "kernel=Image",
                 "initramfs initramfs.gz followkernel"):
        assert line in config.splitlines(), f"config.txt lacks {line}:\n{config}"
    listing = subprocess.run(["mdir", "-b", "-i", fat(disk, "BERTH-BOOT-A"), "::/"], check=True,
                             capture_output=True, text=True).stdout
    files = {os.path.basename(x.strip()).lower() for x in listing.splitlines()}
    for name in ("start4.elf", "fixup4.dat", "image", "initramfs.gz", "cmdline.txt", "slot.toml",
                 "bcm2711-rpi-4-b.dtb", "bcm2711-rpi-400.dtb", "bcm2711-rpi-cm4-io.dtb"):
        assert name in files, f"BERTH-BOOT-A lacks {name}: {sorted(files)}"
    pifw = os.path.join(os.environ.get("BERTH_CACHE", os.path.expanduser("~/.cache/berth")),
                        "firmware/raspi-firmware/usr/lib/raspi-firmware/start4.elf")
    assert mtype(disk, "BERTH-BOOT-A", "start4.elf") == open(pifw, "rb").read(), \
        "start4.elf is not Debian's raspi-firmware"
    image = mtype(disk, "BERTH-BOOT-A", "Image")
    assert image == open(kernel, "rb").read(), "the card's Image is not the built kernel"
    assert image[56:60] == b"ARM\x64", "Image has no arm64 boot header"
    assert TRYBOOT_STRING in image, "the kernel lacks the tryboot patch"
    return boot_a


@case(arches=("arm64",))
def raspi4b_boots_the_sd_card_image(arch):
    """The rpi image is what a Pi 4 boots (GPT, FAT autoboot.txt first, firmware and config.txt
    on BOOT-A, a kernel with the tryboot patch), and on QEMU raspi4b its kernel, initramfs and
    (QEMU-adjusted) device tree boot it from the SD card to ready: the Raspberry Pi boot
    control path, containerd, DHCP over usb-net, the API from the host, SELinux enforcing with no
    denial, user data from the card's first partition, its settings.boot in BOOT-A's cmdline.txt."""
    d = rpi_dir(arch)
    disk = os.path.join(d, "disk.img")
    boot_a = check_image(disk, os.path.join(d, "kernel"))
    with tempfile.TemporaryDirectory(prefix="berth-raspi4b-") as tmp:
        # The Pi habit: user data put on the card's first partition (the drive a desktop shows as
        # BERTH) from another computer, read at the first boot. Its settings.boot reaches the
        # slot's cmdline.txt, which the firmware would hand the next boot.
        card = os.path.join(tmp, "card.img")
        subprocess.run(["cp", "--sparse=always", disk, card], check=True)
        udf = os.path.join(tmp, "user-data.toml")
        with open(udf, "w") as f:
            f.write('[settings]\nmotd = "hello from the Pi"\n[settings.network]\nhostname = "pi-1"\n'
                    '[settings.boot]\nreboot-to-reconcile = false\n'
                    '[settings.boot.kernel-parameters]\n"printk.devkmsg" = ["on"]\n'
                    '[settings.boot.init-parameters]\n"berth.health-timeout" = ["600"]\n')
        subprocess.run(["mcopy", "-i", fat(card, "BERTH-AUTOBOOT"), udf, "::/user-data.toml"], check=True)
        base_line = mtype(card, "BERTH-BOOT-A", "cmdline.txt").decode().strip()
        got = {}
        for name in ("Image", "initramfs.gz", "bcm2711-rpi-4-b.dtb"):
            got[name] = os.path.join(tmp, name)
            mcopy_out(disk, "BERTH-BOOT-A", name, got[name])
        dtb = os.path.join(tmp, "qemu.dtb")
        qemu_dtb(got["bcm2711-rpi-4-b.dtb"], dtb, boot_a)
        append = ("console=ttyAMA0,115200 clk_ignore_unused panic=-1 berth.watchdog=off "
                  "berth.api-serial=ttyUSB0 berth.rootwait=60")
        with Raspi4b(arch, got["Image"], dtb, got["initramfs.gz"], append, base=card) as vm:
            vm.start()
            vm.wait_for(r"Raspberry Pi firmware booted partition %d \(slot A\)" % boot_a, timeout=300)
            m = vm.wait_for(r"berth: network up: (\S+) (\S+) gateway (\S+)", timeout=600)
            assert m.group(2) == "10.0.2.15/24" and m.group(3) == "10.0.2.2", m.group(0)
            ready = vm.wait_ready(timeout=900)
            assert ready["variant"] == "rpi" and ready["slot"] == "A", ready
            assert "cdc_ether" in vm.console(), "the NIC is not usb-net's cdc_ether"
            c = vm.console()
            assert c.index("service containerd is ready") < c.index("berth: ready"), "ready before containerd"
            vm.wait_for(r"berth: api bridge")
            try:
                st, body = vm.api("GET", "/os", timeout=120)
            except OSError as e:
                raise AssertionError(f"the API over usb-serial: {e}\n" + vm.tail(400)) from e
            assert st == 200 and body.get("variant_id", body.get("variant")) == "rpi", (st, body)
            st, svc = vm.api("GET", "/services/containerd", timeout=120)
            assert st == 200 and svc["state"] == "running" and svc["ready"] is True, svc
            st, report = vm.api("GET", "/boot", timeout=120)
            assert st == 200, (st, report)
            fw = report.get("firmware") or {}
            assert fw.get("autoboot") == {"boot_partition": boot_a, "tryboot_partition": boot_a}, report
            # SELinux enforcing on the Pi too, with no denial on this path (the BERTH-AUTOBOOT
            # partition, the usb-serial bridge, GENET/cdc_ether, the SD card).
            st, sel = vm.api("GET", "/selinux", timeout=120)
            assert st == 200 and sel["mode"] == "enforcing" and sel["enforcing"] is True, sel
            assert sel["denials"] == 0 and sel["suppressed"] == 0, sel["recent_denials"]
            # User data from BERTH-AUTOBOOT, applied as one transaction.
            st, s = vm.api("GET", "/settings", timeout=120)
            assert st == 200 and s["motd"] == "hello from the Pi" and s["network"]["hostname"] == "pi-1", s
            assert "user data from boot partition user-data.toml" in vm.console(), vm.tail(60)
            wanted = ["printk.devkmsg=on", "--", "berth.health-timeout=600"]
            nxt = (report.get("cmdline") or {}).get("next") or {}
            assert all(w in str(nxt.get("A")).split() for w in wanted), report.get("cmdline")
            # QMP quit: QEMU writes back the overlay as it exits (a kill would lose its tables).
            vm.qmp("quit")
            vm.wait_exit(60)
            after = os.path.join(tmp, "after.img")
            subprocess.run(["qemu-img", "convert", "-O", "raw", vm.disk, after], check=True)
            line = mtype(after, "BERTH-BOOT-A", "cmdline.txt").decode()
            assert line.split()[:len(base_line.split())] == base_line.split(), (base_line, line)
            assert all(w in line.split() for w in wanted), line
            assert mtype(after, "BERTH-BOOT-A", "cmdline.base.txt").decode().strip() == base_line


def main(argv):
    """`rpi_cases.py run [DISK.qcow2]`: boot the rpi image on QEMU raspi4b with the serial
    console on this terminal (Ctrl-A X quits), as the case does; the API on a host socket."""
    import shutil
    import signal
    import sys
    if not argv or argv[0] != "run":
        print("usage: rpi_cases.py run [DISK.qcow2]", file=sys.stderr)
        return 2
    d = rpi_dir("arm64")
    disk = os.path.join(d, "disk.img")
    boot_a = check_image(disk, os.path.join(d, "kernel"))
    tmp = tempfile.mkdtemp(prefix="berth-raspi4b-run-")
    try:
        got = {}
        for name in ("Image", "initramfs.gz", "bcm2711-rpi-4-b.dtb"):
            got[name] = os.path.join(tmp, name)
            mcopy_out(disk, "BERTH-BOOT-A", name, got[name])
        dtb = os.path.join(tmp, "qemu.dtb")
        qemu_dtb(got["bcm2711-rpi-4-b.dtb"], dtb, boot_a)
        card = argv[1] if len(argv) > 1 else os.path.join(tmp, "disk.qcow2")
        if not os.path.exists(card):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.join(d, "disk.qcow2"),
                            "-F", "qcow2", card, "4G"], check=True)
        api_sock = os.environ.get("BERTH_API_SOCKET") or os.path.join(tmp, "api.sock")
        argv = ["qemu-system-aarch64", "-M", "raspi4b", "-accel", "tcg", "-kernel", got["Image"],
                "-dtb", dtb, "-initrd", got["initramfs.gz"],
                "-append", "console=ttyAMA0,115200 clk_ignore_unused panic=5 berth.watchdog=off "
                           "berth.api-serial=ttyUSB0 berth.rootwait=60",
                "-drive", f"file={card},if=sd,format=qcow2",
                "-netdev", "user,id=net0", "-device", "usb-net,netdev=net0",
                "-chardev", f"socket,id=bridge,path={api_sock},server=on,wait=off",
                "-device", "usb-serial,chardev=bridge,always-plugged=on",
                "-nographic", "-serial", "mon:stdio"]
        print(f"berth: QEMU raspi4b (TCG); SD card {card}; quit with Ctrl-A X\n"
              f"berth: the VM's API from this host: curl --unix-socket {api_sock} http://localhost/settings",
              file=sys.stderr, flush=True)
        proc = subprocess.Popen(argv)
        signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
        return proc.wait()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    import sys
    sys.exit(main(sys.argv[1:]))
