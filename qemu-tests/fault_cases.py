"""Fault cases (hardening): power cuts, hostile output, broken state on the disk, a hung PID 1.

Power cuts here kill QEMU (SIGKILL) with the disk opened `cache=unsafe`: every write the guest
had submitted survives in the host's page cache, whether the guest flushed it or not, and what
the guest had not yet submitted (its own page cache) is lost. So these cases check Berth's own
write discipline (temp file, fsync, rename, fsync of the directory; ordered GPT copies) against
a crash at any point of it; they do not model a disk whose volatile cache drops writes that
were submitted but not flushed (PLATFORM-NOTES, "Power-cut tests in QEMU").

Random points are reproducible: each case prints its seed, and BERTH_FAULT_SEED=N replays one.
"""

import json
import os
import random
import re
import subprocess
import tempfile
import threading
import time

from berthvm import VM, gpt_partitions
from cases import case


def seed_for(name):
    seed = int(os.environ.get("BERTH_FAULT_SEED", random.randrange(1 << 32)))
    print(f"  {name}: seed {seed} (replay with BERTH_FAULT_SEED={seed})", flush=True)
    return random.Random(seed)


class Private:
    """The PRIVATE partition of a raw disk image, copied out to a file for debugfs and back."""

    def __init__(self, disk):
        self.disk = disk
        self.offset, self.size = gpt_partitions(disk)["BERTH-PRIVATE"]
        self.tmp = tempfile.mkdtemp(prefix="berth-private-")
        self.img = os.path.join(self.tmp, "private.img")
        subprocess.run(["dd", f"if={disk}", f"of={self.img}", "bs=1M", f"skip={self.offset >> 20}",
                        f"count={self.size >> 20}", "status=none"], check=True)

    def debugfs(self, *cmds, write=False):
        script = os.path.join(self.tmp, "cmds")
        with open(script, "w") as f:
            f.write("\n".join(cmds) + "\n")
        argv = ["debugfs"] + (["-w"] if write else []) + ["-f", script, self.img]
        return subprocess.run(argv, check=True, capture_output=True, text=True).stdout

    def read(self, path):
        return subprocess.run(["debugfs", "-R", f"cat {path}", self.img], check=True, capture_output=True,
                              text=True).stdout

    def put(self, path, data):
        src = os.path.join(self.tmp, "src")
        with open(src, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode())
        d, name = os.path.split(path)
        self.debugfs(f"cd {d}", f"rm {name}", f"write {src} {name}", write=True)

    def ls(self, path):
        return subprocess.run(["debugfs", "-R", f"ls -l {path}", self.img], check=True, capture_output=True,
                              text=True).stdout

    def save(self):
        subprocess.run(["dd", f"if={self.img}", f"of={self.disk}", "bs=1M", f"seek={self.offset >> 20}",
                        "conv=notrunc", "status=none"], check=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        subprocess.run(["rm", "-rf", self.tmp])


def powerdown(vm):
    vm.qmp("system_powerdown")
    rc = vm.wait_exit(90)
    assert rc == 0, f"QEMU exit code {rc}\n{vm.tail()}"


def boot_notices(vm):
    st, report = vm.api("GET", "/boot")
    assert st == 200, (st, report)
    return report["notices"]


@case()
def known_good_slot_boots_through_bad_state(arch):
    """A known-good slot never loops on reboot: settings written by a newer version (unknown
    keys) are kept aside and survive a commit, a partition after DATA only stops its growth, a
    torn live.json is set aside, and a PRIVATE that does not mount is replaced by memory; each
    boot reaches ready and says what it worked around in GET /boot."""
    with VM(arch, raw=True) as vm:
        vm.start()
        vm.wait_ready()
        vm.wait_for(r"berth: api bridge")
        assert vm.api("PATCH", "/settings", {"motd": "before"})[0] == 204
        assert vm.api("POST", "/tx/commit_and_apply")[0] == 200
        powerdown(vm)

        # Settings a newer version wrote, and a partition added after DATA.
        newer = {"motd": "from-newer", "future-group": {"x": 1},
                 "kubernetes": {"cluster-name": "c", "future-setting": {"memory.available": "10%"}}}
        with Private(vm.disk) as p:
            p.put("datastore/live.json", json.dumps(newer))
            p.save()
        subprocess.run(["truncate", "-s", "+64M", vm.disk], check=True)
        subprocess.run(["sgdisk", "-e", vm.disk], check=True, capture_output=True)
        subprocess.run(["sgdisk", "-n", "0:0:0", "-t", "0:8300", "-c", "0:EXTRA", vm.disk], check=True,
                       capture_output=True)
        vm.mark()
        vm.start()
        vm.wait_ready()
        vm.wait_for(r"berth: api bridge")
        st, settings = vm.api("GET", "/settings")
        assert settings == {"motd": "from-newer", "kubernetes": {"cluster-name": "c"}}, settings
        notes = "\n".join(boot_notices(vm))
        for want in ("settings.future-group", "settings.kubernetes.future-setting", "not the last partition"):
            assert want in notes, f"no notice about {want}:\n{notes}"
        assert vm.api("PATCH", "/settings", {"motd": "changed-by-older"})[0] == 204
        assert vm.api("POST", "/tx/commit_and_apply")[0] == 200
        powerdown(vm)
        with Private(vm.disk) as p:
            stored = json.loads(p.read("datastore/live.json"))
            assert stored["motd"] == "changed-by-older", stored
            assert stored["future-group"] == {"x": 1}, stored
            assert stored["kubernetes"]["future-setting"] == {"memory.available": "10%"}, stored
            # A torn live.json.
            p.put("datastore/live.json", b'{"motd": "to')
            p.save()
        vm.mark()
        vm.start()
        vm.wait_ready()
        vm.wait_for(r"berth: api bridge")
        assert vm.api("GET", "/settings")[1] == {}, "a torn live.json means defaults"
        notes = "\n".join(boot_notices(vm))
        assert "set aside" in notes, notes
        powerdown(vm)
        with Private(vm.disk) as p:
            listing = p.ls("datastore")
            assert "live.json.unreadable-" in listing, listing
            # PRIVATE that no longer mounts: its superblock magic zeroed.
            with open(p.img, "r+b") as f:
                f.seek(1024 + 0x38)
                f.write(b"\0\0")
            p.save()
        vm.mark()
        vm.start()
        vm.wait_ready()
        vm.wait_for(r"berth: api bridge")
        notes = "\n".join(boot_notices(vm))
        assert "BERTH-PRIVATE" in notes and "in memory" in notes, notes
        # The API works on the in-memory datastore.
        assert vm.api("PATCH", "/settings", {"motd": "in memory"})[0] == 204
        assert vm.api("POST", "/tx/commit_and_apply")[0] == 200


@case()
def service_output_cannot_grow_pid1(arch):
    """A service that writes a 64 MiB line without a newline and then 2 million empty lines
    leaves PID 1's peak memory small; its log keeps the newest lines, the long one cut."""
    with VM(arch, append="berth.selftest=logflood") as vm:
        vm.start()
        vm.wait_ready()
        vm.wait_for(r"berth: api bridge")
        deadline = time.monotonic() + 180
        while True:
            st, logs = vm.api("GET", "/logs?service=selftest-logflood")
            # An empty log is answered 200 with no body (the flood's first line has no
            # newline yet): that is "not yet", like a log without the last line.
            logs = logs or ""
            if st == 200 and "logflood done" in logs:
                break
            assert time.monotonic() < deadline, f"the flood did not finish: {str(logs)[-500:]}\n{vm.tail()}"
            time.sleep(1)
        assert "earlier lines dropped" in logs, logs[:300]
        assert len(logs) <= 64 * 1024 + 100, len(logs)
        st, state = vm.api("GET", "/system/state")
        peak = state["memory"]["peak_rss_kb"]
        print(f"  PID 1 peak RSS after the flood: {peak} KiB", flush=True)
        assert peak < 16 * 1024, f"PID 1 peaked at {peak} KiB"


@case()
def hostile_api_clients_cannot_starve_or_bloat_it(arch):
    """A hostile local client (berth.selftest=apiflood) holds 64 idle API connections, twice
    the server's slots, reopening each one the server closes; sends 32 concurrent 1 MiB bodies
    and opens pending transactions past the quota. Fresh clients inside and outside still get
    answers, the bodies are refused with 4xx, the 65th pending transaction is a 429, refusals
    are not logged per connection, and PID 1's peak memory stays small."""
    with VM(arch, append="berth.selftest=apiflood") as vm:
        vm.start()
        vm.wait_ready()
        vm.wait_for(r"berth: api bridge")
        m = vm.wait_for(r"berth-selftest: apiflood idle=(\d+) fresh=(\S+) bodies=(\S+) pending=(\S+)", timeout=300)
        idle, fresh, bodies, pending = m.group(1), m.group(2), m.group(3), m.group(4)
        print(f"  apiflood: idle={idle} fresh={fresh} bodies={bodies} pending={pending}", flush=True)
        assert fresh == "200x5", f"fresh clients inside were not all answered while {idle} idle ones were held: {fresh}"
        # Each body is refused: answered 400/413, or the connection closed by the server
        # before the whole body was sent (the sender's write fails).
        counts = dict(part.split("x") for part in bodies.split(","))
        assert set(counts) <= {"400", "413", "closed"} and sum(map(int, counts.values())) == 32, bodies
        counts = dict(part.split("x") for part in pending.split(","))
        assert counts == {"204": "64", "429": "16"}, pending
        # From outside, while the hostile client still holds its connections.
        for _ in range(5):
            st, _ = vm.api("GET", "/settings")
            assert st == 200, st
        st, state = vm.api("GET", "/system/state")
        peak = state["memory"]["peak_rss_kb"]
        print(f"  PID 1 peak RSS after the flood: {peak} KiB", flush=True)
        assert peak < 64 * 1024, f"PID 1 peaked at {peak} KiB"
        stamps = [float(t) for t in re.findall(r"\[\s*(\d+\.\d+)\] berth: api: all \d+ connections in use",
                                               vm.console())]
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        print(f"  refusal/eviction log lines: {len(stamps)}, closest {min(gaps, default=0):.1f} s apart", flush=True)
        assert stamps and all(g >= 9.5 for g in gaps), f"refusals logged more than once per 10 s: {gaps}"


@case()
def pid1_hang_after_ready_is_reset_by_the_watchdog(arch):
    """The watchdog stays armed after the boot is healthy: a PID 1 whose main loop stops after
    ready (berth.fault=hang-after-ready) is reset, and the machine boots again."""
    with VM(arch, append="berth.fault=hang-after-ready berth.watchdog-timeout=10", reboot=True) as vm:
        vm.start()
        vm.wait_ready()
        vm.wait_for(r"fault injection berth.fault=hang-after-ready")
        vm.wait_for(r"berth: api bridge")
        st, report = vm.api("GET", "/boot")
        assert report["watchdog"] == "armed", report
        phases = {(p["stage"], p["name"]) for p in report["phases"]}
        assert (1, "verity") in phases and (2, "api") in phases, phases
        vm.mark()
        vm.wait_for(r"berth: stage1 start", timeout=90)  # the reset, then a new boot
        vm.wait_ready()


@case()
def power_cuts_during_settings_commits_lose_nothing(arch):
    """Power cut (QEMU killed) at 20 random points of a loop of 50 settings commits: after
    each reboot the settings are exactly one committed state, never torn, and no commit that
    was answered 200 is lost."""
    rng = seed_for("power_cuts_during_settings_commits_lose_nothing")
    cuts = sorted(rng.sample(range(1, 51), 20))

    def state(n):
        return {"motd": f"commit-{n}", "kubernetes": {"node-labels": {"commit": str(n)}}}

    acked = 0  # the last commit answered 200
    with VM(arch, raw=True) as vm:
        n = 0
        for cut in cuts + [None]:
            vm.mark()
            vm.start()
            vm.wait_for(r"berth: api bridge", timeout=120)
            st, settings = vm.api("GET", "/settings")
            assert st == 200, (st, settings)
            allowed = [state(acked)] if acked else [{}]
            if n > acked:
                allowed.append(state(n))  # the commit in flight at the cut may have landed
            assert settings in allowed, f"after the cut at commit {n} (last acked {acked}): {settings}"
            assert boot_notices(vm) == [], "the datastore needed repair"
            if settings == state(n):
                acked = n
            if cut is None:
                break
            while n < cut - 1:
                n += 1
                assert vm.api("PATCH", "/settings", state(n))[0] == 204
                assert vm.api("POST", "/tx/commit_and_apply")[0] == 200, n
                acked = n
            # The commit at the cut: sent, and QEMU killed a random moment later.
            n += 1
            answered = []

            def commit(k=n):
                try:
                    if vm.api("PATCH", "/settings", state(k), timeout=10)[0] == 204 and \
                            vm.api("POST", "/tx/commit_and_apply", timeout=10)[0] == 200:
                        answered.append(k)
                except Exception:
                    pass
            t = threading.Thread(target=commit)
            t.start()
            time.sleep(rng.uniform(0.0, 0.25))
            vm.kill()
            t.join()
            if answered:
                acked = n
        print(f"  {len(cuts)} power cuts, last commit {n}, last acknowledged {acked}", flush=True)
