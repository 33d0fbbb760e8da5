"""One MX hop: the value routing produces and the SMTP client consumes.

It lives in its own tiny module, below both of them, so that routing (DNS)
and the SMTP client (sockets) share one type without either importing the
other: the scheduler hands ``Route.hops`` to ``ConnectionPool.send`` as they are.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Hop:
    """One address to try, in order.

    ``mx_host`` is the name to expect in TLS certificates (and to send as SNI);
    ``preference`` is the MX preference it came from (0 for static routes,
    literals and implicit MX).
    """

    mx_host: str
    address: str
    port: int = 25
    preference: int = 0

    @property
    def label(self) -> str:
        """``mx.example[192.0.2.1]:25``, how logs and reply texts name this hop."""
        return f"{self.mx_host}[{self.address}]:{self.port}"
