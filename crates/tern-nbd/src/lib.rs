//! An NBD server written from the protocol specification (NetworkBlockDevice/nbd
//! `doc/proto.md`), for exporting a VM disk to QEMU on the same host.
//!
//! ```text
//! socket --bytes--> ServerSession (proto: handshake, options, request framing, bounds)
//!                     | Event::Request               ^ reply(id, Result<Reply, NbdError>)
//!                     v                              |
//!                   driver (server) --execute--> Backend (file: pread/pwrite, fallocate,
//!                                                          SEEK_DATA/SEEK_HOLE)
//! ```
//! Guarantees: the session is sans-IO and never panics on any byte stream; every length
//! the client controls is checked against a named bound ([`proto::MAX_OPTION_BYTES`],
//! [`proto::MAX_PAYLOAD_BYTES`], [`proto::MAX_STRING_BYTES`]) before anything is buffered
//! for it; requests reach a backend only with known flags, inside the export, and never
//! write to a read-only export. One connection's failure never stops the server.
//!
//! Protocol subset: fixed newstyle negotiation only (no oldstyle), no TLS (traffic stays on
//! a unix socket or loopback), simple and structured replies, the `base:allocation`
//! metadata context. Version policy: the spec's baseline plus the options listed in
//! `docs/nbd.md`; anything else is refused with `NBD_REP_ERR_UNSUP` or `NBD_EINVAL`, never
//! misparsed. Session states:
//!
//! ```text
//! ClientFlags --> Options --(GO acked / EXPORT_NAME)--> Transmission --(DISC, in-flight done)--> Closed
//!      |             |                                       |
//!      +-------------+---(ABORT, bad magic, unknown flags,---+--> Closed
//!                           oversized option or write, EOF)
//! ```

pub mod backend;
pub mod file;
pub mod proto;
pub mod server;
/// Private management sockets (moved to `tern-os`; re-exported for the drivers that used it here).
pub use tern_os::unix;
pub mod wire;

pub use backend::{Backend, Extent, MemBackend, execute, nbd_error};
pub use file::FileBackend;
pub use proto::{
    CloseReason, Command, Event, ExportInfo, NbdError, ProtocolError, Reply, ReplyError, Request,
    RequestId, ServerSession,
};
pub use server::{Export, LocalAddr, ServeError, Server, ServerHandle, Stats, serve_connection};
