"""The kubelet's path without a kubelet: a CRI client (qemu-tests/cri-client, built on the k8s-cri
crate, static, not part of berth) runs inside the VM as a superpowered host container and takes
one pod through the calls kubelet makes to containerd's CRI, checking each (see its main.rs).
"""

import re
import subprocess

from berthvm import VM, ROOT
from cases import case, _poll, _host_container_user_data, assert_no_avc_denials

STEPS = ("Version", "Status", "PullImage", "RunPodSandbox", "PodSandboxStatus", "CreateContainer",
         "StartContainer", "ContainerStatus", "cgroup", "reach", "log", "ExecSync", "StopContainer",
         "RemoveContainer", "StopPodSandbox", "RemovePodSandbox", "ListPodSandbox")


def cri_client(arch):
    """The client's bytes for `arch` (scripts/build-cri-client; cargo keeps it in the cache)."""
    r = subprocess.run([f"{ROOT}/scripts/build-cri-client", arch], stdout=subprocess.PIPE, text=True,
                       check=True)
    with open(r.stdout.strip(), "rb") as f:
        return f.read()


@case(arches=("x86_64", "arm64"))
def cri_pod_lifecycle(arch):
    """containerd's CRI runs a pod as kubelet drives it: the sandbox image is the one
    settings.kubernetes.pod-infra-container-image names (from the tests' registry), CNI gives
    the pod an IP on a bridge, the container starts, its status and CRI-format log file are
    right, ExecSync returns output and exit status, the pod answers at its IP from the host's
    network, and stop and remove leave nothing (IP released). No SELinux denial on the way.
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
            # IPv6 SLAAC on QEMU's user network (prefix fec0::/64 by default): the kernel's
            # autoconfiguration from slirp's router advertisements, on the host's eth0.
            v6 = re.search(r"cri: host ipv6: (.*)", text).group(1)
            # (fec0::/10 is site-local: scope 0x40 in /proc/net/if_inet6.)
            assert re.search(r"eth0 fec0::[0-9a-f:]+/64 ", v6 + " "), v6
            # The DHCPv6 client solicited on eth0 for its 30 s budget and reported it: no
            # stateful server on slirp's network (the address above is SLAAC's).
            vm.wait_for(r"dhcp6: eth0: no answer to Solicit", timeout=120)
            assert_no_avc_denials(vm)
