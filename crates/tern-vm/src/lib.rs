//! # tern-vm — guest VMs at a lab site
//!
//! tern migrates real QEMU guests. This crate starts, watches and stops them, and talks to
//! them over QMP:
//!
//! - [`qmp`] — the QMP protocol as a **sans-IO core** ([`QmpSession`]): bytes in, command
//!   lines, replies (matched by id) and events out. Bounded buffers, typed errors.
//! - [`client`] — [`QmpClient`], the blocking driver over a Unix socket, with deadlines on
//!   every call and file-descriptor passing (`SCM_RIGHTS`) for `getfd`.
//! - [`vm`] — the lifecycle: `start`, `start_incoming` (the destination of a migration),
//!   `list`, `stop`, `promote`, with QEMU running inside the site's network namespace and
//!   its state under `/run/tern/vm/NAME/SITE/`.
//! - [`testkernel`] — a tiny multiboot kernel that prints one line on the serial port and
//!   then counts in RAM forever, for tests that need a bootable guest without the real one.
//!
//! ```text
//!   tern vm start web --site a                 /run/tern/vm/web/
//!     ip netns exec tern-a qemu-system-x86_64    a/spec.json qmp.sock qmp-status.sock
//!       -nodefaults -m 524292K … -daemonize        serial.log qemu.pid
//!   migration to b:
//!     start_incoming(spec, "b", "unix:…")        b/…  role "incoming", -incoming URI
//!     source: getfd + migrate fd:…  ──────────▶  b runs on
//!     promote("web", "b")                        a/ stopped and removed; b/ is the primary
//! ```
//!
//! Guarantees: a VM name has at most one primary instance; QEMU runs with `-nodefaults`
//! and guest RAM that is not a multiple of 256 KiB (QEMU 7.2 under TCG loses dirty pages
//! during migration otherwise; see `docs/vm.md`); a stopped VM leaves no state behind.
//! Version policy: `spec.json` carries [`vm::RECORD_VERSION`]; records of another version
//! are reported, not guessed at.

pub mod client;
pub mod qmp;
pub mod testkernel;
pub mod vm;

pub use client::{ClientError, QmpClient};
pub use qmp::{Event, QmpError, QmpSession, ReplyError};
pub use vm::{VmError, VmHost, VmInfo, VmSpec};
