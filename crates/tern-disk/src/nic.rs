//! PipeCloud's output gate in front of a protected VM's switch port (driver).
//!
//! QEMU's NIC (`-netdev stream`) connects to this socket instead of the site switch; the
//! disk server connects to the switch on the VM's behalf. Frames from the switch to the VM
//! pass at once. Frames from the VM are tagged with the volume's write counter when they
//! arrive and leave, in order, once the backup's committed counter reaches the tag
//! (`tern_gate::Gate`). The counters live in this same process, and a write's counter is
//! taken before its NBD reply goes out, so a packet that depends on a write (the guest can
//! only send it after the reply) is always tagged with it.
//!
//! With peer tiers (`GateOptions::peers`, PipeCloud's multi-tier case) frames to a peer pass
//! at once with a clock trailer (`tern_gate::Group`); frames from a peer have theirs
//! stripped and taken in before the guest sees them; frames leaving the group wait for our
//! disk and for every peer disk they depend on, whose committed counters the peer servers
//! publish in their counter pages (`counters.rs`).
//!
//! A MAC proves nothing, so with peers the gate's switch connection is a *gated* port
//! (`tern_node::switch`, port security): it opens with a marked hello naming the VM's MAC
//! (the only MAC the port may source); frames to peers go marked, so the switch delivers them
//! only to the gated port bound to that peer (never flooded: they passed unheld); and the
//! switch marks the frames it delivers here whose source is the gated port bound to the
//! source MAC. Only those trailers are taken in.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tern_gate::Outcome;
use tern_node::switch::{FrameDecoder, encode_frame, encode_marked, hello_frame};

use crate::counters::CounterPage;
use crate::server::Shared;

/// How often a gate holding frames looks at its peers' counter pages.
const PEER_POLL: Duration = Duration::from_millis(1);

/// Serves QEMU NIC connections on `listener` (one at a time), each bridged to `switch`.
pub(crate) fn serve(sh: Arc<Shared>, listener: UnixListener, switch: PathBuf) {
    for vm in listener.incoming() {
        if sh.stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(vm) = vm else { continue };
        // A hello on this socket is trusted by the switch (marks): only QEMU as root or
        // this server's user may connect.
        if !tern_os::unix::peer_allowed(&vm, None) {
            eprintln!("tern disk: gate: refused a NIC connection from another user");
            continue;
        }
        let sw = match UnixStream::connect(&switch) {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "tern disk: gate: cannot reach the switch {}: {e}",
                    switch.display()
                );
                continue;
            }
        };
        if let Err(e) = bridge(&sh, vm, sw) {
            eprintln!("tern disk: gate: {e}");
        }
    }
}

fn bridge(sh: &Arc<Shared>, vm: UnixStream, mut sw: UnixStream) -> std::io::Result<()> {
    let t0 = Instant::now();
    let hello = {
        let g = sh.lock();
        g.group.as_ref().map(|group| group.me())
    };
    if let Some(mac) = hello {
        // First on the connection, before any frame of the VM.
        let mut h = Vec::new();
        encode_marked(&hello_frame(mac), true, &mut h);
        sw.write_all(&h)?;
    }
    let now_ns = move || t0.elapsed().as_nanos() as u64;
    // Switch -> VM: bytes as they come; with peers, frame by frame (their clocks).
    let (mut from_sw, mut to_vm) = (sw.try_clone()?, vm.try_clone()?);
    let grouped = sh.lock().group.is_some();
    let sh_in = sh.clone();
    let inbound = std::thread::spawn(move || {
        if grouped {
            let _ = inbound_grouped(&sh_in, &mut from_sw, &mut to_vm);
        } else {
            let _ = std::io::copy(&mut from_sw, &mut to_vm);
        }
        let _ = to_vm.shutdown(std::net::Shutdown::Both);
    });
    let peer_paths: Vec<PathBuf> = sh
        .opts()
        .gate
        .as_ref()
        .map(|g| g.peers.iter().map(|(_, p)| p.clone()).collect())
        .unwrap_or_default();
    // VM -> gate, and a releaser gate -> switch.
    let mut to_sw = sw.try_clone()?;
    let sh2 = sh.clone();
    let releaser = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut pages: Vec<Option<CounterPage>> = peer_paths.iter().map(|_| None).collect();
        loop {
            let mut g = sh2.lock();
            loop {
                // Frames that passed at once first: they arrived before anything held.
                out.append(&mut g.gate_ready);
                let committed = g.primary.committed_writes();
                let gate = &mut g.gate;
                gate.commit(committed);
                for (i, page) in pages.iter_mut().enumerate() {
                    if page.is_none() {
                        *page = CounterPage::open(&peer_paths[i]).ok();
                    }
                    if let Some(p) = page {
                        gate.commit_member(i + 1, p.committed());
                    }
                }
                while let Some(f) = gate.poll_release(now_ns()) {
                    encode_frame(&f, &mut out);
                }
                if !out.is_empty() || g.gate_closed {
                    break;
                }
                let wait = if pages.is_empty() || g.gate.waiting_for().is_none() {
                    Duration::from_millis(5)
                } else {
                    PEER_POLL
                };
                g = sh2
                    .cond
                    .wait_timeout(g, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            let closed = g.gate_closed;
            drop(g);
            if !out.is_empty() && to_sw.write_all(&out).is_err() {
                return;
            }
            out.clear();
            if closed {
                return;
            }
        }
    });
    let mut from_vm = vm;
    let mut dec = FrameDecoder::default();
    let mut buf = vec![0u8; 64 << 10];
    let result = loop {
        let n = match from_vm.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        dec.push(&buf[..n]);
        let mut g = sh.lock();
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => {
                    let writes = g.primary.writes();
                    let mut frame = f.to_vec();
                    let g = &mut *g;
                    let tag = match &g.group {
                        Some(group) if group.is_peer(&dst_of(&frame)) => {
                            // Inside the group: not held, but carries what it depends on.
                            group.stamp(&mut frame, writes);
                            // Marked: the switch hands it only to that peer's gated port.
                            encode_marked(&frame, true, &mut g.gate_ready);
                            continue;
                        }
                        _ if !g.gate_enforce => vec![0],
                        Some(group) => group.clock(writes),
                        None => vec![writes],
                    };
                    if let Outcome::Release(f) = g.gate.outbound_clock(now_ns(), tag, frame) {
                        // Nothing held and already committed: next out. One thread writes
                        // the switch socket (the releaser), so frames never interleave.
                        encode_frame(&f, &mut g.gate_ready);
                    }
                }
                Ok(None) => break,
                Err(_) => break,
            }
        }
        if dec.next_frame().is_err() {
            break Err(std::io::Error::other("frame longer than the switch takes"));
        }
        sh.cond.notify_all();
    };
    sh.lock().gate_closed = true;
    sh.cond.notify_all();
    let _ = sw.shutdown(std::net::Shutdown::Both);
    let _ = releaser.join();
    let _ = inbound.join();
    sh.lock().gate_closed = false;
    result
}

fn dst_of(frame: &[u8]) -> tern_gate::Mac {
    let mut m = [0u8; 6];
    let n = frame.len().min(6);
    m[..n].copy_from_slice(&frame[..n]);
    m
}

/// Switch -> VM for a VM with peers: a peer's clock is taken in (and its trailer removed)
/// before the frame reaches the guest, when the switch marked the frame as coming from the
/// peer's own gated port.
fn inbound_grouped(
    sh: &Shared,
    from_sw: &mut UnixStream,
    to_vm: &mut UnixStream,
) -> std::io::Result<()> {
    let mut dec = FrameDecoder::default();
    let mut buf = vec![0u8; 64 << 10];
    let mut out = Vec::new();
    loop {
        let n = from_sw.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        dec.push(&buf[..n]);
        {
            let mut g = sh.lock();
            while let Some((from_owner, f)) = dec
                .next_marked()
                .map_err(|_| std::io::Error::other("frame longer than the switch takes"))?
            {
                let mut frame = f.to_vec();
                if let Some(group) = g.group.as_mut() {
                    group.receive(&mut frame, from_owner);
                }
                encode_frame(&frame, &mut out);
            }
        }
        to_vm.write_all(&out)?;
        out.clear();
    }
}
