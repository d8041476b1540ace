//! The guest's TCP-facing state: counters shared with the workload loop, and the tiny
//! HTTP/1.0 status endpoint's request routing and response (no I/O here; `main.rs` owns
//! the sockets).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Longest request head the status endpoint reads before answering 400.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// Counters the workload loop publishes and the service threads read.
#[derive(Debug)]
pub struct Shared {
    pub workload: &'static str,
    pub mem_mb: u64,
    pub records: AtomicU64,
    /// Completed verification passes.
    pub pass: AtomicU64,
    /// Corrupt records found, by passes and by check-before-write.
    pub failures: AtomicU64,
    pub touched_pages: AtomicU64,
    /// Data filled (the `ready` marker was printed).
    pub ready: AtomicBool,
}

impl Shared {
    pub fn new(workload: &'static str, mem_mb: u64) -> Self {
        Self {
            workload,
            mem_mb,
            records: AtomicU64::new(0),
            pass: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            touched_pages: AtomicU64::new(0),
            ready: AtomicBool::new(false),
        }
    }

    /// The status document at `uptime_s`.
    pub fn status_json(&self, uptime_s: f64) -> String {
        let pass = self.pass.load(Ordering::Acquire);
        let failures = self.failures.load(Ordering::Acquire);
        format!(
            concat!(
                "{{\"workload\":\"{}\",\"pass\":{},\"verified\":{},\"uptime_s\":{:.3},",
                "\"records\":{},\"mem_mb\":{},\"ready\":{},\"failures\":{},",
                "\"touched_pages\":{}}}"
            ),
            self.workload,
            pass,
            pass > 0 && failures == 0,
            uptime_s,
            self.records.load(Ordering::Acquire),
            self.mem_mb,
            self.ready.load(Ordering::Acquire),
            failures,
            self.touched_pages.load(Ordering::Acquire),
        )
    }
}

/// What a request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Status,
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// True once `head` holds a complete request head (HTTP/1.0 clients may use bare `\n`).
pub fn head_complete(head: &[u8]) -> bool {
    head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n")
}

/// Routes on the request line alone.
pub fn route(head: &[u8]) -> Route {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Route::BadRequest;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Route::BadRequest;
    };
    if method != "GET" {
        return Route::MethodNotAllowed;
    }
    match target.split('?').next() {
        Some("/status") | Some("/") => Route::Status,
        _ => Route::NotFound,
    }
}

/// The full HTTP/1.0 response for `route` (`status_body` is used only for [`Route::Status`]).
pub fn response(route: Route, status_body: &str) -> Vec<u8> {
    let (code, body) = match route {
        Route::Status => ("200 OK", format!("{status_body}\n")),
        Route::NotFound => ("404 Not Found", "not found\n".to_string()),
        Route::MethodNotAllowed => ("405 Method Not Allowed", "GET only\n".to_string()),
        Route::BadRequest => ("400 Bad Request", "bad request\n".to_string()),
    };
    let ctype = if route == Route::Status {
        "application/json"
    } else {
        "text/plain"
    };
    format!(
        "HTTP/1.0 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route(b"GET /status HTTP/1.0\r\n\r\n"), Route::Status);
        assert_eq!(
            route(b"GET /status?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Route::Status
        );
        assert_eq!(route(b"GET /nope HTTP/1.0\r\n\r\n"), Route::NotFound);
        assert_eq!(
            route(b"POST /status HTTP/1.0\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(route(b"\xff\xfe\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"GET\r\n\r\n"), Route::BadRequest);
        assert!(head_complete(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(head_complete(b"GET / HTTP/1.0\n\n"));
        assert!(!head_complete(b"GET / HTTP/1.0\r\n"));
    }

    #[test]
    fn status_json_reflects_counters() {
        let s = Shared::new("web-db", 64);
        s.records.store(16384, Ordering::Release);
        let j = s.status_json(1.5);
        assert!(
            j.starts_with("{\"workload\":\"web-db\",\"pass\":0,\"verified\":false,"),
            "{j}"
        );
        assert!(j.contains("\"uptime_s\":1.500,\"records\":16384,"), "{j}");
        s.pass.store(3, Ordering::Release);
        assert!(s.status_json(2.0).contains("\"pass\":3,\"verified\":true,"));
        s.failures.store(1, Ordering::Release);
        assert!(s.status_json(2.0).contains("\"verified\":false,"));
        let r = String::from_utf8(response(Route::Status, &j)).unwrap();
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert_eq!(body.trim_end(), j);
    }
}
