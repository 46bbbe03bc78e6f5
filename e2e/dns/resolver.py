"""A pod's original resolver, for the mesh DNS test: answers A queries for the names given on
the command line (NAME=IP ...) and NXDOMAIN for every other, over UDP; logs each name asked.

Usage: resolver.py BIND_IP PORT NAME=IP [NAME=IP ...]
"""
import socket
import struct
import sys


def main():
    bind, port = sys.argv[1], int(sys.argv[2])
    table = {}
    for arg in sys.argv[3:]:
        name, ip = arg.split("=", 1)
        table[name.lower().rstrip(".")] = socket.inet_aton(ip)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((bind, port))
    while True:
        data, peer = s.recvfrom(4096)
        if len(data) < 12:
            continue
        qid, _flags, qd = struct.unpack("!HHH", data[:6])
        # The question: labels, then type and class.
        i, labels = 12, []
        while i < len(data) and data[i] != 0:
            n = data[i]
            labels.append(data[i + 1 : i + 1 + n].decode("ascii", "replace"))
            i += 1 + n
        question = data[12 : i + 5]
        qtype = struct.unpack("!H", data[i + 1 : i + 3])[0] if i + 3 <= len(data) else 0
        name = ".".join(labels).lower()
        print(f"asked {name} type {qtype}", flush=True)
        ip = table.get(name)
        if ip is not None and qtype == 1:
            header = struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0)
            answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + ip
        elif ip is not None:
            header = struct.pack("!HHHHHH", qid, 0x8180, 1, 0, 0, 0)
            answer = b""
        else:
            header = struct.pack("!HHHHHH", qid, 0x8183, 1, 0, 0, 0)
            answer = b""
        s.sendto(header + question + answer, peer)


if __name__ == "__main__":
    main()
