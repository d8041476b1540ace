//! tern-transport: the sans-IO core of tern's inter-site transport.
//!
//! Two site nodes hold one [`connection::Connection`] per peer over UDP, set up by a Noise IK
//! handshake between pinned static keys ([`endpoint`], [`crypto`]). Every data packet is
//! AEAD-protected with its packet number as nonce and checked against a replay window. A
//! connection multiplexes reliable byte streams (one per terminated TCP connection) with
//! per-stream and per-connection flow control, selective acknowledgement, time- and
//! reorder-threshold loss detection, adaptive Reed-Solomon FEC ([`fec`]), path-MTU probing,
//! pacing and a rate-based congestion controller that tolerates random loss ([`cc`]).
//! Compression of stream data is a record layer above the streams ([`record`]).
//!
//! No sockets, threads or clocks here: drivers call `handle_datagram(now, ..)`,
//! `handle_timeout(now)`, `poll_transmit(now, ..)`, `poll_timeout()` and `poll_event()`.
//! [`sim`] runs two endpoints over a simulated lossy link in virtual time.
//! Formats: [`wire`]; design note: docs/transport.md.

pub mod cc;
pub mod connection;
pub mod crypto;
pub mod endpoint;
pub mod fec;
pub mod rangeset;
pub mod record;
pub mod sim;
pub mod stream;
pub mod wire;

pub use connection::{Config, ConnStats, Connection, Event, StreamError};
pub use endpoint::{Endpoint, EndpointEvent, EndpointStats, PeerConfig, PeerId};
