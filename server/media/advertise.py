"""The address a server behind 1:1 NAT tells its viewers (`ice_advertise_address`).

A container on a bridge network with its UDP ports published at the same numbers, or a cloud
machine whose public address maps to a private one: the viewer must send its ICE checks and
media to the public address, while the server's sockets are bound to the private one. aioice
offers only the interfaces' own addresses and has no option to announce another, so the
answer SDP is rewritten: each host candidate of the advertised address's family carries that
address, with its own port, and so does the media section's `c=` line where it named the
replaced address. The sockets are unchanged; the NAT maps address and port back to them.
Candidates of the other family, and server-reflexive and relay candidates, are left as they are.
"""

from __future__ import annotations

import ipaddress
import re

CANDIDATE = re.compile(r"^(a=candidate:\S+ \d+ \S+ \d+ )(\S+)( \d+ typ host\b)", re.M)


def advertise(sdp: str, address: str) -> str:
    """`sdp` with its host candidates (of `address`'s family) naming `address`; "" : as it is."""
    if not address:
        return sdp
    version = ipaddress.ip_address(address).version
    replaced: set[str] = set()

    def swap(match: re.Match[str]) -> str:
        try:
            local = ipaddress.ip_address(match.group(2))
        except ValueError:  # an mDNS name or the like: not ours to change
            return match.group(0)
        if local.version != version:
            return match.group(0)
        replaced.add(match.group(2))
        return match.group(1) + address + match.group(3)

    sdp = CANDIDATE.sub(swap, sdp)
    kind = "IP4" if version == 4 else "IP6"
    for local_address in replaced:
        sdp = re.sub(
            rf"^c=IN {kind} {re.escape(local_address)}(?=\r?$)",
            f"c=IN {kind} {address}",
            sdp,
            flags=re.M,
        )
    return sdp
