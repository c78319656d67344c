"""Test certificates for the HTTPS cases, made with the openssl CLI in a directory of the test's:
a test CA, another CA nobody trusts, and server certificates for the guest's view of the host
(IP 10.0.2.2): a good one, one from the other CA, an expired one, one for another name.

    pki = make_pki(dir)
    pki["ca"]                       the test CA's certificate (PEM file)
    pki["good"] == (cert, key)      signed by the test CA, valid now, for IP 10.0.2.2 and 127.0.0.1
    pki["wrong-ca"]                 the same names, signed by the other CA
    pki["expired"]                  signed by the test CA, valid only in 2019
    pki["wrong-name"]               signed by the test CA, for DNS repo.example only
"""

import os
import subprocess

NAMES = "IP:10.0.2.2,IP:127.0.0.1"


def _openssl(*args, cwd):
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, f"openssl {' '.join(args)}: {r.stderr}"


def _ca(d, name, cn):
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "30", "-subj", f"/CN={cn}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _server(d, name, ca, names, dates=None):
    """A server key and certificate `name` for `names`, signed by CA `ca`; `dates`: (start,
    end) as YYYYMMDDHHMMSSZ, else valid from now for 30 days."""
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", "/CN=berth test repository", cwd=d)
    ext = os.path.join(d, f"{name}.ext")
    with open(ext, "w") as f:
        f.write(f"subjectAltName={names}\nbasicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    if dates is None:
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
                 "-CAcreateserial", "-days", "30", "-extfile", ext, "-out", f"{name}.crt", cwd=d)
        return
    # `openssl x509` (3.0) cannot date a certificate in the past; `openssl ca` can.
    db = os.path.join(d, f"{name}-db")
    os.makedirs(db)
    open(os.path.join(db, "index.txt"), "w").close()
    with open(os.path.join(db, "serial"), "w") as f:
        f.write("1000\n")
    cnf = os.path.join(d, f"{name}.cnf")
    with open(cnf, "w") as f:
        f.write(f"[ca]\ndefault_ca = test\n[test]\ndatabase = {db}/index.txt\nnew_certs_dir = {db}\n"
                f"serial = {db}/serial\ndefault_md = sha256\npolicy = any\n"
                f"[any]\ncommonName = supplied\n")
    _openssl("ca", "-batch", "-config", cnf, "-cert", f"{ca}.crt", "-keyfile", f"{ca}.key",
             "-in", f"{name}.csr", "-out", f"{name}.crt", "-startdate", dates[0], "-enddate", dates[1],
             "-extfile", ext, "-notext", cwd=d)


def make_pki(d):
    _ca(d, "ca", "Berth test CA")
    _ca(d, "other-ca", "Some other CA")
    _server(d, "good", "ca", NAMES)
    _server(d, "wrong-ca", "other-ca", NAMES)
    _server(d, "expired", "ca", NAMES, ("20190101000000Z", "20200101000000Z"))
    _server(d, "wrong-name", "ca", "DNS:repo.example")
    pki = {"ca": os.path.join(d, "ca.crt")}
    for name in ("good", "wrong-ca", "expired", "wrong-name"):
        pki[name] = (os.path.join(d, f"{name}.crt"), os.path.join(d, f"{name}.key"))
    return pki
