#!/usr/bin/env python3
"""Throw-away checker of the golden QEMU 7.2 migration streams (python3, stdlib only).

    python3 crates/tern-codec/tests/golden/inspect.py [FILE.qemu.zst ...]

Parses the stream up to the first FULL section (or the first section that is not "ram")
and prints record counts. Exits non-zero if a stream does not parse cleanly.
"""

import glob
import json
import os
import struct
import subprocess
import sys
import zlib
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))

MAGIC = 0x5145564D
VERSION = 3

EOF, START, PART, END, FULL, SUBSECTION, VMDESC, CONFIG, COMMAND = 0, 1, 2, 3, 4, 5, 6, 7, 8
FOOTER = 0x7E

F_ZERO, F_MEM_SIZE, F_PAGE, F_EOS, F_CONTINUE, F_XBZRLE, F_COMPRESS = (
    0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x100)
KINDS = {F_ZERO: "ZERO", F_PAGE: "PAGE", F_XBZRLE: "XBZRLE", F_COMPRESS: "COMPRESS"}


class Bad(Exception):
    pass


class Reader:
    def __init__(self, data):
        self.d = data
        self.pos = 0

    def take(self, n):
        if self.pos + n > len(self.d):
            raise Bad(f"truncated at {self.pos} (wanted {n} bytes)")
        b = self.d[self.pos:self.pos + n]
        self.pos += n
        return b

    def u8(self):
        return self.take(1)[0]

    def be16(self):
        return struct.unpack(">H", self.take(2))[0]

    def be32(self):
        return struct.unpack(">I", self.take(4))[0]

    def be64(self):
        return struct.unpack(">Q", self.take(8))[0]

    def idstr(self):
        return self.take(self.u8()).decode()

    def peek(self):
        return self.d[self.pos] if self.pos < len(self.d) else None


def parse_config(r, out):
    name = r.take(r.be32()).decode()
    out["machine"] = name
    subs = []
    while r.peek() == SUBSECTION:
        r.u8()
        sub = r.idstr()
        r.be32()  # version
        if sub == "configuration/target-page-bits":
            subs.append(f"{sub}={r.be32()}")
        elif sub == "configuration/capabilities":
            caps = [r.idstr() for _ in range(r.be32())]
            subs.append(f"{sub}={caps}")
        elif sub == "configuration/uuid":
            subs.append(f"{sub}={r.take(16).hex()}")
        else:
            raise Bad(f"unknown configuration subsection {sub!r}")
    out["config_subsections"] = subs


def parse_ram(r, st, first):
    """RAM section data up to and including EOS."""
    while True:
        at = r.pos
        word = r.be64()
        flags = word & 0xFFF
        addr = word & ~0xFFF
        if flags & F_MEM_SIZE:
            if not first:
                raise Bad(f"MEM_SIZE outside START at {at}")
            total, acc = addr, 0
            while acc < total:
                blk = r.idstr()
                used = r.be64()
                st["blocks"][blk] = used
                acc += used
            if acc != total:
                raise Bad(f"MEM_SIZE sum {acc} != {total}")
            st["mem_size"] = total
            flags &= ~F_MEM_SIZE
            if not flags:
                continue
        if flags == F_EOS:
            st["counts"]["EOS"] += 1
            return
        kind = flags & ~F_CONTINUE
        if kind not in KINDS:
            raise Bad(f"unknown RAM flags {flags:#x} at {at}")
        if flags & F_CONTINUE:
            if st["block"] is None:
                raise Bad(f"CONTINUE with no current block at {at}")
        else:
            st["block"] = r.idstr()
            if st["block"] not in st["blocks"]:
                raise Bad(f"unknown block {st['block']!r} at {at}")
        if addr >= st["blocks"][st["block"]]:
            raise Bad(f"addr {addr:#x} beyond block {st['block']} at {at}")
        if kind == F_ZERO:
            r.u8()
        elif kind == F_PAGE:
            r.take(4096)
        elif kind == F_XBZRLE:
            if r.u8() != 1:
                raise Bad(f"XBZRLE encoding byte != 1 at {at}")
            r.take(r.be16())
        elif kind == F_COMPRESS:
            n = r.be32()
            page = zlib.decompress(r.take(n))
            if len(page) != 4096:
                raise Bad(f"COMPRESS_PAGE inflates to {len(page)} bytes at {at}")
        st["counts"][KINDS[kind]] += 1
        if kind != F_ZERO:
            st["sends"][(st["block"], addr)] += 1


def vmdesc_tail(data):
    """Find the trailing EOF + VMDESCRIPTION (be32 len + JSON that ends the file)."""
    lo = max(0, len(data) - (1 << 20))
    p = data.rfind(b"\x06", lo)
    while p >= lo:
        if p + 5 <= len(data) and struct.unpack(">I", data[p + 1:p + 5])[0] == len(data) - p - 5:
            if data[p - 1] == EOF:
                desc = json.loads(data[p + 5:])
                return p - 1, len(data) - p - 5, len(desc.get("devices", []))
        p = data.rfind(b"\x06", lo, p)
    raise Bad("no trailing EOF + VMDESCRIPTION")


def inspect(path):
    raw = subprocess.run(["zstd", "-dc", path], check=True, capture_output=True).stdout
    r = Reader(raw)
    out = {"file": os.path.basename(path), "zst_bytes": os.path.getsize(path),
           "raw_bytes": len(raw)}
    if r.be32() != MAGIC or r.be32() != VERSION:
        raise Bad("bad magic/version")
    st = {"blocks": {}, "block": None, "counts": Counter(), "sends": Counter()}
    sections = Counter()
    footers = 0
    commands = []
    ram_id = None
    stop = None
    while stop is None:
        at = r.pos
        kind = r.u8()
        if kind == CONFIG:
            parse_config(r, out)
            sections["CONFIGURATION"] += 1
            continue
        if kind == COMMAND:
            cmd, n = r.be16(), r.be16()
            r.take(n)
            commands.append(cmd)
            continue
        if kind == EOF:
            stop = f"EOF at {at}"
            break
        if kind in (START, FULL):
            sid = r.be32()
            idstr = r.idstr()
            r.be32()  # instance_id
            r.be32()  # version_id
            if kind == FULL or idstr != "ram":
                stop = f"{'FULL' if kind == FULL else 'START'} section {idstr!r} at offset {at}"
                break
            ram_id = sid
            sections["START"] += 1
            parse_ram(r, st, first=True)
        elif kind in (PART, END):
            sid = r.be32()
            if sid != ram_id:
                stop = f"non-ram section id {sid} at offset {at}"
                break
            sections["PART" if kind == PART else "END"] += 1
            parse_ram(r, st, first=False)
        else:
            raise Bad(f"unknown record type {kind:#x} at {at}")
        if r.u8() != FOOTER or r.be32() != sid:
            raise Bad(f"footer mismatch after section starting at {at}")
        footers += 1
    eof_at, desc_len, ndev = vmdesc_tail(raw)
    resent = [n for n in st["sends"].values() if n > 1]
    out.update({
        "sections": dict(sections),
        "commands": commands,
        "counts": {k: st["counts"][k] for k in ("PAGE", "ZERO", "XBZRLE", "COMPRESS", "EOS")},
        "blocks": st["blocks"],
        "mem_size": st.get("mem_size"),
        "stopped": stop,
        "footers_ok": footers,
        "pages_sent_more_than_once": len(resent),
        "max_sends_of_one_page": max(st["sends"].values(), default=0),
        "vmdesc": f"EOF at {eof_at}, {desc_len} bytes of JSON, {ndev} devices",
    })
    return out


def main():
    files = sys.argv[1:] or [os.path.join(HERE, f"{n}.qemu.zst")
                             for n in ("idle", "iterate", "xbzrle", "compress")]
    failed = 0
    for path in files:
        try:
            out = inspect(path)
        except Bad as e:
            print(f"{path}: FAILED: {e}")
            failed += 1
            continue
        print(f"== {out.pop('file')}")
        for k, v in out.items():
            print(f"  {k}: {v}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
