"""The kubelet's path without a kubelet: a CRI client (qemu-tests/cri-client, built on the k8s-cri
crate, static, not part of berth) runs inside the VM as a superpowered host container and takes
one pod through the calls kubelet makes to containerd's CRI, checking each (see its main.rs).
"""

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
    network, and stop and remove leave nothing (IP released). No SELinux denial on the way."""
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
        with VM(arch, user_data=ud) as vm:
            vm.start()
            vm.wait_ready(timeout=240)
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
            assert_no_avc_denials(vm)
