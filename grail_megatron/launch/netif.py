"""Which network interface NCCL/GLOO (and Ray) should use on a node.

`python -m grail_megatron.launch.netif [--iface NAME]` prints `<interface> <IPv4 address>`
(the address is `-` if the interface has none). Default choice: the interface of the IPv4 default route (the one that reaches
the other nodes on ordinary clusters), else the first non-loopback interface that has an
address, else `lo`. Users with InfiniBand/RoCE or several Ethernet ports set
`GM_SOCKET_IFNAME` (or NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME) instead.
"""
from __future__ import annotations

import argparse
import fcntl
import socket
import struct
import sys
from pathlib import Path

_SIOCGIFADDR = 0x8915


def default_route_interface(route_table: str | None = None) -> str | None:
    """Interface of the IPv4 default route, read from /proc/net/route (or the given text)."""
    text = route_table if route_table is not None else _read("/proc/net/route")
    for line in text.splitlines()[1:]:
        fields = line.split()
        # Destination 00000000 and the RTF_UP flag (0x1): the default route.
        if len(fields) >= 4 and fields[1] == "00000000" and int(fields[3], 16) & 0x1:
            return fields[0]
    return None


def interface_ipv4(name: str) -> str | None:
    """IPv4 address of an interface, or None if it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def interfaces() -> list[str]:
    return [line.split(":")[0].strip() for line in _read("/proc/net/dev").splitlines()[2:] if ":" in line]


def detect_interface() -> str:
    route = default_route_interface()
    if route and interface_ipv4(route):
        return route
    for name in interfaces():
        if name != "lo" and interface_ipv4(name):
            return name
    return "lo"


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grail_megatron.launch.netif", description=__doc__.split("\n")[0])
    parser.add_argument("--iface", help="report this interface instead of detecting one")
    args = parser.parse_args(argv)
    name = args.iface or detect_interface()
    if args.iface and args.iface not in interfaces():
        print(f"no network interface {args.iface!r} (interfaces: {', '.join(interfaces()) or 'none'})", file=sys.stderr)
        return 1
    print(name, interface_ipv4(name) or "-")
    return 0


if __name__ == "__main__":
    sys.exit(main())
