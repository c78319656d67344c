"""Berth's boot tests. Each case states in its docstring what it proves.

Host cases check build outputs; VM cases boot a real image under QEMU and check it from
outside (serial console, QMP, the disk afterwards).
"""

import os
import random
import re
import struct
import subprocess
import tempfile

from berthvm import VM, arch_paths, gpt_partitions, slot_states, ROOT
from ethpeer import free_udp_port

CASES = []


def case(arches=("x86_64",)):
    def register(fn):
        for a in arches:
            CASES.append((f"{fn.__name__}[{a}]", fn, a))
        return fn
    return register


def host_berth():
    m = os.uname().machine
    t = "x86_64-unknown-linux-musl" if m == "x86_64" else "aarch64-unknown-linux-musl"
    return os.path.join(ROOT, "target", t, "release", "berth")


def berth_bin(arch):
    t = "x86_64-unknown-linux-musl" if arch == "x86_64" else "aarch64-unknown-linux-musl"
    return os.path.join(ROOT, "target", t, "release", "berth")


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def ext4_state(disk, offset):
    """(clean, needs_recovery, has_errors) from the ext4 superblock at `offset` of `disk`."""
    with open(disk, "rb") as f:
        f.seek(offset + 1024)
        sb = f.read(1024)
    magic, state = struct.unpack_from("<HH", sb, 0x38)
    assert magic == 0xEF53, f"no ext4 superblock at {offset}"
    incompat = struct.unpack_from("<I", sb, 0x60)[0]
    return bool(state & 1), bool(incompat & 0x4), bool(state & 2)


def copy_slot(disk, src="A", dst="B"):
    parts = gpt_partitions(disk)
    for kind in ("BOOT", "ROOT", "HASH"):
        s_off, s_len = parts[f"BERTH-{kind}-{src}"]
        d_off, d_len = parts[f"BERTH-{kind}-{dst}"]
        assert s_len == d_len
        subprocess.run(["dd", f"if={disk}", f"of={disk}", "bs=1M", f"skip={s_off >> 20}",
                        f"seek={d_off >> 20}", f"count={s_len >> 20}", "conv=notrunc,sparse",
                        "status=none"], check=True)


# ---------------------------------------------------------------- host checks

@case(arches=("x86_64", "arm64"))
def static_binary(arch):
    """The berth binary for each arch is statically linked: no interpreter, no shared libraries."""
    b = berth_bin(arch)
    hdr = subprocess.run(["readelf", "-hlW", b], check=True, capture_output=True, text=True).stdout
    machine = "X86-64" if arch == "x86_64" else "AArch64"
    assert machine in hdr, f"{b} is not an {machine} binary"
    assert "INTERP" not in hdr, f"{b} asks for a program interpreter"
    dyn = subprocess.run(["readelf", "-dW", b], check=True, capture_output=True, text=True).stdout
    assert "NEEDED" not in dyn, f"{b} needs shared libraries:\n{dyn}"


@case(arches=("x86_64",))
def verity_tree_matches_veritysetup(arch):
    """Berth's own dm-verity tree is the standard format: `veritysetup verify` accepts it,
    for the built root and for random data needing 0, 2 and 3 tree levels; a flipped byte fails."""
    p = arch_paths(arch)
    d = os.path.join(p["dir"])
    root_hash = re.search(r'root-hash = "([0-9a-f]+)"', open(os.path.join(d, "slot.toml")).read()).group(1)
    subprocess.run(["veritysetup", "verify", os.path.join(d, "root.erofs"), os.path.join(d, "hash.img"),
                    root_hash], check=True)
    rng = random.Random(42)
    with tempfile.TemporaryDirectory() as tmp:
        for blocks in (1, 129, 16385):
            data, tree = os.path.join(tmp, "data"), os.path.join(tmp, "tree")
            with open(data, "wb") as f:
                f.write(rng.randbytes(blocks * 4096))
            out = subprocess.run([host_berth(), "verity-format", data, tree], check=True,
                                 capture_output=True, text=True).stdout
            h = re.search(r'root-hash = "([0-9a-f]+)"', out).group(1)
            subprocess.run(["veritysetup", "verify", data, tree, h], check=True, capture_output=True)
            flip_byte(data, rng.randrange(blocks * 4096))
            r = subprocess.run(["veritysetup", "verify", data, tree, h], capture_output=True)
            assert r.returncode != 0, f"veritysetup accepted corrupted data ({blocks} blocks)"


# ---------------------------------------------------------------- boots

@case(arches=("x86_64", "arm64"))
def boots_to_ready(arch):
    """A fresh image boots through both stages to `berth: ready` from a verified root, slot A."""
    with VM(arch) as vm:
        vm.start()
        r = vm.wait_ready()
        assert r["slot"] == "A", r
        assert r["verity"] == "V", f"dm-verity status is {r['verity']}, not V"
        c = vm.console()
        assert "stage1 phase verity done" in c and "switching to the verified root" in c
        assert "stage2 start slot=A" in c
        vm.wait_for(r"berth: api bridge")
        assert_no_avc_denials(vm)


@case(arches=("x86_64", "arm64"))
def corrupted_root_never_runs(arch):
    """One flipped byte in ROOT-A is caught by dm-verity; the machine restarts and no code
    from the corrupted root (stage 2) ever runs."""
    with VM(arch, raw=True) as vm:
        off, _ = gpt_partitions(vm.disk)["BERTH-ROOT-A"]
        flip_byte(vm.disk, off + 1024 + 8)  # inside the EROFS superblock, read at mount
        vm.start()
        vm.wait_for(r"verity.*(data block \d+ is corrupted|corrupt)", timeout=120)
        vm.wait_exit(60)  # restart_on_corruption restarts; -no-reboot turns that into an exit
        c = vm.console()
        assert "stage2 start" not in c and "berth: ready" not in c, vm.tail()


@case(arches=("x86_64", "arm64"))
def powerdown_is_clean(arch):
    """QEMU's system_powerdown (ACPI button / gpio-keys) makes PID 1 stop, unmount and power
    off; QEMU exits 0 and DATA and PRIVATE are marked cleanly unmounted on disk."""
    with VM(arch, raw=True) as vm:
        vm.start()
        vm.wait_ready()
        vm.wait_for(r"berth: idle rss_kb=")
        vm.qmp("system_powerdown")
        vm.wait_for(r"berth: shutdown requested: PowerOff", timeout=60)
        rc = vm.wait_exit(90)
        assert rc == 0, f"QEMU exit code {rc}\n{vm.tail()}"
        c = vm.console()
        assert "unmounted /local" in c and "unmounted /var/lib/berth" in c, vm.tail()
        parts = gpt_partitions(vm.disk)
        for label in ("BERTH-DATA", "BERTH-PRIVATE"):
            clean, recovery, errors = ext4_state(vm.disk, parts[label][0])
            assert clean and not recovery and not errors, \
                f"{label}: clean={clean} needs_recovery={recovery} errors={errors}"
        # First boot grew DATA to the end of the 2 GiB disk.
        assert parts["BERTH-DATA"][0] + parts["BERTH-DATA"][1] > 2000 * 2**20, parts["BERTH-DATA"]


@case(arches=("x86_64", "arm64"))
def orphans_are_reaped(arch):
    """Processes orphaned to PID 1 are reaped: none is left a zombie."""
    with VM(arch, append="berth.selftest=orphans") as vm:
        vm.start()
        vm.wait_ready()
        m = vm.wait_for(r"berth-selftest: orphans=(\d+) zombies=(\d+)", timeout=60)
        assert int(m.group(1)) == 5
        assert int(m.group(2)) == 0, f"{m.group(2)} zombies left\n{vm.tail()}"
        assert len(re.findall(r"berth: reaped pid \d+", vm.console())) >= 5, vm.tail()


@case(arches=("x86_64", "arm64"))
def trial_slot_boots_and_is_marked_good(arch):
    """A slot on trial (priority above A, tries 1) boots, uses its try, and is marked successful."""
    with VM(arch, raw=True) as vm:
        copy_slot(vm.disk)
        subprocess.run([host_berth(), "bootctl", "set", vm.disk, "B", "2", "1", "0"], check=True)
        vm.start()
        r = vm.wait_ready()
        assert r["slot"] == "B", r
        vm.wait_for(r"slot B marked successful")
        vm.qmp("system_powerdown")
        vm.wait_exit(90)
        s = slot_states(vm.disk, host_berth())
        assert s["B"] == {"priority": 2, "tries": 0, "successful": 1}, s
        assert s["A"] == {"priority": 1, "tries": 0, "successful": 1}, s


@case(arches=("x86_64", "arm64"))
def bad_trial_slot_rolls_back(arch):
    """A slot on trial whose root is corrupt restarts the machine, and the next boot falls back
    to slot A by itself; B is left with no tries and never marked successful."""
    with VM(arch, raw=True, reboot=True) as vm:
        copy_slot(vm.disk)
        off, _ = gpt_partitions(vm.disk)["BERTH-ROOT-B"]
        flip_byte(vm.disk, off + 1024 + 8)
        subprocess.run([host_berth(), "bootctl", "set", vm.disk, "B", "2", "1", "0"], check=True)
        vm.start()
        vm.wait_for(r"boot control: slot B \(on trial: true, tries left: 0\)")
        vm.wait_for(r"verity.*(data block \d+ is corrupted|corrupt)")
        vm.wait_for(r"boot control: slot A \(on trial: false", timeout=120)
        r = vm.wait_ready()
        assert r["slot"] == "A", r
        vm.qmp("system_powerdown")
        vm.wait_for(r"berth: shutdown requested", timeout=60)
        vm.wait_for(r"reboot: Power down|Power down", timeout=60)
        vm.kill()
        s = slot_states(vm.disk, host_berth())
        assert s["B"] == {"priority": 2, "tries": 0, "successful": 0}, s


# ---------------------------------------------------------------- settings API (issue 3)

@case(arches=("x86_64", "arm64"))
def settings_through_host_socket_apply_and_persist(arch):
    """Hostname, motd and a sysctl set through the host's socket to the VM's API are applied
    at once (read back from the kernel), and are still set and applied after a reboot."""
    want = {"motd": "hello from the host", "network": {"hostname": "berth-qemu-1"},
            "kernel": {"sysctl": {"vm.swappiness": "42"}}}
    with VM(arch, raw=True) as vm:
        vm.start()
        vm.wait_ready()
        vm.wait_for(r"berth: api bridge")
        st, body = vm.api("GET", "/settings")
        assert st == 200 and body == {}, (st, body)
        st, body = vm.api("PATCH", "/settings", want)
        assert st == 204, (st, body)
        st, body = vm.api("POST", "/tx/commit_and_apply")
        assert st == 200 and sorted(body) == ["kernel.sysctl", "motd", "network.hostname"], (st, body)
        st, state = vm.api("GET", "/system/state")
        assert {k: state[k] for k in ("hostname", "motd", "sysctl")} == {
            "hostname": "berth-qemu-1", "motd": "hello from the host\n", "sysctl": {"vm.swappiness": "42"}}, state
        # curl, as a person would use it
        out = subprocess.run(["curl", "-sf", "--unix-socket", vm.api_sock, "http://localhost/settings"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and '"berth-qemu-1"' in out.stdout, out
        st, _ = vm.api("POST", "/actions/reboot")
        assert st == 202
        vm.wait_for(r"berth: shutdown requested: Restart", timeout=60)
        vm.wait_exit(90)  # -no-reboot: the restart ends QEMU
        vm.start()
        vm.wait_ready()
        vm.wait_for(r"berth: api bridge")
        st, body = vm.api("GET", "/settings")
        assert body == want, body
        st, state = vm.api("GET", "/system/state")
        assert state["hostname"] == "berth-qemu-1" and state["sysctl"] == {"vm.swappiness": "42"}, state


@case(arches=("x86_64",))
def user_data_from_fw_cfg_applied_at_first_boot(arch):
    """TOML user data given through QEMU fw_cfg is applied as one transaction before the API
    starts, and its effects are visible."""
    ud = '[settings]\nmotd = "from user data"\n[settings.network]\nhostname = "ud-host"\n' \
         '[settings.kernel.sysctl]\n"vm.swappiness" = "13"\n'
    with VM(arch, user_data=ud) as vm:
        vm.start()
        vm.wait_ready()
        vm.wait_for(r"berth: api bridge")
        st, body = vm.api("GET", "/user-data")
        assert body.get("applied") is True and "fw_cfg" in body.get("source", ""), body
        st, state = vm.api("GET", "/system/state")
        state.pop("memory")
        assert state == {"hostname": "ud-host", "motd": "from user data\n", "sysctl": {"vm.swappiness": "13"}}, state


@case(arches=("x86_64",))
def bad_user_data_is_reported_and_boot_goes_on(arch):
    """User data with an unknown key is rejected as a whole, reported on the console and by the
    API, and the boot still reaches ready with nothing of it applied."""
    ud = '[settings]\nmotd = "partial"\n[settings.network]\nhostnme = "typo"\n'
    with VM(arch, user_data=ud) as vm:
        vm.start()
        vm.wait_for(r"berth: user data from .* rejected: .*hostnme")
        vm.wait_ready()
        vm.wait_for(r"berth: api bridge")
        st, body = vm.api("GET", "/user-data")
        assert body.get("applied") is False and "hostnme" in body.get("error", ""), body
        st, settings = vm.api("GET", "/settings")
        assert settings == {}, settings


# ---------------------------------------------------------------- services (issue 4)

@case(arches=("x86_64",))
def crash_looping_service_backs_off(arch):
    """A service that exits at once is restarted with growing delays (>= 1 s, doubling), its
    output is captured for GET /logs, and PID 1 and the API keep answering throughout."""
    import time
    with VM(arch, append="berth.selftest=crashloop") as vm:
        vm.start()
        vm.wait_ready()
        vm.wait_for(r"berth: api bridge")
        deadline = time.monotonic() + 60
        while True:
            st, svc = vm.api("GET", "/services/crashloop")
            assert st == 200, (st, svc)
            if svc["restarts"] >= 4 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert svc["restarts"] >= 4, svc
        assert svc["last_exit"]["code"] == 1, svc
        starts = svc["recent_starts_ms"]
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert all(g >= 950 for g in gaps), f"restarts closer than 1 s: {gaps}"
        assert gaps[-1] >= 1.7 * gaps[0], f"delay does not grow on a crash loop: {gaps}"
        st, logs = vm.api("GET", "/logs?service=crashloop")
        assert st == 200 and "crashing on purpose" in logs, (st, logs)
        st, _ = vm.api("GET", "/logs?service=nope")
        assert st == 404
        st, os_ = vm.api("GET", "/os")
        assert st == 200 and os_["slot"] == "A" and os_["boot"] == {"backend": "gpt", "secure_boot": False}, os_


@case(arches=("x86_64", "arm64"))
def containerd_becomes_ready(arch):
    """containerd from the root filesystem starts under the supervisor with its rendered
    config, answers its version call (ready), and the boot is marked good only after that;
    no plugin fails to load; GET /boot and `apiclient boot [--svg]` show the timeline."""
    with VM(arch) as vm:
        vm.start()
        vm.wait_for(r"berth: service containerd is ready", timeout=240)
        r = vm.wait_ready(timeout=60)
        c = vm.console()
        assert c.index("service containerd is ready") < c.index("berth: ready"), "ready before containerd"
        vm.wait_for(r"berth: api bridge")
        st, svc = vm.api("GET", "/services/containerd")
        assert st == 200 and svc["state"] == "running" and svc["ready"] is True, svc
        assert svc["restarts"] == 0, svc
        st, logs = vm.api("GET", "/logs?service=containerd")
        assert "containerd successfully booted" in logs, logs[-2000:]
        # The plugins Berth leaves out (disabled_plugins) are none that another one needs.
        assert "failed to load plugin" not in logs, logs[-4000:]
        assert r["slot"] == "A"
        # The boot timeline: both stages' phases and containerd's start and ready times, kernel-
        # relative; `apiclient boot` (run here against the guest's API) prints it as a table
        # and draws it as an SVG that an XML parser accepts.
        st, boot = vm.api("GET", "/boot")
        assert st == 200, boot
        phases = {(p["stage"], p["name"]) for p in boot["phases"]}
        assert (1, "verity") in phases and (2, "containerd") in phases, phases
        ctd = [s for s in boot["services"] if s["name"] == "containerd"]
        assert ctd and 0 < ctd[0]["start-ms"] <= ctd[0]["ready-ms"] <= r["boot_ms"] + 1000, boot["services"]
        client = [host_berth(), "apiclient", "-s", vm.api_sock, "boot"]
        table = subprocess.run(client, check=True, capture_output=True, text=True).stdout
        assert "service containerd" in table and "stage 2: containerd" in table, table
        import xml.etree.ElementTree as ET
        svg = os.path.join(vm.tmp, "boot.svg")
        subprocess.run(client + ["--svg", svg], check=True)
        root = ET.parse(svg).getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg", root.tag
        bars = root.findall("{http://www.w3.org/2000/svg}rect")
        assert len(bars) == 1 + len(boot["phases"]) + len(boot["services"]), len(bars)


@case(arches=("x86_64", "arm64"))
def network_gets_a_dhcp_lease(arch):
    """PID 1's own DHCPv4 client gets QEMU user networking's lease on the first interface
    (10.0.2.15/24, gateway 10.0.2.2) without holding up the boot."""
    with VM(arch) as vm:
        vm.start()
        m = vm.wait_for(r"berth: network up: (\S+) (\S+) gateway (\S+)", timeout=120)
        assert m.group(2) == "10.0.2.15/24" and m.group(3) == "10.0.2.2", m.group(0)
        vm.wait_ready()


def _poll(fn, timeout, every=0.5):
    """Call fn until it returns something truthy; return that, or fail with its last value."""
    import time
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last and last[0]:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s; last: {last}")


def _host_container_user_data(name, ref, superpowered, reg=None, mirror=True):
    """User data for one host container. With `reg` (and `mirror`), the test registry is
    configured as insecure (a plain http:// mirror endpoint), which alone lets a host container
    pull from it over plain HTTP."""
    sp = "true" if superpowered else "false"
    ud = (f'[settings.host-containers.{name}]\nsource = "{ref}"\nenabled = true\n'
          f'superpowered = {sp}\n')
    if reg is not None and mirror:
        ud += (f'[[settings.container-registry.mirrors]]\nregistry = "{reg.guest_address}"\n'
               f'endpoint = ["http://{reg.guest_address}"]\n')
    return ud


def assert_no_avc_denials(vm):
    """The happy path makes no SELinux denial (GET /selinux counts them from the kernel log)."""
    st, s = vm.api("GET", "/selinux")
    assert st == 200 and s["mode"] == "enforcing" and s["enforcing"] is True, s
    assert s["denials"] == 0 and s["suppressed"] == 0, s["recent_denials"]


@case(arches=("x86_64", "arm64"))
def host_container_from_test_registry(arch):
    """A host container whose image is pulled from a registry on the host (reached at
    10.0.2.2) runs under the supervisor, its output appears in GET /logs, and disabling it
    through the API stops it."""
    from registry import Registry
    with Registry() as reg:
        ref = reg.push_busybox(arch)
        with VM(arch, user_data=_host_container_user_data("hello", ref, False, reg)) as vm:
            vm.start()
            vm.wait_ready(timeout=240)
            vm.wait_for(r"berth: api bridge")
            svc = "host-containers@hello"

            def logs():
                st, text = vm.api("GET", f"/logs?service={svc}")
                return (st == 200 and "hello from busybox" in (text or ""), st, text)
            _poll(logs, 240)
            st, info = vm.api("GET", f"/services/{svc}")
            assert info["state"] == "running" and info["pid"], info
            st, _ = vm.api("PATCH", "/settings", {"host-containers": {"hello": {"enabled": False}}})
            assert st == 204
            st, _ = vm.api("POST", "/tx/commit_and_apply")
            assert st == 200

            def stopped():
                st, info = vm.api("GET", f"/services/{svc}")
                return (info["state"] == "stopped" and info["pid"] is None, info)
            _poll(stopped, 60)
            assert_no_avc_denials(vm)


@case(arches=("x86_64",))
def containerd_killed_from_superpowered_container_restarts(arch):
    """A superpowered host container sees the host's processes and kills containerd; the
    supervisor restarts containerd and the API answers throughout."""
    from registry import Registry
    script = ("if [ ! -e /.berth/rootfs/run/killed-once ]; then touch /.berth/rootfs/run/killed-once; "
              "sleep 2; kill -9 $(pidof containerd) && echo killed containerd; fi; sleep 3600")
    with Registry() as reg:
        ref = reg.push_busybox_cmd(arch, ["/bin/sh", "-c", script], tag="killer")
        with VM(arch, user_data=_host_container_user_data("killer", ref, True, reg)) as vm:
            vm.start()
            vm.wait_ready(timeout=240)
            vm.wait_for(r"berth: api bridge")
            answers = []

            def restarted():
                st, info = vm.api("GET", "/services/containerd")
                answers.append(st)
                return (info["restarts"] >= 1 and info["state"] == "running", info)
            _poll(restarted, 240)
            assert all(s == 200 for s in answers), answers
            st, text = vm.api("GET", "/logs?service=host-containers@killer")
            assert "killed containerd" in text, text


@case(arches=("x86_64",))
def kubelet_configured_but_absent_is_reported(arch):
    """With settings.kubernetes configured and no kubelet in the image, the kubelet service is
    reported absent with its reason, and the boot is still healthy."""
    ud = ('[settings.kubernetes]\napi-server = "https://10.0.2.2:6443"\ncluster-name = "test"\n'
          'bootstrap-token = "abcdef.0123456789abcdef"\ncluster-certificate = "aGVsbG8="\nmax-pods = 50\n')
    with VM(arch, user_data=ud) as vm:
        vm.start()
        vm.wait_ready()
        vm.wait_for(r"berth: api bridge")
        st, svc = vm.api("GET", "/services/kubelet")
        assert st == 200 and svc["state"] == "absent", svc
        assert "/usr/bin/kubelet is not in this image" in svc["reason"], svc
        assert "--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubeconfig" in svc["argv"], svc
        st, files = vm.api("GET", "/configuration-files")
        assert files["kubelet-config"]["path"] == "/etc/kubernetes/kubelet/config.json", files


@case(arches=("x86_64",))
def registry_mirror_change_restarts_containerd(arch):
    """Changing settings.container-registry.mirrors re-renders containerd's config and restarts
    containerd, which comes back ready with the new mirror."""
    with VM(arch) as vm:
        vm.start()
        vm.wait_ready()
        vm.wait_for(r"berth: api bridge")
        mirror = {"container-registry": {"mirrors": [
            {"registry": "docker.io", "endpoint": ["http://10.0.2.2:5999"]}]}}
        st, _ = vm.api("PATCH", "/settings", mirror)
        assert st == 204
        st, changed = vm.api("POST", "/tx/commit_and_apply")
        assert st == 200 and changed == ["container-registry.mirrors"], changed

        def restarted():
            st, info = vm.api("GET", "/services/containerd")
            return (info["restarts"] >= 1 and info["state"] == "running", info)
        _poll(restarted, 120)
        st, logs = vm.api("GET", "/logs?service=containerd")
        assert "http://10.0.2.2:5999" in logs, logs[-3000:]


@case(arches=("x86_64",))
def static_address_from_settings(arch):
    """settings.network.static-address (from user data) configures the interface instead of
    DHCP, with its gateway."""
    ud = ('[settings.network]\nstatic-address = "10.0.2.20/24"\ngateway = "10.0.2.2"\n'
          'name-servers = ["10.0.2.3"]\n')
    with VM(arch, user_data=ud) as vm:
        vm.start()
        m = vm.wait_for(r"berth: network up: (\S+) (\S+) gateway (\S+)", timeout=120)
        assert m.group(2) == "10.0.2.20/24" and m.group(3) == "10.0.2.2", m.group(0)
        assert "dhcp:" not in vm.console(), "DHCP ran despite a static address"
        vm.wait_ready()



# ---------------------------------------------------------------- time (issue 9)

class Chronyd:
    """Debian's chronyd serving the host's time on 127.0.0.1:PORT (QEMU's user networking takes
    the guest's 10.0.2.2:PORT there). -x: it never touches the host's clock. scripts/setup
    extracts it into the cache."""

    def __init__(self):
        cache = os.environ.get("BERTH_CACHE") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "berth")
        exe = os.environ.get("BERTH_CHRONYD") or os.path.join(cache, "chrony/usr/sbin/chronyd")
        assert os.path.exists(exe), f"{exe} is missing: run scripts/setup"
        self.dir = tempfile.mkdtemp(prefix="berth-chronyd-")
        self.port = free_udp_port()
        conf = os.path.join(self.dir, "chrony.conf")
        with open(conf, "w") as f:
            f.write(f"port {self.port}\nbindaddress 127.0.0.1\nallow 127.0.0.1\nlocal stratum 8\n"
                    f"cmdport 0\npidfile {self.dir}/chronyd.pid\n")
        self.proc = subprocess.Popen([exe, "-d", "-x", "-u", "root", "-f", conf],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _poll(lambda: (self.answers(), None), 10, every=0.2)

    def answers(self):
        """Whether it answers an SNTP request on the loopback."""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.5)
        try:
            s.sendto(bytes([0x23]) + bytes(39) + os.urandom(8), ("127.0.0.1", self.port))
            return len(s.recv(512)) >= 48
        except OSError:
            return False
        finally:
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)


@case(arches=("x86_64",))
def ntp_sets_a_far_off_clock(arch):
    """A guest whose clock starts in 2001 (-rtc base=2001-01-01) gets the right time from
    chronyd on the host through QEMU user networking, past a server that never answers: one
    step, then the kernel's PLL; /system/time and the kernel say synchronised; a changed
    settings.ntp.time-servers is followed without another step, and a bad entry is refused."""
    import time
    with Chronyd() as a, Chronyd() as b:
        dead = free_udp_port()
        ud = f'[settings.ntp]\ntime-servers = ["10.0.2.2:{dead}", "10.0.2.2:{a.port}"]\n'
        with VM(arch, user_data=ud, extra=("-rtc", "base=2001-01-01T00:00:00")) as vm:
            vm.start()
            m = vm.wait_for(r"berth: time: stepped the clock by \+(\d+)\.\d+ s", timeout=180)
            assert int(m.group(1)) > 20 * 365 * 86400, f"the guest did not start in 2001: {m.group(0)}"
            vm.wait_ready()
            vm.wait_for(r"berth: api bridge")
            st, t = vm.api("GET", "/system/time")
            assert st == 200, (st, t)
            assert t["synchronized"] is True and t["steps"] == 1, t
            assert t["server"].startswith(f"10.0.2.2:{a.port}"), t
            assert t["last_step"]["by_s"] > 20 * 365 * 86400, t
            assert abs(t["clock_unix_s"] - time.time()) < 10, f"guest clock {t['clock']} vs host {time.time()}"
            assert t["kernel"]["synchronized"] is True, t
            # The setting changes: the new server is used within seconds, and the clock,
            # already right, is not stepped again.
            st, body = vm.api("PATCH", "/settings", {"ntp": {"time-servers": [f"10.0.2.2:{b.port}"]}})
            assert st == 204, (st, body)
            st, body = vm.api("POST", "/tx/commit_and_apply")
            assert st == 200 and body == ["ntp.time-servers"], (st, body)
            _, t = _poll(lambda: (lambda t: ((t.get("server") or "").startswith(f"10.0.2.2:{b.port}"), t))(
                vm.api("GET", "/system/time")[1]), 60)
            assert t["servers"] == [f"10.0.2.2:{b.port}"] and t["steps"] == 1, t
            assert abs(t["last_offset_s"]) < 0.4, t
            st, body = vm.api("PATCH", "/settings", {"ntp": {"time-servers": ["not a server"]}})
            assert st == 400 and "settings.ntp.time-servers" in body["error"], (st, body)


# The superpowered probe of eks_node_user_data_accepted_and_effective: prints each effect as
# the host has it, between @@NAME and @@end lines.
EKS_PROBE = r"""
R=/.berth/rootfs
show() { echo "@@$1"; cat "$2" 2>&1; echo; echo "@@end"; }
show kubelet-config $R/etc/kubernetes/kubelet/config.json
show containerd $R/etc/containerd/config.toml
show cri-base $R/etc/containerd/cri-base.json
show resolv $R/etc/resolv.conf
show hosts $R/etc/hosts
grep -qF CALINE $R/etc/pki/tls/certs/ca-bundle.crt && echo ca=trusted || echo ca=absent
show user-data /.bottlerocket/host-containers/current/user-data
set -- $(pidof containerd)
echo "@@containerd-env"; tr '\0' '\n' < /proc/$1/environ; echo "@@end"
echo "lockdown=$(cat $R/sys/kernel/security/lockdown)"
echo "somaxconn=$(cat /proc/sys/net/core/somaxconn)"
echo "cri=$(chroot $R /usr/bin/ctr plugins ls | grep -E 'grpc[.]v1 +cri ' | grep -oE '(ok|error|skip) *$')"
echo probe-done
sleep 3600
"""


def _sections(text):
    """{NAME: text} of the @@NAME ... @@end blocks of the probe's output."""
    out, name, lines = {}, None, []
    for line in text.splitlines():
        if line.startswith("@@") and line != "@@end":
            name, lines = line[2:], []
        elif line == "@@end" and name:
            out[name] = "\n".join(lines)
            name = None
        elif name:
            lines.append(line)
    return out


@case(arches=("x86_64",))
def eks_node_user_data_accepted_and_effective(arch):
    """A realistic EKS node's user data (tests/data/settings/eks-node.toml: kubernetes tuning,
    host container user-data, sysctls, lockdown, registry mirrors in table form and
    credentials, proxy, DNS, pki, oci-defaults, container-runtime; without [settings.aws],
    which only the aws variant takes) is accepted as a whole at first boot, and each effect is
    there as the host has it: kubelet's KubeletConfiguration (with Bottlerocket's newer keys:
    reserved CPUs, memory manager, CPU manager options, swap, image GC ages), /etc/hosts
    (settings.network.hosts), containerd's config (whose CRI
    plugin loads with it) and base OCI spec, resolv.conf, containerd's proxy environment, the
    CA in the trust bundle, the lockdown mode in securityfs, a sysctl, the user-data file; no
    SELinux denial on the way."""
    import base64
    import json
    import tomllib
    from registry import Registry
    with open(os.path.join(ROOT, "tests/data/settings/eks-node.toml")) as f:
        ud = f.read()
    ud = ud[:ud.index("[settings.aws]")]
    with open(os.path.join(ROOT, "tests/data/settings/ca.pem")) as f:
        ca_line = f.read().splitlines()[2]  # a line of the certificate's own base64
    probe_ud = base64.b64encode(b'{"probe": true}').decode()
    with Registry() as reg:
        ref = reg.push_busybox_cmd(arch, ["/bin/sh", "-c", EKS_PROBE.replace("CALINE", ca_line)], "eksprobe")
        ud = ud.replace('[settings.container-registry.mirrors]\n',
                        f'[settings.container-registry.mirrors]\n"{reg.guest_address}" = '
                        f'["http://{reg.guest_address}"]\n')
        ud += (f'\n[settings.host-containers.probe]\nsource = "{ref}"\nenabled = true\n'
               f'superpowered = true\nuser-data = "{probe_ud}"\n')
        want = tomllib.loads(ud)["settings"]
        with VM(arch, user_data=ud) as vm:
            vm.start()
            vm.wait_ready(timeout=300)
            vm.wait_for(r"berth: api bridge")
            st, body = vm.api("GET", "/user-data")
            assert st == 200 and body["applied"] is True, body
            st, got = vm.api("GET", "/settings")
            assert got["kubernetes"]["eviction-hard"] == want["kubernetes"]["eviction-hard"], got
            assert got["container-registry"]["mirrors"] == want["container-registry"]["mirrors"], got

            def probed():
                st, text = vm.api("GET", "/logs?service=host-containers@probe")
                text = text if st == 200 and isinstance(text, str) else ""
                return ("probe-done" in text, text)
            _, out = _poll(probed, 400)
            sec = _sections(out)
            assert {"kubelet-config", "containerd", "cri-base", "resolv", "hosts", "user-data",
                    "containerd-env"} <= set(sec), out[-6000:]
            # kubelet reads its configuration as KubeletConfiguration JSON.
            k = json.loads(sec["kubelet-config"])
            assert k["kind"] == "KubeletConfiguration", k
            assert k["evictionHard"] == {"memory.available": "200Mi", "nodefs.available": "10%"}, k
            assert k["kubeReserved"] == {"cpu": "70m", "memory": "893Mi", "ephemeral-storage": "1Gi"}, k
            assert k["systemReserved"] == {"cpu": "100m", "memory": "256Mi"}, k
            assert (k["registryPullQPS"], k["registryBurst"], k["eventRecordQPS"], k["eventBurst"],
                    k["kubeAPIQPS"], k["kubeAPIBurst"]) == (20, 40, 10, 20, 30, 60), k
            assert k["cpuManagerPolicy"] == "static" and k["topologyManagerScope"] == "pod", k
            assert k["imageGCHighThresholdPercent"] == 85 and k["imageGCLowThresholdPercent"] == 80, k
            assert k["allowedUnsafeSysctls"] == ["net.core.somaxconn", "net.ipv4.ip_local_port_range"], k
            assert k["shutdownGracePeriod"] == "30s" and k["seccompDefault"] is True, k
            # Bottlerocket's newer kubelet keys, by kubelet's own field names.
            assert k["reservedSystemCPUs"] == "0" and k["memoryManagerPolicy"] == "Static", k
            assert k["reservedMemory"] == [{"numaNode": 0, "limits": {"memory": "1349Mi"}}], k
            assert k["cpuManagerPolicyOptions"] == {"full-pcpus-only": "true"}, k
            assert k["memorySwap"] == {"swapBehavior": "NoSwap"}, k
            assert (k["imageMaximumGCAge"], k["imageMinimumGCAge"]) == ("168h", "2m"), k
            # settings.network.hosts in /etc/hosts.
            assert "10.0.2.2 registry.internal.example mirror.internal.example" in sec["hosts"].splitlines(), sec
            # containerd: mirrors, credentials and runtime values, and its CRI plugin loads them.
            c = tomllib.loads(sec["containerd"])
            cri = c["plugins"]["io.containerd.grpc.v1.cri"]
            assert cri["registry"]["mirrors"]["docker.io"]["endpoint"] == [
                "https://mirror.example.com", "http://10.0.2.2:5000"], cri
            assert cri["registry"]["configs"]["registry-1.docker.io"]["auth"] == {
                "username": "berth", "password": "s3cret"}, cri
            assert cri["registry"]["configs"]["registry.example.com"]["auth"] == {"auth": "YmVydGg6czNjcmV0"}
            assert cri["max_concurrent_downloads"] == 4 and cri["max_container_log_line_size"] == 32768, cri
            assert cri["enable_unprivileged_ports"] is True and cri["enable_unprivileged_icmp"] is True, cri
            assert cri["sandbox_image"].endswith("/eks/pause:3.5"), cri
            assert cri["containerd"]["runtimes"]["runc"]["base_runtime_spec"] == "/etc/containerd/cri-base.json"
            assert "cri=ok" in out, out
            # The base OCI spec: oci-defaults' capabilities and rlimits.
            spec = json.loads(sec["cri-base"])
            caps = spec["process"]["capabilities"]["bounding"]
            assert "CAP_NET_ADMIN" in caps and "CAP_MKNOD" not in caps and len(caps) == 14, caps
            assert {"type": "RLIMIT_NOFILE", "hard": 65536, "soft": 32768} in spec["process"]["rlimits"], spec
            assert {"type": "RLIMIT_CORE", "hard": 2**64 - 1, "soft": 2**64 - 1} in spec["process"]["rlimits"], spec
            # resolv.conf: settings.dns over DHCP's.
            r = sec["resolv"].splitlines()
            assert "search us-west-2.compute.internal example.com" in r, r
            assert [x for x in r if x.startswith("nameserver")] == ["nameserver 10.0.2.3", "nameserver 1.1.1.1"], r
            # containerd's environment: the proxy.
            env = dict(line.split("=", 1) for line in sec["containerd-env"].splitlines() if "=" in line)
            assert env.get("HTTPS_PROXY") == "http://10.0.2.2:3128", env
            assert env.get("NO_PROXY", "").startswith("10.0.0.0/8,.internal.example,localhost,127.0.0.1,"), env
            # The CA in the trust bundle, lockdown, a sysctl, the host container's user data.
            assert "ca=trusted" in out, out
            assert "lockdown=none [integrity] confidentiality" in out, out
            assert "somaxconn=1024" in out, out
            assert sec["user-data"].strip() == '{"probe": true}', sec["user-data"]
            assert_no_avc_denials(vm)


# The A/B update cases and the fault cases register themselves with `case` too.
import update_cases  # noqa: E402,F401
import fault_cases  # noqa: E402,F401
import uefi_cases  # noqa: E402,F401
import selinux_cases  # noqa: E402,F401
import ec2_cases  # noqa: E402,F401
import rpi_cases  # noqa: E402,F401
import node_cases  # noqa: E402,F401
import cri_cases  # noqa: E402,F401
import storage_cases  # noqa: E402,F401
