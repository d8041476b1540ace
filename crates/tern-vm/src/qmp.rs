//! The QMP session as a sans-IO state machine.
//!
//! QMP (the QEMU Machine Protocol) is newline-delimited JSON over a stream socket:
//!
//! ```text
//!   QEMU                                   tern (QmpSession)
//!    │ {"QMP": {"version": …, "capabilities": ["oob"]}}   greeting
//!    │ ──────────────────────────────────▶ phase Greeting → Negotiating
//!    │ ◀────────────────────────────────── {"execute":"qmp_capabilities","id":0}  (automatic)
//!    │ {"return": {}, "id": 0}
//!    │ ──────────────────────────────────▶ phase Ready; queued commands are released
//!    │ ◀────────────────────────────────── {"execute":"query-status","id":1}
//!    │ {"timestamp": …, "event": "STOP"}   (events may come at any time, between replies)
//!    │ {"return": {"status": "paused", …}, "id": 1}
//! ```
//!
//! The session never reads a socket or a clock: feed it bytes with
//! [`QmpSession::handle_input`], send what [`QmpSession::poll_transmit`] returns, take
//! replies with [`QmpSession::take_reply`] and events with [`QmpSession::poll_event`].
//! Every transmit is exactly one whole command line, so a driver can attach ancillary data
//! (a file descriptor for `getfd`) to the `sendmsg` that carries it.
//!
//! Guarantees: every buffer is bounded ([`MAX_LINE_BYTES`], [`MAX_EVENTS`],
//! [`MAX_IN_FLIGHT`]); a protocol violation (malformed JSON, a reply to an id never sent, a
//! second greeting, an over-long line) moves the session to [`Phase::Failed`] and is
//! reported once as a [`QmpError`] — every later call reports [`QmpError::Failed`], because
//! after a desynchronization no later reply can be trusted to belong to its command. A QMP
//! `error` reply to a command is not a protocol violation: it is that command's
//! [`ReplyError`] (class + description) and the session carries on.
//!
//! Version policy: QMP has been stable since QEMU 1.0; tern is tested against QEMU 7.2 and
//! sends only `qmp_capabilities` without arguments (no out-of-band execution).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use serde_json::{Map, Value};

/// Longest line accepted from QEMU (bytes, without the newline). The largest reply tern
/// could ask for, `query-qmp-schema`, is about 200 KiB on QEMU 7.2.
pub const MAX_LINE_BYTES: usize = 4 << 20;
/// Longest command line tern sends (bytes).
pub const MAX_COMMAND_BYTES: usize = 64 << 10;
/// Events kept until polled; beyond it the oldest are dropped and counted
/// ([`QmpSession::events_dropped`]).
pub const MAX_EVENTS: usize = 1024;
/// Commands issued and not yet taken (waiting to be sent, sent, or answered but not taken).
pub const MAX_IN_FLIGHT: usize = 64;
/// How much of an offending line an error message quotes.
const QUOTE_BYTES: usize = 120;

/// The id tern gives its own `qmp_capabilities`; user commands count up from 1.
const CAPABILITIES_ID: u64 = 0;

/// Where a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for QEMU's `{"QMP": …}` greeting.
    Greeting,
    /// `qmp_capabilities` sent; commands issued now wait for its reply.
    Negotiating,
    /// Commands flow.
    Ready,
    /// A protocol violation was seen; the connection must be dropped.
    Failed,
}

/// QEMU's version from the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// The greeting QEMU sends first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub version: QemuVersion,
    /// The distribution's package string, e.g. "Debian 1:7.2+dfsg-7+deb12u18+b3".
    pub package: String,
    /// Capabilities the server offers (QEMU 7.2: `["oob"]`); tern enables none.
    pub capabilities: Vec<String>,
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// E.g. `STOP`, `RESUME`, `SHUTDOWN`, `MIGRATION`.
    pub name: String,
    /// The event's `data` object (`Value::Null` when the event has none).
    pub data: Value,
    /// QEMU's wall-clock time of the event, microseconds since the Unix epoch.
    pub timestamp_us: u64,
}

/// The id of a command issued on a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CommandId(pub u64);

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A QMP `error` reply: QEMU refused or failed the command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct ReplyError {
    /// E.g. `GenericError`, `CommandNotFound`, `DeviceNotFound`.
    pub class: String,
    /// QEMU's human-readable description.
    pub desc: String,
}

/// The outcome of one command: its `return` value or its `error`.
pub type Reply = Result<Value, ReplyError>;

/// A protocol violation or misuse of the session.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP line {line} is longer than {limit} bytes")]
    LineTooLong { line: u64, limit: usize },
    #[error("QMP line {line} is not JSON: {text}")]
    Json {
        line: u64,
        text: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("QMP line {line}: {what}: {text}")]
    Unexpected {
        line: u64,
        what: &'static str,
        text: String,
    },
    #[error("QMP line {line} answers id {id}, which no command in flight has")]
    UnknownId { line: u64, id: String },
    #[error(
        "QMP line {line} is an error reply without an id ({error}); the session is out of step"
    )]
    UnsolicitedError { line: u64, error: ReplyError },
    #[error("QEMU refused capabilities negotiation: {0}")]
    Negotiation(ReplyError),
    #[error("the QMP session failed earlier and must be reconnected")]
    Failed,
    #[error("{limit} QMP commands are already in flight")]
    TooManyInFlight { limit: usize },
    #[error("QMP command name {0:?} is not a command name")]
    BadCommandName(String),
    #[error("arguments of QMP command {0} must be a JSON object or null")]
    BadArguments(String),
    #[error("QMP command {cmd} is {len} bytes long, more than {limit}")]
    CommandTooLong {
        cmd: String,
        len: usize,
        limit: usize,
    },
}

/// One QMP connection's protocol state. See the module docs.
#[derive(Debug)]
pub struct QmpSession {
    phase: Phase,
    /// Bytes of the line being received (no newline yet).
    partial: Vec<u8>,
    /// Lines received so far (for error messages).
    lines: u64,
    greeting: Option<Greeting>,
    next_id: u64,
    /// Issued before the session was ready; released after negotiation.
    held: VecDeque<Vec<u8>>,
    transmit: VecDeque<Vec<u8>>,
    /// Ids issued and not answered yet.
    awaiting: BTreeSet<u64>,
    /// Answered and not taken yet.
    replies: BTreeMap<u64, Reply>,
    /// Given up on by the driver (timed out); their replies are dropped on arrival.
    abandoned: BTreeSet<u64>,
    events: VecDeque<Event>,
    events_dropped: u64,
}

impl Default for QmpSession {
    fn default() -> Self {
        Self::new()
    }
}

impl QmpSession {
    pub fn new() -> Self {
        Self {
            phase: Phase::Greeting,
            partial: Vec::new(),
            lines: 0,
            greeting: None,
            next_id: CAPABILITIES_ID + 1,
            held: VecDeque::new(),
            transmit: VecDeque::new(),
            awaiting: BTreeSet::new(),
            replies: BTreeMap::new(),
            abandoned: BTreeSet::new(),
            events: VecDeque::new(),
            events_dropped: 0,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// True once capabilities are negotiated and the session has not failed.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    pub fn greeting(&self) -> Option<&Greeting> {
        self.greeting.as_ref()
    }

    /// Events dropped because nobody polled them and the queue was full.
    pub fn events_dropped(&self) -> u64 {
        self.events_dropped
    }

    /// Issues a command. `args` must be `Null` (no arguments) or an object. Before the
    /// session is ready the command is held and sent right after negotiation.
    pub fn send_command(&mut self, cmd: &str, args: Value) -> Result<CommandId, QmpError> {
        if self.phase == Phase::Failed {
            return Err(QmpError::Failed);
        }
        let name_ok = !cmd.is_empty()
            && cmd.len() <= 128
            && cmd
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !name_ok {
            return Err(QmpError::BadCommandName(cmd.to_string()));
        }
        let args = match args {
            Value::Null => None,
            Value::Object(m) => Some(m),
            _ => return Err(QmpError::BadArguments(cmd.to_string())),
        };
        if self.awaiting.len() + self.replies.len() >= MAX_IN_FLIGHT {
            return Err(QmpError::TooManyInFlight {
                limit: MAX_IN_FLIGHT,
            });
        }
        let id = self.next_id;
        let line = encode_command(cmd, args, id);
        if line.len() > MAX_COMMAND_BYTES {
            return Err(QmpError::CommandTooLong {
                cmd: cmd.to_string(),
                len: line.len(),
                limit: MAX_COMMAND_BYTES,
            });
        }
        self.next_id += 1;
        self.awaiting.insert(id);
        if self.phase == Phase::Ready {
            self.transmit.push_back(line);
        } else {
            self.held.push_back(line);
        }
        Ok(CommandId(id))
    }

    /// The next command line to send (one whole line, newline included).
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    /// The reply to `id`, once it has arrived (each reply is returned once).
    pub fn take_reply(&mut self, id: CommandId) -> Option<Reply> {
        self.replies.remove(&id.0)
    }

    /// Gives up on `id` (its driver timed out): a reply that already arrived is dropped, one
    /// that arrives later is dropped then, so it does not hold a slot of [`MAX_IN_FLIGHT`]
    /// forever. The command stays counted in flight until QEMU answers.
    pub fn abandon(&mut self, id: CommandId) {
        if self.replies.remove(&id.0).is_none() && self.awaiting.contains(&id.0) {
            self.abandoned.insert(id.0);
        }
    }

    /// True while `id` was issued and its reply has not arrived.
    pub fn is_awaiting(&self, id: CommandId) -> bool {
        self.awaiting.contains(&id.0)
    }

    /// The oldest queued event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Removes and returns the oldest queued event called `name`, leaving the others queued.
    pub fn take_event(&mut self, name: &str) -> Option<Event> {
        let i = self.events.iter().position(|e| e.name == name)?;
        self.events.remove(i)
    }

    /// Feeds bytes received from QEMU. Lines may be split anywhere across calls.
    pub fn handle_input(&mut self, mut data: &[u8]) -> Result<(), QmpError> {
        if self.phase == Phase::Failed {
            return Err(QmpError::Failed);
        }
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            let (head, tail) = data.split_at(pos);
            data = &tail[1..];
            self.lines += 1;
            if self.partial.len() + head.len() > MAX_LINE_BYTES {
                return self.fail(QmpError::LineTooLong {
                    line: self.lines,
                    limit: MAX_LINE_BYTES,
                });
            }
            let result = if self.partial.is_empty() {
                self.handle_line(head)
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(head);
                self.handle_line(&line)
            };
            if let Err(e) = result {
                return self.fail(e);
            }
        }
        if self.partial.len() + data.len() > MAX_LINE_BYTES {
            return self.fail(QmpError::LineTooLong {
                line: self.lines + 1,
                limit: MAX_LINE_BYTES,
            });
        }
        self.partial.extend_from_slice(data);
        Ok(())
    }

    fn fail(&mut self, e: QmpError) -> Result<(), QmpError> {
        self.phase = Phase::Failed;
        self.partial = Vec::new();
        self.transmit.clear();
        self.held.clear();
        Err(e)
    }

    fn handle_line(&mut self, raw: &[u8]) -> Result<(), QmpError> {
        let line = self.lines;
        let text = raw.trim_ascii();
        if text.is_empty() {
            return Ok(());
        }
        let value: Value = serde_json::from_slice(text).map_err(|source| QmpError::Json {
            line,
            text: quote(text),
            source,
        })?;
        let unexpected = |what| QmpError::Unexpected {
            line,
            what,
            text: quote(text),
        };
        let Value::Object(mut msg) = value else {
            return Err(unexpected("not a JSON object"));
        };
        // QEMU can put an event on a freshly opened monitor before its greeting (seen:
        // NETDEV_STREAM_CONNECTED while a stream netdev connects): keep it as an event.
        if self.phase == Phase::Greeting && !msg.contains_key("event") {
            let greeting = msg
                .get("QMP")
                .and_then(parse_greeting)
                .ok_or_else(|| unexpected("expected the QMP greeting"))?;
            self.greeting = Some(greeting);
            self.phase = Phase::Negotiating;
            self.transmit
                .push_back(encode_command("qmp_capabilities", None, CAPABILITIES_ID));
            return Ok(());
        }
        if msg.contains_key("QMP") {
            return Err(unexpected("a second greeting"));
        }
        if let Some(name) = msg.get("event") {
            let name = name
                .as_str()
                .ok_or_else(|| unexpected("event name is not a string"))?
                .to_string();
            let timestamp_us = msg
                .get("timestamp")
                .and_then(parse_timestamp)
                .ok_or_else(|| unexpected("event without a valid timestamp"))?;
            let data = msg.remove("data").unwrap_or(Value::Null);
            if self.events.len() >= MAX_EVENTS {
                self.events.pop_front();
                self.events_dropped += 1;
            }
            self.events.push_back(Event {
                name,
                data,
                timestamp_us,
            });
            return Ok(());
        }
        let reply = if let Some(v) = msg.remove("return") {
            Ok(v)
        } else if let Some(e) = msg.get("error") {
            Err(parse_reply_error(e).ok_or_else(|| unexpected("malformed error reply"))?)
        } else {
            return Err(unexpected("neither a reply nor an event"));
        };
        let Some(id_value) = msg.get("id") else {
            return Err(match reply {
                Err(error) => QmpError::UnsolicitedError { line, error },
                Ok(_) => unexpected("a reply without an id"),
            });
        };
        let unknown = || QmpError::UnknownId {
            line,
            id: id_value.to_string(),
        };
        let id = id_value.as_u64().ok_or_else(unknown)?;
        if id == CAPABILITIES_ID && self.phase == Phase::Negotiating {
            reply.map_err(QmpError::Negotiation)?;
            self.phase = Phase::Ready;
            self.transmit.extend(self.held.drain(..));
            return Ok(());
        }
        if !self.awaiting.remove(&id) {
            return Err(unknown());
        }
        if !self.abandoned.remove(&id) {
            self.replies.insert(id, reply);
        }
        Ok(())
    }
}

fn encode_command(cmd: &str, args: Option<Map<String, Value>>, id: u64) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("execute".into(), Value::String(cmd.into()));
    if let Some(a) = args {
        m.insert("arguments".into(), Value::Object(a));
    }
    m.insert("id".into(), Value::from(id));
    let mut line = serde_json::to_vec(&Value::Object(m)).expect("a JSON map serializes");
    line.push(b'\n');
    line
}

fn parse_greeting(v: &Value) -> Option<Greeting> {
    let ver = v.get("version")?;
    let q = ver.get("qemu")?;
    let num = |k: &str| q.get(k)?.as_u64().and_then(|n| u32::try_from(n).ok());
    Some(Greeting {
        version: QemuVersion {
            major: num("major")?,
            minor: num("minor")?,
            micro: num("micro")?,
        },
        package: ver
            .get("package")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        capabilities: v
            .get("capabilities")?
            .as_array()?
            .iter()
            .map(|c| c.as_str().map(str::to_string))
            .collect::<Option<_>>()?,
    })
}

fn parse_timestamp(v: &Value) -> Option<u64> {
    let s = v.get("seconds")?.as_u64()?;
    let us = v.get("microseconds")?.as_u64()?;
    if us >= 1_000_000 {
        return None;
    }
    s.checked_mul(1_000_000)?.checked_add(us)
}

fn parse_reply_error(v: &Value) -> Option<ReplyError> {
    Some(ReplyError {
        class: v.get("class")?.as_str()?.to_string(),
        desc: v.get("desc")?.as_str()?.to_string(),
    })
}

fn quote(text: &[u8]) -> String {
    let s = String::from_utf8_lossy(&text[..text.len().min(QUOTE_BYTES)]);
    if text.len() > QUOTE_BYTES {
        format!("{s}…")
    } else {
        s.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // Golden transcripts, captured from QEMU 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3) with
    // `-machine pc,accel=tcg -nodefaults -S -qmp unix:…` and a Python client.
    const GREETING: &[u8] = b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"Debian 1:7.2+dfsg-7+deb12u18+b3\"}, \"capabilities\": [\"oob\"]}}\r\n";
    const CAPS_OK: &[u8] = b"{\"return\": {}, \"id\": 0}\r\n";
    const QUERY_STATUS_PRELAUNCH: &[u8] = b"{\"return\": {\"status\": \"prelaunch\", \"singlestep\": false, \"running\": false}, \"id\": 1}\r\n";
    const NOT_FOUND: &[u8] = b"{\"id\": 2, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command no-such-cmd has not been found\"}}\r\n";
    /// `cont`: the RESUME event arrives before the reply.
    const CONT: &[u8] = b"{\"timestamp\": {\"seconds\": 1795306541, \"microseconds\": 961062}, \"event\": \"RESUME\"}\r\n{\"return\": {}, \"id\": 3}\r\n";
    /// `migrate {"uri": "exec:cat > /dev/null"}` with the `events` capability on.
    const MIGRATE: &[u8] = b"{\"timestamp\": {\"seconds\": 1795306649, \"microseconds\": 330299}, \"event\": \"MIGRATION\", \"data\": {\"status\": \"setup\"}}\r\n{\"return\": {}, \"id\": 4}\r\n{\"timestamp\": {\"seconds\": 1795306649, \"microseconds\": 361550}, \"event\": \"MIGRATION_PASS\", \"data\": {\"pass\": 1}}\r\n{\"timestamp\": {\"seconds\": 1795306649, \"microseconds\": 361718}, \"event\": \"MIGRATION\", \"data\": {\"status\": \"active\"}}\r\n{\"timestamp\": {\"seconds\": 1795306649, \"microseconds\": 375883}, \"event\": \"MIGRATION_PASS\", \"data\": {\"pass\": 2}}\r\n{\"timestamp\": {\"seconds\": 1795306649, \"microseconds\": 377658}, \"event\": \"MIGRATION\", \"data\": {\"status\": \"completed\"}}\r\n";
    const GETFD_WITHOUT_FD: &[u8] = b"{\"id\": 5, \"error\": {\"class\": \"GenericError\", \"desc\": \"No file descriptor supplied via SCM_RIGHTS\"}}\r\n";
    /// `quit`: SHUTDOWN comes before the reply, then QEMU closes the socket.
    const QUIT: &[u8] = b"{\"timestamp\": {\"seconds\": 1795306654, \"microseconds\": 787958}, \"event\": \"SHUTDOWN\", \"data\": {\"guest\": false, \"reason\": \"host-qmp-quit\"}}\r\n{\"return\": {}, \"id\": 6}\r\n";
    /// What QEMU answers to a line that is not JSON (no id: it cannot know one).
    const PARSE_ERROR: &[u8] = b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, invalid keyword 'garbage'\"}}\r\n";

    fn ready() -> QmpSession {
        let mut s = QmpSession::new();
        s.handle_input(GREETING).unwrap();
        assert_eq!(
            s.poll_transmit().unwrap(),
            b"{\"execute\":\"qmp_capabilities\",\"id\":0}\n"
        );
        s.handle_input(CAPS_OK).unwrap();
        assert!(s.is_ready());
        s
    }

    fn sent(s: &mut QmpSession) -> Value {
        let line = s.poll_transmit().expect("a command to send");
        assert_eq!(line.last(), Some(&b'\n'));
        assert!(s.poll_transmit().is_none(), "one line per command");
        serde_json::from_slice(&line).unwrap()
    }

    #[test]
    fn greeting_is_parsed_and_capabilities_are_negotiated_before_commands() {
        let mut s = QmpSession::new();
        assert_eq!(s.phase(), Phase::Greeting);
        // A command issued before the greeting waits for negotiation.
        let id = s.send_command("query-status", Value::Null).unwrap();
        assert!(s.poll_transmit().is_none());
        s.handle_input(GREETING).unwrap();
        let g = s.greeting().unwrap();
        assert_eq!(g.version.to_string(), "7.2.22");
        assert_eq!(g.package, "Debian 1:7.2+dfsg-7+deb12u18+b3");
        assert_eq!(g.capabilities, vec!["oob".to_string()]);
        assert_eq!(s.phase(), Phase::Negotiating);
        assert_eq!(
            sent(&mut s),
            json!({"execute": "qmp_capabilities", "id": 0})
        );
        s.handle_input(CAPS_OK).unwrap();
        assert_eq!(s.phase(), Phase::Ready);
        assert_eq!(sent(&mut s), json!({"execute": "query-status", "id": 1}));
        assert!(s.is_awaiting(id));
        s.handle_input(QUERY_STATUS_PRELAUNCH).unwrap();
        assert!(!s.is_awaiting(id));
        let r = s.take_reply(id).unwrap().unwrap();
        assert_eq!(r["status"], "prelaunch");
        assert!(s.take_reply(id).is_none(), "a reply is taken once");
    }

    #[test]
    fn golden_session_replies_errors_and_events() {
        let mut s = ready();
        let st = s.send_command("query-status", Value::Null).unwrap();
        let nf = s.send_command("no-such-cmd", Value::Null).unwrap();
        let cont = s.send_command("cont", json!({})).unwrap();
        let mig = s
            .send_command("migrate", json!({"uri": "exec:cat > /dev/null"}))
            .unwrap();
        let getfd = s.send_command("getfd", json!({"fdname": "nofd"})).unwrap();
        let quit = s.send_command("quit", Value::Null).unwrap();
        let lines: Vec<Value> = std::iter::from_fn(|| s.poll_transmit())
            .map(|l| serde_json::from_slice(&l).unwrap())
            .collect();
        assert_eq!(lines.len(), 6);
        assert_eq!(
            lines[2],
            json!({"execute": "cont", "arguments": {}, "id": 3})
        );
        assert_eq!(
            lines[3],
            json!({"execute": "migrate", "arguments": {"uri": "exec:cat > /dev/null"}, "id": 4})
        );

        // Replies arrive in pieces: feed the whole transcript one byte at a time.
        let transcript = [
            QUERY_STATUS_PRELAUNCH,
            NOT_FOUND,
            CONT,
            MIGRATE,
            GETFD_WITHOUT_FD,
            QUIT,
        ]
        .concat();
        for b in &transcript {
            s.handle_input(std::slice::from_ref(b)).unwrap();
        }
        assert_eq!(s.take_reply(st).unwrap().unwrap()["running"], false);
        let e = s.take_reply(nf).unwrap().unwrap_err();
        assert_eq!(e.class, "CommandNotFound");
        assert_eq!(e.desc, "The command no-such-cmd has not been found");
        assert_eq!(s.take_reply(cont).unwrap().unwrap(), json!({}));
        assert_eq!(s.take_reply(mig).unwrap().unwrap(), json!({}));
        let e = s.take_reply(getfd).unwrap().unwrap_err();
        assert_eq!(
            e.to_string(),
            "GenericError: No file descriptor supplied via SCM_RIGHTS"
        );
        assert_eq!(s.take_reply(quit).unwrap().unwrap(), json!({}));

        // Events in order, with data and microsecond timestamps; take_event skips others.
        let resume = s.poll_event().unwrap();
        assert_eq!(resume.name, "RESUME");
        assert_eq!(resume.data, Value::Null);
        assert_eq!(resume.timestamp_us, 1_795_306_541_961_062);
        let done = s.take_event("MIGRATION").unwrap();
        assert_eq!(done.data, json!({"status": "setup"}));
        let shutdown = s.take_event("SHUTDOWN").unwrap();
        assert_eq!(shutdown.data["reason"], "host-qmp-quit");
        let names: Vec<String> = std::iter::from_fn(|| s.poll_event())
            .map(|e| e.name)
            .collect();
        assert_eq!(
            names,
            ["MIGRATION_PASS", "MIGRATION", "MIGRATION_PASS", "MIGRATION"]
        );
        assert_eq!(s.events_dropped(), 0);
        assert!(s.is_ready());
    }

    #[test]
    fn crlf_and_lf_and_blank_lines_are_all_fine() {
        let mut s = QmpSession::new();
        let greeting = std::str::from_utf8(GREETING).unwrap().replace("\r\n", "\n");
        s.handle_input(b"\r\n\n").unwrap();
        s.handle_input(greeting.as_bytes()).unwrap();
        s.handle_input(b"{\"return\": {}, \"id\": 0}").unwrap();
        assert!(!s.is_ready(), "no newline yet");
        s.handle_input(b"\n").unwrap();
        assert!(s.is_ready());
    }

    fn assert_fails(input: &[u8], want: &str) {
        let mut s = ready();
        s.send_command("query-status", Value::Null).unwrap();
        let err = s.handle_input(input).unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
        assert_eq!(s.phase(), Phase::Failed);
        assert!(matches!(s.handle_input(CAPS_OK), Err(QmpError::Failed)));
        assert!(matches!(
            s.send_command("query-status", Value::Null),
            Err(QmpError::Failed)
        ));
    }

    #[test]
    fn garbage_input_fails_the_session_with_clear_errors() {
        assert_fails(b"garbage\n", "is not JSON: garbage");
        assert_fails(b"{\"return\": {}, \"id\": 1\n", "is not JSON");
        assert_fails(b"[1, 2]\n", "not a JSON object");
        assert_fails(b"\xff\xfe\n", "is not JSON");
        assert_fails(b"{\"hello\": 1}\n", "neither a reply nor an event");
        assert_fails(b"{\"return\": {}, \"id\": 99}\n", "answers id 99");
        assert_fails(b"{\"return\": {}, \"id\": \"x\"}\n", "answers id \"x\"");
        assert_fails(b"{\"return\": {}}\n", "a reply without an id");
        assert_fails(PARSE_ERROR, "JSON parse error, invalid keyword 'garbage'");
        assert_fails(GREETING, "a second greeting");
        assert_fails(b"{\"event\": 7, \"timestamp\": {}}\n", "event name");
        assert_fails(b"{\"event\": \"STOP\"}\n", "without a valid timestamp");
        assert_fails(
            b"{\"event\": \"STOP\", \"timestamp\": {\"seconds\": -1, \"microseconds\": 0}}\n",
            "without a valid timestamp",
        );
        assert_fails(
            b"{\"error\": {\"class\": 1}, \"id\": 1}\n",
            "malformed error",
        );
    }

    #[test]
    fn something_else_than_a_greeting_first_is_refused() {
        let mut s = QmpSession::new();
        let err = s.handle_input(CAPS_OK).unwrap_err();
        assert!(
            err.to_string().contains("expected the QMP greeting"),
            "{err}"
        );
        let mut s = QmpSession::new();
        let err = s
            .handle_input(b"{\"QMP\": {\"version\": 7}}\n")
            .unwrap_err();
        assert!(
            err.to_string().contains("expected the QMP greeting"),
            "{err}"
        );
    }

    #[test]
    fn an_event_before_the_greeting_is_kept() {
        let mut s = QmpSession::new();
        s.handle_input(
            b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"NETDEV_STREAM_CONNECTED\", \"data\": {}}\n",
        )
        .unwrap();
        s.handle_input(GREETING).unwrap();
        assert!(s.greeting().is_some());
        assert!(s.take_event("NETDEV_STREAM_CONNECTED").is_some());
    }

    #[test]
    fn refused_negotiation_is_an_error() {
        let mut s = QmpSession::new();
        s.handle_input(GREETING).unwrap();
        let err = s
            .handle_input(
                b"{\"id\": 0, \"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}}\n",
            )
            .unwrap_err();
        assert!(matches!(err, QmpError::Negotiation(ref e) if e.desc == "no"));
    }

    #[test]
    fn line_length_is_bounded_even_without_a_newline() {
        let mut s = ready();
        let chunk = vec![b' '; 1 << 20];
        for _ in 0..4 {
            s.handle_input(&chunk).unwrap();
        }
        let err = s.handle_input(b"  ").unwrap_err();
        assert!(matches!(err, QmpError::LineTooLong { limit, .. } if limit == MAX_LINE_BYTES));
        assert_eq!(s.phase(), Phase::Failed);

        // A line exactly at the limit is fine.
        let mut s = ready();
        let mut line = b"{\"return\": {}, \"id\": 1}".to_vec();
        s.send_command("x", Value::Null).unwrap();
        line.resize(MAX_LINE_BYTES, b' ');
        line.push(b'\n');
        s.handle_input(&line).unwrap();
        assert!(s.take_reply(CommandId(1)).unwrap().is_ok());
    }

    #[test]
    fn event_queue_is_bounded_and_counts_drops() {
        let mut s = ready();
        for i in 0..MAX_EVENTS + 5 {
            let ev = format!(
                "{{\"timestamp\": {{\"seconds\": {i}, \"microseconds\": 0}}, \"event\": \"E\"}}\n"
            );
            s.handle_input(ev.as_bytes()).unwrap();
        }
        assert_eq!(s.events_dropped(), 5);
        assert_eq!(s.poll_event().unwrap().timestamp_us, 5_000_000);
        assert_eq!(
            std::iter::from_fn(|| s.poll_event()).count(),
            MAX_EVENTS - 1
        );
    }

    #[test]
    fn commands_in_flight_are_bounded_and_checked() {
        let mut s = ready();
        for _ in 0..MAX_IN_FLIGHT {
            s.send_command("query-status", Value::Null).unwrap();
        }
        assert!(matches!(
            s.send_command("query-status", Value::Null),
            Err(QmpError::TooManyInFlight { .. })
        ));
        // Taking a reply frees a slot.
        s.handle_input(b"{\"return\": {}, \"id\": 1}\n").unwrap();
        assert!(s.send_command("query-status", Value::Null).is_err());
        s.take_reply(CommandId(1)).unwrap().unwrap();
        s.send_command("query-status", Value::Null).unwrap();

        let mut s = ready();
        for bad in ["", "a b", "x\"y", "quit\n"] {
            assert!(matches!(
                s.send_command(bad, Value::Null),
                Err(QmpError::BadCommandName(_))
            ));
        }
        assert!(s.send_command("stop", json!([1])).is_err());
        let huge = "x".repeat(MAX_COMMAND_BYTES);
        assert!(matches!(
            s.send_command("human-monitor-command", json!({"command-line": huge})),
            Err(QmpError::CommandTooLong { .. })
        ));
        assert!(s.poll_transmit().is_none(), "refused commands are not sent");
    }

    #[test]
    fn abandoned_commands_free_their_slot_when_answered() {
        let mut s = ready();
        let late = s.send_command("query-status", Value::Null).unwrap();
        let done = s.send_command("query-name", Value::Null).unwrap();
        s.handle_input(b"{\"return\": {\"name\": \"x\"}, \"id\": 2}\n")
            .unwrap();
        s.abandon(done); // already answered: dropped now
        s.abandon(late); // answered later: dropped then
        assert!(s.take_reply(done).is_none());
        assert!(s.is_awaiting(late));
        s.handle_input(QUERY_STATUS_PRELAUNCH).unwrap();
        assert!(!s.is_awaiting(late));
        assert!(s.take_reply(late).is_none());
        assert!(s.replies.is_empty() && s.awaiting.is_empty() && s.abandoned.is_empty());
        assert!(s.is_ready());
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_bounds_hold() {
        // A small deterministic generator (xorshift) over JSON-ish fragments and raw bytes.
        let pieces: &[&[u8]] = &[
            b"{",
            b"}",
            b"\"",
            b"\n",
            b"\r\n",
            b"return",
            b"error",
            b"event",
            b"id",
            b":",
            b",",
            b"1",
            b"0",
            b"-1",
            b"[",
            b"]",
            b"null",
            b"\xff",
            b"QMP",
            b"timestamp",
            GREETING,
            CAPS_OK,
            CONT,
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let mut s = QmpSession::new();
            let mut input = Vec::new();
            for _ in 0..40 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                input.extend_from_slice(pieces[(x % pieces.len() as u64) as usize]);
            }
            for chunk in input.chunks(7) {
                if s.handle_input(chunk).is_err() {
                    assert_eq!(s.phase(), Phase::Failed);
                    break;
                }
            }
            assert!(s.partial.len() <= MAX_LINE_BYTES);
            assert!(s.events.len() <= MAX_EVENTS);
        }
    }
}
