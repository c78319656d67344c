"""SELinux cases (issue 14): Berth's policy enforcing from stage 1, the domains of the OS and its
containers, what a container cannot reach, the confinement of a plain host container, and a
policy that does not load.
"""

import os
import subprocess

from berthvm import VM, BUILD
from cases import case, host_berth, berth_bin, _poll, _host_container_user_data
from update_cases import Repo, boot_stage_activate_reboot, back_on_v1_after_rollback

# The superpowered probe's view of the host, and ctr run there (chroot into the host's root).
SUPER_SCRIPT = r"""
R=/.berth/rootfs
echo "enforce=$(cat $R/sys/fs/selinux/enforce)"
echo "super-label=$(cat /proc/self/attr/current)"
echo "pid1-label=$(cat /proc/1/attr/current)"
set -- $(pidof containerd); echo "containerd-label=$(cat /proc/$1/attr/current)"
echo "cri=$(chroot $R /usr/bin/ctr plugins ls | grep -E 'grpc[.]v1 +cri ' | grep -oE '(ok|error|skip) *$')"
until grep -q probe $R/etc/motd 2>/dev/null; do sleep 1; done
ctr() { chroot $R /usr/bin/ctr -n probe "$@"; }
ctr images pull --plain-http IMAGE >/dev/null || echo "pull failed"
ctr run -d --runc-binary /usr/libexec/berth/runc IMAGE a \
  sh -c 'echo s3cret > /secret; cat /proc/self/attr/current > /label; sleep 3600' >/dev/null
A=/run/containerd/io.containerd.runtime.v2.task/probe/a/rootfs
# -s: the shell makes /label before cat writes into it.
for i in $(seq 1 30); do [ -s $R$A/label ] && break; sleep 1; done
echo "a-label=$(cat $R$A/label)"
ctr run --rm --runc-binary /usr/libexec/berth/runc \
  --mount type=bind,src=/local,dst=/h/local,options=rbind:rw \
  --mount type=bind,src=/etc,dst=/h/etc,options=rbind:rw \
  --mount type=bind,src=/var/lib/berth,dst=/h/private,options=rbind:rw \
  --mount type=bind,src=/run/api.sock,dst=/h/api.sock,options=bind:rw \
  --mount type=bind,src=$A,dst=/h/a,options=rbind:ro \
  IMAGE b sh -c '
    echo "b-label=$(cat /proc/self/attr/current)"
    ls /h/local >/dev/null 2>&1 && echo b-local=read || echo b-local=denied
    touch /h/local/planted 2>/dev/null && echo b-local-write=written || echo b-local-write=denied
    cat /h/etc/hostname >/dev/null 2>&1 && echo b-etc=read || echo b-etc=denied
    touch /h/etc/planted 2>/dev/null && echo b-etc-write=written || echo b-etc-write=denied
    ls /h/private >/dev/null 2>&1 && echo b-private=read || echo b-private=denied
    touch /h/private/planted 2>/dev/null && echo b-private-write=written || echo b-private-write=denied
    apiclient -s /h/api.sock get /os >/dev/null 2>/tmp/e && echo b-api=answered || echo "b-api=denied $(cat /tmp/e)"
    cat /h/a/secret >/dev/null 2>&1 && echo b-other=read || echo b-other=denied
    test -e /h/a/bin/busybox && echo b-other-image=seen'
echo super-probes-done
last= lastl=
while :; do
  s=absent; [ -d $R/sys/fs/cgroup/host-containers/plain ] && s="present pids.max=$(cat $R/sys/fs/cgroup/host-containers/plain/pids.max) memory.max=$(cat $R/sys/fs/cgroup/host-containers/plain/memory.max)"
  [ "$s" != "$last" ] && echo "plain-cgroup=$s"
  l=$(cat $R/sys/kernel/security/lockdown 2>&1)
  [ "$l" != "$lastl" ] && echo "lockdown=$l"
  last=$s lastl=$l; sleep 2
done
"""

PLAIN_SCRIPT = r"""
echo "plain-label=$(cat /proc/self/attr/current)"
grep -E '^(Seccomp|CapBnd):' /proc/self/status | sed 's/^/plain-/'
apiclient get /os >/dev/null 2>/tmp/e && echo plain-api=answered || echo "plain-api=failed $(cat /tmp/e)"
sleep 3600
"""


def logs(vm, svc):
    st, text = vm.api("GET", f"/logs?service=host-containers@{svc}")
    return text if st == 200 and isinstance(text, str) else ""


def value(text, key):
    for line in text.splitlines():
        if line.startswith(key + "="):
            return line[len(key) + 1:]
    return None


def selinux(vm):
    st, body = vm.api("GET", "/selinux")
    assert st == 200, (st, body)
    return body


def assert_no_denials(vm):
    """The happy path makes no AVC denial at all."""
    s = selinux(vm)
    assert s["mode"] == "enforcing" and s["enforcing"] is True, s
    assert s["denials"] == 0 and s["suppressed"] == 0, s["recent_denials"]


@case()
def selinux_enforces_and_confines_containers(arch):
    """One boot: enforcing with Berth's policy from stage 1 (PID 1 init_t, containerd runtime_t,
    a superpowered host container super_t, a plain one control_t) and no denial on the way; a
    plain host container has seccomp, no CAP_NET_RAW, its own cgroup with limits and the API;
    a container_t container cannot read or write the host's /local, /etc or /var/lib/berth,
    connect to /run/api.sock, or read another container's files, each an AVC denial the API
    reports; removing the plain host container from settings stops it. Also: containerd's CRI
    plugin loads with enable_selinux; a host container from a registry not configured as
    insecure is pulled over HTTPS only (no plain-HTTP retry); settings.kernel.lockdown reaches
    securityfs."""
    from registry import Registry
    with open(berth_bin(arch), "rb") as f:
        extra = {"apiclient": f.read()}
    with Registry() as reg, Registry() as other:
        image = reg.push_busybox_cmd(arch, ["/bin/sh", "-c", "sleep 3600"], "probe", extra=extra)
        # A second registry (plain HTTP, like the first) that settings do not call insecure.
        https_only = other.push_busybox(arch)
        sup = reg.push_busybox_cmd(arch, ["/bin/sh", "-c", SUPER_SCRIPT.replace("IMAGE", image)],
                                   "super", extra=extra)
        plain = reg.push_busybox_cmd(arch, ["/bin/sh", "-c", PLAIN_SCRIPT], "plain", extra=extra)
        ud = (_host_container_user_data("probe", sup, True, reg) +
              _host_container_user_data("plain", plain, False, reg, mirror=False) +
              _host_container_user_data("httpsonly", https_only, False))
        with VM(arch, user_data=ud) as vm:
            vm.start()
            vm.wait_ready(timeout=240)
            vm.wait_for(r"berth: api bridge")
            _poll(lambda: (value(logs(vm, "plain"), "plain-api") is not None, logs(vm, "plain")), 300)
            _poll(lambda: (value(logs(vm, "probe"), "cri") is not None, logs(vm, "probe")), 300)
            p, s = logs(vm, "plain"), logs(vm, "probe")
            # The domains.
            assert value(s, "enforce") == "1", s
            assert value(s, "pid1-label") == "system_u:system_r:init_t:s0-s0:c0.c1023", s
            assert value(s, "containerd-label") == "system_u:system_r:runtime_t:s0-s0:c0.c1023", s
            assert value(s, "super-label") == "system_u:system_r:super_t:s0-s0:c0.c1023", s
            assert value(p, "plain-label").startswith("system_u:system_r:control_t:s0:c"), p
            # containerd's CRI plugin came up with SELinux enabled (enable_selinux = true).
            assert value(s, "cri").strip() == "ok", s
            # The plain host container: seccomp, no CAP_NET_RAW (bit 13), its cgroup and limits, the API.
            assert "plain-Seccomp:\t2" in p, p
            capbnd = int(p.split("plain-CapBnd:\t")[1].split()[0], 16)
            assert capbnd and not capbnd & (1 << 13), hex(capbnd)
            assert value(p, "plain-api") == "answered", p
            st, os_ = vm.api("GET", "/os")
            assert os_["selinux"] == {"mode": "enforcing", "denials": 0}, os_
            assert selinux(vm)["policy"] == "/usr/share/berth/selinux/berth/policy/policy.33"
            # Only HTTPS for a registry not configured as insecure: the pull fails, and is not
            # retried over plain HTTP (which this registry would have answered).
            _poll(lambda: ("over HTTPS" in logs(vm, "httpsonly"), logs(vm, "httpsonly")), 120)
            h = logs(vm, "httpsonly")
            assert "HTTP response to HTTPS client" in h and "hello from busybox" not in h, h
            assert_no_denials(vm)
            # A container_t container tries the host's files, the API and another container's files.
            st, _ = vm.api("PATCH", "/settings", {"motd": "probe"})
            assert st == 204
            st, _ = vm.api("POST", "/tx/commit_and_apply")
            assert st == 200
            _poll(lambda: ("super-probes-done" in logs(vm, "probe"), logs(vm, "probe")), 300)
            s = logs(vm, "probe")
            a, b = value(s, "a-label"), value(s, "b-label")
            assert a and a.startswith("system_u:system_r:container_t:s0:c"), s
            assert b and b.startswith("system_u:system_r:container_t:s0:c") and a != b, s
            for k in ("b-local", "b-local-write", "b-etc", "b-etc-write", "b-private", "b-private-write",
                      "b-other"):
                assert value(s, k) == "denied", (k, s)
            assert value(s, "b-api").startswith("denied") and "ermission denied" in value(s, "b-api"), s
            assert value(s, "b-other-image") == "seen", s  # the image's files (s0) are not secret
            # The plain host container's cgroup, as the host sees it: its own subtree, limits.
            _poll(lambda: ("plain-cgroup=present" in logs(vm, "probe"), logs(vm, "probe")), 60)
            s = logs(vm, "probe")
            assert "plain-cgroup=present pids.max=1024 memory.max=536870912" in s, s

            def reported():
                body = selinux(vm)
                seen = {d["tcontext"].split(":")[2] for d in body["recent_denials"]
                        if d["scontext"] == b}
                want = {"local_t", "etc_t", "private_t", "api_socket_t", "container_file_t"}
                return (want <= seen, seen, body["denials"])
            _, _, count = _poll(reported, 60)
            st, os_ = vm.api("GET", "/os")
            assert os_["selinux"]["denials"] >= 5, os_
            # Removing the plain host container from settings stops it, and its container.
            st, _ = vm.api("PATCH", "/settings", {"host-containers": {"plain": None}})
            assert st == 204
            st, _ = vm.api("POST", "/tx/commit_and_apply")
            assert st == 200
            _poll(lambda: (lambda i: (i["state"] == "stopped" and i["pid"] is None, i))(
                vm.api("GET", "/services/host-containers@plain")[1]), 60)
            _poll(lambda: ("plain-cgroup=absent" in logs(vm, "probe"), logs(vm, "probe")), 60)
            # settings.kernel.lockdown is written to securityfs (last: it only ever goes up).
            assert "lockdown=[none] integrity confidentiality" in logs(vm, "probe"), logs(vm, "probe")
            st, _ = vm.api("PATCH", "/settings", {"kernel": {"lockdown": "integrity"}})
            assert st == 204
            st, _ = vm.api("POST", "/tx/commit_and_apply")
            assert st == 200
            _poll(lambda: ("lockdown=none [integrity] confidentiality" in logs(vm, "probe"),
                           logs(vm, "probe")), 60)


@case()
def broken_policy_rolls_back_and_boots_permissive_when_asked(arch):
    """A v2 whose policy the kernel refuses fails its trial boot in stage 1 and v1 comes back by
    itself; the same slot booted with berth.selinux=permissive comes up and reports permissive."""
    with Repo(arch, ["v2-badpolicy"]) as repo, VM(arch, raw=True, reboot=True) as vm:
        boot_stage_activate_reboot(vm, repo)
        vm.wait_for(r"boot control: slot B \(on trial: true", timeout=120)
        vm.wait_for(r"FATAL: stage 1 phase selinux failed: SELinux: the kernel refused the policy", timeout=120)
        back_on_v1_after_rollback(vm)
        st, _ = vm.api("POST", "/actions/shutdown")
        assert st == 202
        vm.wait_exit(120)
        # The same disk, slot B forced, permissive asked for on the command line.
        vm.append = "berth.slot=B berth.selinux=permissive"
        vm.mark()
        vm.start()
        r = vm.wait_ready(300)
        assert r["slot"] == "B" and r["version"] == "0.2.0", r
        vm.wait_for(r"berth: api bridge")
        st, os_ = vm.api("GET", "/os")
        assert os_["selinux"]["mode"] == "permissive", os_
        s = selinux(vm)
        assert s["mode"] == "permissive" and s["policy"] is None and "refused" in s["error"], s
        st, boot = vm.api("GET", "/boot")
        assert any("SELinux" in n for n in boot["notices"]), boot
