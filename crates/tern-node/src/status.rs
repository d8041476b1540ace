//! Status report (`tern node status --json`) and its Prometheus rendering.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use tern_transport::{ConnStats, EndpointStats};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FlowTotals {
    pub active: u64,
    pub opened: u64,
    pub completed: u64,
    pub refused: u64,
    pub connect_failed: u64,
    pub reset_local: u64,
    pub reset_by_peer: u64,
    pub bad_header: u64,
    pub bad_record: u64,
    /// Bytes read from / written to terminated TCP connections.
    pub tcp_bytes_in: u64,
    pub tcp_bytes_out: u64,
    /// Bytes written to / read from transport streams (after compression).
    pub stream_bytes_out: u64,
    pub stream_bytes_in: u64,
    pub compress_in: u64,
    pub compress_out: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TransportStatus {
    pub packets_sent: u64,
    pub packets_received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub stream_bytes_sent: u64,
    pub stream_bytes_retransmitted: u64,
    pub packets_lost: u64,
    pub fec_repairs_sent: u64,
    pub fec_recovered: u64,
    pub auth_failures: u64,
    pub duplicates: u64,
    pub malformed: u64,
    pub srtt_us: u64,
    pub min_rtt_us: u64,
    pub pacing_rate_bps: u64,
    pub cwnd_bytes: u64,
    pub bytes_in_flight: u64,
    pub loss_estimate: f64,
    pub udp_payload: usize,
    pub streams_open: usize,
}

impl From<ConnStats> for TransportStatus {
    fn from(s: ConnStats) -> Self {
        Self {
            packets_sent: s.packets_sent,
            packets_received: s.packets_received,
            bytes_sent: s.bytes_sent,
            bytes_received: s.bytes_received,
            stream_bytes_sent: s.stream_bytes_sent,
            stream_bytes_retransmitted: s.stream_bytes_retransmitted,
            packets_lost: s.packets_lost,
            fec_repairs_sent: s.fec_repairs_sent,
            fec_recovered: s.fec_recovered,
            auth_failures: s.auth_failures,
            duplicates: s.duplicates,
            malformed: s.malformed,
            srtt_us: s.srtt_us,
            min_rtt_us: s.min_rtt_us,
            pacing_rate_bps: s.pacing_rate_bps,
            cwnd_bytes: s.cwnd_bytes,
            bytes_in_flight: s.bytes_in_flight,
            loss_estimate: s.loss_estimate,
            udp_payload: s.udp_payload,
            streams_open: s.streams_open,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DropCounters {
    pub datagrams_received: u64,
    pub dropped_malformed: u64,
    pub dropped_unknown_index: u64,
    pub handshakes_rejected: u64,
    pub handshakes_unknown_key: u64,
    pub handshakes_replayed: u64,
    pub handshakes_rate_limited: u64,
    pub handshakes_completed: u64,
}

impl From<EndpointStats> for DropCounters {
    fn from(s: EndpointStats) -> Self {
        Self {
            datagrams_received: s.datagrams_received,
            dropped_malformed: s.dropped_malformed,
            dropped_unknown_index: s.dropped_unknown_index,
            handshakes_rejected: s.handshakes_rejected,
            handshakes_unknown_key: s.handshakes_unknown_key,
            handshakes_replayed: s.handshakes_replayed,
            handshakes_rate_limited: s.handshakes_rate_limited,
            handshakes_completed: s.handshakes_completed,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub address: Option<String>,
    pub connected: bool,
    pub transport: Option<TransportStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub listen: String,
    pub uptime_s: f64,
    pub peers: Vec<PeerStatus>,
    pub endpoint: DropCounters,
    pub flows: FlowTotals,
}

/// Prometheus text exposition format.
pub fn prometheus(s: &NodeStatus) -> String {
    let mut o = String::new();
    let mut metric = |name: &str, labels: &str, v: f64| {
        let _ = writeln!(o, "tern_{name}{{node=\"{}\"{labels}}} {v}", s.name);
    };
    let f = &s.flows;
    for (n, v) in [
        ("flows_active", f.active),
        ("flows_opened_total", f.opened),
        ("flows_completed_total", f.completed),
        ("flows_refused_total", f.refused),
        ("flows_connect_failed_total", f.connect_failed),
        ("tcp_bytes_in_total", f.tcp_bytes_in),
        ("tcp_bytes_out_total", f.tcp_bytes_out),
        ("compress_input_bytes_total", f.compress_in),
        ("compress_output_bytes_total", f.compress_out),
    ] {
        metric(n, "", v as f64);
    }
    let e = &s.endpoint;
    for (n, v) in [
        ("datagrams_received_total", e.datagrams_received),
        ("dropped_malformed_total", e.dropped_malformed),
        ("dropped_unknown_index_total", e.dropped_unknown_index),
        ("handshakes_rejected_total", e.handshakes_rejected),
        ("handshakes_unknown_key_total", e.handshakes_unknown_key),
        ("handshakes_completed_total", e.handshakes_completed),
    ] {
        metric(n, "", v as f64);
    }
    for p in &s.peers {
        let l = format!(",peer=\"{}\"", p.name);
        metric("peer_connected", &l, if p.connected { 1.0 } else { 0.0 });
        if let Some(t) = &p.transport {
            for (n, v) in [
                ("bytes_sent_total", t.bytes_sent as f64),
                ("bytes_received_total", t.bytes_received as f64),
                ("packets_lost_total", t.packets_lost as f64),
                ("fec_repairs_sent_total", t.fec_repairs_sent as f64),
                ("fec_recovered_total", t.fec_recovered as f64),
                ("auth_failures_total", t.auth_failures as f64),
                ("srtt_seconds", t.srtt_us as f64 / 1e6),
                ("pacing_rate_bits", t.pacing_rate_bps as f64),
                ("loss_estimate", t.loss_estimate),
            ] {
                metric(n, &l, v);
            }
        }
    }
    o
}
