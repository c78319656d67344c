"""EC2 cases: the `aws` image on an EC2 look-alike (UEFI firmware, the root disk on NVMe, SMBIOS
saying "Amazon EC2", IMDSv2 at 169.254.169.254 served by the tests), and scripts/build-ami
against a stand-in for the AWS APIs (moto on the loopback).

What a look-alike is not: Nitro's own firmware, ENA (QEMU has none: virtio-net stands in), EBS
behind the NVMe controller, the real IMDS. docs/aws.md says what was only tested this way.
"""

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse

from berthvm import VM, BUILD, CACHE, ROOT, arch_paths
from cases import case
from imds_server import Imds

GOOD_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOc+cLvqSBn1JzS7wyRwfmiy0L10Fq6GiuVduhhsLiin my-key"
# What a broken or hostile IMDS might say: a key with a second line smuggled in.
BAD_KEY = "ssh-ed25519 AAAA\nX-Evil: 1"
ZONE, INSTANCE = "us-west-2b", "i-0123456789abcdef0"
GUEST_IP = "169.254.2.15"  # QEMU user networking's guest address in 169.254.0.0/16
HOSTNAME = "ip-169-254-2-15.us-west-2.compute.internal"
USER_DATA = """[settings]
motd = "from IMDS user data"
[settings.aws]
region = "eu-north-1"
"""


def ec2_answers(arch):
    identity = {"accountId": "123456789012", "architecture": "arm64" if arch == "arm64" else "x86_64",
                "availabilityZone": ZONE, "imageId": "ami-0123456789abcdef0", "instanceId": INSTANCE,
                "instanceType": "m7g.large" if arch == "arm64" else "m7i.large", "privateIp": GUEST_IP,
                "region": "us-west-2", "version": "2017-09-30"}
    return {
        "/latest/user-data": USER_DATA,
        "/latest/meta-data/local-hostname": HOSTNAME,
        "/latest/meta-data/local-ipv4": GUEST_IP,
        "/latest/meta-data/instance-id": INSTANCE,
        "/latest/dynamic/instance-identity/document": json.dumps(identity, indent=2),
        "/latest/meta-data/public-keys/": "0=my-key\n1=broken-key",
        "/latest/meta-data/public-keys/0/openssh-key": GOOD_KEY + "\n",
        "/latest/meta-data/public-keys/1/openssh-key": BAD_KEY,
    }


# SMBIOS type 1 (system) as Nitro instances have it; on arm64 it reaches the guest only
# through the UEFI firmware.
EC2_SMBIOS = ("-smbios", "type=1,manufacturer=Amazon EC2,product=m7.large,serial=ec2-look-alike")


@case(arches=("x86_64", "arm64"))
def ec2_lookalike_configures_itself_from_imds(arch):
    """The aws image on an EC2 look-alike (UEFI, NVMe root, SMBIOS "Amazon EC2", IMDSv2 of the
    tests at 169.254.169.254, which refuses IMDSv1): the network comes up before user data,
    user data from IMDS is applied, the host name, node IP and provider ID come from IMDS (a
    region given in user data wins over IMDS's), the good SSH key reaches the admin container's
    user data while a hostile one is reported on the console and in GET /boot and the boot goes
    on; every request carried a session token; the ACPI power button powers it off."""
    with Imds(ec2_answers(arch)) as imds, \
            VM(arch, platform="aws", raw=True, firmware="uefi", disk_bus="nvme", nic=imds.nic(),
               extra=EC2_SMBIOS, disk_size="3G") as vm:
        # The stand-in is honest: IMDSv1 is refused, v2 works.
        assert imds.get("/latest/meta-data/instance-id") == (401, b"")
        assert imds.get("/latest/meta-data/instance-id", imds.token()) == (200, INSTANCE.encode())
        host_requests = len(imds.requests())

        vm.start()
        vm.wait_for(r"Kernel command line: .*nvme_core\.io_timeout=4294967295", timeout=240)
        if arch == "arm64":
            vm.wait_for(r"ACPI: Interpreter enabled", timeout=120)
        vm.wait_for(r"berth: EC2 instance \(DMI\)", timeout=240)
        vm.wait_for(rf"berth: network up: \S+ {re.escape(GUEST_IP)}/16", timeout=120)
        vm.wait_for(r"berth: user data from EC2 IMDSv2 applied: aws.region, motd", timeout=120)
        m = vm.wait_for(r"berth: NOTICE: instance settings from EC2 IMDSv2: (.*)", timeout=120)
        notice = m.group(1)
        assert notice.startswith("settings.host-containers.admin.user-data: GET "
                                 "/latest/meta-data/public-keys/1/openssh-key: not one line of text"), notice
        assert "\\nX-Evil: 1" in notice and "this key is left out" in notice, notice
        vm.wait_for(r"berth: instance settings from EC2 IMDSv2: aws.region|berth: instance settings from "
                    r"EC2 IMDSv2: host-containers.admin", timeout=60)
        r = vm.wait_ready(300)
        assert r["variant"] == "aws", r
        vm.wait_for(r"berth: api bridge")

        st, s = vm.api("GET", "/settings")
        assert st == 200, (st, s)
        assert s["motd"] == "from IMDS user data", s
        assert s["network"]["hostname"] == HOSTNAME, s
        assert s["kubernetes"]["node-ip"] == GUEST_IP, s
        assert s["kubernetes"]["provider-id"] == f"aws:///{ZONE}/{INSTANCE}", s
        assert s["aws"]["region"] == "eu-north-1", f"the user's region must win over IMDS's: {s}"
        admin = json.loads(base64.b64decode(s["host-containers"]["admin"]["user-data"]))
        assert admin == {"ssh": {"authorized-keys": [GOOD_KEY]}}, admin
        st, state = vm.api("GET", "/system/state")
        assert st == 200 and state["hostname"] == HOSTNAME, (st, state)
        st, boot = vm.api("GET", "/boot")
        assert any("public-keys/1/openssh-key" in n for n in boot["notices"]), boot["notices"]
        st, ud = vm.api("GET", "/user-data")
        assert ud["source"] == "EC2 IMDSv2" and ud["applied"] is True, ud

        guest = imds.requests()[host_requests:]
        puts = [q for q in guest if q[0] == "PUT"]
        gets = [q for q in guest if q[0] == "GET"]
        assert puts and all(q[2] == 200 for q in puts), guest
        assert gets and all(q[3] for q in gets), f"a request without a valid token (IMDSv1): {guest}"
        asked = {q[1] for q in gets}
        assert {"/latest/user-data", "/latest/meta-data/local-hostname", "/latest/meta-data/local-ipv4",
                "/latest/dynamic/instance-identity/document"} <= asked, asked

        # "Stop" on EC2 is the ACPI power button.
        vm.qmp("system_powerdown")
        vm.wait_for(r"power button pressed", timeout=60)
        assert vm.wait_exit(120) == 0, vm.tail()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Moto:
    """moto's server (a stand-in for the AWS APIs, from PyPI, in the venv scripts/setup makes)
    on the loopback."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="berth-moto-", suffix=".log", delete=False)
        # moto keeps only some of register-image's parameters (not the architecture, boot mode,
        # ENA or IMDS support), so the requests it received are recorded and checked as sent.
        self.recording = self.log.name + ".requests"
        env = dict(os.environ, MOTO_ENABLE_RECORDING="True", MOTO_RECORDER_FILEPATH=self.recording)
        self.proc = subprocess.Popen([os.path.join(CACHE, "venv", "bin", "moto_server"), "-H", "127.0.0.1",
                                      "-p", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert self.proc.poll() is None, f"moto_server exited: {open(self.log.name).read()}"
                assert time.monotonic() < deadline, "moto_server did not start listening in 60 s"
                time.sleep(0.2)

    def env(self, region):
        e = dict(os.environ)
        e.update(AWS_ENDPOINT_URL=self.url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                 AWS_DEFAULT_REGION=region, AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")
        return e

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(10)
        os.unlink(self.log.name)
        if os.path.exists(self.recording):
            os.unlink(self.recording)

    def requests(self, action):
        """The form parameters of every EC2 query API request for `action` moto received."""
        found = []
        with open(self.recording) as f:
            for line in f:
                entry = json.loads(line)
                body = entry.get("body") or ""
                if entry.get("body_encoded"):
                    body = base64.b64decode(body).decode("utf-8", "replace")
                params = {k: v[0] for k, v in urllib.parse.parse_qs(body).items()}
                if params.get("Action") == action:
                    found.append(params)
        return found


def aws(env, *args):
    out = subprocess.run([os.path.join(CACHE, "venv", "bin", "aws"), *args, "--output", "json"], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out) if out.strip() else None


BUILD_AMI = os.path.join(ROOT, "scripts", "build-ami")
REGION = "us-west-2"


@case(arches=("x86_64", "arm64"))
def build_ami_prints_its_calls_without_credentials(arch):
    """scripts/build-ami --dry-run, and a run without credentials, print the exact AWS CLI calls
    (EBS direct APIs, then register-image with UEFI boot, ENA, IMDSv2 only, the arch and the
    root device) and make none."""
    name = f"berth-test-{arch}"
    env = dict(os.environ, BERTH_SKIP_BUILD="1")
    for k in list(env):
        if k.startswith("AWS_"):
            del env[k]
    # No credentials anywhere: the calls are printed, none is made.
    env.update(AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null",
               AWS_EC2_METADATA_DISABLED="true")
    for extra in (["--dry-run"], []):
        out = subprocess.run([BUILD_AMI, arch, "--region", REGION, "--name", name, *extra], env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        calls = [line for line in out.stdout.splitlines() if line.startswith("aws ")]
        reg = [c for c in calls if c.startswith("aws ec2 register-image")]
        assert len(reg) == 1, out.stdout[-3000:]
        for want in ["--boot-mode uefi", "--ena-support", "--imds-support v2.0", "--virtualization-type hvm",
                     f"--architecture {arch}", "--root-device-name /dev/xvda", f"--name {name}",
                     "DeviceName=/dev/xvda,Ebs={SnapshotId=", f"--region {REGION}"]:
            assert want in reg[0], f"{want!r} not in {reg[0]}"
        order = [" ".join(c.split()[1:3]) for c in calls]
        puts = order.count("ebs put-snapshot-block")
        assert puts > 0 and order == ["ebs start-snapshot"] + ["ebs put-snapshot-block"] * puts + [
            "ebs complete-snapshot", "ec2 wait", "ec2 register-image"], order
        if not extra:
            assert "no AWS credentials" in out.stderr, out.stderr


# One arch: the upload and registration do not depend on it (the dry runs above check the
# --architecture of each), and the upload costs minutes under TCG-loaded CI.
@case(arches=("x86_64",))
def build_ami_registers_against_moto(arch):
    """Against moto (the AWS APIs' stand-in, on the loopback) scripts/build-ami uploads the aws
    image's non-zero blocks through the EBS direct APIs, whose snapshot reads back as the image,
    and registers an AMI with UEFI boot, ENA, IMDSv2 only, the arch and the root device, as the
    requests moto received show."""
    script, region = BUILD_AMI, REGION
    image = os.path.join(arch_paths(arch, "aws")["raw"])
    name = f"berth-test-{arch}-{int(time.time())}"
    with Moto() as moto:
        env = moto.env(region)
        env["BERTH_SKIP_BUILD"] = "1"
        out = subprocess.run([script, arch, "--region", region, "--name", name], env=env,
                             capture_output=True, text=True, timeout=1200)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        ami = out.stdout.strip().splitlines()[-1]
        assert re.fullmatch(r"ami-[0-9a-f]+", ami), out.stdout[-2000:]
        img = aws(env, "ec2", "describe-images", "--image-ids", ami)["Images"][0]
        assert img["Name"] == name and img["State"] == "available", img
        # The register-image request as moto received it (after botocore checked it against
        # the API model).
        [reg] = moto.requests("RegisterImage")
        want = {"Name": name, "Architecture": arch, "VirtualizationType": "hvm", "BootMode": "uefi",
                "EnaSupport": "true", "ImdsSupport": "v2.0", "RootDeviceName": "/dev/xvda",
                "BlockDeviceMapping.1.DeviceName": "/dev/xvda", "BlockDeviceMapping.1.Ebs.VolumeType": "gp3",
                "BlockDeviceMapping.1.Ebs.DeleteOnTermination": "true"}
        assert {k: reg.get(k) for k in want} == want, reg
        snap = reg["BlockDeviceMapping.1.Ebs.SnapshotId"]
        assert aws(env, "ec2", "describe-snapshots", "--snapshot-ids", snap)["Snapshots"][0]["State"] == \
            "completed"
        # The snapshot holds the image: every block uploaded, read back through the EBS direct
        # APIs, equals the image's; the blocks not uploaded are zero in the image.
        blocks = aws(env, "ebs", "list-snapshot-blocks", "--snapshot-id", snap)
        uploaded = sorted(b["BlockIndex"] for b in blocks["Blocks"])
        size = int(re.search(r"block size (\d+)", out.stderr).group(1))
        tmp = tempfile.mkdtemp(prefix="berth-ami-")
        try:
            with open(image, "rb") as f:
                total = (os.path.getsize(image) + size - 1) // size
                nonzero = [i for i in range(total) if any(f.read(size))]
                assert uploaded == nonzero, (len(uploaded), len(nonzero))
                for i in uploaded[:: max(1, len(uploaded) // 8)] + uploaded[-1:]:
                    dest = os.path.join(tmp, f"{i}")
                    subprocess.run([os.path.join(CACHE, "venv", "bin", "aws"), "ebs", "get-snapshot-block",
                                    "--snapshot-id", snap, "--block-index", str(i), "--block-token",
                                    next(b["BlockToken"] for b in blocks["Blocks"] if b["BlockIndex"] == i), dest],
                                   env=env, check=True, capture_output=True)
                    f.seek(i * size)
                    assert open(dest, "rb").read() == f.read(size), f"block {i} differs"
        finally:
            shutil.rmtree(tmp)
