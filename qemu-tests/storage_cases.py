"""A bare-metal node: its network from Bottlerocket's `net.toml` on the BOOT partition
(`crate::net::nettoml`), and ephemeral storage (`crate::ephemeral`): spare disks found,
formatted, striped, bound over containerd's directory, and what was written there read back
from the disks on the host."""

import os
import subprocess
import tempfile

from berthvm import VM, gpt_partitions
from cases import case, _poll, assert_no_avc_denials

DISK_MB = 320  # mkfs.xfs (xfsprogs 6.1) makes no filesystem under 300 MB
CHUNK = 256 * 1024


def unstripe(disks, out):
    """The flat image of a device-mapper `striped` set over `disks` (256 KiB chunks, equal
    shares, in order), written to `out`: what the guest saw as /dev/mapper/ephemeral."""
    per = min(os.path.getsize(d) for d in disks) // CHUNK
    fs = [open(d, "rb") for d in disks]
    try:
        with open(out, "wb") as o:
            for c in range(per):
                for f in fs:
                    f.seek(c * CHUNK)
                    o.write(f.read(CHUNK))
    finally:
        for f in fs:
            f.close()


def debugfs(image, request):
    r = subprocess.run(["debugfs", "-R", request, image], capture_output=True, text=True)
    return r.stdout + r.stderr


# The interface by QEMU's default MAC, a static address and a default route (version 3), and
# what Berth cannot set up yet: a second interface and a VLAN (logged as not applied).
NET_TOML = """version = 3

["52:54:00:12:34:56"]
primary = true
static4 = { addresses = ["10.0.2.31/24"] }

[["52:54:00:12:34:56".route]]
to = "default"
via = "10.0.2.2"

[eth1]
dhcp4 = true

[vlan7]
kind = "vlan"
device = "eth1"
id = 7
dhcp4 = true
"""


@case(arches=("x86_64",))
def metal_node_net_toml_and_ephemeral_storage(arch):
    """A bare-metal style node (raw disk). net.toml on its BOOT partition names the interface
    by MAC with a static address and default route: the network comes up with them, and the
    devices Berth cannot set up yet are logged as not applied. Two spare virtio disks (serial eph0, eph1) are listed and the OS disk is not; bad input
    is refused (400: unknown disk, unknown filesystem, a directory not allowed); init formats
    one disk (xfs, the default, then ext4), then both striped (dm `striped`); bind covers /var/lib/containerd and
    /var/log/pods; a changed layout while bound is refused (409). containerd, restarted on the
    new storage, pulls and runs a host container there: after shutdown the host reassembles
    the stripe from the two disk files and finds containerd's content store in the ext4
    filesystem, under the bound directory's name."""
    from registry import Registry
    tmp = tempfile.mkdtemp(prefix="berth-eph-")
    disks = [os.path.join(tmp, f"eph{i}.img") for i in range(2)]
    extra = []
    for i, d in enumerate(disks):
        with open(d, "wb") as f:
            f.truncate(DISK_MB << 20)
        extra += ["-drive", f"file={d},format=raw,if=none,id=eph{i}",
                  "-device", f"virtio-blk-pci,drive=eph{i},serial=eph{i}"]
    base = "/actions/ephemeral-storage"
    with Registry() as reg:
        ref = reg.push_busybox(arch)
        with VM(arch, extra=extra, raw=True) as vm:
            nt = os.path.join(vm.tmp, "net.toml")
            with open(nt, "w") as f:
                f.write(NET_TOML)
            boot_a = f"{vm.disk}@@{gpt_partitions(vm.disk)['BERTH-BOOT-A'][0]}"
            subprocess.run(["mcopy", "-i", boot_a, nt, "::/net.toml"], check=True)
            vm.start()
            m = vm.wait_for(r"berth: network up: (\S+) (\S+) gateway (\S+)", timeout=180)
            assert m.groups() == ("eth0", "10.0.2.31/24", "10.0.2.2"), m.group(0)
            c = vm.console()
            assert "network: configured from net.toml" in c, vm.tail()
            assert "not applied (not supported yet): eth1" in c and "vlan7" in c, vm.tail()
            vm.wait_ready(timeout=240)
            vm.wait_for(r"berth: api bridge")
            st, body = vm.api("GET", f"{base}/list-disks")
            assert st == 200 and body == "/dev/vdb\n/dev/vdc\n", (st, body)
            st, body = vm.api("GET", f"{base}/list-disks?format=json")
            assert st == 200 and body == ["/dev/vdb", "/dev/vdc"], (st, body)
            st, body = vm.api("GET", "/ephemeral-storage/list-dirs?format=json")
            assert st == 200 and "/var/lib/containerd" in body and "/var/log/pods" in body, (st, body)
            st, body = vm.api("GET", f"{base}/list-dirs?format=yaml")
            assert st == 400, (st, body)
            for bad in ({"disks": ["/dev/vda"]}, {"filesystem": "Btrfs"}, {"disks": "/dev/vdb"}):
                st, body = vm.api("POST", f"{base}/init", bad)
                assert st == 400, (bad, st, body)
            st, body = vm.api("POST", f"{base}/bind", {"targets": ["/etc"]})
            assert st == 400 and "/etc" in body["error"], (st, body)

            # xfs by default (Bottlerocket's), made by the image's mkfs.xfs.
            st, body = vm.api("POST", f"{base}/init", {"disks": ["/dev/vdb"]}, timeout=300)
            assert st == 204, (st, body)
            st, body = vm.api("POST", f"{base}/init", {"filesystem": "Ext4", "disks": ["/dev/vdb"]},
                              timeout=300)
            assert st == 204, (st, body)
            st, body = vm.api("POST", f"{base}/init", {"filesystem": "Ext4", "disks": None}, timeout=300)
            assert st == 204, (st, body)
            st, body = vm.api("POST", f"{base}/bind",
                              {"targets": ["/var/lib/containerd", "/var/log/pods"]}, timeout=60)
            assert st == 204, (st, body)
            st, body = vm.api("POST", f"{base}/init", {"filesystem": "Ext4", "disks": ["/dev/vdb"]})
            assert st == 409 and "reboot" in body["error"], (st, body)
            # The same layout again is no change, so no error.
            st, body = vm.api("POST", f"{base}/init", {"filesystem": "Ext4"}, timeout=60)
            assert st == 204, (st, body)

            # containerd restarts (a mirror setting) on the new /var/lib/containerd and runs a
            # host container from it.
            st, body = vm.api("PATCH", "/settings", {
                "host-containers": {"eph": {"source": ref, "enabled": True, "superpowered": False}},
                "container-registry": {"mirrors": [{"registry": reg.guest_address,
                                                    "endpoint": [f"http://{reg.guest_address}"]}]}})
            assert st == 204, (st, body)
            st, body = vm.api("POST", "/tx/commit_and_apply")
            assert st == 200, (st, body)

            def logs():
                st, text = vm.api("GET", "/logs?service=host-containers@eph")
                return (st == 200 and "hello from busybox" in (text or ""), st, text)
            _poll(logs, 300)
            assert_no_avc_denials(vm)
            st, _ = vm.api("POST", "/actions/shutdown")
            assert st == 202, st
            vm.wait_exit(120)
    flat = os.path.join(tmp, "flat.img")
    unstripe(disks, flat)
    top = debugfs(flat, "ls -l /")
    assert "._var_lib_containerd" in top and "._var_log_pods" in top, top
    content = debugfs(flat, "ls /._var_lib_containerd/io.containerd.content.v1.content/blobs/sha256")
    layer = reg.pushed[ref]["layer"].split(":")[1]
    assert layer in content, (layer, content)
    subprocess.run(["rm", "-rf", tmp])
