"""Sealed transfers: bytes a site sends to other sites through a relay (the aggregator) that cannot read them.

A transfer is a sequence of records (byte strings: chunk frames of a model) that the sender's `Sealer` seals for
one or more recipients, each named by its certificate from the project's CA; each recipient's `Opener` checks and
opens them. The relay reads only who sends to whom (`header_info`) and each record's index (`record_index`).
Every record verifies alone, so a transfer resumes from any record and a bad record is refused alone.

Keys (docs/swarm.md, "Sealed streams"): per transfer a fresh random 32-byte data key K and ephemeral EC P-256
key; per recipient, kek = HKDF-SHA256(ECDH(ephemeral, recipient's certificate key), salt = transfer id, info =
KDF_INFO + name) wraps K (AES-256-GCM, nonce 0: each kek wraps one key). Record i is AES-256-GCM(K), nonce = the
header's 4 random bytes || i (u64 BE), associated data = transfer id, i, last-record flag; the sender signs
(ECDSA P-256, SHA-256) the same and the GCM tag, so a record cannot move to another index or transfer and the flag
ends the transfer (no silent truncation). With several recipients each knows K and could forge a ciphertext with
the same tag (GHASH is linear in the ciphertext under a known key), so the signature then also covers SHA-256 of
the ciphertext: no co-recipient can forge a record in the sender's name. With one, only the sender and it know K.

    header  offset 0    4 bytes   magic b"FLh1" (version 1)
            offset 4    u32 BE    body length B (at most MAX_HEADER)
            offset 8    B bytes   fields, each a u16 BE length and its bytes: transfer id, sender name (UTF-8),
                                  sender certificate (PEM), ephemeral key (65 bytes, X9.62 uncompressed), nonce
                                  prefix (4 bytes); a u16 BE count N; N pairs: recipient name, wrapped K (48 bytes)
            offset 8+B  64 bytes  the sender's signature r || s (32 bytes each, BE) over bytes 0 .. 8+B
    record  offset 0    4 bytes   magic b"FLr1"
            offset 4    u64 BE    index
            offset 12   u8        flags: bit 0 = the transfer's last record; other bits 0
            offset 13   u32 BE    length n of ciphertext + tag (at least 16)
            offset 17   64 bytes  signature r || s over RECORD_CONTEXT, associated data, tag [, SHA-256(ct)]
            offset 81   n bytes   ciphertext || 16-byte GCM tag

Parsing checks each length against the bytes at hand before it slices (a header claiming a gigabyte allocates
nothing); anything malformed, forged, replayed or not ours is a SealError naming the transfer, record and fix,
never an IndexError or struct.error. The relay needs only the CA (and its revocation list) to check who signed
a header (`header_info(header, certs)`); no key it holds opens a record.

Cost (`python tests/test_seal.py`: 64 records of 4 MiB, one core of a shared 2-core AMD EPYC, AES-NI, SHA-NI):
seal 1.3 GB/s and open 1.7 GB/s, bare AES-GCM 1.9 GB/s each way; the rest is the one copy that joins a record
(5 GB/s) and 0.1 ms of ECDSA per record. With several recipients SHA-256 (1.2 GB/s) halves both (0.6-0.7 GB/s).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fl_plugins.errors import FLError, MissingDependencyError
from fl_plugins.security.ca import not_a_site
from fl_plugins.security.revocation import Revoked

try:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature, InvalidTag
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    from cryptography.x509.oid import NameOID
except ImportError as e:  # pragma: no cover - the [server] extra brings it
    raise MissingDependencyError("sealed transfers need 'cryptography': pip install 'fl-plugins[server]'") from e

if TYPE_CHECKING:
    from fl_plugins.security.tls import SiteKit

HEADER_MAGIC, RECORD_MAGIC = b"FLh1", b"FLr1"
KDF_INFO, RECORD_CONTEXT = b"fl-plugins seal v1|", b"fl-plugins seal v1 record|"  # domain separation
MAX_HEADER = 1 << 20  # body bytes of a header: about 8000 recipients' worth
MAX_NAME = 256  # UTF-8 bytes of a transfer id or a party's name
MAX_CERT = 16 << 10  # bytes of a certificate PEM (a kit's is under 1 KiB)
MAX_RECIPIENTS = 1024
MAX_RECORD = 1 << 30  # plaintext bytes per record (records are 4 MiB, at most 64 MiB)
SIG, TAG, POINT, PREFIX, WRAPPED = 64, 16, 65, 4, 48
_HEAD = struct.Struct(">4sI")  # header: magic, body length
_RECORD = struct.Struct(">4sQBI")  # record: magic, index, flags, ciphertext length
OVERHEAD = _RECORD.size + SIG + TAG  # a record's bytes beyond its plaintext (97)
_U16, _LAST = struct.Struct(">H"), 1  # field lengths; the last-record flag
_REFETCH = "fetch it again from the sender or the relay; if it persists, refuse this transfer"


class SealError(FLError, ValueError):
    """A sealed transfer refused: a certificate not of the project, expired, revoked or of another name; a header
    or record malformed, forged, tampered with, replayed, or not sealed for this site."""


@dataclass(frozen=True)
class Identity:
    """This party: its name (its certificate's common name), EC P-256 key, certificate and the project's CA."""

    name: str
    key_pem: bytes = field(repr=False)
    cert_pem: bytes = field(repr=False)
    ca_pem: bytes = field(repr=False)

    @classmethod
    def from_kit(cls, kit: SiteKit) -> Identity:
        return cls(kit.site, kit.key, kit.cert, kit.ca)

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        try:
            key = serialization.load_pem_private_key(self.key_pem, password=None)
        except (ValueError, TypeError) as e:
            raise SealError(f"{self.name!r}: its key cannot be read ({e}); pass the client.key of its kit") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise SealError(f"{self.name!r}: its key is not EC P-256; pass the client.key `fl-plugins provision` wrote")
        return key


class Certificates:
    """Checks a peer's certificate: signed by the project's CA, within its dates, of the expected name, not
    revoked. `revoked(cert_pem)` says why a certificate is revoked (a reason, or a `Revoked` as
    `RevocationList(path).lookup` returns), or None."""

    def __init__(self, ca_pem: bytes, revoked: Callable[[bytes], Revoked | str | None] | None = None) -> None:
        try:
            self.ca = x509.load_pem_x509_certificate(ca_pem)
        except ValueError as e:
            raise SealError(f"the project's CA certificate cannot be read ({e}); pass the ca.crt of a kit") from None
        self.revoked = revoked

    def check(self, cert_pem: bytes, name: str, role: str) -> ec.EllipticCurvePublicKey:
        """The certificate's public key, or SealError naming `role` ("recipient", "sender"), `name` and why."""
        who = f"the {role} {name!r}"
        fix = f"use the certificate in the kit `fl-plugins provision` wrote for {name!r} in this project"
        try:
            if len(cert_pem) > MAX_CERT:
                raise ValueError(f"{len(cert_pem)} bytes, at most {MAX_CERT}")
            cert = x509.load_pem_x509_certificate(cert_pem)
            cert.verify_directly_issued_by(self.ca)
            if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                raise ValueError("a CA's certificate, not a party's")
        except Exception as e:  # noqa: BLE001 - hostile bytes through cryptography's parser: any failure refuses
            raise SealError(
                f"{who}: not a party's certificate signed by this project's CA ({self.ca.subject.rfc4514_string()}) "
                f"({type(e).__name__}: {e}): of another project, or altered; {fix}"
            ) from None
        cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if (other := not_a_site(cert)) is not None:  # the aggregator's or the operator's: sealed for sites only
            raise SealError(f"{who}: {other}; weights are sealed for sites only, by sites only")
        if cns != [name]:
            raise SealError(f"{who}: the certificate is of {', '.join(map(str, cns)) or 'nobody'}, not {name!r}; {fix}")
        start, end, now = cert.not_valid_before_utc, cert.not_valid_after_utc, dt.datetime.now(dt.timezone.utc)
        if not start <= now <= end:
            raise SealError(
                f"{who}: the certificate is valid from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC, not now "
                f"({'expired' if now > end else 'check this clock'}); {name!r} needs a new kit (`fl-plugins provision`)"
            )
        pub = cert.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or not isinstance(pub.curve, ec.SECP256R1):
            raise SealError(f"{who}: the certificate's key is not EC P-256; {fix}")
        gone = self.revoked(cert_pem) if self.revoked is not None else None
        if gone is not None:
            why = f"serial {gone.serial:x} on {gone.revoked_at or '?'}" if isinstance(gone, Revoked) else gone
            raise SealError(
                f"{who}: the certificate was revoked ({why}); nothing is sealed for or accepted from it: "
                f"{name!r} needs a new kit (`fl-plugins provision PROJECT.yaml -o kits`)"
            )
        return pub


@dataclass(frozen=True)
class HeaderInfo:
    """What a header says in the clear: the relay checks with it who may put and get a transfer."""

    transfer_id: str
    sender: str
    recipients: tuple[str, ...]


@dataclass(frozen=True)
class _Header:
    signed: bytes  # every byte the signature covers
    transfer_id: str
    sender: str
    cert_pem: bytes
    ephemeral: bytes
    prefix: bytes
    wrapped: dict[str, bytes]
    signature: bytes


class _Reader:
    """Length-prefixed fields out of a buffer, each length checked against the bytes left before slicing."""

    def __init__(self, data: memoryview, where: str) -> None:
        self.data, self.pos, self.where = data, 0, where

    def take(self, n: int, what: str) -> memoryview:
        if n > len(self.data) - self.pos:
            left = len(self.data) - self.pos
            raise SealError(f"{self.where} is truncated: its {what} needs {n} bytes, {left} are left; {_REFETCH}")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def field(self, what: str, limit: int, exact: int | None = None) -> bytes:
        n = int.from_bytes(self.take(2, what), "big")
        if n > limit or (exact is not None and n != exact):
            want = f"{exact}" if exact is not None else f"at most {limit}"
            raise SealError(f"{self.where}: its {what} is {n} bytes ({want}); {_REFETCH}")
        return bytes(self.take(n, what))

    def text(self, what: str) -> str:
        raw = self.field(what, MAX_NAME)
        text = raw.decode("utf-8", "replace")
        if not text or text.encode() != raw:
            raise SealError(f"{self.where}: its {what} is empty or not UTF-8 ({raw[:40]!r}); {_REFETCH}")
        return text


def _parse_header(header: bytes | memoryview, where: str) -> _Header:
    data = memoryview(header).cast("B")
    if len(data) < _HEAD.size + SIG:
        raise SealError(f"{where} is truncated: {len(data)} bytes, shorter than a header can be; {_REFETCH}")
    magic, n = _HEAD.unpack_from(data)
    if magic != HEADER_MAGIC or n > MAX_HEADER or len(data) != _HEAD.size + n + SIG:
        raise SealError(
            f"{where} is not a whole sealed header (magic {magic!r}, {HEADER_MAGIC!r} expected; {len(data)} bytes "
            f"for a {n}-byte body, at most {MAX_HEADER}): truncated or altered; {_REFETCH}"
        )
    r = _Reader(data[_HEAD.size : _HEAD.size + n], where)
    tid, sender = r.text("transfer id"), r.text("sender name")
    cert, eph = r.field("sender certificate", MAX_CERT), r.field("ephemeral key", POINT, POINT)
    prefix, count = r.field("nonce prefix", PREFIX, PREFIX), int.from_bytes(r.take(2, "recipient count"), "big")
    if not 1 <= count <= MAX_RECIPIENTS:
        raise SealError(f"{where}: it lists {count} recipients (1 to {MAX_RECIPIENTS}); {_REFETCH}")
    wrapped: dict[str, bytes] = {}
    for _ in range(count):
        name = r.text("recipient name")
        if name in wrapped:
            raise SealError(f"{where}: it lists recipient {name!r} twice; {_REFETCH}")
        wrapped[name] = r.field("wrapped key", WRAPPED, WRAPPED)
    if r.pos != n:
        raise SealError(f"{where}: {n - r.pos} bytes follow its last field; {_REFETCH}")
    end = _HEAD.size + n
    return _Header(bytes(data[:end]), tid, sender, cert, eph, prefix, wrapped, bytes(data[end:]))


def _verified(h: _Header, certs: Certificates, where: str) -> ec.EllipticCurvePublicKey:
    """The sender's key, once its certificate passes `certs` and the header's signature verifies with it."""
    try:
        pub = certs.check(h.cert_pem, h.sender, "sender")
    except SealError as e:
        raise SealError(f"{where}: {e}") from None
    if not _verify(pub, h.signature, h.signed):
        raise SealError(
            f"{where}: the header's signature does not verify with the certificate of {h.sender!r} it carries: "
            "forged (signed by another key) or altered; ask the sender to seal the transfer again"
        )
    return pub


def header_info(header: bytes | memoryview, certs: Certificates | None = None) -> HeaderInfo:
    """Who sends a transfer to whom, read from its header without a key. With `certs`, also check the sender's
    certificate and the header's signature (SealError if either fails): the relay needs only the CA for it."""
    h = _parse_header(header, "a sealed transfer's header")
    if certs is not None:
        _verified(h, certs, f"transfer {h.transfer_id!r} from {h.sender!r}")
    return HeaderInfo(h.transfer_id, h.sender, tuple(h.wrapped))


def record_index(record: bytes | memoryview) -> int:
    """The index of a sealed record, read without a key (the relay checks the order it stores records in)."""
    return _parse_record(memoryview(record).cast("B"), "a sealed record")[0]


def _parse_record(data: memoryview, where: str) -> tuple[int, bool, memoryview, memoryview]:
    """(index, last, signature, ciphertext || tag) of a record whose layout and lengths hold."""
    head = _RECORD.size + SIG
    if len(data) < head + TAG:
        raise SealError(f"{where} is truncated: {len(data)} bytes, shorter than a record can be; {_REFETCH}")
    magic, index, flags, n = _RECORD.unpack_from(data)
    if magic != RECORD_MAGIC or flags & ~_LAST or n < TAG or len(data) != head + n:
        raise SealError(
            f"{where} is not a whole sealed record (magic {magic!r}, {RECORD_MAGIC!r} expected; flags {flags:#x}; "
            f"{len(data)} bytes for {n} of ciphertext): truncated or altered; {_REFETCH}"
        )
    return index, bool(flags & _LAST), data[_RECORD.size : head], data[head:]


def _lp(raw: bytes) -> bytes:
    return _U16.pack(len(raw)) + raw


def _name(value: str, what: str, where: str) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else b""
    if not 1 <= len(raw) <= MAX_NAME:
        raise SealError(f"{where}: the {what} must be 1 to {MAX_NAME} bytes of UTF-8 text (got {value!r})")
    return raw


def _sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _verify(pub: ec.EllipticCurvePublicKey, sig: bytes | memoryview, data: bytes) -> bool:
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    try:
        pub.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def _kek(shared: bytes, tid: bytes, name: bytes) -> AESGCM:
    return AESGCM(HKDF(hashes.SHA256(), 32, salt=tid, info=KDF_INFO + name).derive(shared))


def _aad(tid: bytes, index: int, last: bool) -> bytes:
    return b"".join((_lp(tid), index.to_bytes(8, "big"), b"\x01" if last else b"\x00"))


def _signed_record(aad: bytes, ct: bytes | memoryview, commit: bool) -> bytes:
    return b"".join((RECORD_CONTEXT, aad, ct[-TAG:], hashlib.sha256(ct).digest() if commit else b""))


class Sealer:
    """Seals one transfer from `me` to `recipients` (name -> certificate PEM), each checked by `certs` before
    anything is sealed. `header` goes first; `seal(i, ...)` makes record i. One stream at a time."""

    def __init__(self, me: Identity, transfer_id: str, recipients: Mapping[str, bytes], certs: Certificates) -> None:
        where = f"transfer {transfer_id!r} from {me.name!r}"
        tid = _name(transfer_id, "transfer id", where)
        if not 1 <= len(recipients) <= MAX_RECIPIENTS:
            raise SealError(f"{where}: seal for 1 to {MAX_RECIPIENTS} recipients (got {len(recipients)})")
        names = {n: _name(n, "recipient name", where) for n in recipients}
        self._key = me.private_key()
        try:
            if certs.check(me.cert_pem, me.name, "sender") != self._key.public_key():
                raise SealError(f"{me.name!r}'s key is not its certificate's; pass the key and certificate of one kit")
            pubs = {n: certs.check(pem, n, "recipient") for n, pem in recipients.items()}
        except SealError as e:
            raise SealError(f"{where}: {e}") from None
        data_key, eph = AESGCM.generate_key(256), ec.generate_private_key(ec.SECP256R1())
        self._prefix = os.urandom(PREFIX)
        body = [_lp(tid), _lp(_name(me.name, "sender name", where)), _lp(me.cert_pem)]
        point = eph.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        body += [_lp(point), _lp(self._prefix), _U16.pack(len(pubs))]
        for n, pub in pubs.items():
            wrap = _kek(eph.exchange(ec.ECDH(), pub), tid, names[n])
            body += [_lp(names[n]), _lp(wrap.encrypt(bytes(12), data_key, _lp(tid) + _lp(names[n])))]
        signed = b"".join((_HEAD.pack(HEADER_MAGIC, sum(map(len, body))), *body))
        self.header: bytes = signed + _sign(self._key, signed)
        self.transfer_id, self.sender, self.recipients = transfer_id, me.name, tuple(pubs)
        self._where, self._tid, self._aead, self._commit = where, tid, AESGCM(data_key), len(pubs) > 1
        self._tags: dict[int, bytes] = {}  # index -> GCM tag: sealing an index again must give the same record
        self._last: int | None = None
        self._top = -1

    def seal(self, index: int, plaintext: bytes | memoryview, *, last: bool) -> bytes:
        """Record `index` of the transfer (`last`: the transfer ends with it). Sealing an index again is allowed
        only with the same plaintext and flag (a resend); other plaintext would reuse the GCM nonce."""
        where = f"{self._where}, record {index}"
        self._check_order(index, last, where)
        try:
            data = memoryview(plaintext).cast("B")
        except TypeError as e:
            raise SealError(f"{where}: the plaintext must be a contiguous bytes-like object ({e})") from None
        if len(data) > MAX_RECORD:
            raise SealError(f"{where}: {len(data)} bytes (at most {MAX_RECORD} per record); split it into records")
        aad = _aad(self._tid, index, last)
        ct = self._aead.encrypt(self._prefix + index.to_bytes(8, "big"), data, aad)
        if self._tags.setdefault(index, ct[-TAG:]) != ct[-TAG:]:
            why = "a record is sealed once (a resend seals the same bytes): send other content in a new transfer"
            raise SealError(f"{where} was sealed before with other bytes or another last flag; {why}")
        if last:
            self._last = index
        self._top = max(self._top, index)
        sig = _sign(self._key, _signed_record(aad, ct, self._commit))
        return b"".join((_RECORD.pack(RECORD_MAGIC, index, _LAST if last else 0, len(ct)), sig, ct))

    def _check_order(self, index: int, last: bool, where: str) -> None:
        if not isinstance(index, int) or not 0 <= index < 1 << 64:
            raise SealError(f"{where}: the index must be an integer from 0 to 2**64-1")
        if self._last is not None and (index > self._last or (last and index != self._last)):
            raise SealError(f"{where}: the transfer already ended with record {self._last}; start a new transfer")
        if last and index < self._top:
            raise SealError(f"{where}: cannot be the last record, record {self._top} was sealed already")


class Opener:
    """Opens one transfer sealed for `me`: checks the header (the sender's certificate from the project's CA,
    named `sender`, not revoked; its signature; `transfer_id`, so a header of another transfer is refused) and
    unwraps the data key; `open(i, record)` checks and decrypts record i."""

    def __init__(self, me: Identity, header: bytes, *, transfer_id: str, sender: str, certs: Certificates) -> None:
        where = f"transfer {transfer_id!r} from {sender!r}"
        h = _parse_header(header, f"{where}: the header")
        if h.transfer_id != transfer_id or h.sender != sender:
            raise SealError(
                f"{where}: the header is of transfer {h.transfer_id!r} from {h.sender!r}: replayed from another "
                f"transfer, or the wrong one fetched; fetch the header of {transfer_id!r} from {sender!r}"
            )
        self._pub = _verified(h, certs, where)
        if me.name not in h.wrapped:
            who = ", ".join(h.wrapped)
            raise SealError(f"{where}: not sealed for {me.name!r} (only for {who}); ask the sender to seal for it")
        tid, name, key = h.transfer_id.encode(), me.name.encode(), me.private_key()
        try:
            eph = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), h.ephemeral)
            wrap = _kek(key.exchange(ec.ECDH(), eph), tid, name)
            data_key = wrap.decrypt(bytes(12), h.wrapped[me.name], _lp(tid) + _lp(name))
        except (ValueError, InvalidTag):
            raise SealError(
                f"{where}: this key does not open the data key sealed for {me.name!r}: it is not the key of "
                f"{me.name!r}'s certificate; open with {me.name!r}'s own kit"
            ) from None
        self.transfer_id, self.sender, self.recipients = transfer_id, sender, tuple(h.wrapped)
        self._where, self._tid, self._prefix = where, tid, h.prefix
        self._aead, self._commit = AESGCM(data_key), len(h.wrapped) > 1
        self.last: int | None = None  # the index of the last record, once opened: the transfer is complete

    def open(self, index: int, record: bytes | memoryview) -> tuple[bytes, bool]:
        """(plaintext, last) of record `index`; SealError for a record of another index (replayed, reordered),
        after the last one, forged, tampered with, or of another transfer."""
        where = f"{self._where}, record {index}"
        got, last, sig, ct = _parse_record(memoryview(record).cast("B"), where)
        if got != index:
            raise SealError(f"{where}: it carries index {got}: replayed or reordered; ask for record {index}")
        if self.last is not None and (index > self.last or (index == self.last) != last):
            raise SealError(f"{where}: the transfer ended with record {self.last}; this record contradicts it")
        aad = _aad(self._tid, index, last)
        if not _verify(self._pub, sig, _signed_record(aad, ct, self._commit)):
            raise SealError(
                f"{where}: its signature does not verify with {self.sender!r}'s certificate: altered, forged, or "
                f"of another transfer; {_REFETCH}"
            )
        try:
            plain = self._aead.decrypt(self._prefix + index.to_bytes(8, "big"), ct, aad)
        except InvalidTag:
            raise SealError(f"{where}: its ciphertext fails AES-GCM's check (altered); {_REFETCH}") from None
        if last:
            self.last = index
        return plain, last


def entropy_bits(data: bytes | memoryview) -> float:
    """The Shannon entropy of `data`'s byte histogram in bits per byte: 8 for uniform bytes; ciphertext of a few
    KiB reads above 7.9, float32 weights well below (their exponent bytes repeat)."""
    import numpy as np

    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    p = counts[counts > 0] / max(int(counts.sum()), 1)
    return float(-(p * np.log2(p)).sum())
