//! systemd's readiness protocol (`sd_notify`) without libsystemd: one datagram per state
//! change to the unix socket named by `NOTIFY_SOCKET` (a path, or `@name` for an abstract
//! socket), as `Type=notify` units expect.
//!
//! The node sends `READY=1` once its UDP socket is bound and its control socket listens,
//! `RELOADING=1` (with `MONOTONIC_USEC`) and then `READY=1` around a config reload, `STOPPING=1`
//! when it shuts down, and `STATUS=...` (one line for `systemctl status`) with each. Without
//! `NOTIFY_SOCKET` every call does nothing. A failed send is reported once on stderr and never
//! stops the node.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Longest `STATUS=` text sent (longer text is cut at a character boundary).
pub const MAX_STATUS_LEN: usize = 200;

/// Where notifications go, if anywhere.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    warned: bool,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`; a disabled notifier when it is unset or empty.
    pub fn from_env() -> Notifier {
        match std::env::var("NOTIFY_SOCKET") {
            Ok(s) if !s.is_empty() => Notifier::to(&s).unwrap_or_else(|e| {
                eprintln!("tern node: NOTIFY_SOCKET={s:?} is unusable ({e}); not notifying");
                Notifier::disabled()
            }),
            _ => Notifier::disabled(),
        }
    }

    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            warned: false,
        }
    }

    /// To the socket `name`: a filesystem path, or `@name` for the abstract namespace.
    pub fn to(name: &str) -> io::Result<Notifier> {
        let addr = match name.strip_prefix('@') {
            Some(abs) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(abs.as_bytes())?
            }
            None if name.starts_with('/') => SocketAddr::from_pathname(name)?,
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "neither an absolute path nor @abstract",
                ));
            }
        };
        let sock = UnixDatagram::unbound()?;
        Ok(Notifier {
            target: Some((sock, addr)),
            warned: false,
        })
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one notification of newline-separated `KEY=value` assignments.
    pub fn send(&mut self, msg: &str) {
        let Some((sock, addr)) = &self.target else {
            return;
        };
        if let Err(e) = sock.send_to_addr(msg.as_bytes(), addr)
            && !self.warned
        {
            self.warned = true;
            eprintln!("tern node: sd_notify failed ({e}); the service manager may time out");
        }
    }

    pub fn ready(&mut self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", status_text(status)));
    }

    pub fn reloading(&mut self) {
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading the config",
            crate::sys::mono_ns() / 1000
        ));
    }

    pub fn stopping(&mut self) {
        self.send("STOPPING=1\nSTATUS=stopping");
    }

    pub fn status(&mut self, status: &str) {
        self.send(&format!("STATUS={}", status_text(status)));
    }
}

/// One line of at most [`MAX_STATUS_LEN`] bytes.
fn status_text(s: &str) -> String {
    let line = s.lines().next().unwrap_or("");
    let mut end = line.len().min(MAX_STATUS_LEN);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn recv(s: &UnixDatagram) -> String {
        let mut b = [0u8; 4096];
        let n = s.recv(&mut b).unwrap();
        String::from_utf8(b[..n].to_vec()).unwrap()
    }

    #[test]
    fn notifications_reach_a_path_socket_in_order() {
        let dir = std::env::temp_dir().join(format!("tern-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut n = Notifier::to(path.to_str().unwrap()).unwrap();
        assert!(n.enabled());
        n.ready("listening on udp 127.0.0.1:7400\nsecond line dropped");
        n.reloading();
        n.ready("reloaded");
        n.stopping();
        assert_eq!(
            recv(&server),
            "READY=1\nSTATUS=listening on udp 127.0.0.1:7400"
        );
        let r = recv(&server);
        assert!(r.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{r}");
        let usec: u64 = r.lines().nth(1).unwrap()["MONOTONIC_USEC=".len()..]
            .parse()
            .unwrap();
        assert!(usec > 0);
        assert_eq!(recv(&server), "READY=1\nSTATUS=reloaded");
        assert_eq!(recv(&server), "STOPPING=1\nSTATUS=stopping");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn abstract_socket_names_and_long_status_lines_work() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("tern-notify-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut n = Notifier::to(&format!("@{name}")).unwrap();
        n.status(&"é".repeat(150));
        let got = recv(&server);
        let text = got.strip_prefix("STATUS=").unwrap();
        assert!(text.len() <= MAX_STATUS_LEN && text.len() >= MAX_STATUS_LEN - 1);
        assert!(text.chars().all(|c| c == 'é'));
        assert!(Notifier::to("relative/path").is_err());
        assert!(!Notifier::disabled().enabled());
        // A socket that is gone: sending does not panic or block.
        let mut gone = Notifier::to("/nonexistent/tern/notify.sock").unwrap();
        gone.ready("x");
        gone.ready("y");
        assert!(gone.warned);
    }
}
