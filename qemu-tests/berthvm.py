"""Boot Berth images in QEMU and watch them from outside: the serial console, QMP, the disk.

Every VM gets its own copy-on-write overlay (or raw copy) of the built image in a temporary
directory, so cases never touch build/ and can run in any order.
"""

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("BERTH_BUILD", os.path.join(ROOT, "build"))

READY = re.compile(r"berth: ready version=(\S+) variant=(\S+) slot=(\S) verity=(\S+) boot_ms=(\d+)")


def kvm_works():
    """KVM is used only when /dev/kvm exists and is not the kvm_pvm module (which fails)."""
    return os.path.exists("/dev/kvm") and not os.path.exists("/sys/module/kvm_pvm") \
        and os.environ.get("BERTH_NO_KVM") != "1"


def arch_paths(arch, platform="qemu"):
    """The built image of `arch` for `platform` (scripts/build-image ARCH --platform P)."""
    d = os.path.join(BUILD, arch if platform == "qemu" else f"{arch}-{platform}")
    return {k: os.path.join(d, f) for k, f in
            [("kernel", "kernel"), ("initrd", "initramfs.cpio"), ("qcow2", "disk.qcow2"),
             ("raw", "disk.img"), ("dir", ".")]}


# UEFI firmware for the UEFI cases: (code, variable store template) per arch; with Secure Boot
# (x86_64 only) the code built with SMM and the keys enrolled into a copy of the store.
FIRMWARE = {
    "x86_64": ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    "x86_64-secure": ("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    "arm64": ("/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd"),
}


DEFAULT_NIC = "user,model=virtio-net-pci"


def qemu_argv(arch, disk, disk_format, append, qmp_path, extra=(), api_sock=None, user_data=None,
              firmware=None, vars_path=None, disk_bus="virtio", nic=DEFAULT_NIC, platform="qemu"):
    """firmware: None (QEMU hands over the kernel, SeaBIOS/no firmware), "uefi" or "secure"
    (the firmware starts the disk's UKI; Secure Boot enforcing with "secure"). The kernel
    command line of a UEFI boot is the UKI's own, so `append` applies to direct boots only.
    On arm64 the firmware describes the machine with ACPI, as servers and EC2 Graviton do (a
    direct boot gets QEMU's device tree). `nic` is the `-nic` option."""
    p = arch_paths(arch, platform)
    accel = ["-accel", "kvm", "-cpu", "host"] if kvm_works() and arch == os.uname().machine.replace("aarch64", "arm64") else ["-accel", "tcg"]
    if arch == "x86_64":
        machine = "pc" if not firmware else ("q35,smm=on" if firmware == "secure" else "q35")
        argv = ["qemu-system-x86_64", "-M", machine] + accel
        if accel[1] == "tcg":
            argv += ["-cpu", "max"]
        console = "ttyS0"
        # Under TCG on a loaded host the kernel's IO-APIC timer check can time out and panic
        # ("IO-APIC + timer doesn't work!") a few hundredths of a second into the boot; the
        # check proves nothing about Berth, so the tests skip it.
        if accel[1] == "tcg":
            append = f"no_timer_check {append}"
    else:
        # Under UEFI, AAVMF hands the kernel ACPI tables (SPCR, MCFG, GED power button), the
        # realistic path for arm64 servers and Graviton; with GICv3 and its ITS for MSI-X, as
        # Graviton has.
        argv = ["qemu-system-aarch64", "-M", "virt,gic-version=3" if firmware else "virt"] + accel
        if accel[1] == "tcg":
            argv += ["-cpu", "cortex-a72"]
        console = "ttyAMA0"
    argv += ["-m", "1024", "-smp", "2", "-nographic", "-no-reboot"]
    if firmware:
        code = FIRMWARE[f"{arch}-secure" if firmware == "secure" else arch][0]
        argv += ["-drive", f"if=pflash,format=raw,readonly=on,file={code}",
                 "-drive", f"if=pflash,format=raw,file={vars_path}"]
        if firmware == "secure":
            argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    else:
        argv += ["-kernel", p["kernel"], "-initrd", p["initrd"],
                 "-append", f"console={console} panic=-1 {append}".strip()]
    disk_device = {"virtio": "virtio-blk-pci,drive=disk0", "nvme": "nvme,drive=disk0,serial=berth0",
                   "ahci": "ide-hd,drive=disk0,bus=ide.0"}[disk_bus]
    argv += [
        "-drive", f"file={disk},if=none,id=disk0,format={disk_format},cache=unsafe",
        "-device", disk_device,
        "-nic", nic,
        "-device", "virtio-rng-pci",
        # A hardware watchdog: armed while a slot is on trial, so a hung boot resets.
        "-device", "i6300esb",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
    ]
    if api_sock:
        # The guest bridges the virtio-serial port org.berth.api to /run/api.sock.
        argv += ["-device", "virtio-serial-pci",
                 "-chardev", f"socket,id=berthapi,path={api_sock},server=on,wait=off",
                 "-device", "virtserialport,chardev=berthapi,name=org.berth.api"]
    if user_data:
        argv += ["-fw_cfg", f"name=opt/berth/user-data,file={user_data}"]
    return argv + list(extra)


class VM:
    """One QEMU process. Use as a context manager; the temp dir goes away on exit."""

    def __init__(self, arch="x86_64", append="", raw=False, disk_size="2G", reboot=False, extra=(),
                 user_data=None, firmware=None, disk_bus="virtio", nic=DEFAULT_NIC, platform="qemu"):
        """platform: which image (build/ARCH or build/ARCH-PLATFORM); nic: the `-nic` option."""
        self.arch = arch
        self.nic, self.platform = nic, platform
        self.tmp = tempfile.mkdtemp(prefix=f"berth-{arch}-")
        self.firmware, self.disk_bus = firmware, disk_bus
        self.vars = None
        if firmware:
            # The machine's NVRAM: a copy of the firmware's empty store, kept across the VM's
            # restarts; with Secure Boot, Berth's development keys enrolled (PK, KEK, db).
            self.vars = os.path.join(self.tmp, "vars.fd")
            shutil.copyfile(FIRMWARE[arch][1], self.vars)
            if firmware == "secure":
                enroll_secure_boot(self.vars)
        p = arch_paths(arch, platform)
        if raw:
            self.disk = os.path.join(self.tmp, "disk.img")
            subprocess.run(["cp", "--sparse=always", p["raw"], self.disk], check=True)
            subprocess.run(["truncate", "-s", disk_size, self.disk], check=True)
            self.format = "raw"
        else:
            self.disk = os.path.join(self.tmp, "disk.qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", p["qcow2"],
                            "-F", "qcow2", self.disk, disk_size], check=True)
            self.format = "qcow2"
        self.append = append
        self.reboot = reboot
        self.extra = extra
        self.qmp_path = os.path.join(self.tmp, "qmp.sock")
        self.api_sock = os.path.join(self.tmp, "api.sock")
        self.user_data = None
        if user_data is not None:
            self.user_data = os.path.join(self.tmp, "user-data")
            with open(self.user_data, "wb") as f:
                f.write(user_data if isinstance(user_data, bytes) else user_data.encode())
        self.out = []
        self.since = 0
        self.lock = threading.Condition()
        self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def start(self):
        argv = qemu_argv(self.arch, self.disk, self.format, self.append, self.qmp_path, self.extra,
                         api_sock=self.api_sock, user_data=self.user_data, firmware=self.firmware,
                         vars_path=self.vars, disk_bus=self.disk_bus, nic=self.nic,
                         platform=self.platform)
        if self.reboot:
            argv.remove("-no-reboot")
        self.out = []
        self.times = []
        self.since = 0
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        threading.Thread(target=self._pump, daemon=True).start()
        return self

    def _pump(self):
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with self.lock:
                self.out.append(line)
                self.times.append(time.monotonic())
                self.lock.notify_all()
        with self.lock:
            self.lock.notify_all()

    def console(self):
        with self.lock:
            return "\n".join(self.out)

    def wait_for(self, pattern, timeout=120):
        """Wait until a console line matches; return the match. Fail on timeout or exit."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = self.since
        with self.lock:
            while True:
                for line in self.out[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.out)
                if self.proc.poll() is not None and seen == len(self.out):
                    # drain: the pump may still be appending
                    self.lock.wait(0.2)
                    if seen == len(self.out):
                        raise AssertionError(f"QEMU exited (rc {self.proc.returncode}) before /{pattern}/\n" + self.tail())
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    # A guest whose kernel never started PID 1 ran none of Berth: say so, so
                    # the runner can tell an emulator stall from a failure of Berth's.
                    stalled = not any("as init process" in line for line in self.out)
                    why = f" ({KERNEL_STALL})" if stalled else ""
                    raise AssertionError(f"timed out after {timeout}s waiting for /{pattern}/{why}\n" + self.tail())
                self.lock.wait(min(left, 0.5))

    def mark(self):
        """From now on, wait_for only looks at console lines printed after this call."""
        with self.lock:
            self.since = len(self.out)

    def wait_ready(self, timeout=180):
        m = self.wait_for(READY.pattern, timeout)
        return {"version": m.group(1), "variant": m.group(2), "slot": m.group(3),
                "verity": m.group(4), "boot_ms": int(m.group(5))}

    def wait_exit(self, timeout=120):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"QEMU still running after {timeout}s\n" + self.tail())

    def qmp(self, command, **args):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(self.qmp_path)
        f = s.makefile("rw")
        json.loads(f.readline())  # greeting
        for cmd in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": args}):
            f.write(json.dumps(cmd) + "\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "return" in reply or "error" in reply:
                    break
        s.close()
        if "error" in reply:
            raise AssertionError(f"QMP {command}: {reply['error']}")
        return reply["return"]

    def api(self, method, path, body=None, timeout=30):
        """One request to the guest's API through the host socket: (status, parsed JSON or text)."""
        return api_request(self.api_sock, method, path, body, timeout)

    def tail(self, n=150):
        with self.lock:
            return "--- last console lines ---\n" + "\n".join(self.out[-n:])

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


CACHE = os.environ.get("BERTH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "berth"))
SB_KEYS = os.environ.get("BERTH_SB_KEYS", os.path.join(BUILD, "secureboot-keys"))


def enroll_secure_boot(vars_path, keys=SB_KEYS):
    """Enroll PK, KEK and db from `keys` (scripts/secureboot-keys) into the variable store and
    turn Secure Boot on, with virt-fw-vars (scripts/setup puts it in a venv under the cache)."""
    owner = open(os.path.join(keys, "owner.guid")).read().strip()
    tool = os.path.join(CACHE, "venv", "bin", "virt-fw-vars")
    subprocess.run([tool, "--inplace", vars_path, "--set-pk", owner, os.path.join(keys, "PK.crt"),
                    "--add-kek", owner, os.path.join(keys, "KEK.crt"),
                    "--add-db", owner, os.path.join(keys, "db.crt"), "--secure-boot"],
                   check=True, capture_output=True)


# Under TCG a guest kernel has (rarely) stopped printing for minutes in its early initcalls,
# before any of Berth runs; qemu-tests/run runs such a case once more.
KERNEL_STALL = "the guest kernel never started PID 1"


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def api_request(sock_path, method, path, body=None, timeout=30):
    """HTTP over a Unix socket; the answer is read by Content-Length (the bridge to a VM cannot
    close the host's side of the connection)."""
    c = _UnixHTTPConnection(sock_path, timeout)
    data = None if body is None else (body if isinstance(body, (bytes, str)) else json.dumps(body))
    c.request(method, path, body=data, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    raw = r.read()
    c.close()
    try:
        return r.status, json.loads(raw) if raw else None
    except ValueError:
        return r.status, raw.decode("utf-8", "replace")


class Pty:
    """A command on a pseudo-terminal of its own (its controlling terminal, as in a terminal
    emulator), driven like a user: set the window size (the kernel sends SIGWINCH), type, and
    read what it prints."""

    def __init__(self, argv, rows, cols):
        import fcntl
        import termios
        self.master, slave = os.openpty()
        self.resize(rows, cols)
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        self.out = b""
        self.seen = 0

    def resize(self, rows, cols):
        import fcntl
        import struct
        import termios
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def send(self, data):
        os.write(self.master, data)

    def _read(self, timeout):
        import select
        r, _, _ = select.select([self.master], [], [], timeout)
        if not r:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the command and its terminal are gone
            data = b""
        self.out += data
        return bool(data)

    def expect(self, pattern, timeout):
        """Wait for `pattern` (a bytes regex) in the output after the last match; fail with the
        output so far if it does not come."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.out, self.seen)
            if m:
                self.seen = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(min(left, 1.0)):
                raise AssertionError(f"no {pattern!r} within {timeout}s; output: {self.out[-2000:]!r}")

    def wait(self, timeout):
        """The command's exit status (its output read meanwhile)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.2)
        return self.proc.wait(timeout=max(1, deadline - time.monotonic()))

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def gpt_partitions(disk_raw):
    """{label: (first_byte, size_bytes)} read with sgdisk, independent of berth's own parser."""
    out = subprocess.run(["sgdisk", "-p", disk_raw], check=True, capture_output=True, text=True).stdout
    parts = {}
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 7 and f[0].isdigit():
            first, last = int(f[1]), int(f[2])
            parts[f[-1]] = (first * 512, (last - first + 1) * 512)
    return parts


def slot_states(disk_raw, berth):
    """{"A": {...}, "B": {...}} from `berth bootctl show`."""
    out = subprocess.run([berth, "bootctl", "show", disk_raw], check=True, capture_output=True,
                         text=True).stdout
    states = {}
    for line in out.splitlines():
        kv = dict(x.split("=", 1) for x in line.split())
        if "slot" in kv:
            states[kv["slot"]] = {k: int(v) for k, v in kv.items() if k != "slot"}
    return states


def main(argv):
    """`berthvm.py run ARCH [DISK] [--uefi | --secure-boot]`: boot interactively with the serial
    console on this terminal (Ctrl-A X quits). Without DISK, a fresh overlay of the built image
    is used. With --uefi the firmware (OVMF, AAVMF) starts the disk's UKI; --secure-boot also
    enrolls the project's keys (x86_64). The firmware's variables live in DISK.vars next to a
    kept DISK."""
    import sys
    flags = [a for a in argv if a.startswith("--")]
    argv = [a for a in argv if not a.startswith("--")]
    if len(argv) < 2 or argv[0] != "run" or set(flags) - {"--uefi", "--secure-boot"}:
        print("usage: berthvm.py run ARCH [DISK] [--uefi | --secure-boot]", file=sys.stderr)
        return 2
    arch = argv[1]
    disk = argv[2] if len(argv) > 2 else None
    firmware = "secure" if "--secure-boot" in flags else "uefi" if "--uefi" in flags else None
    tmp = tempfile.mkdtemp(prefix="berth-run-")
    if disk is None:
        disk = os.path.join(tmp, "disk.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", arch_paths(arch)["qcow2"],
                        "-F", "qcow2", disk, "4G"], check=True)
        vars_path = os.path.join(tmp, "vars.fd")
    else:
        vars_path = disk + ".vars"
    if firmware and not os.path.exists(vars_path):
        shutil.copyfile(FIRMWARE[arch][1], vars_path)
        if firmware == "secure":
            enroll_secure_boot(vars_path)
    api_sock = os.environ.get("BERTH_API_SOCKET") or os.path.join(tmp, "api.sock")
    argv = qemu_argv(arch, disk, "qcow2", "", os.path.join(tmp, "qmp.sock"), api_sock=api_sock,
                     user_data=os.environ.get("BERTH_USER_DATA"), firmware=firmware, vars_path=vars_path)
    argv.remove("-no-reboot")
    argv = [a.replace("panic=-1", "panic=5") for a in argv]
    print("berth: " + ("KVM" if "kvm" in argv else "TCG (software emulation)") +
          f"{', UEFI' + (' with Secure Boot' if firmware == 'secure' else '') if firmware else ''}"
          f"; disk {disk}; QMP {tmp}/qmp.sock; quit with Ctrl-A X", file=sys.stderr)
    print(f"berth: the VM's API from this host: curl --unix-socket {api_sock} http://localhost/settings",
          file=sys.stderr, flush=True)
    import signal
    proc = subprocess.Popen(argv)
    # A terminated `scripts/run` takes its VM with it.
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    import sys
    sys.exit(main(sys.argv[1:]))
