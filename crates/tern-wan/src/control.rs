//! The control socket: serves [`Request`]s for a running [`Emulator`], and a client for it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use crate::WanError;
use crate::emulator::Emulator;
use crate::proto::{MAX_REQUEST_BYTES, Reply, Request};

/// Serves requests until a `Shutdown` request arrives; then stops the emulator.
pub fn serve(emulator: Emulator, path: &Path) -> Result<(), WanError> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|source| WanError::Io {
        what: format!("bind {}", path.display()),
        source,
    })?;
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let mut line = String::new();
        let read = BufReader::new((&mut conn).take(MAX_REQUEST_BYTES as u64)).read_line(&mut line);
        let (reply, stop) = match read {
            Err(e) => (
                Reply::Error {
                    message: format!("reading request: {e}"),
                },
                false,
            ),
            Ok(_) => match serde_json::from_str::<Request>(line.trim()) {
                Err(e) => (
                    Reply::Error {
                        message: format!("bad request: {e}"),
                    },
                    false,
                ),
                Ok(Request::Shutdown) => (Reply::Ok, true),
                Ok(Request::Stats) => match emulator.stats() {
                    Ok(s) => (Reply::Stats(Box::new(s)), false),
                    Err(e) => (
                        Reply::Error {
                            message: e.to_string(),
                        },
                        false,
                    ),
                },
                Ok(Request::Set { direction, config }) => match emulator.set(direction, config) {
                    Ok(()) => (Reply::Ok, false),
                    Err(e) => (
                        Reply::Error {
                            message: e.to_string(),
                        },
                        false,
                    ),
                },
            },
        };
        if let Ok(mut text) = serde_json::to_string(&reply) {
            text.push('\n');
            let _ = conn.write_all(text.as_bytes());
        }
        if stop {
            break;
        }
    }
    emulator.stop();
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// Sends one request to the emulator at `path` and returns its reply.
pub fn request(path: &Path, req: &Request) -> Result<Reply, WanError> {
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |source| WanError::Io { what, source }
    };
    let mut s = UnixStream::connect(path).map_err(io("connect to emulator control socket"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io("configure"))?;
    let mut text = serde_json::to_string(req).map_err(|e| WanError::Protocol(e.to_string()))?;
    text.push('\n');
    s.write_all(text.as_bytes()).map_err(io("write to"))?;
    let mut line = String::new();
    BufReader::new(s.take(16 << 20))
        .read_line(&mut line)
        .map_err(io("read from"))?;
    serde_json::from_str(line.trim())
        .map_err(|e| WanError::Protocol(format!("bad reply {line:?}: {e}")))
}
