"""The kubelet's path without a kubelet: a CRI client (qemu-tests/cri-client, built on the k8s-cri
crate, static, not part of berth) runs inside the VM as a superpowered host container and takes
one pod through the calls kubelet makes to containerd's CRI, checking each (see its main.rs).
"""

import re
import subprocess

from berthvm import VM, ROOT
from cases import case, _poll, _host_container_user_data, assert_no_avc_denials

STEPS = ("Version", "Status", "PullImage", "RunPodSandbox", "PodSandboxStatus", "CreateContainer",
         "StartContainer", "ContainerStatus", "cgroup", "reach", "log", "ExecSync", "limits",
         "StopContainer", "RemoveContainer", "StopPodSandbox", "RemovePodSandbox", "ListPodSandbox")


def cri_client(arch):
    """The client's bytes for `arch` (scripts/build-cri-client; cargo keeps it in the cache)."""
    r = subprocess.run([f"{ROOT}/scripts/build-cri-client", arch], stdout=subprocess.PIPE, text=True,
                       check=True)
    with open(r.stdout.strip(), "rb") as f:
        return f.read()


# Values unlike containerd's defaults: one default capability dropped, one added, other limits.
OCI_DEFAULTS = """[settings.oci-defaults.capabilities]
net-admin = true
mknod = false
[settings.oci-defaults.resource-limits.max-open-files]
hard-limit = 20000
soft-limit = 10000
"""

# Linux's capability numbers (include/uapi/linux/capability.h) of the base spec's defaults
# (src/settings/render.rs DEFAULT_CAPABILITIES) and of the ones the case changes.
CAP_NUMBERS = {"chown": 0, "dac-override": 1, "fowner": 3, "fsetid": 4, "kill": 5, "setgid": 6,
               "setuid": 7, "setpcap": 8, "net-bind-service": 10, "net-admin": 12, "net-raw": 13,
               "sys-chroot": 18, "mknod": 27, "audit-write": 29, "setfcap": 31}
DEFAULT_CAPS = {"audit-write", "chown", "dac-override", "fowner", "fsetid", "kill", "mknod",
                "net-bind-service", "net-raw", "setfcap", "setgid", "setpcap", "setuid", "sys-chroot"}


def check_oci_defaults(text):
    """The `cri: proc:` lines of the client against OCI_DEFAULTS: the container's own process
    (main) and one ExecSync started in it (exec)."""
    proc = {(who, name): value for who, name, value in re.findall(
        r"cri: proc: (main|exec) (Cap\w+|Max open files|Max core file size):?\s+(.*)", text)}
    want = sum(1 << CAP_NUMBERS[c] for c in (DEFAULT_CAPS - {"mknod"}) | {"net-admin"})
    for who in ("main", "exec"):
        for s in ("CapBnd", "CapEff", "CapPrm"):
            assert int(proc[(who, s)], 16) == want, (who, s, proc, hex(want))
    assert proc[("main", "Max open files")].split()[:2] == ["10000", "20000"], proc
    # An ExecSync process has the hard limit; its soft one is not checked: the image's runc
    # (Debian's 1.1.5, a Go program) sets an exec's rlimits with prlimit on its child, whose Go
    # runtime then raises the soft NOFILE limit to the hard one (runc issue 4195, fixed in runc
    # 1.1.13 and 1.2), so it shows 20000 here.
    assert proc[("exec", "Max open files")].split()[1] == "20000", proc


@case(arches=("x86_64", "arm64"))
def cri_pod_lifecycle(arch):
    """containerd's CRI runs a pod as kubelet drives it: the sandbox image is the one
    settings.kubernetes.pod-infra-container-image names (from the tests' registry), CNI gives
    the pod an IP on a bridge, the container starts, its status and CRI-format log file are
    right, ExecSync returns output and exit status, the pod answers at its IP from the host's
    network, and stop and remove leave nothing (IP released). No SELinux denial on the way.
    The container has the capabilities and rlimits settings.oci-defaults gives (NET_ADMIN
    added, MKNOD dropped, NOFILE 10000/20000), as /proc shows them through ExecSync (an exec'd
    process: the same capabilities and hard limit).
    The host has an IPv6 address by SLAAC from QEMU's user network.
    The network comes from the kernel command line's netdog.default-interface: DHCPv4, and
    the optional dhcp6, whose client runs but gets no answer (slirp has no stateful DHCPv6
    server), and the boot does not wait for it."""
    from registry import Registry
    client = cri_client(arch)
    with Registry() as reg:
        extra = {"cri-client": client}
        pause = reg.push_busybox_cmd(arch, ["/bin/sleep", "2147483647"], tag="pause", extra=extra)
        # The pod's container runs the client's own image (another tag than the sandbox's, so
        # that the sandbox image is there only if containerd pulled it, as its config says).
        own = f"{reg.guest_address}/berth-test/busybox:cri"
        runner = reg.push_busybox_cmd(arch, ["/bin/cri-client", "lifecycle", pause, own], tag="cri",
                                      extra=extra)
        assert runner == own, (runner, own)
        ud = _host_container_user_data("cri", runner, True, reg)
        ud += f'[settings.kubernetes]\npod-infra-container-image = "{pause}"\n'
        ud += OCI_DEFAULTS
        # The network as Bottlerocket's cloud images give it, on the kernel command line.
        with VM(arch, user_data=ud, append="netdog.default-interface=eth0:dhcp4,dhcp6?") as vm:
            vm.start()
            vm.wait_ready(timeout=240)
            c = vm.console()
            assert "network: configured from netdog.default-interface" in c, vm.tail()
            assert "network: DHCPv6 on eth0 (optional)" in c, vm.tail()
            assert "not applied (not supported yet): eth0: dhcp6" not in c, vm.tail()
            vm.wait_for(r"berth: api bridge")

            def done():
                st, text = vm.api("GET", "/logs?service=host-containers@cri")
                text = text or ""
                return ("cri: lifecycle ok" in text or "cri: FAILED" in text, st, text)
            _, _, text = _poll(done, 900, every=2)
            assert "cri: lifecycle ok" in text, text[-4000:]
            for s in STEPS:
                assert f"cri: {s} ok" in text, (s, text[-4000:])
            assert f"sandbox image {pause}" in text, text[-4000:]
            check_oci_defaults(text)
            # IPv6 SLAAC on QEMU's user network (prefix fec0::/64 by default): the kernel's
            # autoconfiguration from slirp's router advertisements, on the host's eth0.
            v6 = re.search(r"cri: host ipv6: (.*)", text).group(1)
            # (fec0::/10 is site-local: scope 0x40 in /proc/net/if_inet6.)
            assert re.search(r"eth0 fec0::[0-9a-f:]+/64 ", v6 + " "), v6
            # The DHCPv6 client solicited on eth0 for its 30 s budget and reported it: no
            # stateful server on slirp's network (the address above is SLAAC's).
            vm.wait_for(r"dhcp6: eth0: no answer to Solicit", timeout=120)
            assert_no_avc_denials(vm)
