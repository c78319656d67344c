"""Node features Bottlerocket users rely on (issue 17): bootstrap commands and containers,
static pods, exec into host containers, the CIS report. Boots are few: each case checks several
things in one boot where it reads well."""

import base64
import subprocess
import time

from berthvm import VM, Pty, slot_states
from cases import _poll, case, copy_slot, host_berth


def _b64(text):
    return base64.b64encode(text.encode()).decode()


def _bootstrap_user_data(reg, refs):
    pod_web, pod_off = _b64("apiVersion: v1\nkind: Pod\n"), _b64("kind: Pod\n")
    ud = f'''
[settings.bootstrap-commands.z-last]
commands = [["apiclient", "set", "motd=z"]]
mode = "always"

[settings.bootstrap-commands.a-first]
commands = [["apiclient", "set", "motd=a"]]
mode = "once"
essential = true

[settings.bootstrap-containers.always]
source = "{refs['always']}"
mode = "always"

[settings.bootstrap-containers.once]
source = "{refs['once']}"
mode = "once"
user-data = "{_b64('hello-once')}"

[settings.bootstrap-containers.zz-fails]
source = "{refs['fails']}"
mode = "always"
essential = true

[settings.kubernetes.static-pods.web]
manifest = "{pod_web}"
enabled = true

[settings.kubernetes.static-pods.off]
manifest = "{pod_off}"
enabled = false

[settings.host-containers.admin]
source = "{refs['admin']}"
enabled = true

[settings.host-containers.execer]
source = "{refs['execer']}"
enabled = true
superpowered = true

[[settings.container-registry.mirrors]]
registry = "{reg.guest_address}"
endpoint = ["http://{reg.guest_address}"]
'''
    return ud


def _cis_flips_with_a_weakened_sysctl(vm):
    """`GET /report/cis`: every check has a result read from the system; verity, SELinux and
    ASLR pass; setting kernel.randomize_va_space to 0 flips the ASLR check."""
    def report():
        st, r = vm.api("GET", "/report/cis?format=json&level=2")
        assert st == 200, r
        return {c["id"]: c for c in r["results"]}, r
    checks, r = report()
    assert r["total"] == len(checks) >= 15, r
    assert all(c["status"] in ("PASS", "FAIL", "SKIP") and c["detail"] for c in checks.values()), r
    for cid in ("1.3.1", "1.4.1", "1.5.1"):
        assert checks[cid]["status"] == "PASS", checks[cid]
    st, _ = vm.api("PATCH", "/settings", {"kernel": {"sysctl": {"kernel.randomize_va_space": "0"}}})
    assert st == 204
    st, _ = vm.api("POST", "/tx/commit_and_apply")
    assert st == 200
    checks, r = report()
    assert checks["1.4.1"]["status"] == "FAIL", checks["1.4.1"]
    assert "kernel.randomize_va_space=0 (want 2)" in checks["1.4.1"]["detail"], checks["1.4.1"]
    assert r["failed"] >= 1 and r["status"] == "FAIL", r


def _exec_from_the_host(vm):
    """`apiclient exec` driven from the host, the host's berth binary on the VM's API socket
    (the serial bridge, which relays the upgraded connection): without a TTY, exit status and
    output; with one, under a real pty: the window size at the start and after a change
    (SIGWINCH), Ctrl-C (the byte 0x03) interrupting the foreground command, the exit status.
    The bridge is back to requests after each session, also after a client killed mid-session."""
    apiclient = [host_berth(), "apiclient", "-s", vm.api_sock, "exec"]
    r = subprocess.run(apiclient + ["admin", "sh", "-c", "echo ok; exit 3"], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=180)
    assert (r.returncode, r.stdout) == (3, b"ok\n"), r
    st, _ = vm.api("GET", "/os")
    assert st == 200, st

    def size_is(t, want):
        # ctr sizes the container's terminal just after starting the command, and passes a
        # resize on when it gets its SIGWINCH: ask until the size shows (a wrong one never does).
        for _ in range(20):
            t.send(b"busybox stty size\r")
            try:
                return t.expect(want, 6)
            except AssertionError:
                pass
        raise AssertionError(f"the terminal never became {want!r}: {t.out[-2000:]!r}")

    t = Pty(apiclient + ["-t", "admin", "sh"], 33, 101)
    try:
        t.expect(rb"# ", 180)
        size_is(t, rb"\n33 101\r*\n")
        t.resize(41, 123)
        size_is(t, rb"\n41 123\r*\n")
        t.send(b"echo S$((1+2)); sleep 1000\r")
        t.expect(rb"\nS3\r*\n", 60)
        time.sleep(3)
        t.send(b"\x03")
        t.send(b"echo back$((2+3))\r")
        t.expect(rb"\nback5\r*\n", 60)
        t.send(b"exit 7\r")
        code = t.wait(120)
        assert code == 7, (code, t.out[-2000:])
    finally:
        t.kill()
    st, _ = vm.api("GET", "/os")
    assert st == 200, st

    # A client killed mid-session: its disconnect, or the next request, ends the session.
    t = Pty(apiclient + ["-t", "admin", "sh"], 24, 80)
    try:
        t.send(b"echo V$((3+4))\r")
        t.expect(rb"\nV7\r*\n", 180)
    finally:
        t.kill()
    st, _ = vm.api("GET", "/os")
    assert st == 200, st
    console = vm.console()
    assert console.count("api bridge: the exec session ended") >= 2, console[-3000:]
    assert "api bridge: the host client left during an exec session" in console \
        or "api bridge: the host sent a request during an exec session" in console, console[-3000:]


@case(arches=("x86_64",))
def bootstrap_commands_and_containers(arch):
    """Bootstrap commands run in name order, then bootstrap containers, all before the boot is
    ready; a container writes on /local (kept across boots); `once` ones turn themselves off and
    do not run at the next boot; an essential one that fails is a notice on the known-good slot
    and rolls a slot on trial back to it. In the same boots: an enabled static pod's manifest is
    in kubelet's directory and a disabled one's is not; `report cis` reads the system (a
    weakened sysctl flips its check)."""
    from registry import Registry
    root = "/.berth/rootfs/local"
    scripts = {
        "always": ("echo static: $(ls /.berth/rootfs/etc/kubernetes/static-pods); "
                   f"echo boot >> {root}/bootstrap-always; "
                   f"echo \"always: runs=$(wc -l < {root}/bootstrap-always) "
                   f"once=$(cat {root}/bootstrap-once 2>/dev/null | wc -l)\""),
        "once": (f"cat /.bottlerocket/bootstrap-containers/current/user-data >> {root}/bootstrap-once; "
                 f"echo >> {root}/bootstrap-once; echo once ran"),
        "fails": "echo failing on purpose; exit 7",
        "admin": "sleep 3600",
        # apiclient is the host's berth binary run by that name. ctr sizes the container's
        # terminal just after it starts the command: stty waits a moment.
        "execer": ("mkdir -p /tmp; cp /.berth/rootfs/sbin/init /tmp/apiclient; A=/tmp/apiclient; "
                   "for i in $(seq 1 90); do $A exec -T admin true 2>/dev/null && break; sleep 2; done; "
                   "$A exec admin sh -c 'echo ok; exit 3'; echo \"exec status=$?\"; "
                   "LINES=33 COLUMNS=111 $A exec -t admin sh -c 'sleep 2; busybox stty size'; echo \"tty status=$?\"; "
                   "(sleep 8; printf '\\003') | $A exec -t admin sh -c "
                   "'trap \"echo got INT; exit 5\" INT; sleep 30 & wait'; echo \"int status=$?\"; "
                   "sleep 3600"),
    }
    with Registry() as reg:
        refs = {k: reg.push_busybox_cmd(arch, ["/bin/sh", "-c", s], tag=k) for k, s in scripts.items()}
        with VM(arch, raw=True, reboot=True, user_data=_bootstrap_user_data(reg, refs)) as vm:
            vm.start()
            vm.wait_ready(timeout=400)
            console = vm.console()
            exited = console.find("service bootstrap exited")
            assert 0 <= exited < console.find("berth: ready"), "the bootstrap ends before ready"
            st, svc = vm.api("GET", "/services/bootstrap")
            assert svc["state"] == "exited" and svc["last_exit"]["code"] == 1, svc
            st, logs = vm.api("GET", "/logs?service=bootstrap")
            for want in ["always: runs=1 once=0", "once ran", "static: web",
                         "essential bootstrap container zz-fails failed"]:
                assert want in logs, logs
            # Commands before containers, in name order: a-first then z-last.
            assert logs.find("bootstrap command a-first done") < logs.find("bootstrap command z-last done") \
                < logs.find("running bootstrap container always"), logs
            st, s = vm.api("GET", "/settings")
            assert s["motd"] == "z", s["motd"]
            assert s["bootstrap-commands"]["a-first"]["mode"] == "off", s["bootstrap-commands"]
            assert s["bootstrap-commands"]["z-last"]["mode"] == "always", s["bootstrap-commands"]
            assert s["bootstrap-containers"]["once"]["mode"] == "off", s["bootstrap-containers"]
            st, boot = vm.api("GET", "/boot")
            assert "essential bootstrap step failed" in str(boot), boot
            _cis_flips_with_a_weakened_sysctl(vm)

            # apiclient exec, run inside the guest by the superpowered host container "execer".
            def exec_done():
                st, text = vm.api("GET", "/logs?service=host-containers@execer")
                return ("int status=" in (text or ""), text)
            _, text = _poll(exec_done, 300)
            assert ("\n" + text).find("\nok\nexec status=3") >= 0, text
            assert "33 111" in text and "tty status=0" in text, text
            assert "got INT" in text and "int status=5" in text, text
            _exec_from_the_host(vm)
            vm.qmp("system_powerdown")
            vm.wait_for(r"reboot: Power down|Power down", timeout=90)
            vm.kill()

            # The same disk, with slot B (a copy of A) on trial: the essential failure rolls it back.
            copy_slot(vm.disk)
            subprocess.run([host_berth(), "bootctl", "set", vm.disk, "B", "2", "1", "0"], check=True)
            vm.start()
            vm.wait_for(r"boot control: slot B \(on trial: true, tries left: 0\)")
            vm.wait_for(r"essential bootstrap step failed", timeout=400)
            vm.wait_for(r"boot control: slot A \(on trial: false", timeout=120)
            r = vm.wait_ready(timeout=400)
            assert r["slot"] == "A", r
            st, logs = vm.api("GET", "/logs?service=bootstrap")
            assert "always: runs=3 once=1" in logs, logs
            assert "once ran" not in logs and "bootstrap command a-first" not in logs, logs
            vm.qmp("system_powerdown")
            vm.wait_for(r"reboot: Power down|Power down", timeout=90)
            vm.kill()
            s = slot_states(vm.disk, host_berth())
            assert s["B"] == {"priority": 2, "tries": 0, "successful": 0}, s
