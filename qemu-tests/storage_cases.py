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


# The interface by QEMU's default MAC, a static address and a default route (version 3); eth1
# by DHCP from a second QEMU user network (10.0.4.0/24: its router must not become the default
# route), VLAN 7 on eth1, and an active-backup bond of eth2 and eth3 (MII monitoring). The
# kernel makes bond0 at boot (CONFIG_BONDING): Berth replaces it with net.toml's.
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
static4 = { addresses = ["192.168.7.2/24"] }

[bond0]
kind = "bond"
mode = "active-backup"
interfaces = ["eth2", "eth3"]
static4 = { addresses = ["192.168.8.2/24"] }

[bond0.monitoring]
miimon-frequency-ms = 100
miimon-updelay-ms = 200
miimon-downdelay-ms = 200
"""


def nic_args(vlan_peer, bond_peer):
    """eth1 on hub 2 with a second user network (DHCP) and `vlan_peer`; eth2 and eth3 on hub 1
    with `bond_peer` alone, so the bond's traffic reaches the host only through them."""
    a = ["-netdev", "user,id=u2,net=10.0.4.0/24",
         "-netdev", "hubport,id=h2u,hubid=2,netdev=u2",
         "-netdev", vlan_peer.netdev_args("p2"), "-netdev", "hubport,id=h2p,hubid=2,netdev=p2",
         "-netdev", bond_peer.netdev_args("p1"), "-netdev", "hubport,id=h1p,hubid=1,netdev=p1"]
    for nic, hub, mac in (("nic1", 2, "52:54:00:00:01:01"), ("nic2", 1, "52:54:00:00:01:02"),
                          ("nic3", 1, "52:54:00:00:01:03")):
        a += ["-netdev", f"hubport,id=h{nic},hubid={hub}",
              "-device", f"virtio-net-pci,id={nic},netdev=h{nic},mac={mac}"]
    return a


def check_vlan_and_bond(vm, vlan_peer, bond_peer):
    """VLAN 7 answers a tagged ping with a tagged reply; the bond keeps answering while its
    members' links are cut one at a time (QMP set_link), whichever was active, and stops when
    both are cut (so the check can fail)."""
    assert vlan_peer.answers("192.168.7.1", "192.168.7.2", vlan=7), "no tagged reply from vlan7"
    assert not vlan_peer.answers("192.168.7.1", "192.168.7.2", vlan=8, within=3), \
        "an address of VLAN 7 answered in VLAN 8"
    ping = lambda within=30: bond_peer.answers("192.168.8.1", "192.168.8.2", within=within)
    assert ping(), "bond0 does not answer"
    for cut, other in (("nic2", "nic3"), ("nic3", "nic2")):
        vm.qmp("set_link", name=cut, up=False)
        assert ping(), f"bond0 stopped answering with {cut}'s link cut"
        vm.qmp("set_link", name=other, up=False)
        assert not ping(within=4), "bond0 answered with both links cut"
        vm.qmp("set_link", name=other, up=True)
        assert ping(), f"bond0 does not answer over {other} alone"
        vm.qmp("set_link", name=cut, up=True)
    assert ping()


@case(arches=("x86_64",))
def metal_node_net_toml_and_ephemeral_storage(arch):
    """A bare-metal style node (raw disk) with four NICs. net.toml on its BOOT partition names
    the first interface by MAC with a static address and default route: the network comes up
    with them; eth1 gets its address by DHCP from a second user network (that its router is not
    the default route is checked by the netns test net_toml_devices_in_network_namespaces); VLAN 7 on eth1 answers tagged
    pings from a peer on eth1's network; an active-backup bond of eth2 and eth3 keeps answering
    while its links are cut in turn (see check_vlan_and_bond). Two spare virtio disks (serial eph0, eph1) are listed and the OS disk is not; bad input
    is refused (400: unknown disk, unknown filesystem, a directory not allowed); init formats
    one disk (xfs, the default, then ext4), then both striped (dm `striped`); bind covers /var/lib/containerd and
    /var/log/pods; a changed layout while bound is refused (409). containerd, restarted on the
    new storage, pulls and runs a host container there: after shutdown the host reassembles
    the stripe from the two disk files and finds containerd's content store in the ext4
    filesystem, under the bound directory's name."""
    from registry import Registry
    from ethpeer import Peer
    vlan_peer, bond_peer = Peer("02:00:00:00:be:07"), Peer("02:00:00:00:be:08")
    tmp = tempfile.mkdtemp(prefix="berth-eph-")
    disks = [os.path.join(tmp, f"eph{i}.img") for i in range(2)]
    extra = []
    for i, d in enumerate(disks):
        with open(d, "wb") as f:
            f.truncate(DISK_MB << 20)
        extra += ["-drive", f"file={d},format=raw,if=none,id=eph{i}",
                  "-device", f"virtio-blk-pci,drive=eph{i},serial=eph{i}"]
    extra += nic_args(vlan_peer, bond_peer)
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
            vm.wait_for(r"network: eth1 has 10\.0\.4\.15/24 \(dhcp4\)", timeout=120)
            c = vm.console()
            assert "network: configured from net.toml" in c, vm.tail()
            assert "not applied (not supported yet)" not in c, vm.tail()
            for line in ("network: bond0 set up (active-backup bond of eth2, eth3, 192.168.8.2/24)",
                         "network: vlan7 set up (VLAN 7 on eth1, 192.168.7.2/24)",
                         "network: eth1 set up (dhcp4)"):
                assert line in c, (line, vm.tail())
            check_vlan_and_bond(vm, vlan_peer, bond_peer)
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
    vlan_peer.close()
    bond_peer.close()
