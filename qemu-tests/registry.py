"""A real OCI registry on the host's loopback, for guests to pull from, and a tiny image to push.

QEMU's user networking shows the host's 127.0.0.1 to the guest as 10.0.2.2, so the registry
listens on 127.0.0.1 only, on a free port, and references are handed out as the guest sees them.
The image is built here, without docker: one layer with Debian's static busybox for the target
arch, written as an OCI image layout and pushed with skopeo. The layer is deterministic (sorted,
mtime 0, uid/gid 0), so its digest is the same on every run with the same busybox.

    with Registry() as reg:
        ref = reg.push_busybox("arm64")        # "10.0.2.2:PORT/berth-test/busybox:1"

Run this file directly for a host-only self-check.
"""

import glob
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request

REGISTRY_BIN = "/usr/bin/docker-registry"
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "berth")
GUEST_HOST = "10.0.2.2"  # the host's loopback, seen from a QEMU user-networking guest

DEBARCH = {"x86_64": "amd64", "arm64": "arm64"}
ELF_MACHINE = {"x86_64": "X86-64", "arm64": "AArch64"}
APPLETS = ("sh", "echo", "sleep", "kill", "pidof", "cat", "ls", "ps", "pkill", "true", "chroot", "grep",
           "touch", "test", "[", "sed", "head", "seq")
EMPTY_DIRS = ("dev", "etc", "proc", "sys", "tmp")
DEFAULT_CMD = ["/bin/sh", "-c", "echo hello from busybox; sleep 3600"]

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def host_arch():
    return os.uname().machine.replace("aarch64", "arm64")


def _sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- busybox for an arch

def _check_static(path, arch):
    """True when `path` is an ELF for `arch` that asks for no program interpreter."""
    r = subprocess.run(["readelf", "-hlW", path], capture_output=True, text=True)
    return r.returncode == 0 and ELF_MACHINE[arch] in r.stdout and "INTERP" not in r.stdout


def busybox_binary(arch):
    """The path of a static busybox for `arch`: the installed one when it fits, else Debian's
    busybox-static:ARCH, downloaded to ~/.cache/berth/debs/ARCH/ and extracted once."""
    if arch not in DEBARCH:
        raise ValueError(f"unknown arch {arch!r} (want one of {sorted(DEBARCH)})")
    if arch == host_arch():
        for p in ("/bin/busybox", "/usr/bin/busybox"):
            if os.path.exists(p) and _check_static(p, arch):
                return p
    debarch = DEBARCH[arch]
    debs = os.path.join(CACHE, "debs", arch)
    found = sorted(glob.glob(os.path.join(debs, f"busybox-static_*_{debarch}.deb")))
    if not found:
        os.makedirs(debs, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".download.", dir=debs)
        try:
            argv = ["apt-get", "download", "-q=2"]
            if os.getuid() == 0:  # apt's _apt user cannot write into root's cache
                argv += ["-o", "APT::Sandbox::User=root"]
            r = subprocess.run(argv + [f"busybox-static:{debarch}"], cwd=tmp,
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"apt-get download busybox-static:{debarch} failed (are apt's "
                                   f"lists current? scripts/setup adds the arm64 arch):\n{r.stderr}")
            for f in glob.glob(os.path.join(tmp, "*.deb")):
                os.replace(f, os.path.join(debs, os.path.basename(f)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        found = sorted(glob.glob(os.path.join(debs, f"busybox-static_*_{debarch}.deb")))
        if not found:
            raise RuntimeError(f"apt-get download left no busybox-static .deb in {debs}")
    deb = found[-1]
    out = os.path.join(CACHE, "busybox", arch, os.path.basename(deb)[:-len(".deb")])
    binary = os.path.join(out, "bin", "busybox")
    if not os.path.exists(binary):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".extract.", dir=os.path.dirname(out))
        try:
            subprocess.run(["dpkg-deb", "-x", deb, tmp], check=True)
            if not os.path.exists(os.path.join(tmp, "bin", "busybox")):
                raise RuntimeError(f"{deb} has no /bin/busybox")
            shutil.rmtree(out, ignore_errors=True)
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not _check_static(binary, arch):
        raise RuntimeError(f"{binary} is not a static {ELF_MACHINE[arch]} binary")
    return binary


# ---------------------------------------------------------------- the image

def busybox_layer(arch, extra=None):
    """(uncompressed tar, gzipped tar) of the busybox layer: deterministic bytes. `extra` maps
    more files to put in bin/ to their contents (executable)."""
    with open(busybox_binary(arch), "rb") as f:
        bb = f.read()

    def info(name, kind, mode, size=0, target=""):
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.size, ti.linkname = kind, mode, size, target
        ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "root", "root"
        return ti

    entries = [("bin", info("bin", tarfile.DIRTYPE, 0o755), None),
               ("bin/busybox", info("bin/busybox", tarfile.REGTYPE, 0o755, len(bb)), bb)]
    entries += [(f"bin/{a}", info(f"bin/{a}", tarfile.SYMTYPE, 0o777, target="busybox"), None)
                for a in APPLETS]
    entries += [(d, info(d, tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755), None)
                for d in EMPTY_DIRS]
    entries += [(f"bin/{n}", info(f"bin/{n}", tarfile.REGTYPE, 0o755, len(data)), data)
                for n, data in sorted((extra or {}).items())]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for _, ti, data in sorted(entries, key=lambda e: e[0]):
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    return raw, gzip.compress(raw, compresslevel=9, mtime=0)


def write_layout(layout, arch, cmd=None, tag="1", extra=None):
    """Write an OCI image layout of the busybox image into directory `layout` (made if missing).
    Returns the digests: {"manifest", "config", "layer", "diff_id"}."""
    cmd = list(DEFAULT_CMD if cmd is None else cmd)
    raw, gz = busybox_layer(arch, extra)
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)

    def blob(data):
        d = _sha256(data)
        with open(os.path.join(blobs, d.split(":", 1)[1]), "wb") as f:
            f.write(data)
        return {"digest": d, "size": len(data)}

    def dumps(obj):
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()

    layer = blob(gz)
    diff_id = _sha256(raw)
    config = blob(dumps({
        "architecture": DEBARCH[arch],
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Cmd": cmd, "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z",
                     "created_by": "berth qemu-tests/registry.py: Debian busybox-static"}],
    }))
    manifest = blob(dumps({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, **config},
        "layers": [{"mediaType": MT_LAYER, **layer}],
    }))
    with open(os.path.join(layout, "index.json"), "wb") as f:
        f.write(dumps({
            "schemaVersion": 2,
            "mediaType": MT_INDEX,
            "manifests": [{"mediaType": MT_MANIFEST, **manifest,
                           "platform": {"architecture": DEBARCH[arch], "os": "linux"},
                           "annotations": {"org.opencontainers.image.ref.name": tag}}],
        }))
    with open(os.path.join(layout, "oci-layout"), "wb") as f:
        f.write(dumps({"imageLayoutVersion": "1.0.0"}))
    return {"manifest": manifest["digest"], "config": config["digest"],
            "layer": layer["digest"], "diff_id": diff_id}


# ---------------------------------------------------------------- the registry

def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """Debian's docker-registry on 127.0.0.1:PORT with storage in a temp dir. A context manager:
    the process is stopped and the temp dir removed on exit, also after a failure."""

    def __init__(self, start_timeout=30):
        self.start_timeout = start_timeout
        self.tmp = None
        self.proc = None
        self.port = None
        self.guest_address = None
        self.pushed = {}  # guest reference -> digests (see write_layout)

    @property
    def address(self):
        """host:port as this host reaches the registry."""
        return f"127.0.0.1:{self.port}"

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self):
        if not os.access(REGISTRY_BIN, os.X_OK):
            raise RuntimeError(f"{REGISTRY_BIN} missing: run scripts/setup (package docker-registry)")
        self.tmp = tempfile.mkdtemp(prefix="berth-registry-")
        last = None
        for _ in range(3):  # the free port can be taken between the probe and the bind
            try:
                self._start_once(_free_port())
                return self
            except RuntimeError as e:
                last = e
                self._stop_proc()
        raise last

    def _start_once(self, port):
        storage = os.path.join(self.tmp, "storage")
        os.makedirs(storage, exist_ok=True)
        config = os.path.join(self.tmp, "config.yml")
        with open(config, "w") as f:
            f.write("version: 0.1\n"
                    "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
                    f"storage:\n  filesystem:\n    rootdirectory: {storage}\n"
                    "  delete:\n    enabled: true\n"
                    f"http:\n  addr: 127.0.0.1:{port}\n  secret: berth-qemu-tests\n")
        self.log_path = os.path.join(self.tmp, "registry.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([REGISTRY_BIN, "serve", config], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.port = port
        self.guest_address = f"{GUEST_HOST}:{port}"
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited (rc {self.proc.returncode}) on port "
                                   f"{port}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not answer /v2/ within "
                                   f"{self.start_timeout}s\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, n=30):
        try:
            with open(self.log_path, errors="replace") as f:
                return "--- registry log ---\n" + "".join(f.readlines()[-n:])
        except OSError:
            return "(no registry log)"

    def _stop_proc(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self):
        self._stop_proc()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    # ------------------------------------------------------------ pushing

    def push_busybox(self, arch, name="berth-test/busybox", tag="1"):
        """Build the busybox image for `arch` (x86_64 or arm64), push it, and return its reference
        as the guest sees it: 10.0.2.2:PORT/NAME:TAG."""
        return self.push_busybox_cmd(arch, DEFAULT_CMD, tag, name=name)

    def push_busybox_cmd(self, arch, cmd, tag, name="berth-test/busybox", extra=None):
        """The same image with another Cmd (a list of strings) and `extra` files in bin/ (see
        busybox_layer); returns the guest's reference."""
        if self.proc is None:
            raise RuntimeError("the registry is not running")
        layout = tempfile.mkdtemp(prefix="layout-", dir=self.tmp)
        try:
            digests = write_layout(layout, arch, cmd, tag, extra)
            r = subprocess.run(["skopeo", "--insecure-policy", "copy", "-q",
                                "--dest-tls-verify=false", f"oci:{layout}:{tag}",
                                f"docker://{self.address}/{name}:{tag}"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"skopeo copy to {self.address}/{name}:{tag} failed:\n"
                                   f"{r.stderr}\n{self.log_tail()}")
        finally:
            shutil.rmtree(layout, ignore_errors=True)
        ref = f"{self.guest_address}/{name}:{tag}"
        self.pushed[ref] = digests
        return ref

    def host_ref(self, ref):
        """A guest reference (10.0.2.2:PORT/...) as this host reaches it (127.0.0.1:PORT/...)."""
        return ref.replace(self.guest_address, self.address, 1)


# ---------------------------------------------------------------- self-check (host only)

def _self_check():
    t0 = time.monotonic()
    with Registry() as reg:
        t_start = time.monotonic() - t0
        print(f"registry up on {reg.address} (guest: {reg.guest_address}) in {t_start:.2f}s")
        for arch in ("x86_64", "arm64"):
            t = time.monotonic()
            ref = reg.push_busybox(arch, tag=f"{arch}")
            print(f"pushed {ref} in {time.monotonic() - t:.2f}s")
            d = reg.pushed[ref]
            again = reg.push_busybox(arch, tag=f"{arch}-again")
            assert reg.pushed[again] == d, f"{arch}: the image is not deterministic"
            host = reg.host_ref(ref)
            info = json.loads(subprocess.run(
                ["skopeo", "--insecure-policy", "inspect", "--tls-verify=false", f"docker://{host}"],
                check=True, capture_output=True, text=True).stdout)
            assert info["Architecture"] == DEBARCH[arch], info
            assert info["Os"] == "linux", info
            assert info["Layers"] == [d["layer"]], (info["Layers"], d)
            assert info["Digest"] == d["manifest"], (info["Digest"], d)
            name, tag = host.split("/", 1)[1].rsplit(":", 1)
            req = urllib.request.Request(f"http://{reg.address}/v2/{name}/manifests/{tag}",
                                         headers={"Accept": MT_MANIFEST})
            with urllib.request.urlopen(req, timeout=10) as r:
                body = r.read()
                ctype = r.headers["Content-Type"]
                rdigest = r.headers["Docker-Content-Digest"]
            manifest = json.loads(body)
            assert manifest["mediaType"] == MT_MANIFEST, manifest
            assert ctype == MT_MANIFEST, ctype
            assert rdigest == d["manifest"] == _sha256(body), (rdigest, d)
            assert manifest["layers"][0]["mediaType"] == MT_LAYER, manifest
            with urllib.request.urlopen(f"http://{reg.address}/v2/{name}/blobs/{d['layer']}",
                                        timeout=10) as r:
                gz = r.read()
            assert _sha256(gz) == d["layer"]
            raw = gzip.decompress(gz)
            assert _sha256(raw) == d["diff_id"]
            with tarfile.open(fileobj=io.BytesIO(raw)) as t:
                names = t.getnames()
                assert names == sorted(names), names
                assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in t.getmembers())
            assert {"bin/busybox", "bin/sh", "tmp", "proc", "sys", "dev", "etc"} <= set(names), names
            print(f"  {arch}: arch {info['Architecture']}, layer {d['layer'][:19]}..., "
                  f"manifest {manifest['mediaType']}")
            # run the layer: chroot for the host's arch, qemu-user for the other one
            root = tempfile.mkdtemp(prefix="berth-layer-")
            try:
                with tarfile.open(fileobj=io.BytesIO(raw)) as t:
                    t.extractall(root, **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))
                if arch == host_arch():
                    argv = ["chroot", root, "/bin/sh", "-c", "echo ok; ls /bin"]
                else:
                    qemu = "qemu-aarch64" if arch == "arm64" else "qemu-x86_64"
                    if not shutil.which(qemu):
                        print(f"  {arch}: {qemu} not installed, layer not run")
                        continue
                    argv = [qemu, os.path.join(root, "bin", "busybox"), "sh", "-c", "echo ok"]
                r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
                assert r.returncode == 0 and r.stdout.split()[:1] == ["ok"], (argv, r)
                out = r.stdout
                if arch == host_arch():
                    assert sorted(out.split()[1:]) == sorted(("busybox",) + APPLETS), out
                print(f"  {arch}: layer runs: {' '.join(argv[:2])}... -> {out.split()[0]}")
            finally:
                shutil.rmtree(root, ignore_errors=True)
        # another Cmd
        ref = reg.push_busybox_cmd("x86_64", ["/bin/sh", "-c", "echo custom"], "custom")
        cfg = json.loads(subprocess.run(
            ["skopeo", "--insecure-policy", "inspect", "--config", "--tls-verify=false",
             f"docker://{reg.host_ref(ref)}"], check=True, capture_output=True, text=True).stdout)
        assert cfg["config"]["Cmd"] == ["/bin/sh", "-c", "echo custom"], cfg
        assert cfg["config"]["Env"] == ["PATH=/bin"], cfg
        print(f"pushed {ref} with Cmd {cfg['config']['Cmd']}")
        proc, tmp = reg.proc, reg.tmp
    assert proc.poll() is not None and not os.path.exists(tmp), "registry not cleaned up"
    print(f"registry stopped and {tmp} removed; self-check passed in {time.monotonic() - t0:.2f}s")


if __name__ == "__main__":
    _self_check()
