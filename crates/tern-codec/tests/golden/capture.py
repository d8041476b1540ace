#!/usr/bin/env python3
"""Capture golden QEMU migration streams for the tests of crates/tern-codec.

Run from anywhere (python3, stdlib only; needs qemu-system-x86_64 and zstd):

    python3 crates/tern-codec/tests/golden/capture.py

Writes, next to this script, NAME.qemu.zst (zstd -19) for:

  idle      plain precopy of a running guest that increments one counter
  iterate   precopy with >= MIN_SYNCS dirty-sync passes of a guest dirtying 128 pages
  xbzrle    as iterate, with capability xbzrle (stream holds XBZRLE records, 0x40)
  compress  as iterate, with capability compress (COMPRESS_PAGE records, 0x100)

Capability `events` is on in all. Every QEMU started here is killed before exit.
"""

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
QEMU = "qemu-system-x86_64"

LOAD_ADDR = 0x0010_0000
HEADER_BYTES = 32
MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_AOUT_KLUDGE = 1 << 16

COUNTER_ADDR = 0x0020_0000  # idle guest: one counter
DIRTY_BASE = 0x0040_0000  # busy guest: first of DIRTY_PAGES pages
DIRTY_PAGES = 128
PAGE = 4096

MIN_SYNCS = 4  # dirty-sync-count reached before letting the migration finish
TIMEOUT = 180.0  # seconds for one capture


# --------------------------------------------------------------------------- guest


def multiboot_image(message, busy):
    """Multiboot v1 a.out-kludge image (same header as crates/tern-vm/src/testkernel.rs).

    Prints `message` on COM1, then loops forever:
      busy=False: inc dword [COUNTER_ADDR]
      busy=True:  for page in 0..DIRTY_PAGES: inc dword [DIRTY_BASE + page*4096]
    """
    msg = message.encode()
    assert b"\0" not in msg
    entry = LOAD_ADDR + HEADER_BYTES
    code = bytearray()
    code += b"\xba\xf8\x03\x00\x00"  # mov edx, 0x3f8
    code += b"\xbe"  # mov esi, imm32 (message address, patched below)
    msg_at = len(code)
    code += b"\0\0\0\0"
    # next: lodsb; test al,al; jz done; out dx,al; jmp next
    code += b"\xac\x84\xc0\x74\x03\xee\xeb\xf8"
    # done:
    if busy:
        end = DIRTY_BASE + DIRTY_PAGES * PAGE
        outer = len(code)
        code += b"\xb8" + struct.pack("<I", DIRTY_BASE)  # outer: mov eax, DIRTY_BASE
        inner = len(code)
        code += b"\xff\x00"  # inner: inc dword [eax]
        code += b"\x05" + struct.pack("<I", PAGE)  # add eax, 4096
        code += b"\x3d" + struct.pack("<I", end)  # cmp eax, end
        code += b"\x72" + struct.pack("<b", inner - (len(code) + 2))  # jb inner
        code += b"\xeb" + struct.pack("<b", outer - (len(code) + 2))  # jmp outer
    else:
        code += b"\xff\x05" + struct.pack("<I", COUNTER_ADDR)  # inc dword [COUNTER_ADDR]
        code += b"\xeb\xf8"  # jmp back to the inc
    msg_addr = entry + len(code)
    code[msg_at:msg_at + 4] = struct.pack("<I", msg_addr)
    flags = MULTIBOOT_AOUT_KLUDGE
    header = struct.pack(
        "<8I",
        MULTIBOOT_MAGIC,
        flags,
        (-(MULTIBOOT_MAGIC + flags)) & 0xFFFFFFFF,
        LOAD_ADDR,  # header_addr
        LOAD_ADDR,  # load_addr
        0,  # load_end_addr: whole file
        0,  # bss_end_addr: none
        entry,
    )
    return header + bytes(code) + msg + b"\0"


# --------------------------------------------------------------------------- QMP


class Qmp:
    def __init__(self, path, timeout=10.0):
        deadline = time.time() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(30)
        self.buf = b""
        self.events = []
        greeting = self._read()
        assert "QMP" in greeting, greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP socket closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise RuntimeError(f"{name} {args}: {r['error']}")
            return r["return"]

    def close(self):
        self.sock.close()


# --------------------------------------------------------------------------- capture


def start_qemu(tmp, kernel):
    qmp_path = os.path.join(tmp, "qmp.sock")
    args = [
        QEMU,
        "-machine", "pc", "-accel", "tcg", "-nodefaults", "-no-user-config",
        "-m", "65540K",  # not a multiple of 256 KiB: works around a 7.2 TCG dirty-log bug
        "-display", "none",
        "-kernel", kernel,
        "-serial", "file:" + os.path.join(tmp, "serial.log"),
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
    ]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(tmp, "qemu.err"), "wb"))
    try:
        qmp = Qmp(qmp_path)
    except Exception:
        proc.kill()
        proc.wait()
        raise
    return proc, qmp


def read_guest_u32(qmp, addr):
    out = qmp.cmd("human-monitor-command", **{"command-line": f"xp /1wx {addr:#x}"})
    return int(out.split(":")[1].split()[0], 16)


def capture(name, caps, params, iterate, workdir):
    tmp = tempfile.mkdtemp(prefix=f"capture-{name}-", dir=workdir)
    kernel = os.path.join(tmp, "kernel.bin")
    with open(kernel, "wb") as f:
        f.write(multiboot_image(f"tern golden guest {name}\n", busy=iterate))
    out = os.path.join(tmp, f"{name}.qemu")
    proc, qmp = start_qemu(tmp, kernel)
    info = {"name": name}
    try:
        # The guest must be up and dirtying memory.
        probe = DIRTY_BASE + (DIRTY_PAGES - 1) * PAGE if iterate else COUNTER_ADDR
        deadline = time.time() + 20
        first = read_guest_u32(qmp, probe)
        while read_guest_u32(qmp, probe) == first:
            if time.time() > deadline:
                raise RuntimeError(f"{name}: guest does not run (counter at {probe:#x} stuck)")
            time.sleep(0.1)
        time.sleep(0.3)

        capabilities = [{"capability": c, "state": True} for c in ["events"] + caps]
        qmp.cmd("migrate-set-capabilities", capabilities=capabilities)
        if params:
            qmp.cmd("migrate-set-parameters", **params)
        qmp.cmd("migrate", uri=f"exec:cat > {out}")

        released = not iterate
        deadline = time.time() + TIMEOUT
        while True:
            st = qmp.cmd("query-migrate")
            status = st.get("status")
            ram = st.get("ram", {})
            if status == "completed":
                info["final"] = ram
                break
            if status in ("failed", "cancelled"):
                raise RuntimeError(f"{name}: migration {status}: {st}")
            if not released and ram.get("dirty-sync-count", 0) >= MIN_SYNCS:
                info["at_release"] = {k: ram.get(k) for k in
                                      ("dirty-sync-count", "dirty-pages-rate", "transferred")}
                qmp.cmd("migrate-set-parameters", **{"downtime-limit": 2000000})
                released = True
            if time.time() > deadline:
                raise RuntimeError(f"{name}: migration did not finish: {st}")
            time.sleep(0.05)
        if caps:
            info["xbzrle-cache"] = st.get("xbzrle-cache")
            info["compression"] = st.get("compression")
        info["events"] = sorted({e["data"]["status"] for e in qmp.events
                                 if e.get("event") == "MIGRATION"})
        try:
            qmp.cmd("quit")
        except (EOFError, OSError):
            pass
        proc.wait(timeout=10)
    finally:
        qmp.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # `cat` (QEMU's child) exits once QEMU closed the pipe; wait for the file to settle.
    size = -1
    for _ in range(50):
        time.sleep(0.1)
        now = os.path.getsize(out)
        if now == size:
            break
        size = now
    info["raw_bytes"] = size
    dest = os.path.join(HERE, f"{name}.qemu.zst")
    subprocess.run(["zstd", "-19", "-q", "-f", out, "-o", dest], check=True)
    info["zst_bytes"] = os.path.getsize(dest)
    return info


def main():
    if shutil.which("zstd") is None:
        subprocess.run(["apt-get", "update"], check=True)
        subprocess.run(["apt-get", "install", "-y", "zstd"], check=True)
    slow = {"downtime-limit": 1, "max-bandwidth": 2 * 1024 * 1024}
    runs = [
        ("idle", [], {}, False),
        ("iterate", [], dict(slow), True),
        ("xbzrle", ["xbzrle"], dict(slow, **{"xbzrle-cache-size": 8 * 1024 * 1024}), True),
        ("compress", ["compress"], dict(slow, **{"compress-threads": 2}), True),
    ]
    only = sys.argv[1:]
    workdir = tempfile.mkdtemp(prefix="tern-golden-")
    try:
        for name, caps, params, iterate in runs:
            if only and name not in only:
                continue
            info = capture(name, caps, params, iterate, workdir)
            print(json.dumps(info, sort_keys=True))
            sys.stdout.flush()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
