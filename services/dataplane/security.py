"""Session keys: ZeroMQ CURVE for the data plane, mutual TLS for the control plane.

`generate(folder, plan, ...)` makes a session's keys (the local runner calls it; on Kubernetes the
same folder layout is mounted from Secrets), and every stage reads the folder named by
$DETSTREAM_KEYS through `Keys`:

    FOLDER/curve/public/NAME.key          CURVE public keys of every stage, and of `external`
    FOLDER/curve/private/NAME.key_secret  CURVE secret key of each (a stage reads only its own)
    FOLDER/tls/ca.crt, ca.key             the session's certificate authority
    FOLDER/tls/NAME.crt, NAME.key         a server certificate per stage (127.0.0.1, localhost and
                                          the stage's Kubernetes Service name) and for `external`
                                          senders, and `launcher`, the client certificate of
                                          whoever drives the session

Data plane (`spec.security.dataPlane: curve`): every socket that binds is a CURVE server with its
stage's key; every socket that connects knows the key of the stage it connects to. A ZAP handler
in each stage admits only the session's own keys, and only the roles that belong on each port
(`ACCEPTS`): a client without a session key is refused, and counted
(`detstream_rejected_messages_total{reason="auth"}`). `external` is the key of detector-side
senders that join through `detstream stage source --connect`.

Control plane (`spec.security.controlPlane: mtls`): every stage serves gRPC over TLS and requires
a client certificate signed by the session's CA; a caller without one is refused in the TLS
handshake.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import threading
from pathlib import Path

import zmq
import zmq.auth

KEYS_ENV = "DETSTREAM_KEYS"
EXTERNAL = "external"   # the CURVE identity of senders outside the session
LAUNCHER = "launcher"   # the TLS client identity of the local runner (the operator, on Kubernetes)
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
# who may connect to each bound data port: roles (by the key's name) per ZAP domain
ACCEPTS = {"route": ("source", EXTERNAL), "data": ("source", EXTERNAL), "work": ("worker",),
           "results": ("worker", "distributor")}
CERT_DAYS = 30


def _private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o600)


def generate(folder: Path, plan, curve: bool = True, tls: bool = True) -> Path:
    """Write fresh keys for every stage of `plan` into `folder` (created 0700)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    names = [s.name for s in plan.stages]
    if curve:
        public, private = folder / "curve" / "public", folder / "curve" / "private"
        for d in (public, private):
            d.mkdir(parents=True, exist_ok=True)
        for name in names + [EXTERNAL]:
            pub, sec = zmq.curve_keypair()
            (public / f"{name}.key").write_text(_key_file(pub))
            _private(private / f"{name}.key_secret", _key_file(pub, sec).encode())
    if tls:
        _certificates(folder / "tls", plan)
    return folder


def _key_file(public: bytes, secret: bytes | None = None) -> str:
    """The ZPL certificate format `zmq.auth.load_certificate` reads."""
    text = "metadata\ncurve\n" + f'    public-key = "{public.decode()}"\n'
    if secret is not None:
        text += f'    secret-key = "{secret.decode()}"\n'
    return text


def _certificates(folder: Path, plan) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=CERT_DAYS)

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "detstream"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name(f"detstream session {plan.session} CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _private(folder / "ca.key", pem_key(ca_key))

    def issue(cn: str, hosts: list[str], usage) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for host in dict.fromkeys(hosts):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        (folder / f"{cn}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _private(folder / f"{cn}.key", pem_key(key))

    for stage in plan.stages:
        issue(stage.name, [stage.host, "127.0.0.1", "localhost", f"{plan.session}-{stage.name}"],
              ExtendedKeyUsageOID.SERVER_AUTH)
    issue(EXTERNAL, ["127.0.0.1", "localhost"], ExtendedKeyUsageOID.SERVER_AUTH)  # a sender's own control port
    issue(LAUNCHER, [], ExtendedKeyUsageOID.CLIENT_AUTH)


class KeysMissing(Exception):
    pass


class Keys:
    """A session's key folder, as one stage (or the launcher) uses it."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise KeysMissing(f"session keys folder {self.folder} does not exist (${KEYS_ENV})")

    @classmethod
    def from_env(cls) -> Keys | None:
        folder = os.environ.get(KEYS_ENV)
        return cls(folder) if folder else None

    # -- CURVE ---------------------------------------------------------------------------------------
    def curve_public(self, name: str) -> bytes:
        path = self.folder / "curve" / "public" / f"{name}.key"
        if not path.is_file():
            raise KeysMissing(f"no CURVE public key for {name} ({path})")
        return zmq.auth.load_certificate(path)[0]

    def curve_secret(self, name: str) -> tuple[bytes, bytes]:
        path = self.folder / "curve" / "private" / f"{name}.key_secret"
        if not path.is_file():
            raise KeysMissing(f"no CURVE secret key for {name} ({path})")
        public, secret = zmq.auth.load_certificate(path)
        if secret is None:
            raise KeysMissing(f"{path} holds no CURVE secret key for {name}")
        return public, secret

    def curve_clients(self) -> dict[bytes, str]:
        """Public key (z85) -> name, for every key of the session."""
        out = {}
        for path in sorted((self.folder / "curve" / "public").glob("*.key")):
            out[zmq.auth.load_certificate(path)[0]] = path.stem
        return out

    def curve_server(self, sock: zmq.Socket, me: str, domain: str) -> None:
        public, secret = self.curve_secret(me)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
        sock.zap_domain = domain.encode()

    def curve_client(self, sock: zmq.Socket, me: str, server: str) -> None:
        public, secret = self.curve_secret(me)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_serverkey = self.curve_public(server)

    # -- TLS -----------------------------------------------------------------------------------------
    def _read(self, name: str) -> bytes:
        path = self.folder / "tls" / name
        if not path.is_file():
            raise KeysMissing(f"no {name} in {path.parent}")
        return path.read_bytes()

    def server_credentials(self, me: str):
        import grpc
        return grpc.ssl_server_credentials([(self._read(f"{me}.key"), self._read(f"{me}.crt"))],
                                           root_certificates=self._read("ca.crt"), require_client_auth=True)

    def channel_credentials(self, client: str = LAUNCHER):
        import grpc
        return grpc.ssl_channel_credentials(root_certificates=self._read("ca.crt"),
                                            private_key=self._read(f"{client}.key"),
                                            certificate_chain=self._read(f"{client}.crt"))


def role_of(name: str) -> str:
    return name.rsplit("-", 1)[0] if name != EXTERNAL else EXTERNAL


class ZapHandler:
    """Answers ZeroMQ's authentication requests for one context: a CURVE client is admitted when its
    key is one of the session's and its role may connect to the port (the ZAP domain)."""

    def __init__(self, ctx: zmq.Context, clients: dict[bytes, str], log=None):
        self.ctx = ctx
        self.clients = clients
        self.refused = 0
        self.log = log
        self.sock = ctx.socket(zmq.REP)
        self.sock.linger = 0
        self.sock.bind(ZAP_ENDPOINT)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.serve, name="zap", daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stopped.is_set():
            try:
                if not self.sock.poll(100):
                    continue
                request = self.sock.recv_multipart()
            except zmq.ZMQError:
                return
            version, request_id, domain, address, _identity, mechanism, *credentials = request + [b""] * 6
            name = None
            if mechanism == b"CURVE" and credentials and len(credentials[0]) == 32:
                name = self.clients.get(zmq.utils.z85.encode(credentials[0]))
            allowed = name is not None and role_of(name) in ACCEPTS.get(domain.decode(errors="replace"), ())
            if not allowed:
                self.refused += 1
                if self.log is not None and self.refused % 1000 == 1:  # the first, then every 1000th
                    self.log.warning("refused a %s client from %s on %s (%s; %d refused so far)",
                                     mechanism.decode(errors="replace"), address.decode(errors="replace"),
                                     domain.decode(errors="replace"),
                                     f"key of {name}, not allowed here" if name else "not a session key",
                                     self.refused)
            reply = [version, request_id, b"200" if allowed else b"400", b"OK" if allowed else b"refused",
                     (name or "").encode(), b""]
            try:
                self.sock.send_multipart(reply)
            except zmq.ZMQError:
                return

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(1.0)
        self.sock.close(0)
