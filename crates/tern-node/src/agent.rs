//! The site agent's protocol (sans-IO): request/reply frames, the command set and the
//! per-peer allow-list. The threads that serve it are in `agent_worker.rs`; the commands
//! are carried out by an [`AgentHandler`](crate::agent_worker::AgentHandler) the binary
//! provides (tern-cli, with tern-vm and tern-disk).
//!
//! ```text
//! request : 'A' | 1 | site_len (1) | site (0..=MAX_SITE_LEN) | body_len (4, BE) | JSON body
//! reply   : 'a' | 1 | body_len (4, BE) | JSON body
//! ```
//! `site` is empty for "this node"; a local caller names a peer there to have its node relay
//! the request to that peer's agent (the relayed frame carries an empty site: no second
//! hop). Bodies are strict JSON (`deny_unknown_fields`, typed and bounded fields): a VM or
//! volume is named by a [`Name`], a spec has no paths (kernel, initrd, disk files are the
//! serving site's own), no QMP command and no shell word crosses.
//!
//! A peer may call only what its `[[peer]]` `agent = [...]` list names (default: nothing);
//! local callers on the control socket (root or the node's user) may call everything.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Request frame magic and version.
pub const REQUEST_MAGIC: u8 = b'A';
/// Reply frame magic.
pub const REPLY_MAGIC: u8 = b'a';
pub const VERSION: u8 = 1;
/// Longest request body; a longer one is refused (`too_large`) before it is read.
pub const MAX_REQUEST_BODY: usize = 16 << 10;
/// Longest reply body; a handler's longer answer becomes a `failed` error.
pub const MAX_REPLY_BODY: usize = 1 << 20;
/// Longest site (peer) name in a request.
pub const MAX_SITE_LEN: usize = 64;
/// Longest request frame.
pub const MAX_REQUEST_FRAME: usize = 3 + MAX_SITE_LEN + 4 + MAX_REQUEST_BODY;
/// Longest VM, volume or workload name (tern-vm's rule).
pub const MAX_NAME_LEN: usize = 32;
/// Guest memory bounds of `vm.start`.
pub const MIN_MEM_MIB: u32 = 64;
pub const MAX_MEM_MIB: u32 = 65536;
/// Most vCPUs of `vm.start`.
pub const MAX_SMP: u32 = 64;
/// Highest workload write rate of `vm.start`.
pub const MAX_WORKLOAD_RATE_MB_S: u32 = 10_000;
/// TCP ports a `vm.start_incoming` may listen on (libvirt's migration range).
pub const INCOMING_PORTS: (u16, u16) = (49152, 49215);

/// A VM, volume or workload name: 1..=[`MAX_NAME_LEN`] of `[A-Za-z0-9_-]`, starting with a
/// letter or digit. Never a path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    pub fn new(s: &str) -> Result<Name, String> {
        let ok = !s.is_empty()
            && s.len() <= MAX_NAME_LEN
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(Name(s.to_string()))
        } else {
            Err(format!(
                "bad name {s:?}: 1..={MAX_NAME_LEN} of [A-Za-z0-9_-], starting with a letter or digit"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = String;
    fn try_from(s: String) -> Result<Name, String> {
        Name::new(&s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The machine a site is asked to run: typed and bounded, no paths (the serving site uses
/// its own kernel, initrd, volume directory and switch). [`VmStartSpec::validate`] checks
/// the bounds; the codec calls it on every decoded request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStartSpec {
    pub name: Name,
    /// [`MIN_MEM_MIB`]..=[`MAX_MEM_MIB`].
    pub mem_mib: u32,
    /// 1..=[`MAX_SMP`].
    #[serde(default = "one")]
    pub smp: u32,
    #[serde(default)]
    pub workload: Option<Name>,
    /// At most `mem_mib`.
    #[serde(default)]
    pub workload_mib: Option<u32>,
    /// At most [`MAX_WORKLOAD_RATE_MB_S`].
    #[serde(default)]
    pub workload_rate_mb_s: Option<u32>,
    #[serde(default)]
    pub seed: Option<u64>,
    /// Guest address `a.b.c.d/len`; `None`: the site picks one.
    #[serde(default)]
    pub ip: Option<String>,
    /// `aa:bb:cc:dd:ee:ff`; `None`: derived from the name.
    #[serde(default)]
    pub mac: Option<String>,
    /// A volume of the serving site's volume directory, by name.
    #[serde(default)]
    pub volume: Option<Name>,
    /// Attach a NIC to the site's switch.
    #[serde(default)]
    pub net: bool,
}

fn one() -> u32 {
    1
}

impl VmStartSpec {
    pub fn new(name: Name, mem_mib: u32) -> VmStartSpec {
        VmStartSpec {
            name,
            mem_mib,
            smp: 1,
            workload: None,
            workload_mib: None,
            workload_rate_mb_s: None,
            seed: None,
            ip: None,
            mac: None,
            volume: None,
            net: false,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(format!(
                "mem_mib {} outside {MIN_MEM_MIB}..={MAX_MEM_MIB}",
                self.mem_mib
            ));
        }
        if !(1..=MAX_SMP).contains(&self.smp) {
            return Err(format!("smp {} outside 1..={MAX_SMP}", self.smp));
        }
        if self.workload_mib.is_some_and(|m| m > self.mem_mib) {
            return Err("workload_mib is larger than mem_mib".into());
        }
        if self
            .workload_rate_mb_s
            .is_some_and(|r| r > MAX_WORKLOAD_RATE_MB_S)
        {
            return Err(format!("workload_rate_mb_s above {MAX_WORKLOAD_RATE_MB_S}"));
        }
        if let Some(ip) = &self.ip {
            let ok = ip.split_once('/').is_some_and(|(a, p)| {
                a.parse::<std::net::Ipv4Addr>().is_ok()
                    && p.parse::<u8>().is_ok_and(|p| (1..=32).contains(&p))
                    && !p.starts_with('0')
            });
            if !ok {
                return Err(format!("ip {ip:?} is not a.b.c.d/len"));
            }
        }
        if let Some(mac) = &self.mac {
            let parts: Vec<&str> = mac.split(':').collect();
            let ok = parts.len() == 6
                && parts
                    .iter()
                    .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
            if !ok {
                return Err(format!("mac {mac:?} is not aa:bb:cc:dd:ee:ff"));
            }
        }
        Ok(())
    }
}

/// Where a `vm.start_incoming` destination waits for the migration stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Incoming {
    /// The instance's `incoming.sock`, reached through the node's migration relay
    /// (`tern migrate` over tern's transport).
    Relay,
    /// A TCP port in [`INCOMING_PORTS`] on the site's address (kernel TCP, or intercepted
    /// by the accelerator).
    Tcp(u16),
}

/// A request. `cmd` names the command; the other fields are its arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", deny_unknown_fields)]
pub enum Request {
    /// The VM instances at this site.
    #[serde(rename = "vm.list")]
    VmList {},
    /// One VM's instance at this site.
    #[serde(rename = "vm.status")]
    VmStatus { name: Name },
    /// The machine of a VM's instance here (what a destination must be started with).
    #[serde(rename = "vm.spec")]
    VmSpec { name: Name },
    /// Start the primary instance of a new VM here.
    #[serde(rename = "vm.start")]
    VmStart { spec: VmStartSpec },
    /// Start a migration destination here.
    #[serde(rename = "vm.start_incoming")]
    VmStartIncoming {
        spec: VmStartSpec,
        incoming: Incoming,
    },
    /// Stop the VM's instance here.
    #[serde(rename = "vm.stop")]
    VmStop { name: Name },
    /// Make the instance here the primary (after a migration: `cont`).
    #[serde(rename = "vm.promote")]
    VmPromote { name: Name },
    /// A volume of this site.
    #[serde(rename = "disk.status")]
    DiskStatus { name: Name },
    /// Promote this site's replica of a volume to primary (failover).
    #[serde(rename = "disk.promote")]
    DiskPromote { name: Name },
}

/// The commands, for allow-lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Command {
    VmList,
    VmStatus,
    VmSpec,
    VmStart,
    VmStartIncoming,
    VmStop,
    VmPromote,
    DiskStatus,
    DiskPromote,
}

impl Command {
    pub const ALL: [Command; 9] = [
        Command::VmList,
        Command::VmStatus,
        Command::VmSpec,
        Command::VmStart,
        Command::VmStartIncoming,
        Command::VmStop,
        Command::VmPromote,
        Command::DiskStatus,
        Command::DiskPromote,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Command::VmList => "vm.list",
            Command::VmStatus => "vm.status",
            Command::VmSpec => "vm.spec",
            Command::VmStart => "vm.start",
            Command::VmStartIncoming => "vm.start_incoming",
            Command::VmStop => "vm.stop",
            Command::VmPromote => "vm.promote",
            Command::DiskStatus => "disk.status",
            Command::DiskPromote => "disk.promote",
        }
    }

    pub fn parse(s: &str) -> Option<Command> {
        Command::ALL.into_iter().find(|c| c.name() == s)
    }

    fn bit(self) -> u32 {
        1 << self as u32
    }
}

impl Request {
    pub fn command(&self) -> Command {
        match self {
            Request::VmList {} => Command::VmList,
            Request::VmStatus { .. } => Command::VmStatus,
            Request::VmSpec { .. } => Command::VmSpec,
            Request::VmStart { .. } => Command::VmStart,
            Request::VmStartIncoming { .. } => Command::VmStartIncoming,
            Request::VmStop { .. } => Command::VmStop,
            Request::VmPromote { .. } => Command::VmPromote,
            Request::DiskStatus { .. } => Command::DiskStatus,
            Request::DiskPromote { .. } => Command::DiskPromote,
        }
    }

    /// Bounds JSON types cannot say.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Request::VmStart { spec } => spec.validate(),
            Request::VmStartIncoming { spec, incoming } => {
                if let Incoming::Tcp(p) = incoming
                    && !(INCOMING_PORTS.0..=INCOMING_PORTS.1).contains(p)
                {
                    return Err(format!(
                        "incoming port {p} outside {}..={}",
                        INCOMING_PORTS.0, INCOMING_PORTS.1
                    ));
                }
                spec.validate()
            }
            _ => Ok(()),
        }
    }
}

/// The commands one peer may call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllowList(u32);

impl AllowList {
    /// Every command (local callers).
    pub const ALL: AllowList = AllowList(u32::MAX);

    pub fn new(cmds: &[Command]) -> AllowList {
        AllowList(cmds.iter().fold(0, |b, c| b | c.bit()))
    }

    /// From a config's `agent = [...]`; an unknown name is an error naming it.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<AllowList, String> {
        let mut cmds = Vec::new();
        for n in names {
            let n = n.as_ref();
            cmds.push(Command::parse(n).ok_or_else(|| {
                format!(
                    "unknown agent command {n:?}; known: {}",
                    Command::ALL.map(Command::name).join(", ")
                )
            })?);
        }
        Ok(AllowList::new(&cmds))
    }

    pub fn allows(self, c: Command) -> bool {
        self.0 & c.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        !Command::ALL.into_iter().any(|c| self.allows(c))
    }

    pub fn commands(self) -> Vec<Command> {
        Command::ALL
            .into_iter()
            .filter(|&c| self.allows(c))
            .collect()
    }
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A client of the control socket (root or the node's user): everything.
    Local,
    /// An authenticated peer site: its allow-list.
    Peer { name: String, allow: AllowList },
}

impl Caller {
    /// The allow-list check: `Err` is the reply a refused request gets.
    pub fn authorize(&self, req: &Request) -> Result<(), AgentError> {
        match self {
            Caller::Local => Ok(()),
            Caller::Peer { name, allow } => {
                let c = req.command();
                if allow.allows(c) {
                    Ok(())
                } else {
                    Err(AgentError::new(
                        ErrorCode::Refused,
                        format!(
                            "{} is not in peer {name}'s agent allow-list here (allowed: {})",
                            c.name(),
                            if allow.is_empty() {
                                "nothing".to_string()
                            } else {
                                allow
                                    .commands()
                                    .iter()
                                    .map(|c| c.name())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            }
                        ),
                    ))
                }
            }
        }
    }
}

/// What kind of failure a reply reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Outside the caller's allow-list.
    Refused,
    /// Not a valid request (framing, JSON, bounds).
    BadRequest,
    /// Longer than [`MAX_REQUEST_BODY`].
    TooLarge,
    /// The agent's queue is full; try again.
    Overloaded,
    /// No handler on this node, or the relay to the peer failed.
    Unavailable,
    /// The named VM or volume does not exist here.
    NotFound,
    /// The handler failed.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(deny_unknown_fields)]
#[error("{code:?}: {message}")]
pub struct AgentError {
    pub code: ErrorCode,
    pub message: String,
}

impl AgentError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> AgentError {
        AgentError {
            code,
            message: message.into(),
        }
    }
}

/// One VM instance as the agent reports it (no paths).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    pub name: String,
    pub site: String,
    /// `primary` or `incoming`.
    pub role: String,
    /// QEMU's run state (`running`, `paused`, `inmigrate`, …), `dead`, `unresponsive`.
    pub state: String,
    pub pid: u32,
    pub mem_mib: u32,
    pub ip: Option<String>,
}

/// A volume as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskState {
    pub name: String,
    pub size_bytes: u64,
    /// A disk server runs for it here.
    pub served: bool,
    pub detail: Option<String>,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Answer {
    Vms { vms: Vec<VmState> },
    Vm { vm: VmState },
    Spec { spec: VmStartSpec },
    Disk { disk: DiskState },
    Done { message: String },
}

/// A reply body: `{"ok": …}` or `{"error": {"code": …, "message": …}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    Ok(Answer),
    Error(AgentError),
}

impl From<Result<Answer, AgentError>> for Reply {
    fn from(r: Result<Answer, AgentError>) -> Reply {
        match r {
            Ok(a) => Reply::Ok(a),
            Err(e) => Reply::Error(e),
        }
    }
}

/// A decoded request frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFrame {
    /// Empty: this node; otherwise the peer to relay to (local callers only).
    pub site: String,
    pub request: Request,
}

/// Why a request frame could not be decoded (the reply it gets says so).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic or version {0:#04x} {1:#04x}")]
    Magic(u8, u8),
    #[error("site name: {0}")]
    Site(String),
    #[error("request body of {0} bytes is over the limit of {MAX_REQUEST_BODY}")]
    TooLarge(usize),
    #[error("bad request: {0}")]
    Json(String),
    #[error("bad request: {0}")]
    Bounds(String),
}

impl FrameError {
    pub fn to_agent_error(&self) -> AgentError {
        let code = match self {
            FrameError::TooLarge(_) => ErrorCode::TooLarge,
            _ => ErrorCode::BadRequest,
        };
        AgentError::new(code, self.to_string())
    }
}

/// A peer name as a relay target: `[A-Za-z0-9._-]`, 1..=[`MAX_SITE_LEN`].
fn valid_site(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SITE_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Encodes a request frame (`site` empty: this node).
pub fn encode_request(site: &str, req: &Request) -> Vec<u8> {
    assert!(
        site.is_empty() || valid_site(site),
        "callers validate sites"
    );
    let body = serde_json::to_vec(req).expect("requests serialize");
    let mut out = Vec::with_capacity(7 + site.len() + body.len());
    out.extend_from_slice(&[REQUEST_MAGIC, VERSION, site.len() as u8]);
    out.extend_from_slice(site.as_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decodes a request frame from the start of `buf`: `Ok(Some((frame, consumed)))`, or
/// `Ok(None)` while incomplete. A length over the limit is an error as soon as it is read.
pub fn decode_request(buf: &[u8]) -> Result<Option<(RequestFrame, usize)>, FrameError> {
    if buf.len() >= 2 && (buf[0] != REQUEST_MAGIC || buf[1] != VERSION) {
        return Err(FrameError::Magic(buf[0], buf[1]));
    }
    if buf.first().is_some_and(|&b| b != REQUEST_MAGIC) {
        return Err(FrameError::Magic(buf[0], 0));
    }
    let Some(&site_len) = buf.get(2) else {
        return Ok(None);
    };
    let site_len = site_len as usize;
    if site_len > MAX_SITE_LEN {
        return Err(FrameError::Site(format!(
            "{site_len} bytes, over {MAX_SITE_LEN}"
        )));
    }
    let Some(site) = buf.get(3..3 + site_len) else {
        return Ok(None);
    };
    let site = std::str::from_utf8(site)
        .ok()
        .filter(|s| s.is_empty() || valid_site(s))
        .ok_or_else(|| FrameError::Site("not [A-Za-z0-9._-]".into()))?
        .to_string();
    let at = 3 + site_len;
    let Some(len) = buf.get(at..at + 4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
    if len > MAX_REQUEST_BODY {
        return Err(FrameError::TooLarge(len));
    }
    let Some(body) = buf.get(at + 4..at + 4 + len) else {
        return Ok(None);
    };
    let request: Request =
        serde_json::from_slice(body).map_err(|e| FrameError::Json(e.to_string()))?;
    request.validate().map_err(FrameError::Bounds)?;
    Ok(Some((RequestFrame { site, request }, at + 4 + len)))
}

/// Encodes a reply frame; an answer over [`MAX_REPLY_BODY`] becomes a `failed` error.
pub fn encode_reply(reply: &Reply) -> Vec<u8> {
    let mut body = serde_json::to_vec(reply).expect("replies serialize");
    if body.len() > MAX_REPLY_BODY {
        body = serde_json::to_vec(&Reply::Error(AgentError::new(
            ErrorCode::Failed,
            format!("the answer is over the reply limit of {MAX_REPLY_BODY} bytes"),
        )))
        .expect("replies serialize");
    }
    let mut out = Vec::with_capacity(6 + body.len());
    out.extend_from_slice(&[REPLY_MAGIC, VERSION]);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decodes a reply frame: `Ok(Some((reply, consumed)))` or `Ok(None)` while incomplete.
pub fn decode_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    if buf.len() >= 2 && (buf[0] != REPLY_MAGIC || buf[1] != VERSION) {
        return Err(format!("bad reply magic {:#04x} {:#04x}", buf[0], buf[1]));
    }
    let Some(len) = buf.get(2..6) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
    if len > MAX_REPLY_BODY {
        return Err(format!("reply of {len} bytes is over {MAX_REPLY_BODY}"));
    }
    let Some(body) = buf.get(6..6 + len) else {
        return Ok(None);
    };
    let reply = serde_json::from_slice(body).map_err(|e| format!("bad reply: {e}"))?;
    Ok(Some((reply, 6 + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn body(json: &str) -> Vec<u8> {
        let mut b = vec![REQUEST_MAGIC, VERSION, 0];
        b.extend_from_slice(&(json.len() as u32).to_be_bytes());
        b.extend_from_slice(json.as_bytes());
        b
    }

    #[test]
    fn golden_bytes_and_incremental_decode() {
        let f = encode_request("", &Request::VmStatus { name: name("vm1") });
        let json = br#"{"cmd":"vm.status","name":"vm1"}"#;
        let mut want = vec![b'A', 1, 0, 0, 0, 0, json.len() as u8];
        want.extend_from_slice(json);
        assert_eq!(f, want);
        for cut in 0..f.len() {
            assert_eq!(decode_request(&f[..cut]), Ok(None), "cut {cut}");
        }
        let (got, used) = decode_request(&f).unwrap().unwrap();
        assert_eq!(used, f.len());
        assert_eq!(got.request, Request::VmStatus { name: name("vm1") });
        assert_eq!(got.site, "");
        let r = encode_request("site-b", &Request::VmList {});
        assert_eq!(&r[..9], b"A\x01\x06site-b");
        assert_eq!(decode_request(&r).unwrap().unwrap().0.site, "site-b");
    }

    #[test]
    fn every_command_round_trips() {
        let mut spec = VmStartSpec::new(name("vm1"), 256);
        spec.ip = Some("198.18.100.20/24".into());
        spec.mac = Some("52:54:00:12:34:56".into());
        spec.volume = Some(name("vol-1"));
        let reqs = [
            Request::VmList {},
            Request::VmStatus { name: name("a") },
            Request::VmSpec { name: name("a") },
            Request::VmStart { spec: spec.clone() },
            Request::VmStartIncoming {
                spec: spec.clone(),
                incoming: Incoming::Relay,
            },
            Request::VmStartIncoming {
                spec,
                incoming: Incoming::Tcp(49152),
            },
            Request::VmStop { name: name("a") },
            Request::VmPromote { name: name("a") },
            Request::DiskStatus { name: name("a") },
            Request::DiskPromote { name: name("a") },
        ];
        let mut seen = std::collections::BTreeSet::new();
        for r in reqs {
            seen.insert(r.command());
            let f = encode_request("", &r);
            assert_eq!(decode_request(&f).unwrap().unwrap().0.request, r);
        }
        assert_eq!(seen.len(), Command::ALL.len());
        for c in Command::ALL {
            assert_eq!(Command::parse(c.name()), Some(c));
        }
    }

    #[test]
    fn strict_parsing_refuses_paths_unknown_fields_and_out_of_bounds() {
        for bad in [
            // Unknown fields and commands: no way to smuggle a path, QMP or a shell word.
            r#"{"cmd":"vm.status","name":"vm1","path":"/etc/passwd"}"#,
            r#"{"cmd":"vm.start","spec":{"name":"vm1","mem_mib":256,"kernel":"/tmp/k"}}"#,
            r#"{"cmd":"qmp","execute":"migrate"}"#,
            r#"{"cmd":"vm.exec","argv":["sh"]}"#,
            // Names are names.
            r#"{"cmd":"vm.status","name":"../vm1"}"#,
            r#"{"cmd":"vm.status","name":"vm1;rm -rf /"}"#,
            r#"{"cmd":"vm.status","name":"-vm"}"#,
            r#"{"cmd":"vm.status","name":""}"#,
            r#"{"cmd":"vm.status","name":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#,
            r#"{"cmd":"disk.status","name":"/var/lib/tern/v.img"}"#,
            // Bounds.
            r#"{"cmd":"vm.start","spec":{"name":"vm1","mem_mib":1}}"#,
            r#"{"cmd":"vm.start","spec":{"name":"vm1","mem_mib":99999999}}"#,
            r#"{"cmd":"vm.start","spec":{"name":"vm1","mem_mib":256,"smp":0}}"#,
            r#"{"cmd":"vm.start","spec":{"name":"vm1","mem_mib":256,"workload_mib":512}}"#,
            r#"{"cmd":"vm.start","spec":{"name":"vm1","mem_mib":256,"ip":"1.2.3.4"}}"#,
            r#"{"cmd":"vm.start","spec":{"name":"vm1","mem_mib":256,"mac":"zz:00:00:00:00:00"}}"#,
            r#"{"cmd":"vm.start_incoming","spec":{"name":"vm1","mem_mib":256},"incoming":{"tcp":22}}"#,
            r#"{"cmd":"vm.list","extra":1}"#,
            r#"not json"#,
        ] {
            let e = decode_request(&body(bad)).unwrap_err();
            assert_eq!(e.to_agent_error().code, ErrorCode::BadRequest, "{bad}: {e}");
        }
        // The length is refused before the body is there.
        let mut big = vec![b'A', 1, 0];
        big.extend_from_slice(&((MAX_REQUEST_BODY + 1) as u32).to_be_bytes());
        assert_eq!(
            decode_request(&big),
            Err(FrameError::TooLarge(MAX_REQUEST_BODY + 1))
        );
        assert!(matches!(
            decode_request(b"status\n"),
            Err(FrameError::Magic(..))
        ));
        assert!(matches!(decode_request(b"X"), Err(FrameError::Magic(..))));
        assert!(matches!(
            decode_request(b"A\x01\x03../\x00\x00\x00\x00"),
            Err(FrameError::Site(_))
        ));
        assert!(matches!(
            decode_request(b"A\x01\xff"),
            Err(FrameError::Site(_))
        ));
    }

    #[test]
    fn a_peer_calls_only_its_allow_list_and_local_callers_everything() {
        let allow = AllowList::parse(&["vm.list", "vm.status"]).unwrap();
        let peer = Caller::Peer {
            name: "site-b".into(),
            allow,
        };
        assert!(peer.authorize(&Request::VmList {}).is_ok());
        assert!(
            peer.authorize(&Request::VmStatus { name: name("x") })
                .is_ok()
        );
        let e = peer
            .authorize(&Request::VmStop { name: name("x") })
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Refused);
        assert!(e.message.contains("vm.stop"), "{}", e.message);
        assert!(e.message.contains("vm.list, vm.status"), "{}", e.message);
        // Default: nothing.
        let none = Caller::Peer {
            name: "site-c".into(),
            allow: AllowList::default(),
        };
        assert!(AllowList::default().is_empty());
        for c in Command::ALL {
            assert!(!AllowList::default().allows(c));
        }
        let e = none.authorize(&Request::VmList {}).unwrap_err();
        assert!(e.message.contains("allowed: nothing"), "{}", e.message);
        assert!(
            Caller::Local
                .authorize(&Request::VmStop { name: name("x") })
                .is_ok()
        );
        assert!(
            AllowList::parse(&["vm.list", "qmp"])
                .unwrap_err()
                .contains("\"qmp\"")
        );
        assert_eq!(
            AllowList::new(&[Command::VmStop]).commands(),
            vec![Command::VmStop]
        );
    }

    #[test]
    fn replies_round_trip_and_are_bounded() {
        let r = Reply::Ok(Answer::Vms {
            vms: vec![VmState {
                name: "vm1".into(),
                site: "a".into(),
                role: "primary".into(),
                state: "running".into(),
                pid: 42,
                mem_mib: 256,
                ip: Some("198.18.100.10/24".into()),
            }],
        });
        let f = encode_reply(&r);
        for cut in 0..f.len() {
            assert_eq!(decode_reply(&f[..cut]), Ok(None), "cut {cut}");
        }
        assert_eq!(decode_reply(&f), Ok(Some((r, f.len()))));
        let e = Reply::Error(AgentError::new(ErrorCode::Refused, "no"));
        let f = encode_reply(&e);
        assert_eq!(&f[6..], br#"{"error":{"code":"refused","message":"no"}}"#);
        let huge = Reply::Ok(Answer::Done {
            message: "x".repeat(MAX_REPLY_BODY),
        });
        let (back, _) = decode_reply(&encode_reply(&huge)).unwrap().unwrap();
        assert!(matches!(
            back,
            Reply::Error(AgentError {
                code: ErrorCode::Failed,
                ..
            })
        ));
        assert!(decode_reply(b"A\x01").is_err());
    }
}
