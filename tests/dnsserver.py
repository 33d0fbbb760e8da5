"""A real authoritative DNS server on loopback, for tests.

Delivery code must be tested against real DNS traffic, not a patched
resolver: this server speaks the wire protocol (UDP, and TCP on the same port
for truncated answers) with dnspython's message parser, serves records given
as data, and injects faults (SERVFAIL, REFUSED, or never answering) per name.
It runs in background threads, so tests on any event loop (or none) can use
it, and it counts every question so a test can prove that a cache held.

Records are a mapping ``name -> {rdtype: rdata}`` where rdata is one string,
a list of strings, or ``(ttl, strings)``; or a name maps to a fault:
``"SERVFAIL"``, ``"REFUSED"`` or ``"TIMEOUT"``::

    srv = DnsServer({
        "example.test": {"MX": ["10 mx1.example.test.", "20 mx2.example.test."]},
        "mx1.example.test": {"A": "127.0.0.1", "AAAA": "::1"},
        "mx2.example.test": {"A": (1, ["127.0.0.2"])},        # TTL 1 s
        "nullmx.test": {"MX": "0 ."},
        "broken.test": "SERVFAIL",
        "slow.test": "TIMEOUT",
    })

Zone-file text works too (``DnsServer(zone_text, origin="example.test")``).
Names not given answer NXDOMAIN; a name that exists without the asked type
answers NODATA. Negative answers carry an SOA (owner: the name's top-level
label) whose minimum is ``negative_ttl``, so resolvers can cache them.

Use the ``dns_server`` fixture factory (``from tests.dnsserver import
dns_server`` in a test module, or list ``"tests.dnsserver"`` in conftest's
``pytest_plugins``): ``host, port = dns_server(records)``
(the returned :class:`DnsServer` unpacks to its address, and also offers
``set_records``, ``set_fault``, ``count`` and ``queries``). Every server the
factory started is stopped at teardown.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.zone
import pytest

RdataSpec = Union[str, Sequence[str], tuple[int, Sequence[str]]]
Records = Mapping[str, Mapping[str, RdataSpec] | str]

FAULTS = ("SERVFAIL", "REFUSED", "TIMEOUT")
_MAX_CHAIN = 8


@dataclass(frozen=True)
class Query:
    """One question the server received."""

    name: str  # lower case, no trailing dot
    rdtype: str  # "MX", "A", ...
    transport: str  # "udp" or "tcp"


def _name(text: str | dns.name.Name) -> dns.name.Name:
    if isinstance(text, dns.name.Name):
        return text if text.is_absolute() else text.concatenate(dns.name.root)
    return dns.name.from_text(text.rstrip(".") + "." if text not in ("", ".") else ".")


def _label(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower() or "."


class DnsServer:
    """Authoritative test DNS server answering from in-memory records.

    Thread-safe: records and faults may be changed while it runs (e.g. to test
    that a cache expires after the TTL and then sees the new data).
    """

    def __init__(
        self,
        records: Records | str | None = None,
        *,
        origin: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        tcp: bool = True,
        default_ttl: int = 300,
        negative_ttl: int = 1,
    ) -> None:
        self.host = host
        self.port = port
        self.tcp = tcp
        self.default_ttl = default_ttl
        self.negative_ttl = negative_ttl
        self._lock = threading.Lock()
        self._rrsets: dict[dns.name.Name, dict[int, dns.rrset.RRset]] = {}
        self._faults: dict[dns.name.Name, str] = {}
        self._queries: list[Query] = []
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        if isinstance(records, str):
            self.load_zone_text(records, origin)
        elif records:
            for owner, spec in records.items():
                if isinstance(spec, str):
                    self.set_fault(owner, spec)
                else:
                    for rdtype, rdata in spec.items():
                        self.set_records(owner, rdtype, rdata)

    # ----- data -------------------------------------------------------------

    def set_records(self, name: str, rdtype: str, rdata: RdataSpec, ttl: int | None = None) -> None:
        """Replace the ``rdtype`` records of ``name`` (an empty list deletes them)."""
        if isinstance(rdata, tuple) and rdata and isinstance(rdata[0], int):
            ttl, rdata = rdata[0], rdata[1]  # type: ignore[misc]
        texts = [rdata] if isinstance(rdata, str) else list(rdata)  # type: ignore[arg-type]
        owner = _name(name)
        rtype = dns.rdatatype.from_text(rdtype)
        with self._lock:
            if not texts:
                self._rrsets.get(owner, {}).pop(rtype, None)
                return
            rrset = dns.rrset.RRset(owner, dns.rdataclass.IN, rtype)
            for text in texts:
                rd = dns.rdata.from_text(
                    dns.rdataclass.IN, rtype, str(text), origin=dns.name.root, relativize=False
                )
                rrset.add(rd, self.default_ttl if ttl is None else ttl)
            self._rrsets.setdefault(owner, {})[rtype] = rrset

    def delete(self, name: str) -> None:
        """Forget every record and fault of ``name`` (it answers NXDOMAIN again)."""
        owner = _name(name)
        with self._lock:
            self._rrsets.pop(owner, None)
            self._faults.pop(owner, None)

    def set_fault(self, name: str, fault: str | None) -> None:
        """Make ``name`` answer SERVFAIL or REFUSED, or never answer (TIMEOUT); None clears it."""
        owner = _name(name)
        with self._lock:
            if fault is None:
                self._faults.pop(owner, None)
                return
            if fault.upper() not in FAULTS:
                raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
            self._faults[owner] = fault.upper()

    def load_zone_text(self, text: str, origin: str | None = None) -> None:
        """Add every record of a zone file (``$ORIGIN`` in the text or ``origin``)."""
        zone = dns.zone.from_text(
            text, origin=origin, relativize=False, check_origin=False
        )
        for owner, rdataset in zone.iterate_rdatasets():
            rrset = dns.rrset.RRset(_name(owner), rdataset.rdclass, rdataset.rdtype)
            rrset.update(rdataset)
            with self._lock:
                self._rrsets.setdefault(rrset.name, {})[rrset.rdtype] = rrset

    # ----- query log --------------------------------------------------------

    @property
    def queries(self) -> list[Query]:
        with self._lock:
            return list(self._queries)

    def count(self, name: str | None = None, rdtype: str | None = None) -> int:
        """How many questions matched ``name`` and/or ``rdtype`` (case-insensitive)."""
        want_name = name.rstrip(".").lower() if name is not None else None
        want_type = rdtype.upper() if rdtype is not None else None
        return sum(
            1
            for q in self.queries
            if (want_name is None or q.name == want_name) and (want_type is None or q.rdtype == want_type)
        )

    def reset_counts(self) -> None:
        with self._lock:
            self._queries.clear()

    # ----- answering --------------------------------------------------------

    def _exists(self, name: dns.name.Name) -> bool:
        """A name exists if it owns data or has descendants (empty non-terminal)."""
        if name in self._faults or self._rrsets.get(name):
            return True
        return any(n.is_subdomain(name) and rrs for n, rrs in self._rrsets.items())

    def _soa(self, qname: dns.name.Name) -> dns.rrset.RRset:
        owner = dns.name.Name(qname.labels[-2:]) if len(qname.labels) >= 2 else dns.name.root
        return dns.rrset.from_text(
            owner,
            self.negative_ttl,
            "IN",
            "SOA",
            f"ns.{owner.to_text()} hostmaster.{owner.to_text()} 1 3600 600 86400 {self.negative_ttl}",
        )

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        """The response bytes for a query, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # garbage: a real server would drop it too
        response = dns.message.make_response(query)
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        with self._lock:
            self._queries.append(Query(_label(qname), dns.rdatatype.to_text(qtype), transport))
            fault = self._faults.get(qname)
            if fault == "TIMEOUT":
                return None
            if fault is not None:
                response.set_rcode(dns.rcode.from_text(fault))
                return response.to_wire()
            response.flags |= dns.flags.AA
            self._fill(response, qname, qtype)
        max_size = 65535 if transport == "tcp" else max(512, query.payload if query.edns >= 0 else 512)
        try:
            return response.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            return truncated.to_wire()

    def _fill(self, response: dns.message.Message, qname: dns.name.Name, qtype: int) -> None:
        """Answer section (following CNAMEs inside our data), or a negative answer with SOA."""
        name = qname
        for _ in range(_MAX_CHAIN):
            rrsets = self._rrsets.get(name, {})
            if qtype in rrsets:
                response.answer.append(rrsets[qtype])
                return
            cname = rrsets.get(dns.rdatatype.CNAME)
            if cname is None or qtype == dns.rdatatype.CNAME:
                break
            response.answer.append(cname)
            name = cname[0].target
        if not self._exists(name):
            response.set_rcode(dns.rcode.NXDOMAIN)
        response.authority.append(self._soa(name))

    # ----- lifecycle --------------------------------------------------------

    def start(self) -> DnsServer:
        """Bind UDP (and TCP on the same port) and serve in daemon threads."""
        server = self
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        class UDPHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                out = server.answer(data, "udp")
                if out is not None:
                    sock.sendto(out, self.client_address)

        class TCPHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock = self.request
                sock.settimeout(10)
                try:
                    while True:
                        head = _recv_exact(sock, 2)
                        if head is None:
                            return
                        body = _recv_exact(sock, struct.unpack("!H", head)[0])
                        if body is None:
                            return
                        out = server.answer(body, "tcp")
                        if out is not None:
                            sock.sendall(struct.pack("!H", len(out)) + out)
                except OSError:
                    return

        class UDPServer(socketserver.UDPServer):
            address_family = family

        class TCPServer(socketserver.ThreadingTCPServer):
            address_family = family
            allow_reuse_address = True
            daemon_threads = True
            block_on_close = False

        last_error: OSError | None = None
        for _ in range(20):  # an ephemeral UDP port may be taken on TCP: pick another
            udp = UDPServer((self.host, self.port), UDPHandler)
            port = udp.server_address[1]
            if not self.tcp:
                self._servers = [udp]
                break
            try:
                tcp = TCPServer((self.host, port), TCPHandler)
            except OSError as exc:
                udp.server_close()
                last_error = exc
                if self.port:
                    raise
                continue
            self._servers = [udp, tcp]
            break
        else:
            raise RuntimeError(f"no free UDP+TCP port on {self.host}: {last_error}")
        self.port = port
        for srv in self._servers:
            t = threading.Thread(
                target=srv.serve_forever, kwargs={"poll_interval": 0.05}, name=f"dns-{port}", daemon=True
            )
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._servers, self._threads = [], []

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- address ----------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def nameserver(self) -> str:
        """``"host:port"`` as the ``[routing] nameservers`` config takes it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __iter__(self) -> Iterator[Any]:
        """So that ``host, port = dns_server(records)`` works."""
        return iter(self.address)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


@pytest.fixture
def dns_server() -> Iterator[Callable[..., DnsServer]]:
    """Factory: ``dns_server(records, **kwargs) -> DnsServer`` (unpacks to ``(host, port)``).

    Each call starts a new server (on 127.0.0.1 and an ephemeral port unless
    ``host=``/``port=`` say otherwise); all are stopped at teardown.
    """
    started: list[DnsServer] = []

    def factory(records: Records | str | None = None, **kwargs: Any) -> DnsServer:
        srv = DnsServer(records, **kwargs).start()
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        srv.stop()
