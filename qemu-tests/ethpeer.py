"""An Ethernet peer on a QEMU `-netdev socket,udp=...` (one frame per UDP datagram): it asks
for a guest's MAC with ARP and pings it (ICMP echo), untagged or in an 802.1Q VLAN, and
checks the replies come back the same way. Enough to see whether a guest address answers on
a virtual network the test controls, with no program in the guest."""

import os
import socket
import struct
import time

ETH_P_IP, ETH_P_ARP, ETH_P_8021Q = 0x0800, 0x0806, 0x8100


def free_udp_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ip4(text):
    return socket.inet_aton(text)


class Peer:
    """One end of a socket netdev. `netdev_args()` is what QEMU's side needs."""

    def __init__(self, mac="02:00:00:00:be:01"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.qemu_port = free_udp_port()
        self.mac = bytes.fromhex(mac.replace(":", ""))
        self.ident = os.getpid() & 0xFFFF
        self.seq = 0

    def netdev_args(self, netdev_id):
        return f"socket,id={netdev_id},udp=127.0.0.1:{self.port},localaddr=127.0.0.1:{self.qemu_port}"

    def close(self):
        self.sock.close()

    def _send(self, dst_mac, ethertype, payload, vlan):
        tag = struct.pack("!HH", ETH_P_8021Q, vlan) if vlan is not None else b""
        frame = dst_mac + self.mac + tag + struct.pack("!H", ethertype) + payload
        self.sock.sendto(frame.ljust(60, b"\0"), ("127.0.0.1", self.qemu_port))

    def _recv(self, until):
        """The next frame for us before `until`, as (vlan or None, ethertype, payload)."""
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                frame, _ = self.sock.recvfrom(65536)
            except socket.timeout:
                return None
            if len(frame) < 14 or frame[0:6] not in (self.mac, b"\xff" * 6):
                continue
            ethertype, rest, vlan = struct.unpack("!H", frame[12:14])[0], frame[14:], None
            if ethertype == ETH_P_8021Q and len(rest) >= 4:
                vlan = struct.unpack("!H", rest[0:2])[0] & 0x0FFF
                ethertype, rest = struct.unpack("!H", rest[2:4])[0], rest[4:]
            return vlan, ethertype, rest

    def arp(self, src_ip, dst_ip, vlan=None, timeout=2.0):
        """The MAC that answers who-has `dst_ip`, or None. A reply in another VLAN (or
        untagged when we asked tagged) does not count."""
        req = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, 1) + self.mac + ip4(src_ip) + b"\0" * 6 + ip4(dst_ip)
        self._send(b"\xff" * 6, ETH_P_ARP, req, vlan)
        until = time.monotonic() + timeout
        while (got := self._recv(until)) is not None:
            v, et, p = got
            if et == ETH_P_ARP and v == vlan and len(p) >= 28 and struct.unpack("!H", p[6:8])[0] == 2 \
                    and p[14:18] == ip4(dst_ip):
                return p[8:14]
        return None

    def ping(self, src_ip, dst_ip, vlan=None, timeout=2.0):
        """True when `dst_ip` answers one ICMP echo (in the same VLAN) within `timeout`."""
        mac = self.arp(src_ip, dst_ip, vlan, timeout)
        if mac is None:
            return False
        self.seq = (self.seq + 1) & 0xFFFF
        body = b"berth-ethpeer"
        icmp = struct.pack("!BBHHH", 8, 0, 0, self.ident, self.seq) + body
        icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), self.seq, 0, 64, 1, 0,
                          ip4(src_ip), ip4(dst_ip))
        hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
        self._send(mac, ETH_P_IP, hdr + icmp, vlan)
        until = time.monotonic() + timeout
        while (got := self._recv(until)) is not None:
            v, et, p = got
            if et != ETH_P_IP or v != vlan or len(p) < 28 or p[9] != 1:
                continue
            ihl = (p[0] & 0x0F) * 4
            t, _, _, ident, seq = struct.unpack("!BBHHH", p[ihl:ihl + 8])
            if t == 0 and ident == self.ident and seq == self.seq and p[12:16] == ip4(dst_ip):
                return True
        return False

    def answers(self, src_ip, dst_ip, vlan=None, within=20.0):
        """Ping until `dst_ip` answers or `within` seconds pass; True if it answered."""
        until = time.monotonic() + within
        while time.monotonic() < until:
            if self.ping(src_ip, dst_ip, vlan, timeout=min(2.0, max(0.1, until - time.monotonic()))):
                return True
        return False
