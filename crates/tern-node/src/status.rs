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
    /// Streams whose target the opening peer is not granted (`grants.rs`).
    #[serde(default)]
    pub refused_by_policy: u64,
    /// Bytes read from / written to terminated TCP connections.
    pub tcp_bytes_in: u64,
    pub tcp_bytes_out: u64,
    /// Bytes written to / read from transport streams (after compression).
    pub stream_bytes_out: u64,
    pub stream_bytes_in: u64,
    pub compress_in: u64,
    pub compress_out: u64,
    /// Live-migration streams relayed (either direction).
    pub migrations: u64,
}

/// The node's UDP socket: batching offloads in use.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UdpStatus {
    /// Runs of equal-size datagrams go out as one UDP GSO message (off after the kernel
    /// refused one).
    pub gso: bool,
    /// GSO messages sent and the datagrams they carried.
    pub gso_messages: u64,
    pub gso_datagrams: u64,
    /// Datagram trains received as one buffer (`UDP_GRO`) and the datagrams in them.
    pub gro_trains: u64,
    pub gro_datagrams: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OverlayStatus {
    /// VM NICs attached now.
    pub ports: usize,
    pub ports_attached: u64,
    pub ports_detached: u64,
    pub ports_refused: u64,
    pub remote_frames_in: u64,
    pub remote_frames_out: u64,
    /// Frames dropped because a port or the WAN could not take them (L2 semantics).
    pub frames_dropped: u64,
    pub bad_frames: u64,
    pub switch: crate::switch::SwitchStats,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub address: Option<String>,
    pub connected: bool,
    pub transport: Option<ConnStats>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub listen: String,
    pub uptime_s: f64,
    pub peers: Vec<PeerStatus>,
    pub endpoint: EndpointStats,
    pub flows: FlowTotals,
    #[serde(default)]
    pub udp: UdpStatus,
    #[serde(default)]
    pub overlay: Option<OverlayStatus>,
    /// Pages in the content store, if the node has one.
    #[serde(default)]
    pub store_pages: Option<u64>,
    /// The last re-encoded (tern-codec) migration streams that ended, oldest first.
    #[serde(default)]
    pub migration_log: Vec<MigrationRecord>,
    /// The loop runs under SCHED_FIFO now (`realtime_priority`, while the node sends).
    #[serde(default)]
    pub realtime: bool,
    /// Times the loop changed its scheduling policy.
    #[serde(default)]
    pub realtime_switches: u64,
    /// The control and metrics surfaces (`mgmt.rs`).
    #[serde(default)]
    pub mgmt: crate::mgmt::MgmtStats,
    /// The site agent (`agent_worker.rs`).
    #[serde(default)]
    pub agent: crate::agent_worker::AgentStats,
    /// Config reloads applied and refused (`reload.rs`).
    #[serde(default)]
    pub reload: crate::reload::ReloadStats,
}

/// One re-encoded migration stream, as one node saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrationRecord {
    /// "source" or "destination".
    pub role: String,
    /// Target socket, relative to the destination's migration directory.
    pub path: String,
    pub codec: String,
    pub started_unix_ms: u64,
    pub ended_unix_ms: u64,
    /// Both directions ended cleanly.
    pub complete: bool,
    /// Codec counters (source only).
    pub stats: Option<tern_codec::Stats>,
    /// Bytes this node wrote into the transport stream (after residual compression).
    pub wire_bytes: u64,
    pub pages_decoded: u64,
    pub bytes_decoded: u64,
    pub error: Option<String>,
}

impl MigrationRecord {
    pub fn new(role: &str, path: &str, codec: tern_codec::Options) -> MigrationRecord {
        MigrationRecord {
            role: role.into(),
            path: path.into(),
            codec: codec.to_string(),
            started_unix_ms: crate::sys::wall_ns() / 1_000_000,
            ..MigrationRecord::default()
        }
    }
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
        ("flows_refused_by_policy_total", f.refused_by_policy),
        ("tcp_bytes_in_total", f.tcp_bytes_in),
        ("tcp_bytes_out_total", f.tcp_bytes_out),
        ("compress_input_bytes_total", f.compress_in),
        ("compress_output_bytes_total", f.compress_out),
    ] {
        metric(n, "", v as f64);
    }
    let u = &s.udp;
    for (n, v) in [
        ("udp_gso_messages_total", u.gso_messages),
        ("udp_gso_datagrams_total", u.gso_datagrams),
        ("udp_gro_trains_total", u.gro_trains),
        ("udp_gro_datagrams_total", u.gro_datagrams),
        ("realtime", u64::from(s.realtime)),
        ("realtime_switches_total", s.realtime_switches),
        ("mgmt_connections_accepted_total", s.mgmt.accepted),
        ("mgmt_requests_served_total", s.mgmt.served),
        ("mgmt_connections_evicted_total", s.mgmt.evicted),
        ("mgmt_connections_timed_out_total", s.mgmt.timed_out),
        ("mgmt_connections_refused_peer_total", s.mgmt.refused_peer),
        ("mgmt_bad_requests_total", s.mgmt.bad_requests),
        ("agent_requests_total", s.agent.requests),
        ("agent_refused_total", s.agent.refused),
        ("agent_overloaded_total", s.agent.overloaded),
        ("reloads_applied_total", s.reload.applied),
        ("reloads_refused_total", s.reload.refused),
    ] {
        metric(n, "", v as f64);
    }
    let e = &s.endpoint;
    for (n, v) in [
        ("datagrams_received_total", e.datagrams_received),
        ("dropped_malformed_total", e.dropped_malformed),
        ("dropped_unknown_session_total", e.dropped_unknown_session),
        ("handshakes_rejected_total", e.handshakes_rejected),
        ("handshakes_unknown_key_total", e.handshakes_unknown_key),
        ("handshakes_completed_total", e.handshakes_completed),
        ("handshake_inits_received_total", e.inits_received),
        ("handshake_inits_accepted_total", e.inits_accepted),
        ("handshakes_bad_mac1_total", e.handshakes_bad_mac1),
        (
            "handshakes_source_limited_total",
            e.handshakes_source_limited,
        ),
        ("handshakes_rate_limited_total", e.handshakes_rate_limited),
        ("handshakes_replayed_total", e.handshakes_replayed),
        ("handshake_cookies_sent_total", e.cookies_sent),
        ("handshake_cookies_received_total", e.cookies_received),
        ("handshake_cookies_invalid_total", e.cookies_invalid),
        ("sessions_confirmed_total", e.sessions_confirmed),
        (
            "sessions_expired_unconfirmed_total",
            e.sessions_expired_unconfirmed,
        ),
        (
            "handshake_transmits_dropped_total",
            e.handshake_transmits_dropped,
        ),
        ("handshake_responses_bad_mac_total", e.responses_bad_mac),
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
                ("protocol_errors_total", t.protocol_errors as f64),
                ("stream_id_violations_total", t.stream_id_violations as f64),
                (
                    "reassembly_limit_hits_total",
                    t.reassembly_limit_hits as f64,
                ),
                ("acks_of_unsent_total", t.acks_of_unsent as f64),
                ("key_updates_sent_total", t.key_updates_sent as f64),
                ("key_updates_received_total", t.key_updates_received as f64),
                ("old_key_packets_total", t.old_key_packets as f64),
                ("old_key_rejected_total", t.old_key_rejected as f64),
                ("key_exhausted_stalls_total", t.key_exhausted_stalls as f64),
            ] {
                metric(n, &l, v);
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_one_sample_per_line_with_the_node_label() {
        let s = NodeStatus {
            name: "site-a".into(),
            realtime: true,
            realtime_switches: 3,
            reload: crate::reload::ReloadStats {
                refused: 2,
                ..Default::default()
            },
            peers: vec![PeerStatus {
                name: "site-b".into(),
                connected: true,
                ..PeerStatus::default()
            }],
            ..NodeStatus::default()
        };
        let text = prometheus(&s);
        for want in [
            "tern_realtime{node=\"site-a\"} 1",
            "tern_realtime_switches_total{node=\"site-a\"} 3",
            "tern_peer_connected{node=\"site-a\",peer=\"site-b\"} 1",
            "tern_flows_active{node=\"site-a\"} 0",
            "tern_reloads_refused_total{node=\"site-a\"} 2",
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "{want} missing in:\n{text}"
            );
        }
        for line in text.lines() {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("tern_") && name.ends_with('}'), "{line}");
            value.parse::<f64>().unwrap();
        }
    }
}
