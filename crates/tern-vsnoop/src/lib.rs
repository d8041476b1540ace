//! `tern-vsnoop`: vSnoop's early-acknowledgement core (seed 003; state machine in
//! `shared/research/seed-tcp.md` §3.3; guarantees in `docs/vsnoop.md`). Sans-IO: the switch
//! port feeds it every TCP segment of a VM in both directions, with time as an argument and the
//! free room of its *guaranteed* buffer toward the VM as a byte budget; it answers what to do.
//!
//! ```text
//!  sender ──seg──▶ handle_segment_to_vm(now, seg, budget) ──▶ Forward{Reserved|Unreserved}
//!                                                        └─▶ maybe EarlyAck ──▶ sender
//!  sender ◀─ack── handle_segment_from_vm(now, seg) ◀── VM : Forward | Rewrite{ack,window} | Suppress
//!
//!  SynSeen ──SYN-ACK──▶ Active     (sender SYN + VM SYN-ACK, or VM SYN + sender SYN-ACK)
//!    Active: in-order, everything before guaranteed, in VM window, fits budget → early ACK
//!    Active ── no budget / outside the VM window ──▶ NoBuffer   (pass-through)
//!    Active ── hole (seq > expected) ─────────────▶ OutOfOrder (pass-through)
//!    NoBuffer / OutOfOrder ── a segment starts where the VM's ACK ends ──▶ Active
//!    any ── unknown option, window shrink, VM SACK, missing TS, FIN, quiesce
//!        ──▶ Passthrough (permanent for the flow)
//!  RST either way: flow deleted.
//! ```
//!
//! Safety (what the tests check): an early ACK never exceeds `safe_seq` (every byte below it
//! is acknowledged by the VM or sits in a reserved, never-dropped slot toward it); its right
//! edge never passes the VM's; SYN, FIN, RST and out-of-order data are never acknowledged
//! early; the VM's ACKs never move the sender's view backwards (they are rewritten up to the
//! early-acked point, or suppressed when they would be duplicate ACKs).
//!
//! IPv4 only; other traffic is the caller's to pass through.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

mod wire;
pub use wire::{AckSpec, build_ack, parse_ipv4_tcp, rewrite_ack};

/// Most flows tracked per VM. New connections beyond it are not tracked (pass-through),
/// counted in [`Counters::flows_over_limit`].
pub const MAX_FLOWS: usize = 4096;

/// A flow with no segment for this long is forgotten by [`Vsnoop::poll_gc`] (its early-acked
/// bytes, if any, are reported in the returned [`DropReport`]).
pub const IDLE_TIMEOUT_NS: u64 = 120_000_000_000;

/// TCP flag bits.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// Parsed TCP options the core understands; anything else sets `unknown`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    pub mss: Option<u16>,
    pub wscale: Option<u8>,
    pub sack_permitted: bool,
    /// The segment carried SACK blocks.
    pub sack: bool,
    /// (TSval, TSecr).
    pub timestamps: Option<(u32, u32)>,
    /// An option kind outside {EOL, NOP, MSS, WS, SACK-permitted, SACK, TS}, or a malformed
    /// option list.
    pub unknown: bool,
}

/// One IPv4 TCP segment as the port sees it (headers only; the port keeps the bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// Raw window field (unscaled).
    pub window: u16,
    pub payload_len: u32,
    pub options: Options,
}

impl Segment {
    pub fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }
}

/// How to forward a segment toward the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// Queue in the guaranteed buffer: it was acknowledged early and must never be dropped
    /// before the VM has it (the port must hold `payload_len` bytes of budget for it).
    Reserved,
    /// Ordinary forwarding: the port may drop it under pressure like any packet.
    Unreserved,
}

/// Result for a segment toward the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToVm {
    pub forward: Forward,
    /// An ACK to send to the sender on the VM's behalf (build it with [`build_ack`]).
    pub early_ack: Option<AckSpec>,
}

/// Result for a segment from the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FromVm {
    Forward,
    /// Forward with the ACK and window fields replaced (checksum to be fixed by the port;
    /// [`rewrite_ack`] does it on IPv4 bytes).
    Rewrite {
        ack: u32,
        window: u16,
    },
    /// Drop: a duplicate of an ACK the sender already has from the early ACK.
    Suppress,
}

/// Why a flow stopped early-acknowledging for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassReason {
    UnknownOption,
    WindowShrink,
    SackFromVm,
    MissingTimestamp,
    Fin,
    Quiesced,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Sender's SYN seen; waiting for the VM's SYN-ACK.
    SynSeen,
    Active,
    /// An in-order segment was forwarded without a reservation (no budget, or outside the VM's
    /// window): pass-through until a segment starts exactly where the VM's own ACK (or a
    /// reserved byte) ends; a cumulative early ACK would otherwise cover bytes that may have
    /// been dropped.
    NoBuffer,
    /// A hole: pass-through until the VM acknowledges the highest byte forwarded, or a segment
    /// starts exactly at the VM's ACK.
    OutOfOrder,
    Passthrough(PassReason),
}

/// Counters (monotone).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub flows_created: u64,
    pub flows_over_limit: u64,
    pub early_acks: u64,
    pub early_acked_bytes: u64,
    pub dup_acks_suppressed: u64,
    pub acks_rewritten: u64,
    pub untracked_segments: u64,
    pub no_buffer_budget: u64,
    pub no_vm_window: u64,
    pub out_of_order: u64,
    pub retransmissions: u64,
    pub fallback_unknown_option: u64,
    pub fallback_window_shrink: u64,
    pub fallback_sack_from_vm: u64,
    pub fallback_missing_timestamp: u64,
    pub fin_seen: u64,
    pub resets: u64,
    /// Bytes that were acknowledged early but not (yet) by the VM when their flow's state was
    /// dropped (reset, GC, crash, migration without drain). See docs/vsnoop.md.
    pub dropped_undelivered_bytes: u64,
}

/// What dropping state lost: early-acked bytes the VM had not acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropReport {
    pub flows: u64,
    pub undelivered_bytes: u64,
}

type Key = (Ipv4Addr, u16, Ipv4Addr, u16); // (sender ip, port, vm ip, port)

#[derive(Debug, Clone)]
struct Flow {
    state: State,
    snd_wscale: Option<u8>,
    sack_ok: bool,
    ts_ok: bool,
    /// Shift applied to the VM's window field (0 unless both sides offered window scaling).
    vm_wscale: u8,
    exp_seq: u32,
    safe_seq: u32,
    /// Highest ACK the sender has seen for this flow (from us or the VM).
    cur_ack: u32,
    vm_ack: u32,
    /// The VM's window in bytes (scaled).
    vm_wnd: u64,
    max_seq_fwd: u32,
    /// Highest right edge the sender has been told.
    adv_right: u32,
    vm_right: u32,
    /// The VM's next sequence number (from its SYN-ACK and data), for the early ACK's seq.
    vm_next_seq: Option<u32>,
    last_vm_tsval: u32,
    last_seen_ns: u64,
    /// VM-initiated connection: the VM's SYN (wscale, SACK-permitted, timestamps, window),
    /// until the sender's SYN-ACK completes the handshake.
    vm_syn: Option<(Option<u8>, bool, bool, u16)>,
}

fn lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}
fn le(a: u32, b: u32) -> bool {
    a == b || lt(a, b)
}
fn max_seq(a: u32, b: u32) -> u32 {
    if lt(a, b) { b } else { a }
}

impl Flow {
    fn undelivered(&self) -> u64 {
        // Early-acked bytes the VM has not acknowledged.
        if lt(self.vm_ack, self.safe_seq) && !matches!(self.state, State::SynSeen) {
            u64::from(self.safe_seq.wrapping_sub(self.vm_ack))
        } else {
            0
        }
    }
    fn window_field(&self, ack: u32) -> u16 {
        let right = self.vm_right;
        if !lt(ack, right) {
            return 0;
        }
        let w = u64::from(right.wrapping_sub(ack)) >> self.vm_wscale;
        u16::try_from(w).unwrap_or(u16::MAX)
    }
    fn note_advertised(&mut self, ack: u32, window: u16) {
        let right = ack.wrapping_add(u32::from(window) << self.vm_wscale);
        self.adv_right = max_seq(self.adv_right, right);
    }
}

/// The per-VM vSnoop engine.
#[derive(Debug, Default)]
pub struct Vsnoop {
    flows: BTreeMap<Key, Flow>,
    counters: Counters,
}

impl Vsnoop {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// The state of the flow `sender → vm`, if tracked.
    pub fn state(&self, sender: (Ipv4Addr, u16), vm: (Ipv4Addr, u16)) -> Option<State> {
        self.flows
            .get(&(sender.0, sender.1, vm.0, vm.1))
            .map(|f| f.state)
    }

    /// Early-acked bytes not yet acknowledged by the VM, over all flows. Zero means the
    /// guaranteed buffer holds nothing the sender believes delivered.
    pub fn undelivered_bytes(&self) -> u64 {
        self.flows.values().map(Flow::undelivered).sum()
    }

    /// A segment from a sender toward the VM. `budget_bytes`: free room in the guaranteed
    /// buffer toward the VM right now.
    pub fn handle_segment_to_vm(&mut self, now_ns: u64, seg: &Segment, budget_bytes: u64) -> ToVm {
        let pass = ToVm {
            forward: Forward::Unreserved,
            early_ack: None,
        };
        let key = (seg.src, seg.sport, seg.dst, seg.dport);
        if seg.has(RST) {
            if let Some(f) = self.flows.remove(&key) {
                self.counters.resets += 1;
                self.counters.dropped_undelivered_bytes += f.undelivered();
            }
            return pass;
        }
        if seg.has(SYN) && !seg.has(ACK) {
            if self.flows.contains_key(&key) {
                return pass; // a retransmitted SYN
            }
            if self.flows.len() >= MAX_FLOWS {
                self.counters.flows_over_limit += 1;
                return pass;
            }
            self.counters.flows_created += 1;
            let isn1 = seg.seq.wrapping_add(1);
            let state = if seg.options.unknown {
                self.counters.fallback_unknown_option += 1;
                State::Passthrough(PassReason::UnknownOption)
            } else {
                State::SynSeen
            };
            self.flows.insert(
                key,
                Flow {
                    state,
                    snd_wscale: seg.options.wscale,
                    sack_ok: seg.options.sack_permitted,
                    ts_ok: seg.options.timestamps.is_some(),
                    vm_wscale: 0,
                    exp_seq: isn1,
                    safe_seq: isn1,
                    cur_ack: isn1,
                    vm_ack: isn1,
                    vm_wnd: 0,
                    max_seq_fwd: isn1,
                    adv_right: isn1,
                    vm_right: isn1,
                    vm_next_seq: None,
                    last_vm_tsval: 0,
                    last_seen_ns: now_ns,
                    vm_syn: None,
                },
            );
            return pass;
        }
        let Some(f) = self.flows.get_mut(&key) else {
            self.counters.untracked_segments += 1;
            return pass;
        };
        f.last_seen_ns = now_ns;
        let c = &mut self.counters;
        if seg.has(SYN) {
            // The sender's SYN-ACK of a VM-initiated connection.
            if let (State::SynSeen, Some((ws, sack, ts, win))) = (f.state, f.vm_syn) {
                if seg.options.unknown {
                    c.fallback_unknown_option += 1;
                    f.state = State::Passthrough(PassReason::UnknownOption);
                    return pass;
                }
                let isn1 = seg.seq.wrapping_add(1);
                f.vm_wscale = match (seg.options.wscale, ws) {
                    (Some(_), Some(s)) => s.min(14),
                    _ => 0,
                };
                f.snd_wscale = seg.options.wscale;
                f.sack_ok = sack && seg.options.sack_permitted;
                f.ts_ok = ts && seg.options.timestamps.is_some();
                f.exp_seq = isn1;
                f.safe_seq = isn1;
                f.cur_ack = isn1;
                f.vm_ack = isn1;
                f.max_seq_fwd = isn1;
                f.vm_right = isn1.wrapping_add(u32::from(win));
                f.adv_right = f.vm_right;
                f.vm_syn = None;
                f.state = State::Active;
            }
            return pass;
        }
        let len = seg.payload_len;
        let end = seg.seq.wrapping_add(len);
        if len > 0 && lt(f.max_seq_fwd, end) {
            f.max_seq_fwd = end;
        }
        if seg.has(FIN) {
            c.fin_seen += 1;
            if !matches!(f.state, State::Passthrough(_)) {
                f.state = State::Passthrough(PassReason::Fin);
            }
            return pass;
        }
        if matches!(f.state, State::Passthrough(_) | State::SynSeen) || len == 0 {
            return pass;
        }
        if seg.options.unknown {
            c.fallback_unknown_option += 1;
            f.state = State::Passthrough(PassReason::UnknownOption);
            return pass;
        }
        if f.ts_ok && seg.options.timestamps.is_none() {
            c.fallback_missing_timestamp += 1;
            f.state = State::Passthrough(PassReason::MissingTimestamp);
            return pass;
        }
        if le(end, f.cur_ack) {
            c.retransmissions += 1;
            return pass;
        }
        // Every byte below `safe` is acknowledged by the VM or sits in a reserved slot.
        let safe = max_seq(f.safe_seq, f.vm_ack);
        if seg.seq != safe {
            if lt(seg.seq, f.exp_seq) {
                // Overlaps forwarded-but-not-early-acked bytes.
                c.retransmissions += 1;
            } else if lt(f.exp_seq, seg.seq) {
                c.out_of_order += 1;
                if f.state == State::Active {
                    f.state = State::OutOfOrder;
                }
            } else if f.state == State::Active {
                // In order but behind an unguaranteed byte: cannot happen while Active.
                f.state = State::NoBuffer;
            }
            if lt(f.exp_seq, end) && !lt(f.exp_seq, seg.seq) {
                f.exp_seq = end;
            }
            return pass;
        }
        // Everything before the segment is guaranteed: it may be acknowledged early (from
        // NoBuffer and OutOfOrder too: bytes forwarded beyond it do not matter to a
        // cumulative ACK of its end).
        if lt(f.exp_seq, end) {
            f.exp_seq = end;
        }
        if !le(end, f.vm_right) || u64::from(len) > budget_bytes {
            if le(end, f.vm_right) {
                c.no_buffer_budget += 1;
            } else {
                c.no_vm_window += 1;
            }
            f.state = State::NoBuffer;
            return pass;
        }
        f.state = State::Active;
        f.safe_seq = end;
        f.cur_ack = end;
        let window = f.window_field(end);
        f.note_advertised(end, window);
        c.early_acks += 1;
        c.early_acked_bytes += u64::from(len);
        let ts = if f.ts_ok {
            seg.options
                .timestamps
                .map(|(tsval, _)| (f.last_vm_tsval, tsval))
        } else {
            None
        };
        ToVm {
            forward: Forward::Reserved,
            early_ack: Some(AckSpec {
                src: seg.dst,
                dst: seg.src,
                sport: seg.dport,
                dport: seg.sport,
                seq: f.vm_next_seq.unwrap_or(0),
                ack: end,
                window,
                timestamps: ts,
            }),
        }
    }

    /// A segment from the VM toward a sender.
    pub fn handle_segment_from_vm(&mut self, now_ns: u64, seg: &Segment) -> FromVm {
        let key = (seg.dst, seg.dport, seg.src, seg.sport);
        if seg.has(SYN) && !seg.has(ACK) && !self.flows.contains_key(&key) {
            if self.flows.len() >= MAX_FLOWS {
                self.counters.flows_over_limit += 1;
                return FromVm::Forward;
            }
            self.counters.flows_created += 1;
            let state = if seg.options.unknown {
                self.counters.fallback_unknown_option += 1;
                State::Passthrough(PassReason::UnknownOption)
            } else {
                State::SynSeen
            };
            let o = &seg.options;
            self.flows.insert(
                key,
                Flow {
                    state,
                    snd_wscale: None,
                    sack_ok: false,
                    ts_ok: false,
                    vm_wscale: 0,
                    exp_seq: 0,
                    safe_seq: 0,
                    cur_ack: 0,
                    vm_ack: 0,
                    vm_wnd: 0,
                    max_seq_fwd: 0,
                    adv_right: 0,
                    vm_right: 0,
                    vm_next_seq: Some(seg.seq.wrapping_add(1)),
                    last_vm_tsval: o.timestamps.map_or(0, |t| t.0),
                    last_seen_ns: now_ns,
                    vm_syn: Some((
                        o.wscale,
                        o.sack_permitted,
                        o.timestamps.is_some(),
                        seg.window,
                    )),
                },
            );
            return FromVm::Forward;
        }
        let Some(f) = self.flows.get_mut(&key) else {
            self.counters.untracked_segments += 1;
            return FromVm::Forward;
        };
        let c = &mut self.counters;
        f.last_seen_ns = now_ns;
        if seg.has(RST) {
            c.resets += 1;
            c.dropped_undelivered_bytes += f.undelivered();
            self.flows.remove(&key);
            return FromVm::Forward;
        }
        let seq_end = seg
            .seq
            .wrapping_add(seg.payload_len)
            .wrapping_add(u32::from(seg.has(SYN)) + u32::from(seg.has(FIN)));
        if f.vm_next_seq.is_none_or(|n| lt(n, seq_end)) {
            f.vm_next_seq = Some(seq_end);
        }
        if let Some((tsval, _)) = seg.options.timestamps {
            f.last_vm_tsval = tsval;
        }
        if seg.has(SYN) {
            if f.state == State::SynSeen && seg.has(ACK) {
                if seg.options.unknown {
                    c.fallback_unknown_option += 1;
                    f.state = State::Passthrough(PassReason::UnknownOption);
                } else {
                    f.vm_wscale = match (f.snd_wscale, seg.options.wscale) {
                        (Some(_), Some(s)) => s.min(14),
                        _ => 0,
                    };
                    f.sack_ok &= seg.options.sack_permitted;
                    f.ts_ok &= seg.options.timestamps.is_some();
                    f.state = State::Active;
                }
                // The SYN-ACK's window is never scaled.
                f.vm_wnd = u64::from(seg.window);
                f.vm_right = f.vm_ack.wrapping_add(u32::from(seg.window));
                f.adv_right = f.vm_right;
            }
            return FromVm::Forward;
        }
        if !seg.has(ACK) {
            return FromVm::Forward;
        }
        let ack = seg.ack;
        if lt(f.vm_ack, ack) {
            f.vm_ack = ack;
        }
        f.vm_wnd = u64::from(seg.window) << f.vm_wscale;
        let right = ack.wrapping_add(f.vm_wnd.min(u64::from(u32::MAX >> 1)) as u32);
        if lt(right, f.vm_right) && !matches!(f.state, State::Passthrough(_)) {
            c.fallback_window_shrink += 1;
            f.state = State::Passthrough(PassReason::WindowShrink);
        }
        f.vm_right = max_seq(f.vm_right, right);
        if seg.options.sack && !matches!(f.state, State::Passthrough(_)) {
            c.fallback_sack_from_vm += 1;
            f.state = State::Passthrough(PassReason::SackFromVm);
        }
        if lt(f.cur_ack, ack) {
            f.cur_ack = ack;
            f.safe_seq = max_seq(f.safe_seq, ack);
            if lt(f.exp_seq, ack) {
                f.exp_seq = ack;
            }
            match f.state {
                State::OutOfOrder if le(f.max_seq_fwd, ack) => {
                    f.exp_seq = ack;
                    f.safe_seq = ack;
                    f.state = State::Active;
                }
                State::NoBuffer if le(f.exp_seq, ack) => {
                    // The VM holds every byte forwarded: nothing unreserved is outstanding.
                    f.safe_seq = max_seq(f.safe_seq, ack);
                    f.state = State::Active;
                }
                _ => {}
            }
            f.note_advertised(ack, seg.window);
            return FromVm::Forward;
        }
        // ack ≤ cur_ack.
        let pure = seg.payload_len == 0 && !seg.has(FIN) && !seg.options.sack;
        let passthrough = matches!(f.state, State::Passthrough(_));
        if ack == f.cur_ack && (passthrough || f.state == State::OutOfOrder) && ack == f.vm_ack {
            // Genuine: the VM's own view equals the sender's; its duplicates drive recovery.
            f.note_advertised(ack, seg.window);
            return FromVm::Forward;
        }
        if pure && le(f.vm_right, f.adv_right) {
            c.dup_acks_suppressed += 1;
            return FromVm::Suppress;
        }
        let window = f.window_field(f.cur_ack);
        f.note_advertised(f.cur_ack, window);
        if ack == f.cur_ack && window == seg.window {
            return FromVm::Forward;
        }
        c.acks_rewritten += 1;
        FromVm::Rewrite {
            ack: f.cur_ack,
            window,
        }
    }

    /// Stop early acknowledgement on every flow (before a migration or shutdown); existing
    /// early-acked bytes stay owed. Returns [`Self::undelivered_bytes`]: the port must deliver
    /// its guaranteed buffer to the VM until this reaches 0 before the VM's state is moved.
    pub fn quiesce(&mut self) -> u64 {
        for f in self.flows.values_mut() {
            if !matches!(f.state, State::Passthrough(_)) {
                f.state = State::Passthrough(PassReason::Quiesced);
            }
        }
        self.undelivered_bytes()
    }

    /// Forget every flow (VM crashed, or migrated away). Reports the early-acked bytes the VM
    /// never acknowledged: after a crash these are lost although the sender believes them
    /// delivered (docs/vsnoop.md).
    pub fn drop_state(&mut self) -> DropReport {
        let r = DropReport {
            flows: self.flows.len() as u64,
            undelivered_bytes: self.undelivered_bytes(),
        };
        self.counters.dropped_undelivered_bytes += r.undelivered_bytes;
        self.flows.clear();
        r
    }

    /// When [`Self::poll_gc`] next has work: the earliest idle deadline, if any flow exists.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.flows
            .values()
            .map(|f| f.last_seen_ns.saturating_add(IDLE_TIMEOUT_NS))
            .min()
    }

    /// Forget flows idle for [`IDLE_TIMEOUT_NS`].
    pub fn poll_gc(&mut self, now_ns: u64) -> DropReport {
        let mut r = DropReport::default();
        self.flows.retain(|_, f| {
            let keep = now_ns.saturating_sub(f.last_seen_ns) < IDLE_TIMEOUT_NS;
            if !keep {
                r.flows += 1;
                r.undelivered_bytes += f.undelivered();
            }
            keep
        });
        self.counters.dropped_undelivered_bytes += r.undelivered_bytes;
        r
    }
}
