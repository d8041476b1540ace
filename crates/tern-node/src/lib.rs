//! tern-node: the per-site daemon. It terminates TCP at the site (transparently, through an
//! nftables REDIRECT to its listener, or through explicit port forwards) and carries every
//! connection as a stream of tern's encrypted, loss-tolerant UDP transport to the peer site's
//! node, which opens the real connection to the original destination.
//!
//! Guarantees: bytes arrive once and in order or the connection is reset (a TCP RST on both
//! ends); FIN and RST map both ways; a peer that is not connected refuses new connections with
//! RST; datagrams that fail authentication only move drop counters.

pub mod agent;
pub mod agent_worker;
pub mod check;
pub mod config;
pub mod grants;
pub mod mgmt;
pub mod nft;
pub mod node;
pub mod notify;
pub mod open;
pub mod reload;
pub mod status;
pub mod switch;
pub mod sys;

use std::path::Path;

use thiserror::Error;

pub use config::NodeConfig;
pub use node::Node;
pub use status::NodeStatus;

#[derive(Debug, Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nft refused the interception rules: {0}")]
    Nft(String),
    #[error("bad status reply from {path}: {message}")]
    Status { path: String, message: String },
    #[error("reload refused: {0}")]
    Reload(String),
}

/// Sends one request line to a running node's control socket and returns its reply.
fn control_request(socket: &Path, request: &str) -> Result<String, NodeError> {
    use std::io::{Read, Write};
    let io = |what: String| move |source| NodeError::Io { what, source };
    let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(io(format!(
        "connect to node control socket {} (is the node running?)",
        socket.display()
    )))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .map_err(io("set timeout".into()))?;
    s.write_all(format!("{request}\n").as_bytes())
        .map_err(io(format!("send {request} request")))?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .map_err(io(format!("read {request} reply")))?;
    Ok(reply)
}

/// Asks a running node for its status over its control socket.
pub fn request_status(socket: &Path) -> Result<NodeStatus, NodeError> {
    let reply = control_request(socket, "status")?;
    serde_json::from_str(reply.trim()).map_err(|e| NodeError::Status {
        path: socket.display().to_string(),
        message: e.to_string(),
    })
}

/// Asks a running node to re-read its config file (as SIGHUP does); returns what the reload
/// did, or `NodeError::Reload` with why it was refused (the node keeps its old config).
pub fn request_reload(socket: &Path) -> Result<String, NodeError> {
    let reply = control_request(socket, "reload")?;
    let r: crate::mgmt::ReloadReply =
        serde_json::from_str(reply.trim()).map_err(|e| NodeError::Status {
            path: socket.display().to_string(),
            message: format!("{e}: {}", reply.trim()),
        })?;
    if r.ok {
        Ok(r.message)
    } else {
        Err(NodeError::Reload(r.message))
    }
}
