//! Sans-IO NBD server session: bytes in, events out, replies in, bytes out.
//!
//! The session owns the whole negotiation (greeting, client flags, options) and the framing
//! of transmission; the driver only moves bytes and runs [`Request`]s against a backend.
//! It never reads a clock, a socket or a file, and never panics on any input: every length
//! is checked against a named bound before anything is buffered or allocated for it.
//!
//! State diagram: see the crate docs.
//!
//! Driver contract: call [`ServerSession::input`] with what the socket delivered, drain
//! [`ServerSession::poll_event`] until `None`, answer each [`Event::Request`] with
//! [`ServerSession::reply`] (in any order), write out [`ServerSession::take_output`], and
//! after [`Event::Close`] write the remaining output and drop the connection. Unparsed input
//! is bounded by one message ([`MAX_OPTION_BYTES`] or [`MAX_PAYLOAD_BYTES`] plus a header)
//! plus what the driver feeds between polls.

use std::collections::BTreeMap;

use crate::backend::Extent;
use crate::wire::*;

/// Largest option payload accepted; a bigger one is answered `NBD_REP_ERR_TOO_BIG` and the
/// session is closed (its payload is not worth reading).
pub const MAX_OPTION_BYTES: u32 = 64 * 1024;
/// Largest payload of a READ or WRITE (the spec's portable maximum, advertised in
/// `NBD_INFO_BLOCK_SIZE`).
pub const MAX_PAYLOAD_BYTES: u32 = 32 * 1024 * 1024;
/// Advertised minimum block size: any byte alignment works on a file.
pub const MIN_BLOCK_BYTES: u32 = 1;
/// Advertised preferred block size.
pub const PREFERRED_BLOCK_BYTES: u32 = 4096;
/// Longest string (export name, query) the spec allows.
pub const MAX_STRING_BYTES: usize = 4096;
/// Requests handed to the driver and not yet answered; past this the session stops parsing.
pub const MAX_IN_FLIGHT: usize = 64;
/// Most block-status descriptors in one reply (the spec's recommended cap is 2^20).
pub const MAX_EXTENTS: usize = 1 << 20;
/// Most unparsed input the session holds: one largest WRITE (header and payload) plus
/// 1 MiB. It fills only while [`MAX_IN_FLIGHT`] requests are unanswered (a client that
/// pipelines faster than the backend completes); a driver must stop reading the socket
/// while [`ServerSession::input_room`] is smaller than what it would read (back-pressure),
/// and input past the bound closes the session ([`ProtocolError::InputOverflow`]).
pub const MAX_BUFFERED_INPUT_BYTES: usize = MAX_PAYLOAD_BYTES as usize + (1 << 20);
/// Context id this server gives `base:allocation` in `NBD_OPT_SET_META_CONTEXT`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// An export as the session sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
    /// Flushes are visible across connections (`NBD_FLAG_CAN_MULTI_CONN`).
    pub multi_conn: bool,
}

/// The NBD error codes a reply can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NbdError {
    #[error("operation not permitted")]
    Perm,
    #[error("input/output error")]
    Io,
    #[error("cannot allocate memory")]
    NoMem,
    #[error("invalid argument")]
    Inval,
    #[error("no space left on device")]
    NoSpc,
    #[error("value too large")]
    Overflow,
    #[error("operation not supported")]
    NotSup,
    #[error("server is shutting down")]
    Shutdown,
}

impl NbdError {
    /// The value in the reply's error field.
    pub fn code(self) -> u32 {
        match self {
            NbdError::Perm => 1,
            NbdError::Io => 5,
            NbdError::NoMem => 12,
            NbdError::Inval => 22,
            NbdError::NoSpc => 28,
            NbdError::Overflow => 75,
            NbdError::NotSup => 95,
            NbdError::Shutdown => 108,
        }
    }
}

/// A client broke the protocol badly enough that the server drops the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("client flags {0:#x} include bits this server did not offer")]
    UnknownClientFlags(u32),
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error("option {option} carries {len} bytes, more than the {MAX_OPTION_BYTES} allowed")]
    OptionTooLong { option: u32, len: u32 },
    #[error("NBD_OPT_EXPORT_NAME names unknown export {0:?}")]
    UnknownExport(String),
    #[error("bad request magic {0:#010x}")]
    BadRequestMagic(u32),
    #[error(
        "write of {len} bytes (cookie {cookie:#x}) exceeds the {MAX_PAYLOAD_BYTES}-byte payload limit"
    )]
    WriteTooLong { cookie: u64, len: u32 },
    #[error("connection closed in the middle of a message ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
    #[error(
        "{buffered} bytes of input buffered and {more} more fed, past the \
         {MAX_BUFFERED_INPUT_BYTES}-byte bound (the driver ignored back-pressure)"
    )]
    InputOverflow { buffered: usize, more: usize },
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent `NBD_OPT_ABORT` during negotiation.
    Abort,
    /// The client sent `NBD_CMD_DISC`; every earlier request has been answered.
    Disconnect,
    /// The client closed its side between messages.
    HangUp,
    /// The client broke the protocol.
    Violation(ProtocolError),
}

/// Identifies a request handed to the driver until it is answered. Cookies are the client's
/// and may repeat; ids never do within a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// What a request asks the backend to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Answer with [`Reply::Data`] of exactly `len` bytes.
    Read,
    /// The `len` bytes to write at `offset`.
    Write(Vec<u8>),
    Flush,
    Trim,
    /// `may_trim`: the client did not set `NBD_CMD_FLAG_NO_HOLE`.
    WriteZeroes {
        may_trim: bool,
    },
    /// `base:allocation` of the range; answer with [`Reply::Extents`].
    BlockStatus,
}

/// A validated transmission request: flags are known, the range lies inside the export,
/// the export is writable if the command writes, and `len` is nonzero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: RequestId,
    pub cookie: u64,
    pub command: Command,
    pub offset: u64,
    pub len: u32,
    /// `NBD_CMD_FLAG_FUA`: durable before the reply.
    pub fua: bool,
}

/// A successful answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Write, flush, trim, write zeroes.
    Done,
    /// The bytes of a read.
    Data(Vec<u8>),
    /// Allocation of a block-status range, in order from `offset`.
    Extents(Vec<Extent>),
}

/// What the session asks of its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Negotiation chose `exports[index]`; transmission begins.
    ExportChosen(usize),
    /// Run this against the chosen export's backend and [`ServerSession::reply`].
    Request(Request),
    /// Write out the remaining output, then drop the connection.
    Close(CloseReason),
}

/// The driver answered a request the session does not know, or with the wrong kind of data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("no request {0:?} in flight")]
    UnknownRequest(RequestId),
    #[error("reply to {id:?} does not fit its command: {what}")]
    Mismatch { id: RequestId, what: &'static str },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    ClientFlags,
    Options,
    Transmission,
    /// `NBD_CMD_DISC` seen: input is ignored, close once nothing is in flight.
    Draining,
    /// Emit `Close(reason)` on the next poll.
    Closing(CloseReason),
    Closed,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    cookie: u64,
    kind: PendingKind,
    offset: u64,
    len: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingKind {
    Read,
    NoData,
    BlockStatus { req_one: bool },
}

/// One client connection's protocol state. See the module docs for the driver contract.
#[derive(Debug)]
pub struct ServerSession {
    exports: Vec<ExportInfo>,
    state: State,
    input: Vec<u8>,
    input_pos: usize,
    output: Vec<u8>,
    no_zeroes: bool,
    structured: bool,
    /// Export for which `base:allocation` is selected.
    meta_export: Option<usize>,
    export: Option<usize>,
    in_flight: BTreeMap<RequestId, Pending>,
    next_id: u64,
    rejected: u64,
}

impl ServerSession {
    /// A session offering `exports`; the greeting is already in the output. An empty export
    /// name selects `exports[0]` unless an export is literally named "".
    pub fn new(exports: Vec<ExportInfo>) -> Self {
        let mut output = Vec::with_capacity(18);
        output.extend_from_slice(&NBD_MAGIC.to_be_bytes());
        output.extend_from_slice(&IHAVEOPT.to_be_bytes());
        output.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        ServerSession {
            exports,
            state: State::ClientFlags,
            input: Vec::new(),
            input_pos: 0,
            output,
            no_zeroes: false,
            structured: false,
            meta_export: None,
            export: None,
            in_flight: BTreeMap::new(),
            next_id: 0,
            rejected: 0,
        }
    }

    /// Bytes received from the client. Ignored once the session is closing.
    pub fn input(&mut self, bytes: &[u8]) {
        if !self.accepts_input() {
            return;
        }
        let buffered = self.input.len() - self.input_pos;
        if bytes.len() > MAX_BUFFERED_INPUT_BYTES - buffered {
            self.close(CloseReason::Violation(ProtocolError::InputOverflow {
                buffered,
                more: bytes.len(),
            }));
            return;
        }
        if self.input_pos > 0 && self.input_pos * 2 >= self.input.len() {
            self.input.drain(..self.input_pos);
            self.input_pos = 0;
        }
        self.input.extend_from_slice(bytes);
    }

    /// Bytes [`ServerSession::input`] still takes before [`MAX_BUFFERED_INPUT_BYTES`].
    pub fn input_room(&self) -> usize {
        MAX_BUFFERED_INPUT_BYTES - (self.input.len() - self.input_pos)
    }

    /// The client closed its sending side.
    pub fn input_eof(&mut self) {
        if !self.accepts_input() {
            return;
        }
        let buffered = self.input.len() - self.input_pos;
        self.state = State::Closing(if buffered == 0 {
            CloseReason::HangUp
        } else {
            CloseReason::Violation(ProtocolError::Truncated { buffered })
        });
    }

    /// Bytes to send to the client, in order.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// Whether output is waiting.
    pub fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    /// The export chosen for transmission, if negotiation got that far.
    pub fn export(&self) -> Option<usize> {
        self.export
    }

    /// Whether `Event::Close` has been emitted.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Requests the session answered with an error itself (bad flags, out of range, ...).
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// Requests handed out and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn accepts_input(&self) -> bool {
        matches!(
            self.state,
            State::ClientFlags | State::Options | State::Transmission
        )
    }

    fn buffered(&self) -> &[u8] {
        &self.input[self.input_pos..]
    }

    fn consume(&mut self, n: usize) {
        self.input_pos += n;
        if self.input_pos >= self.input.len() {
            self.input.clear();
            self.input_pos = 0;
        }
    }

    fn close(&mut self, reason: CloseReason) {
        self.state = State::Closing(reason);
        self.input.clear();
        self.input_pos = 0;
    }

    /// The next thing the driver must do, or `None` until more input or a reply arrives.
    pub fn poll_event(&mut self) -> Option<Event> {
        loop {
            match &self.state {
                State::Closed => return None,
                State::Closing(reason) => {
                    let reason = reason.clone();
                    self.state = State::Closed;
                    self.in_flight.clear();
                    return Some(Event::Close(reason));
                }
                State::Draining => {
                    if !self.in_flight.is_empty() {
                        return None;
                    }
                    self.state = State::Closed;
                    return Some(Event::Close(CloseReason::Disconnect));
                }
                State::ClientFlags => {
                    let flags = u32::from_be_bytes(*self.buffered().first_chunk()?);
                    self.consume(4);
                    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                        self.close(CloseReason::Violation(ProtocolError::UnknownClientFlags(
                            flags,
                        )));
                        continue;
                    }
                    // Fixed newstyle is honoured even if the client did not set its bit.
                    self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                    self.state = State::Options;
                }
                State::Options => {
                    if let Some(event) = self.poll_option()? {
                        return Some(event);
                    }
                }
                State::Transmission => {
                    if self.in_flight.len() >= MAX_IN_FLIGHT {
                        return None;
                    }
                    if let Some(event) = self.poll_request()? {
                        return Some(event);
                    }
                }
            }
        }
    }

    /// Answer a request. Replies may come in any order. An answer that does not fit the
    /// command (a short read, extents for a write) is sent to the client as `NBD_EIO` and
    /// reported as an error.
    pub fn reply(
        &mut self,
        id: RequestId,
        result: Result<Reply, NbdError>,
    ) -> Result<(), ReplyError> {
        let pending = self
            .in_flight
            .remove(&id)
            .ok_or(ReplyError::UnknownRequest(id))?;
        let cookie = pending.cookie;
        let mismatch = |what| ReplyError::Mismatch { id, what };
        let outcome = match (pending.kind, result) {
            (_, Err(e)) => {
                let msg = e.to_string();
                self.error_reply(cookie, e, &msg);
                Ok(())
            }
            (PendingKind::NoData, Ok(Reply::Done)) => {
                self.simple_reply(cookie, 0);
                Ok(())
            }
            (PendingKind::Read, Ok(Reply::Data(data))) if data.len() == pending.len as usize => {
                self.read_reply(cookie, pending.offset, &data);
                Ok(())
            }
            (PendingKind::Read, Ok(Reply::Data(_))) => {
                Err(mismatch("read data of the wrong length"))
            }
            (PendingKind::BlockStatus { req_one }, Ok(Reply::Extents(extents))) => {
                match encode_extents(&extents, pending.len, req_one) {
                    Some(payload) => {
                        self.chunk(cookie, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, &payload);
                        Ok(())
                    }
                    None => Err(mismatch("no extent of nonzero length")),
                }
            }
            (_, Ok(_)) => Err(mismatch("reply kind does not match the command")),
        };
        if outcome.is_err() {
            self.error_reply(cookie, NbdError::Io, "server produced a malformed reply");
        }
        outcome
    }

    // ---- Negotiation ----------------------------------------------------------------

    /// Parses one option if complete. `None`: wait; `Some(None)`: handled, go on.
    fn poll_option(&mut self) -> Option<Option<Event>> {
        let header: &[u8; OPTION_HEADER_BYTES] = self.buffered().first_chunk()?;
        let magic = u64::from_be_bytes(header[0..8].try_into().ok()?);
        let option = u32::from_be_bytes(header[8..12].try_into().ok()?);
        let len = u32::from_be_bytes(header[12..16].try_into().ok()?);
        if magic != IHAVEOPT {
            self.close(CloseReason::Violation(ProtocolError::BadOptionMagic(magic)));
            return Some(None);
        }
        if len > MAX_OPTION_BYTES {
            self.option_error(option, REP_ERR_TOO_BIG, "option too long");
            self.close(CloseReason::Violation(ProtocolError::OptionTooLong {
                option,
                len,
            }));
            return Some(None);
        }
        let total = OPTION_HEADER_BYTES + len as usize;
        let data = self.buffered().get(OPTION_HEADER_BYTES..total)?.to_vec();
        self.consume(total);
        Some(self.handle_option(option, &data))
    }

    fn handle_option(&mut self, option: u32, data: &[u8]) -> Option<Event> {
        match option {
            OPT_EXPORT_NAME => return self.opt_export_name(data),
            OPT_ABORT => {
                self.option_reply(option, REP_ACK, &[]);
                self.close(CloseReason::Abort);
            }
            OPT_LIST => self.opt_list(data),
            OPT_STARTTLS => self.option_error(
                option,
                REP_ERR_POLICY,
                "TLS is not offered: serve over a unix socket or loopback",
            ),
            OPT_INFO | OPT_GO => return self.opt_info_go(option, data),
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    self.structured = true;
                    self.option_reply(option, REP_ACK, &[]);
                } else {
                    self.option_error(option, REP_ERR_INVALID, "option takes no data");
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.opt_meta_context(option, data),
            _ => self.option_error(option, REP_ERR_UNSUP, "option not supported"),
        }
        None
    }

    fn opt_export_name(&mut self, name: &[u8]) -> Option<Event> {
        let Some(index) = self.find_export(name) else {
            let name = String::from_utf8_lossy(clip(name)).into_owned();
            self.close(CloseReason::Violation(ProtocolError::UnknownExport(name)));
            return None;
        };
        let (size, flags) = (self.exports[index].size, self.transmission_flags(index));
        self.output.extend_from_slice(&size.to_be_bytes());
        self.output.extend_from_slice(&flags.to_be_bytes());
        if !self.no_zeroes {
            self.output.extend_from_slice(&[0; 124]);
        }
        Some(self.enter_transmission(index))
    }

    fn opt_list(&mut self, data: &[u8]) {
        if !data.is_empty() {
            return self.option_error(OPT_LIST, REP_ERR_INVALID, "option takes no data");
        }
        for i in 0..self.exports.len() {
            let export = &self.exports[i];
            let (name, description) = (clip_str(&export.name), clip_str(&export.description));
            let mut payload = Vec::with_capacity(4 + name.len() + description.len());
            payload.extend_from_slice(&(name.len() as u32).to_be_bytes());
            payload.extend_from_slice(name);
            payload.extend_from_slice(description);
            self.option_reply(OPT_LIST, REP_SERVER, &payload);
        }
        self.option_reply(OPT_LIST, REP_ACK, &[]);
    }

    fn opt_info_go(&mut self, option: u32, data: &[u8]) -> Option<Event> {
        let Some((name, requests)) = parse_info_request(data) else {
            self.option_error(option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data");
            return None;
        };
        let Some(index) = self.find_export(name) else {
            self.option_error(option, REP_ERR_UNKNOWN, "no such export");
            return None;
        };
        let (size, flags) = (self.exports[index].size, self.transmission_flags(index));
        let mut info = Vec::with_capacity(16);
        info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&size.to_be_bytes());
        info.extend_from_slice(&flags.to_be_bytes());
        self.option_reply(option, REP_INFO, &info);
        // Sent unasked too: the limits hold whether or not the client asked.
        info.clear();
        info.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        for v in [MIN_BLOCK_BYTES, PREFERRED_BLOCK_BYTES, MAX_PAYLOAD_BYTES] {
            info.extend_from_slice(&v.to_be_bytes());
        }
        self.option_reply(option, REP_INFO, &info);
        for (wanted, kind) in [
            (requests.name, INFO_NAME),
            (requests.description, INFO_DESCRIPTION),
        ] {
            if !wanted {
                continue;
            }
            let export = &self.exports[index];
            let text = clip_str(if kind == INFO_NAME {
                &export.name
            } else {
                &export.description
            });
            info.clear();
            info.extend_from_slice(&kind.to_be_bytes());
            info.extend_from_slice(text);
            self.option_reply(option, REP_INFO, &info);
        }
        self.option_reply(option, REP_ACK, &[]);
        (option == OPT_GO).then(|| self.enter_transmission(index))
    }

    fn opt_meta_context(&mut self, option: u32, data: &[u8]) {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // A SET replaces the selection even when it fails.
            self.meta_export = None;
            if !self.structured {
                return self.option_error(
                    option,
                    REP_ERR_INVALID,
                    "negotiate structured replies first",
                );
            }
        }
        let Some((name, queries)) = parse_meta_request(data) else {
            return self.option_error(option, REP_ERR_INVALID, "malformed meta context data");
        };
        let Some(index) = self.find_export(name) else {
            return self.option_error(option, REP_ERR_UNKNOWN, "no such export");
        };
        let selected = if set {
            queries.iter().any(|q| *q == BASE_ALLOCATION.as_bytes())
        } else {
            queries.is_empty()
                || queries
                    .iter()
                    .any(|q| *q == b"base:" || *q == BASE_ALLOCATION.as_bytes())
        };
        if selected {
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            let mut payload = id.to_be_bytes().to_vec();
            payload.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.option_reply(option, REP_META_CONTEXT, &payload);
            if set {
                self.meta_export = Some(index);
            }
        }
        self.option_reply(option, REP_ACK, &[]);
    }

    fn enter_transmission(&mut self, index: usize) -> Event {
        self.export = Some(index);
        self.state = State::Transmission;
        Event::ExportChosen(index)
    }

    fn find_export(&self, name: &[u8]) -> Option<usize> {
        let exact = self.exports.iter().position(|e| e.name.as_bytes() == name);
        exact.or_else(|| (name.is_empty() && !self.exports.is_empty()).then_some(0))
    }

    fn transmission_flags(&self, index: usize) -> u16 {
        let export = &self.exports[index];
        let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;
        if export.read_only {
            flags |= FLAG_READ_ONLY;
        } else {
            flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
        }
        if self.structured {
            // Reads always go as one chunk, so "don't fragment" costs nothing.
            flags |= FLAG_SEND_DF;
        }
        if export.multi_conn {
            flags |= FLAG_CAN_MULTI_CONN;
        }
        flags
    }

    fn option_reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        self.output
            .extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        self.output.extend_from_slice(&option.to_be_bytes());
        self.output.extend_from_slice(&kind.to_be_bytes());
        self.output
            .extend_from_slice(&(data.len() as u32).to_be_bytes());
        self.output.extend_from_slice(data);
    }

    fn option_error(&mut self, option: u32, kind: u32, message: &str) {
        self.option_reply(option, kind, message.as_bytes());
    }

    // ---- Transmission ---------------------------------------------------------------

    /// Parses one request if complete. `None`: wait; `Some(None)`: handled, go on.
    fn poll_request(&mut self) -> Option<Option<Event>> {
        let header: &[u8; REQUEST_HEADER_BYTES] = self.buffered().first_chunk()?;
        let magic = u32::from_be_bytes(header[0..4].try_into().ok()?);
        let flags = u16::from_be_bytes(header[4..6].try_into().ok()?);
        let kind = u16::from_be_bytes(header[6..8].try_into().ok()?);
        let cookie = u64::from_be_bytes(header[8..16].try_into().ok()?);
        let offset = u64::from_be_bytes(header[16..24].try_into().ok()?);
        let len = u32::from_be_bytes(header[24..28].try_into().ok()?);
        if magic != REQUEST_MAGIC {
            self.close(CloseReason::Violation(ProtocolError::BadRequestMagic(
                magic,
            )));
            return Some(None);
        }
        if kind == CMD_WRITE && len > MAX_PAYLOAD_BYTES {
            // The payload cannot be skipped without reading it all; the spec lets the
            // server hang up on a payload this large.
            self.reject(
                cookie,
                NbdError::Inval,
                "write longer than the maximum payload",
            );
            self.close(CloseReason::Violation(ProtocolError::WriteTooLong {
                cookie,
                len,
            }));
            return Some(None);
        }
        let total = REQUEST_HEADER_BYTES + if kind == CMD_WRITE { len as usize } else { 0 };
        let payload = match kind {
            CMD_WRITE => Some(self.buffered().get(REQUEST_HEADER_BYTES..total)?.to_vec()),
            _ => None,
        };
        self.consume(total);
        Some(self.handle_request(flags, kind, cookie, offset, len, payload))
    }

    fn handle_request(
        &mut self,
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: Option<Vec<u8>>,
    ) -> Option<Event> {
        let index = self.export?;
        let (size, read_only) = (self.exports[index].size, self.exports[index].read_only);
        let (allowed, writes) = match kind {
            CMD_DISC => {
                self.state = State::Draining;
                self.input.clear();
                self.input_pos = 0;
                return None;
            }
            CMD_READ if self.structured => (CMD_FLAG_FUA | CMD_FLAG_DF, false),
            CMD_READ => (CMD_FLAG_FUA, false),
            CMD_WRITE | CMD_TRIM => (CMD_FLAG_FUA, true),
            CMD_FLUSH => (CMD_FLAG_FUA, false),
            CMD_WRITE_ZEROES => (CMD_FLAG_FUA | CMD_FLAG_NO_HOLE, true),
            CMD_BLOCK_STATUS => (CMD_FLAG_FUA | CMD_FLAG_REQ_ONE, false),
            _ => return self.reject(cookie, NbdError::Inval, "unknown command"),
        };
        if flags & !allowed != 0 {
            return self.reject(
                cookie,
                NbdError::Inval,
                "command flags not valid for this command",
            );
        }
        if writes && read_only {
            return self.reject(cookie, NbdError::Perm, "export is read-only");
        }
        if kind == CMD_BLOCK_STATUS && !(self.structured && self.meta_export == Some(index)) {
            return self.reject(
                cookie,
                NbdError::Inval,
                "base:allocation was not negotiated",
            );
        }
        if kind == CMD_READ && len > MAX_PAYLOAD_BYTES {
            let error = if self.structured {
                NbdError::Overflow
            } else {
                NbdError::Inval
            };
            return self.reject(cookie, error, "read longer than the maximum payload");
        }
        let in_bounds = offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= size);
        if kind != CMD_FLUSH && !in_bounds {
            let error = if matches!(kind, CMD_WRITE | CMD_WRITE_ZEROES) {
                NbdError::NoSpc
            } else {
                NbdError::Inval
            };
            return self.reject(
                cookie,
                error,
                "request extends beyond the end of the export",
            );
        }
        if len == 0 && kind != CMD_FLUSH {
            if kind == CMD_BLOCK_STATUS {
                return self.reject(cookie, NbdError::Inval, "block status of zero bytes");
            }
            // Nothing to do; the spec leaves it unspecified and asks not to disconnect.
            if kind == CMD_READ && self.structured {
                self.chunk(cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[]);
            } else {
                self.simple_reply(cookie, 0);
            }
            return None;
        }
        let (command, pending) = match kind {
            CMD_READ => (Command::Read, PendingKind::Read),
            CMD_WRITE => (
                Command::Write(payload.unwrap_or_default()),
                PendingKind::NoData,
            ),
            CMD_FLUSH => (Command::Flush, PendingKind::NoData),
            CMD_TRIM => (Command::Trim, PendingKind::NoData),
            CMD_WRITE_ZEROES => (
                Command::WriteZeroes {
                    may_trim: flags & CMD_FLAG_NO_HOLE == 0,
                },
                PendingKind::NoData,
            ),
            _ => (
                Command::BlockStatus,
                PendingKind::BlockStatus {
                    req_one: flags & CMD_FLAG_REQ_ONE != 0,
                },
            ),
        };
        let id = RequestId(self.next_id);
        self.next_id += 1;
        self.in_flight.insert(
            id,
            Pending {
                cookie,
                kind: pending,
                offset,
                len,
            },
        );
        Some(Event::Request(Request {
            id,
            cookie,
            command,
            offset,
            len,
            fua: flags & CMD_FLAG_FUA != 0,
        }))
    }

    fn reject(&mut self, cookie: u64, error: NbdError, message: &str) -> Option<Event> {
        self.rejected += 1;
        self.error_reply(cookie, error, message);
        None
    }

    fn error_reply(&mut self, cookie: u64, error: NbdError, message: &str) {
        if self.structured {
            let message = clip_str(message);
            let mut payload = Vec::with_capacity(6 + message.len());
            payload.extend_from_slice(&error.code().to_be_bytes());
            payload.extend_from_slice(&(message.len() as u16).to_be_bytes());
            payload.extend_from_slice(message);
            self.chunk(cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, &payload);
        } else {
            self.simple_reply(cookie, error.code());
        }
    }

    fn read_reply(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        if self.structured {
            // One chunk for the whole range (reads are capped at MAX_PAYLOAD_BYTES, so the
            // length fits), which is also what "don't fragment" asks for.
            self.chunk_header(
                cookie,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                8 + data.len() as u32,
            );
            self.output.extend_from_slice(&offset.to_be_bytes());
        } else {
            self.simple_reply(cookie, 0);
        }
        self.output.extend_from_slice(data);
    }

    fn simple_reply(&mut self, cookie: u64, error: u32) {
        self.output
            .extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        self.output.extend_from_slice(&error.to_be_bytes());
        self.output.extend_from_slice(&cookie.to_be_bytes());
    }

    fn chunk(&mut self, cookie: u64, flags: u16, kind: u16, payload: &[u8]) {
        self.chunk_header(cookie, flags, kind, payload.len() as u32);
        self.output.extend_from_slice(payload);
    }

    fn chunk_header(&mut self, cookie: u64, flags: u16, kind: u16, len: u32) {
        self.output
            .extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        self.output.extend_from_slice(&flags.to_be_bytes());
        self.output.extend_from_slice(&kind.to_be_bytes());
        self.output.extend_from_slice(&cookie.to_be_bytes());
        self.output.extend_from_slice(&len.to_be_bytes());
    }
}

/// Client's `NBD_INFO_*` requests this server acts on.
#[derive(Debug, Default)]
struct InfoRequests {
    name: bool,
    description: bool,
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` data: name length, name, count, count info types.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], InfoRequests)> {
    let mut r = Reader(data);
    let name = r.string()?;
    let count = r.u16()?;
    if r.0.len() != 2 * usize::from(count) {
        return None;
    }
    let mut requests = InfoRequests::default();
    for _ in 0..count {
        match r.u16()? {
            INFO_NAME => requests.name = true,
            INFO_DESCRIPTION => requests.description = true,
            // EXPORT and BLOCK_SIZE are always sent; unknown types are ignored.
            _ => {}
        }
    }
    Some((name, requests))
}

/// Meta-context option data: name length, name, count, count (length, query).
fn parse_meta_request(data: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let mut r = Reader(data);
    let name = r.string()?;
    let count = r.u32()?;
    let mut queries = Vec::new();
    for _ in 0..count {
        // Each query takes at least four bytes, so the loop is bounded by the data length.
        queries.push(r.string()?);
    }
    r.0.is_empty().then_some((name, queries))
}

/// Big-endian reader over option data; `None` when the data runs out.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    /// A 32-bit length and that many bytes, at most [`MAX_STRING_BYTES`].
    fn string(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u32()?).ok()?;
        if len > MAX_STRING_BYTES {
            return None;
        }
        self.take(len)
    }
}

/// `NBD_REPLY_TYPE_BLOCK_STATUS` payload for `extents`, clipped to the request's `len`
/// (one descriptor if `req_one`), equal neighbours merged. `None` if nothing remains.
fn encode_extents(extents: &[Extent], len: u32, req_one: bool) -> Option<Vec<u8>> {
    let mut descriptors: Vec<(u32, u32)> = Vec::new();
    let mut covered = 0u32;
    for extent in extents {
        let room = len - covered;
        if room == 0 || descriptors.len() >= MAX_EXTENTS {
            break;
        }
        if extent.len == 0 {
            continue;
        }
        let piece = u32::try_from(extent.len).unwrap_or(u32::MAX).min(room);
        let flags =
            if extent.hole { STATE_HOLE } else { 0 } | if extent.zero { STATE_ZERO } else { 0 };
        match descriptors.last_mut() {
            Some((last_len, last_flags)) if *last_flags == flags => *last_len += piece,
            _ => descriptors.push((piece, flags)),
        }
        covered += piece;
        if req_one {
            break;
        }
    }
    if descriptors.is_empty() {
        return None;
    }
    let mut payload = Vec::with_capacity(4 + 8 * descriptors.len());
    payload.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for (len, flags) in descriptors {
        payload.extend_from_slice(&len.to_be_bytes());
        payload.extend_from_slice(&flags.to_be_bytes());
    }
    Some(payload)
}

/// At most [`MAX_STRING_BYTES`] of `s` (strings on the wire may not be longer).
fn clip(s: &[u8]) -> &[u8] {
    &s[..s.len().min(MAX_STRING_BYTES)]
}

/// [`clip`] for text, cut at a character boundary.
fn clip_str(s: &str) -> &[u8] {
    let mut end = s.len().min(MAX_STRING_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s.as_bytes()[..end]
}
