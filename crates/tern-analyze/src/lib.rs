//! `tern-analyze`: offline TCP flow analysis over pcap files, rebuilding the measures of
//! "Impact of virtual machine overhead on TCP performance" (seed 002; definitions in
//! `shared/research/seed-tcp.md` §2.10, choices in `docs/analyze.md`).
//!
//! Pipeline: [`pcap::parse`] (classic libpcap, checked and bounded, never panics) →
//! [`packet::TcpSegment`]s → [`flow::analyze`] (per 4-tuple: ACK inter-arrival histogram and
//! CDF, ACK-compression level, per-ACK compression ratio, burstiness σ/μ at 60 ms,
//! throughput per interval, retransmissions) → JSON (serde) and [`svg`] plots.
//!
//! Pure library: no I/O except what the caller passes in as bytes.

pub mod flow;
pub mod packet;
pub mod pcap;
pub mod svg;

pub use flow::{Analysis, FlowReport, Params, analyze, ks_distance};
pub use packet::TcpSegment;
pub use pcap::{Capture, LinkType, PcapError, parse};

/// Parse and analyse one pcap held in memory.
pub fn analyze_pcap(
    bytes: &[u8],
    params: &Params,
    filter: Option<&str>,
) -> Result<(Capture, Analysis), PcapError> {
    let cap = parse(bytes)?;
    let a = analyze(&cap.tcp_segments, params, filter);
    Ok((cap, a))
}
