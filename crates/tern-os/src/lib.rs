//! tern-os: OS-facing helpers that several of tern's drivers share (the disk server, the NBD
//! server, the site node), so that each exists once: management unix sockets bound private
//! from the start and checked with `SO_PEERCRED` ([`unix`]). Every `unsafe` block here has a
//! `// SAFETY:` note.

pub mod unix;
