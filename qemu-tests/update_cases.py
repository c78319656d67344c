"""A/B update cases (issue 5): a signed TUF repository built with `berth update-repo`, served
from the host's loopback by repo_server.py and reached by the guest at 10.0.2.2.

The v2 slot images come from scripts/test (`BERTH_VERSION=0.2.0 BERTH_SLOT_ONLY=1
scripts/build-image` into build/ARCH-v2, and on x86_64 a never-healthy variant into
build/x86_64-v2-broken).
"""

import base64
import json
import os
import random
import shutil
import subprocess
import tempfile
import re
import threading
import time

from berthvm import VM, BUILD, gpt_partitions, slot_states
from cases import _poll, case, flip_byte, host_berth, assert_no_avc_denials
from testpki import make_pki
from connect_proxy import ConnectProxy

KEYS = os.environ.get("BERTH_UPDATE_KEYS", os.path.join(BUILD, "update-keys"))
HERE = os.path.dirname(os.path.abspath(__file__))


class Repo:
    """A signed repository holding the given slot builds, served over HTTP on 127.0.0.1 (HTTPS
    with `tls` = (cert, key))."""

    def __init__(self, arch, builds, rate=None, tls=None):
        self.dir = tempfile.mkdtemp(prefix="berth-repo-")
        self.repo = os.path.join(self.dir, "repo")
        for b in builds:
            slot = os.path.join(BUILD, f"{arch}-{b}")
            assert os.path.exists(os.path.join(slot, "slot.toml")), \
                f"{slot} is missing: scripts/test builds it (BERTH_SLOT_ONLY=1 scripts/build-image)"
            subprocess.run([host_berth(), "update-repo", "add", "--keys", KEYS, "--repo", self.repo, slot],
                           check=True, stdout=subprocess.DEVNULL)
        self.tls = tls
        self.server = None
        self.others = []
        self.serve(rate)

    def _start(self, rate=None, tls=None):
        argv = ["python3", os.path.join(HERE, "repo_server.py"), self.repo, "--port", "0"]
        if rate:
            argv += ["--rate", str(rate)]
        if tls:
            argv += ["--tls-cert", tls[0], "--tls-key", tls[1]]
        server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = server.stdout.readline()
        assert line.startswith("listening "), line
        return server, int(line.split()[1])

    def serve(self, rate=None):
        if self.server:
            self.server.kill()
            self.server.wait()
        self.server, self.port = self._start(rate, self.tls)
        return self

    def also_serve(self, tls):
        """Another server of the same repository, over HTTPS with `tls`; returns its port."""
        server, port = self._start(tls=tls)
        self.others.append(server)
        return port

    def settings(self, port=None):
        scheme = "https" if self.tls else "http"
        base = f"{scheme}://10.0.2.2:{port or self.port}"
        return {"updates": {"metadata-base-url": f"{base}/metadata", "targets-base-url": f"{base}/targets",
                            "ignore-waves": True}}

    def target(self, part):
        d = os.path.join(self.repo, "targets")
        return next(os.path.join(d, n) for n in os.listdir(d) if part in n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for server in [self.server] + self.others:
            if server:
                server.kill()
                server.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def configure(vm, repo, extra=None):
    patch = repo.settings()
    patch.update(extra or {})
    st, body = vm.api("PATCH", "/settings", patch)
    assert st == 204, (st, body)
    st, body = vm.api("POST", "/tx/commit_and_apply")
    assert st == 200, (st, body)


def status(vm, timeout=600):
    """GET /updates/status, waiting while a command holds the updater (423)."""
    deadline = time.monotonic() + timeout
    while True:
        st, body = vm.api("GET", "/updates/status")
        if st != 423:
            assert st == 200, (st, body)
            return body
        assert time.monotonic() < deadline, f"the updater is still busy after {timeout}s: {body}"
        time.sleep(1)


def progress(vm):
    st, body = vm.api("GET", "/updates/progress")
    assert st == 200, (st, body)
    return body


def run_command(vm, action, cmd, timeout=600, want="Success"):
    """POST /actions/ACTION and wait for the updater to finish it, as Bottlerocket's apiclient
    waits: until the status answers (not 423) with a record of CMD newer than the one before.
    Returns the status."""
    st, body = vm.api("GET", "/updates/status")
    assert st in (200, 404), (st, body)
    before = body["most_recent_command"]["timestamp"] if st == 200 else None
    st, body = vm.api("POST", f"/actions/{action}")
    assert st in (200, 202), (action, st, body)
    s = status(vm, timeout)
    rec = s["most_recent_command"]
    assert rec["cmd_type"] == cmd and rec["timestamp"] != before, (cmd, before, s)
    assert rec["cmd_status"] == want, (cmd, rec, s)
    return s


def stage(vm, repo, version="0.2.0"):
    configure(vm, repo)
    s = run_command(vm, "refresh-updates", "refresh")
    assert s["update_state"] == "Available" and s["chosen_update"]["version"] == version, s
    s = run_command(vm, "prepare-update", "prepare")
    assert s["update_state"] == "Staged" and s["staging_partition"]["image"]["version"] == version, s
    assert not s["staging_partition"]["bootable"], s
    return s


def activate(vm):
    st, s = vm.api("POST", "/actions/activate-update")
    assert st == 200 and s["update_state"] == "Ready", (st, s)
    assert s["staging_partition"]["tries"] == 1 and s["staging_partition"]["bootable"], s
    return s


def boot(vm, timeout=300):
    vm.wait_ready(timeout)
    vm.wait_for(r"berth: api bridge")


def reboot(vm):
    vm.mark()
    st, _ = vm.api("POST", "/actions/reboot")
    assert st == 202


def boot_stage_activate_reboot(vm, repo):
    """Boot v1, stage v2 from `repo`, activate it and reboot into its trial."""
    vm.start()
    boot(vm)
    stage(vm, repo)
    activate(vm)
    reboot(vm)


def back_on_v1_after_rollback(vm, timeout=120):
    """After a failed trial of v2 in slot B: v1 boots from slot A by itself, and
    /updates/status reports the rollback with B left unbootable. Returns the status."""
    vm.mark()
    vm.wait_for(r"boot control: slot A \(on trial: false", timeout=timeout)
    r = vm.wait_ready(300)
    assert r["slot"] == "A", r
    vm.wait_for(r"berth: api bridge")
    s = status(vm)
    assert s["last_rollback"]["failed_version"] == "0.2.0" and s["last_rollback"]["automatic"], s
    assert "rolled back" in (s["note"] or ""), s
    assert s["update_state"] == "Idle", s
    assert s["staging_partition"]["slot"] == "B" and not s["staging_partition"]["bootable"], s
    return s


@case(arches=("x86_64", "arm64"))
def update_v1_to_v2_keeps_settings(arch):
    """v1 refreshes from a signed repository on the host, stages v2 into slot B (tough checks
    every byte, then the verity root of what landed), activates it and reboots: v2 comes up
    in slot B, is marked good, and the settings made on v1 are intact."""
    with Repo(arch, ["v2"]) as repo, VM(arch, raw=True, reboot=True) as vm:
        vm.start()
        boot(vm)
        configure(vm, repo, {"motd": "kept across the update"})
        # apiclient, run on the host against the VM's API socket, as an operator would.
        apiclient = [host_berth(), "apiclient", "-s", vm.api_sock, "update"]
        out = subprocess.run(apiclient + ["check"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and "update available: 0.1.0 -> 0.2.0" in out.stderr, out
        assert json.loads(out.stdout)["chosen_update"]["version"] == "0.2.0", out
        vm.mark()
        out = subprocess.run(apiclient + ["apply", "--reboot"], capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out
        assert "update 0.2.0 is active" in out.stderr and "Rebooting" in out.stderr, out
        assert "writing BERTH-ROOT-B" in out.stderr, out
        vm.wait_for(r"boot control: slot B \(on trial: true, tries left: 0\)", timeout=120)
        vm.wait_for(r"watchdog armed \(timeout \d+ s, slot on trial\)")
        r = vm.wait_ready(300)
        assert r["slot"] == "B" and r["version"] == "0.2.0", r
        vm.wait_for(r"slot B marked successful")
        vm.wait_for(r"berth: api bridge")
        s = status(vm)
        assert s["update_state"] == "Idle" and s["last_update"]["to"] == "0.2.0", s
        assert s["active_partition"]["slot"] == "B" and s["active_partition"]["successful"], s
        st, body = vm.api("GET", "/settings")
        assert body["motd"] == "kept across the update", body
        assert body["updates"]["metadata-base-url"] == repo.settings()["updates"]["metadata-base-url"], body
        st, os_info = vm.api("GET", "/os")
        assert os_info["version_id"] == "0.2.0" and os_info["slot"] == "B", os_info
        assert_no_avc_denials(vm)


@case()
def corrupted_v2_root_rolls_back(arch):
    """v2 is staged and activated, then its root partition is corrupted on the disk while the
    machine is off: the trial boot of B hits dm-verity, restarts, and v1 in slot A comes back
    by itself; /updates/status says v2 failed."""
    with Repo(arch, ["v2"]) as repo, VM(arch, raw=True, reboot=True) as vm:
        vm.start()
        boot(vm)
        stage(vm, repo)
        activate(vm)
        st, _ = vm.api("POST", "/actions/shutdown")
        assert st == 202
        vm.wait_exit(120)
        off, _ = gpt_partitions(vm.disk)["BERTH-ROOT-B"]
        flip_byte(vm.disk, off + 1024 + 8)
        vm.start()
        vm.wait_for(r"boot control: slot B \(on trial: true, tries left: 0\)", timeout=120)
        vm.wait_for(r"verity.*(data block \d+ is corrupted|corrupt)", timeout=120)
        back_on_v1_after_rollback(vm)


@case()
def unhealthy_v2_rolls_back(arch):
    """A v2 that boots but never becomes healthy (its containerd cannot start) is rebooted by
    the health timeout while on trial, and the next boot takes v1 in slot A by itself. On that
    trial boot `apiclient update cancel` is refused (409): slot A is the fallback and stays
    bootable."""
    with Repo(arch, ["v2-broken"]) as repo, \
            VM(arch, raw=True, reboot=True, append="berth.health-timeout=40") as vm:
        boot_stage_activate_reboot(vm, repo)
        vm.wait_for(r"boot control: slot B \(on trial: true", timeout=120)
        vm.wait_for(r"berth: api bridge", timeout=120)
        out = subprocess.run([host_berth(), "apiclient", "-s", vm.api_sock, "update", "cancel"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "Status 409 when POSTing" in out.stderr, out
        assert "no activated update to cancel" in out.stderr and "/actions/rollback" in out.stderr, out
        s = status(vm)
        assert s["active_partition"]["on_trial"] and s["update_state"] == "Idle", s
        assert "on trial" in s["note"], s
        assert s["staging_partition"]["slot"] == "A" and s["staging_partition"]["bootable"], s
        vm.wait_for(r"not healthy in time", timeout=180)
        back_on_v1_after_rollback(vm)


@case()
def hung_v2_is_reset_by_the_watchdog_and_rolls_back(arch):
    """A v2 whose boot hangs before it is healthy (fault injection: PID 1 stops, on trial only)
    is reset by the hardware watchdog that stage 1 armed, and v1 in slot A comes back."""
    with Repo(arch, ["v2"]) as repo, VM(arch, raw=True, reboot=True,
                                        append="berth.fault=hang-on-trial berth.watchdog-timeout=15") as vm:
        boot_stage_activate_reboot(vm, repo)
        vm.wait_for(r"boot control: slot B \(on trial: true", timeout=120)
        vm.wait_for(r"watchdog armed \(timeout 15 s, slot on trial\)")
        vm.wait_for(r"fault injection berth.fault=hang-on-trial", timeout=120)
        back_on_v1_after_rollback(vm, timeout=180)


@case()
def power_cut_while_writing_then_update_again(arch):
    """The VM is killed (a power cut) while v2 is being written into slot B: the next boot
    runs v1 from slot A cleanly, reports the interrupted write; a prepare started then is
    cancelled while it runs (Failed, slot B unbootable, the updater free again); a last
    attempt stages, activates and boots v2."""
    with Repo(arch, ["v2"], rate=3_000_000) as repo, VM(arch, raw=True, reboot=True) as vm:
        vm.start()
        boot(vm)
        configure(vm, repo)
        run_command(vm, "refresh-updates", "refresh")
        st, _ = vm.api("POST", "/actions/prepare-update")
        assert st == 202
        deadline = time.monotonic() + 300
        while True:
            p = progress(vm)
            if p["bytes_done"] > 8 << 20:
                break
            assert time.monotonic() < deadline, p
            time.sleep(0.5)
        vm.kill()
        assert slot_states(vm.disk, host_berth())["B"]["priority"] == 0
        repo.serve(rate=500_000)  # slow, so the next prepare is still running when cancelled
        vm.start()
        r = vm.wait_ready(300)
        assert r["slot"] == "A", r
        vm.wait_for(r"berth: api bridge")
        s = status(vm)
        assert s["update_state"] == "Available" and "interrupted" in s["note"], s
        assert not s["staging_partition"]["bootable"], s
        # A running prepare can be cancelled (it used to hold the updater until a reboot): it
        # ends Failed, the slot stays unbootable, and the updater takes commands again.
        configure(vm, repo)
        st, _ = vm.api("POST", "/actions/prepare-update")
        assert st == 202, st
        _poll(lambda: (lambda p: (p["bytes_done"] > 1 << 20, p))(progress(vm)), 300)
        st, body = vm.api("POST", "/actions/cancel-update")
        assert st in (200, 202), (st, body)
        s = status(vm)
        rec = s["most_recent_command"]
        assert rec["cmd_type"] == "prepare" and rec["cmd_status"] == "Failed" and "cancel" in rec["stderr"], s
        assert not s["staging_partition"]["bootable"], s
        st, body = vm.api("POST", "/actions/cancel-update")
        assert st == 409 and "no prepare is running" in body["error"], (st, body)
        repo.serve()  # full speed from here
        configure(vm, repo)
        s = run_command(vm, "prepare-update", "prepare")
        assert s["update_state"] == "Staged", s
        activate(vm)
        reboot(vm)
        r = vm.wait_ready(300)
        assert r["slot"] == "B" and r["version"] == "0.2.0", r


@case()
def tampered_repository_is_refused(arch):
    """A repository whose timestamp metadata was edited without the key is refused at refresh;
    one whose root image was altered is refused while writing (its hash does not match), with
    slot B left unbootable and v1 running on."""
    with Repo(arch, ["v2"]) as repo, VM(arch, raw=True) as vm:
        vm.start()
        boot(vm)
        configure(vm, repo)
        ts = os.path.join(repo.repo, "metadata", "timestamp.json")
        good = open(ts).read()
        open(ts, "w").write(good.replace('"version": ', '"version": 9', 1))
        s = run_command(vm, "refresh-updates", "refresh", want="Failed")
        err = s["most_recent_command"]["stderr"]
        assert "refused" in err and ("signature" in err.lower() or "threshold" in err.lower()), err
        open(ts, "w").write(good)
        s = run_command(vm, "refresh-updates", "refresh")
        assert s["update_state"] == "Available", s
        root = repo.target("root.img.lz4")
        flip_byte(root, os.path.getsize(root) // 2)
        s = run_command(vm, "prepare-update", "prepare", want="Failed")
        err = s["most_recent_command"]["stderr"]
        assert "hash" in err.lower(), err
        assert s["update_state"] == "Available" and not s["staging_partition"]["bootable"], s
        st, _ = vm.api("POST", "/actions/activate-update")
        assert st == 409
        st, body = vm.api("GET", "/services/containerd")
        assert body["state"] == "running", body


def sgdisk_verify(disk):
    """`sgdisk -v DISK`: (clean, output). sgdisk repairs a damaged copy in memory before it
    verifies and only warns about it, so any warning counts as a problem."""
    out = subprocess.run(["sgdisk", "-v", disk], capture_output=True, text=True)
    text = out.stdout + out.stderr
    complaint = any(w in text for w in ("Warning", "Caution", "Problem", "ERROR", "rror"))
    return out.returncode == 0 and "No problems found" in out.stdout and not complaint, text


def choose(states):
    """The slot boot control picks from `berth bootctl show` states (bootctl::choose)."""
    def bootable(s):
        return s["priority"] > 0 and (s["successful"] or s["tries"] > 0)
    a, b = states["A"], states["B"]
    if bootable(a) and bootable(b):
        return "B" if b["priority"] > a["priority"] else "A"
    return "A" if bootable(a) else "B" if bootable(b) else None


def toggle_activation(vm, stop, count):
    """Activate and deactivate the staged update over and over until `stop` is set or the VM
    is gone; `count[0]` counts the answered commands."""
    action = "activate-update"
    while not stop.is_set():
        try:
            st, _ = vm.api("POST", f"/actions/{action}", timeout=10)
        except OSError:
            return
        if st in (200, 409):
            count[0] += 1
        action = "deactivate-update" if action == "activate-update" else "activate-update"


@case()
def power_cut_during_boot_control_writes(arch):
    """Power cuts at random points of boot-control writes: while the guest activates and
    deactivates a staged v2 in a loop, and right around marking a trial boot of v2 successful.
    After each cut the table on the disk reads as a consistent state, the next boot takes the
    slot that state chooses (stage 1 repairing a copy the cut left stale), and `sgdisk -v`
    finds no problem.

    Which power cut: QEMU is killed (SIGKILL) with its disk at cache=unsafe. The guest loses
    its page cache and every write it had not handed to the virtual disk yet; every write it
    had handed over survives in the host's page cache. So this checks Berth's write order and
    fsyncs (a table copy not yet fsynced may be missing, or be there in part). It does not
    model a disk that drops its own volatile cache: the unit tests in src/disk/gpt.rs enumerate
    that (every subset of the sectors written since the last flush, one torn).

    The cut points come from a seed printed at the start; BERTH_CUT_SEED=N replays a run."""
    seed = int(os.environ.get("BERTH_CUT_SEED") or random.randrange(1 << 32))
    print(f"  power cuts: seed {seed} (replay with BERTH_CUT_SEED={seed})", flush=True)
    rng = random.Random(seed)
    cuts = 5  # one boot each after the first, and one more when B is put on trial from the host
    boots = 1
    kinds = []
    stale = 0
    with Repo(arch, ["v2"]) as repo, VM(arch, raw=True, reboot=True) as vm:
        vm.start()
        boot(vm)
        stage(vm, repo)
        trial = False  # this boot is a trial boot of slot B
        for n in range(cuts):
            if trial:
                # The write that marks B successful follows the ready line at once.
                vm.wait_ready(300)
                delay = rng.uniform(0.0, 0.4)
                time.sleep(delay)
                vm.kill()
                kinds.append(f"mark_successful+{delay:.2f}s")
                legal = lambda st: st["B"]["tries"] == 0  # the try was used at boot
            else:
                vm.wait_ready(300)
                vm.wait_for(r"berth: api bridge")
                s = status(vm)
                need_mark = n == cuts - 1 and not any(k.startswith("mark") for k in kinds)
                if s["update_state"] in ("Staged", "Ready") and not need_mark:
                    stop, count = threading.Event(), [0]
                    t = threading.Thread(target=toggle_activation, args=(vm, stop, count), daemon=True)
                    t.start()
                    delay = rng.uniform(0.5, 4.0)
                    time.sleep(delay)
                    vm.kill()
                    stop.set()
                    t.join(30)
                    kinds.append(f"activate+{delay:.2f}s({count[0]} commands)")
                    legal = lambda st: st["A"] == {"priority": 1, "tries": 0, "successful": 1} and \
                        st["B"] in ({"priority": 0, "tries": 0, "successful": 0},
                                    {"priority": 2, "tries": 1, "successful": 0})
                else:
                    # Nothing staged any more (v2 was kept or rolled back): put B on trial again
                    # from the host with the machine off, for a cut around marking it good.
                    st, _ = vm.api("POST", "/actions/shutdown")
                    assert st == 202
                    vm.wait_exit(120)
                    states = slot_states(vm.disk, host_berth())
                    subprocess.run([host_berth(), "bootctl", "set", vm.disk, "B",
                                    str(states["A"]["priority"] + 1), "1", "0"], check=True)
                    vm.mark()
                    vm.start()
                    boots += 1
                    vm.wait_for(r"boot control: slot B \(on trial: true", timeout=120)
                    vm.wait_ready(300)
                    delay = rng.uniform(0.0, 0.4)
                    time.sleep(delay)
                    vm.kill()
                    kinds.append(f"mark_successful+{delay:.2f}s")
                    legal = lambda st: st["B"]["tries"] == 0
            # The machine is off, cut at a random point. The table reads, in a legal state.
            states = slot_states(vm.disk, host_berth())
            assert legal(states), (kinds[-1], states)
            clean, text = sgdisk_verify(vm.disk)
            if not clean:
                stale += 1  # the cut landed inside a write: one copy is stale or torn
                found = [ln.strip() for ln in text.splitlines() if ": ERROR" in ln or "differ" in ln]
                print(f"  cut {n + 1} ({kinds[-1]}) left: {'; '.join(found)}", flush=True)
            want = choose(states)
            assert want, states
            on_trial = not states[want]["successful"]
            vm.mark()
            vm.start()
            boots += 1
            m = vm.wait_for(r"boot control: slot (\S) \(on trial: (\w+)", timeout=120)
            assert (m.group(1), m.group(2)) == (want, str(on_trial).lower()), (kinds[-1], states, m.group(0))
            if not clean:
                vm.wait_for(r"boot control: repaired the partition table", timeout=5)
            # Stage 1 has repaired the table and used up the try: both copies are clean now.
            time.sleep(1)
            clean, text = sgdisk_verify(vm.disk)
            assert clean, (kinds[-1], text)
            trial = on_trial and want == "B"
        r = vm.wait_ready(300)
        assert r["version"] == ("0.2.0" if r["slot"] == "B" else "0.1.0"), r
        print(f"  power cuts: {', '.join(kinds)}; {stale} landed inside a write (repaired at the next "
              f"boot); {boots} boots", flush=True)
        assert any(k.startswith("activate") for k in kinds) and any(k.startswith("mark") for k in kinds), kinds
@case()
def update_over_https_with_a_private_ca(arch):
    """The repository is served over HTTPS with a certificate from a test CA: refresh is refused
    (unknown issuer) until settings.pki trusts that CA; then a server with a certificate from
    another CA, one with an expired certificate and one with a certificate for another name
    are each refused, the reason in /updates/status; a proxy in settings.network.https-proxy
    that refuses the CONNECT is the refresh's error; and refresh and prepare succeed over HTTPS
    from the good server through a CONNECT proxy, whose log shows the tunnels."""
    with tempfile.TemporaryDirectory(prefix="berth-pki-") as d:
        pki = make_pki(d)
        with Repo(arch, ["v2"], tls=pki["good"]) as repo, VM(arch, raw=True) as vm:
            bad = {name: repo.also_serve(pki[name]) for name in ("wrong-ca", "expired", "wrong-name")}
            vm.start()
            boot(vm)
            # The image's CA bundle does not know the test CA.
            configure(vm, repo)
            s = run_command(vm, "refresh-updates", "refresh", want="Failed")
            err = s["most_recent_command"]["stderr"]
            assert "TLS handshake with 10.0.2.2 failed" in err and "(unknown issuer)" in err, err
            with open(pki["ca"], "rb") as f:
                trust = {"pki": {"test-ca": {"data": base64.b64encode(f.read()).decode(), "trusted": True}}}
            reasons = {
                "wrong-ca": "not signed by a certificate authority this host trusts (unknown issuer)",
                "expired": "the server's certificate has expired: it was valid until 2020-01-01",
                "wrong-name": "not valid for the name '10.0.2.2' (it is for: repo.example)",
            }
            for name, port in bad.items():
                configure(vm, repo, {**trust, **repo.settings(port)})
                s = run_command(vm, "refresh-updates", "refresh", want="Failed")
                err = s["most_recent_command"]["stderr"]
                assert "TLS handshake with 10.0.2.2 failed" in err and reasons[name] in err, (name, err)
                assert s["update_state"] == "Idle", (name, s)
            # Through settings.network.https-proxy: a proxy's refusal is the command's error; then
            # refresh and prepare go through a CONNECT tunnel (the proxy's log shows each).
            with ConnectProxy(refuse="403 Forbidden") as refusing:
                configure(vm, repo, {**trust, "network": {"https-proxy": refusing.url()}})
                s = run_command(vm, "refresh-updates", "refresh", want="Failed")
                err = s["most_recent_command"]["stderr"]
                want = f"through the proxy {refusing.url()}: CONNECT 10.0.2.2:{repo.port} refused: " \
                       "'HTTP/1.1 403 Forbidden'"
                assert want in err, err
                assert refusing.log and set(refusing.log) == {f"CONNECT 10.0.2.2:{repo.port} HTTP/1.1"}, \
                    refusing.log
            with ConnectProxy() as proxy:
                configure(vm, repo, {**trust, "network": {"https-proxy": proxy.url()}})
                s = run_command(vm, "refresh-updates", "refresh")
                assert s["update_state"] == "Available" and s["chosen_update"]["version"] == "0.2.0", s
                s = run_command(vm, "prepare-update", "prepare")
                assert s["update_state"] == "Staged" and s["staging_partition"]["image"]["version"] == "0.2.0", s
                # One connection per fetch (Connection: close), each a tunnel to the repository.
                tunnels = [line for line in proxy.log if line == f"CONNECT 10.0.2.2:{repo.port} HTTP/1.1"]
                assert len(tunnels) >= 4 and tunnels == proxy.log, proxy.log


# ---------------------------------------------------------------- Bottlerocket's update operator

# The calls of Bottlerocket's update operator (brupop's agent), in its order, as one node's
# agent makes them through a whole update: `apiclient raw -u URI [-m POST]` from a container
# that has the host's /run/api.sock and /bin/apiclient mounted and nothing else of the host.
# Each call that fails is retried (the agent retries every failure, 5 times, backing off from
# 10 s up to 60 s with jitter; the fixed 10, 20, 40, 60, 60 s here is one schedule it can
# produce). Its transcript, one CALL/OUT/ERR triple per attempt, is checked afterwards with the
# agent's own rules (check_operator_transcript).
AGENT_SCRIPT = r"""
call() {
  n=$((n + 1))
  for delay in 10 20 40 60 60 last; do
    apiclient raw -u "$@" >/tmp/out 2>/tmp/err
    rc=$?
    echo "CALL $n rc=$rc $*"
    echo "OUT $(cat /tmp/out)"
    echo "ERR $(cat /tmp/err)"
    if [ $rc = 0 ]; then return 0; fi
    if [ $rc -gt 128 ]; then echo "KILLED $n"; return 0; fi
    if [ $delay = last ]; then echo "GAVE-UP $n"; exit 1; fi
    sleep $delay
  done
}
n=0
call /os
case "$(cat /tmp/out)" in
*'"version_id":"0.2.0"'*)
  echo "PHASE rebooted"
  # RebootedIntoUpdate: running the desired version; then the node's status is refreshed.
  call /os
  call /os
  call /actions/refresh-updates -m POST
  call /updates/status
  echo "DONE"
  ;;
*)
  echo "PHASE update"
  # The node's status: the running version and the update to take.
  call /os
  call /actions/refresh-updates -m POST
  call /updates/status
  # StagedAndPerformedUpdate: prepare_update, then activate_update.
  call /updates/status
  call /actions/prepare-update -m POST
  call /updates/status
  call /updates/status
  call /actions/activate-update -m POST
  call /updates/status
  # The node's status again, now in Ready.
  call /os
  call /actions/refresh-updates -m POST
  call /updates/status
  # RebootedIntoUpdate: not the desired version yet, so boot_into_update.
  call /os
  call /updates/status
  echo "REBOOT"
  call /actions/reboot -m POST
  sleep 3600
  ;;
esac
"""

# The wrapper, a superpowered host container: runs the agent's container with `ctr` (the host's,
# through the host's root) and only the two mounts the operator's pod has, and keeps its
# transcript on /local so the next boot can show the one of the boot the reboot ended.
WRAPPER_SCRIPT = r"""
R=/.berth/rootfs
ctr() { /bin/busybox chroot $R /usr/bin/ctr -n berth "$@"; }
LOG=$R/local/operator-transcript
if [ -f $LOG ]; then echo "=== BEFORE REBOOT"; cat $LOG; echo "=== NOW"; : > $LOG; fi
ctr images pull --plain-http AGENT >/dev/null 2>&1 || echo "PULL FAILED"
for c in probe agent; do
  ctr tasks kill -s SIGKILL $c >/dev/null 2>&1
  ctr tasks delete -f $c >/dev/null 2>&1
  ctr containers delete $c >/dev/null 2>&1
done
# Bottlerocket runs the operator's agent with the SELinux type super_t (its pod's
# seLinuxOptions): no other container type may use the API socket and the host's apiclient.
# Berth's runc wrapper gives that label to a container annotated so.
MOUNTS="--runc-binary /usr/libexec/berth/runc --annotation org.berth.selinux=super
  --mount type=bind,src=/run/api.sock,dst=/run/api.sock,options=rbind:rw
  --mount type=bind,src=/bin/apiclient,dst=/bin/apiclient,options=rbind:ro"
# apiclient as a container's first process (PID 1 in its namespace), as a pod may run it.
out=$(ctr run --rm $MOUNTS AGENT probe /bin/apiclient -u /os 2>&1)
echo "PROBE $out rc=$?"
ctr run --rm $MOUNTS AGENT agent 2>&1 | /bin/busybox tee -a $LOG
echo "=== AGENT EXITED"
exec sleep 1000000
"""

SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")


def operator_status(text):
    """/updates/status parsed as strictly as the update operator's agent parses it (serde into
    its types: these fields required with these types, unknown ones ignored)."""
    v = json.loads(text)

    def semver(x, what):
        assert isinstance(x, str) and SEMVER.match(x), f"{what}: not semver: {x!r}"

    def image(x, what):
        assert isinstance(x, dict), f"{what}: {x!r}"
        assert isinstance(x["arch"], str) and isinstance(x["variant"], str), f"{what}: {x!r}"
        semver(x["version"], f"{what}.version")

    assert v["update_state"] in ("Idle", "Available", "Staged", "Ready"), v
    assert isinstance(v["available_updates"], list), v
    for u in v["available_updates"]:
        semver(u, "available_updates")
    if v.get("chosen_update") is not None:
        image(v["chosen_update"], "chosen_update")
    for part in ("active_partition", "staging_partition"):
        p = v.get(part)
        if p is not None:
            if p.get("image") is not None:
                image(p["image"], f"{part}.image")
            assert type(p["next_to_boot"]) is bool, f"{part}: {p!r}"
    rec = v["most_recent_command"]
    assert isinstance(rec, dict), f"most_recent_command must not be null: {v}"
    assert rec["cmd_type"] in ("refresh", "prepare", "activate"), rec
    assert rec["cmd_status"] in ("Success", "Failed", "Unknown"), rec
    assert isinstance(rec["timestamp"], str), rec
    assert type(rec["exit_status"]) is int and 0 <= rec["exit_status"] < 1 << 32, rec
    assert isinstance(rec["stderr"], str), rec
    return v


def operator_status_code(stderr):
    """The HTTP status of a failed call, found as the agent finds it: the first word after
    the first "Status" (the agent panics when there is none)."""
    parts = stderr.split("Status")
    assert len(parts) > 1, f"no 'Status' in the error, the agent would panic: {stderr!r}"
    return parts[1].split()[0]


def transcript_calls(lines):
    """[(uri args, [(rc, out, err), ...attempts])] from an agent transcript."""
    calls = []
    for i, line in enumerate(lines):
        m = re.match(r"CALL (\d+) rc=(\d+) (.*)$", line)
        if not m:
            continue
        n, rc, args = int(m.group(1)), int(m.group(2)), m.group(3)
        out = lines[i + 1][len("OUT "):] if lines[i + 1].startswith("OUT") else None
        err = lines[i + 2][len("ERR "):] if lines[i + 2].startswith("ERR") else None
        if len(calls) < n:
            calls.append((args, []))
        assert calls[n - 1][0] == args, (n, args, calls[n - 1])
        calls[n - 1][1].append((rc, out, err))
    return calls


def check_operator_transcript(calls, want):
    """Each call made as listed in `want` (the URI and method), every failed attempt a 423
    that the agent retries, and the outcomes that the agent checks as it checks them.
    Returns the parsed answers, in order."""
    assert [c[0] for c in calls] == [w[0] for w in want], ([c[0] for c in calls], want)
    answers = []
    for (args, attempts), (_, check) in zip(calls, want):
        for rc, out, err in attempts[:-1]:
            assert rc == 1 and operator_status_code(err) == "423", (args, rc, err)
        rc, out, err = attempts[-1]
        assert rc == 0 or rc > 128, (args, rc, err)
        answers.append(check(out) if check else None)
    return answers


def _os(out):
    v = json.loads(out)
    assert SEMVER.match(v["version_id"]), v
    return v


def _refreshed(out):
    s = operator_status(out)
    rec = s["most_recent_command"]
    assert rec["cmd_type"] == "refresh" and rec["cmd_status"] == "Success", s
    return s


@case()
def update_operator_calls_from_a_container_and_update_codes(arch):
    """Bottlerocket's update operator's calls, made exactly as its agent makes them
    (`apiclient raw`) from a container with only the host's /run/api.sock and /bin/apiclient
    mounted, take the node from v1 through a real update and reboot to v2, every
    /updates/status answer passing the agent's strict parse and checks. On the way, the codes
    the operator depends on: status before any command 404, activate from Idle 409, an empty
    commit 422, and while the agent's prepare runs a second prepare and the status 423."""
    from registry import Registry
    with Registry() as reg, Repo(arch, ["v2"]) as repo:
        agent = reg.push_busybox_cmd(arch, ["/bin/sh", "-c", AGENT_SCRIPT], tag="agent", name="berth-test/agent")
        wrapper = reg.push_busybox_cmd(arch, ["/bin/sh", "-c", WRAPPER_SCRIPT.replace("AGENT", agent)],
                                       tag="operator", name="berth-test/operator")
        updates = repo.settings()["updates"]
        user_data = "[settings.updates]\n" + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in updates.items()) + \
            f'[settings.host-containers.operator]\nsource = "{wrapper}"\nenabled = false\nsuperpowered = true\n' + \
            f'[[settings.container-registry.mirrors]]\nregistry = "{reg.guest_address}"\n' + \
            f'endpoint = ["http://{reg.guest_address}"]\n'  # the test registry is plain HTTP
        with VM(arch, raw=True, reboot=True, user_data=user_data) as vm:
            vm.start()
            boot(vm)
            st, body = vm.api("GET", "/updates/status")
            assert st == 404 and "refresh-updates" in body["error"], (st, body)
            st, body = vm.api("POST", "/actions/activate-update")
            assert st == 409 and "state Idle" in body["error"], (st, body)
            st, body = vm.api("POST", "/tx/commit?tx=nothing-pending")
            assert st == 422, (st, body)
            st, body = vm.api("PATCH", "/settings", {"host-containers": {"operator": {"enabled": True}}})
            assert st == 204, (st, body)
            st, body = vm.api("POST", "/tx/commit_and_apply")
            assert st == 200, (st, body)
            # While the agent's prepare runs: another prepare, a refresh and the status are 423.
            deadline = time.monotonic() + 600
            while progress(vm)["running"] != "prepare":
                assert time.monotonic() < deadline, vm.api("GET", "/logs?service=host-containers@operator")
                time.sleep(0.2)
            for method, path in (("POST", "/actions/prepare-update"), ("POST", "/actions/refresh-updates"),
                                 ("GET", "/updates/status")):
                st, body = vm.api(method, path)
                assert st == 423 and "prepare is running" in body["error"], (method, path, st, body)
            # The agent reboots the node into v2.
            vm.mark()
            vm.wait_for(r"boot control: slot B \(on trial: true", timeout=900)
            r = vm.wait_ready(300)
            assert r["slot"] == "B" and r["version"] == "0.2.0", r
            vm.wait_for(r"berth: api bridge")

            def done():
                st, text = vm.api("GET", "/logs?service=host-containers@operator")
                return (st == 200 and "DONE" in (text or "") or "GAVE-UP" in (text or ""), text)
            text = _poll(done, 600)[1]
            assert "GAVE-UP" not in text and "PULL FAILED" not in text, text
            probe = re.search(r"^PROBE (.*) rc=(\d+)$", text, re.M)
            assert probe and probe.group(2) == "0" and json.loads(probe.group(1))["version_id"] == "0.2.0", text
            lines = text.splitlines()
            before = lines[lines.index("=== BEFORE REBOOT") + 1:lines.index("=== NOW")]
            after = lines[lines.index("=== NOW") + 1:]
            assert "PHASE update" in before and "REBOOT" in before, before
            assert "PHASE rebooted" in after, after
            first = check_operator_transcript(transcript_calls(before), [
                ("/os", _os),
                ("/os", _os),
                ("/actions/refresh-updates -m POST", None),
                ("/updates/status", _refreshed),
                ("/updates/status", operator_status),
                ("/actions/prepare-update -m POST", None),
                ("/updates/status", operator_status),
                ("/updates/status", operator_status),
                ("/actions/activate-update -m POST", None),
                ("/updates/status", operator_status),
                ("/os", _os),
                ("/actions/refresh-updates -m POST", None),
                ("/updates/status", _refreshed),
                ("/os", _os),
                ("/updates/status", operator_status),
                ("/actions/reboot -m POST", None),
            ][:len(transcript_calls(before))])
            # What the agent checks along the way (apiclient.rs of the operator).
            assert first[0]["version_id"] == "0.1.0", first[0]
            assert first[3]["chosen_update"]["version"] == "0.2.0", first[3]
            assert first[4]["update_state"] in ("Available", "Staged"), first[4]
            rec = first[6]["most_recent_command"]
            assert rec["cmd_type"] == "prepare" and rec["cmd_status"] == "Success", first[6]
            assert first[7]["update_state"] == "Staged", first[7]
            rec = first[9]["most_recent_command"]
            assert rec["cmd_type"] == "activate" and rec["cmd_status"] == "Success", first[9]
            assert first[12]["update_state"] == "Ready", first[12]
            assert first[13]["version_id"] == "0.1.0", first[13]
            ready = first[14]
            assert ready["update_state"] == "Ready", ready
            assert ready["staging_partition"]["next_to_boot"] and ready["staging_partition"]["image"]["version"] == "0.2.0", ready
            assert len(first) >= 15, f"the agent stopped before the reboot: {before}"
            second = check_operator_transcript(transcript_calls(after), [
                ("/os", _os),
                ("/os", _os),
                ("/os", _os),
                ("/actions/refresh-updates -m POST", None),
                ("/updates/status", _refreshed),
            ])
            assert second[1]["version_id"] == "0.2.0", second[1]
            s = second[4]
            assert s["update_state"] == "Idle" and s["active_partition"]["image"]["version"] == "0.2.0", s
            assert s["active_partition"]["next_to_boot"], s
            # Every error the agent saw was a 423 it retried: the prepare and refreshes holding the updater.
            retried = sum(len(a) - 1 for _, a in transcript_calls(before) + transcript_calls(after))
            print(f"  operator replay: {len(first)} + {len(second)} calls, {retried} retried after 423", flush=True)
