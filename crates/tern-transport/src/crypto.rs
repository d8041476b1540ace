//! Identity keys, the Noise IK handshake and per-packet AEAD for tern's inter-site transport.
//!
//! # Role
//!
//! Every site node has a long-term X25519 [`StaticKeypair`]; peers are pinned by their public
//! key (printed by `tern keygen` as 44 characters of padded standard base64, like WireGuard
//! keys: [`encode_key`] / [`decode_key`]). A session starts with a one round-trip Noise IK
//! handshake: the initiator already knows the responder's public key, so message 1 both
//! authenticates the initiator and carries an encrypted payload, and message 2 finishes the
//! exchange. Both sides then hold [`PacketKeys`]: one key per direction, with the packet
//! number as the explicit AEAD nonce, so packets may be lost or reordered freely.
//! [`ReplayWindow`] rejects duplicated or very old packet numbers after authentication.
//!
//! ```text
//! initiator                                   responder
//!   InitiatorHandshake::start(payload) ── msg1 ──▶ accept_initiation()
//!                                                  (check remote_public is pinned)
//!   InitiatorHandshake::finish()  ◀── msg2 ──────── AcceptedInitiation::respond(payload)
//!   PacketKeys                                     PacketKeys
//! ```
//!
//! # Wire format
//!
//! Protocol name `Noise_IK_25519_AESGCM_SHA256`, prologue `b"tern-transport/1"` (a peer
//! speaking another version fails the handshake instead of mis-parsing later traffic).
//!
//! * message 1: `e (32) ‖ enc(s) (32+16) ‖ enc(payload) (len+16)` = 96 + payload bytes
//! * message 2: `e (32) ‖ enc(payload) (len+16)` = 48 + payload bytes
//! * packets:   `ciphertext (len) ‖ tag (16)`, nonce = packet number (never `u64::MAX`),
//!   no associated data: as in WireGuard, the packet number is bound through the nonce and
//!   the session is selected by the key, so the cleartext header needs no separate MAC.
//!
//! Handshake payloads are limited to [`MAX_HANDSHAKE_PAYLOAD`] bytes.
//!
//! Packet keys are the raw Noise `Split()` keys, one [`DirectionKey`] per direction, so a
//! connection can update them in place: [`DirectionKey::next`] is Noise's REKEY (see
//! `connection.rs`, `KeyPhases`). [`mac`], [`mac1_key`], [`seal_cookie`] and
//! [`open_cookie`] are the initiation's mac1/mac2 and cookie replies (see `endpoint.rs`).
//!
//! # Cipher choice
//!
//! `snow` is built with `ring-accelerated`, so AES-GCM, ChaCha20-Poly1305 and SHA-256 come
//! from ring (AES-NI/PCLMUL/AVX2 assembly) and X25519 from curve25519-dalek. Measured on the
//! 2-core development machine (release build, other builds running, each 1400-byte packet
//! sealed and then opened on one core,
//! `cargo test --release -p tern-transport --lib crypto::tests::bench -- --ignored --nocapture`):
//! AES-256-GCM ≈ 1.3 GB/s, ChaCha20-Poly1305 ≈ 0.6 GB/s. AES-GCM is therefore the cipher;
//! ChaChaPoly would only win on CPUs without AES-NI.
//!
//! # Determinism
//!
//! Nothing here reads a clock. Randomness is used only for ephemeral and identity keys; the
//! `rng_seed` arguments and [`StaticKeypair::from_seed`] replace it with a SplitMix64 stream
//! so the simulator replays handshakes byte for byte. Seeded keys have only 64 bits of
//! entropy and are for simulation only.

use std::fmt;

use snow::params::{CipherChoice, DHChoice, HashChoice, NoiseParams};
use snow::resolvers::{
    BoxedCryptoResolver, CryptoResolver, DefaultResolver, FallbackResolver, RingResolver,
};
use snow::types::{Cipher, Dh, Hash, Random};
use snow::{Builder, HandshakeState};

/// Length of X25519 public and private keys, in bytes.
pub const KEY_LEN: usize = 32;

/// Largest payload either handshake message may carry, in bytes.
pub const MAX_HANDSHAKE_PAYLOAD: usize = 256;

/// Size of message 1 without payload: `e`, encrypted `s` with tag, payload tag.
pub const MESSAGE1_OVERHEAD: usize =
    KEY_LEN + (KEY_LEN + PacketKeys::TAG_LEN) + PacketKeys::TAG_LEN;

/// Size of message 2 without payload: `e` and the payload tag.
pub const MESSAGE2_OVERHEAD: usize = KEY_LEN + PacketKeys::TAG_LEN;

/// Largest plaintext [`PacketKeys::seal`] accepts (Noise limits a message to 65535 bytes).
pub const MAX_PACKET_PLAINTEXT: usize = 65535 - PacketKeys::TAG_LEN;

/// The Noise protocol name used by every tern session.
pub const NOISE_PROTOCOL: &str = "Noise_IK_25519_AESGCM_SHA256";

/// Hashed into the handshake so a different protocol version cannot complete it.
const PROLOGUE: &[u8] = b"tern-transport/1";

/// Length of a key in padded base64 text.
const KEY_TEXT_LEN: usize = 44;

const BASE64_ALPHABET: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Errors from key handling, the handshake and packet protection.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The operating system's random number generator failed.
    #[error("operating system randomness unavailable")]
    Randomness(#[source] snow::Error),
    /// Key text has the wrong length.
    #[error("key text is {len} characters, expected {KEY_TEXT_LEN} characters of base64")]
    KeyTextLength {
        /// Length of the (whitespace-trimmed) text.
        len: usize,
    },
    /// Key text holds a character outside the base64 alphabet, or misplaced padding.
    #[error("invalid character {found:?} at offset {offset} in key text")]
    KeyTextCharacter {
        /// Byte offset in the trimmed text.
        offset: usize,
        /// The offending character.
        found: char,
    },
    /// Key text decodes, but its unused trailing bits are not zero.
    #[error("key text is not canonical base64")]
    KeyTextNonCanonical,
    /// A handshake payload exceeds [`MAX_HANDSHAKE_PAYLOAD`].
    #[error("handshake payload is {len} bytes, limit is {MAX_HANDSHAKE_PAYLOAD}")]
    PayloadTooLarge {
        /// Payload length in bytes.
        len: usize,
    },
    /// A received handshake message cannot be the given message by its length alone.
    #[error("handshake message {message} is {len} bytes, expected {min} to {max}")]
    HandshakeMessageLength {
        /// 1 or 2.
        message: u8,
        /// Received length in bytes.
        len: usize,
        /// Smallest valid length.
        min: usize,
        /// Largest valid length.
        max: usize,
    },
    /// A handshake message was forged, tampered with or addressed to another key.
    #[error("handshake message {message} failed authentication")]
    HandshakeAuthentication {
        /// 1 or 2.
        message: u8,
    },
    /// The Noise state machine refused an operation (a bug, not a peer's doing).
    #[error("noise handshake failed")]
    Noise(#[source] snow::Error),
    /// A packet failed authentication: tampered, truncated or under another key or number.
    #[error("packet {packet_number} failed authentication")]
    PacketAuthentication {
        /// Packet number used as nonce.
        packet_number: u64,
    },
    /// A plaintext is too large for one AEAD message.
    #[error("packet plaintext is {len} bytes, limit is {MAX_PACKET_PLAINTEXT}")]
    PacketTooLarge {
        /// Plaintext length in bytes.
        len: usize,
    },
    /// `u64::MAX` is reserved by Noise and cannot be a nonce.
    #[error("packet number {packet_number} is reserved and cannot be used as a nonce")]
    PacketNumberReserved {
        /// The offending packet number.
        packet_number: u64,
    },
}

/// A node's long-term X25519 identity.
#[derive(Clone)]
pub struct StaticKeypair {
    /// Secret scalar; never printed by `Debug`.
    pub private: [u8; KEY_LEN],
    /// Public key, as pinned by peers.
    pub public: [u8; KEY_LEN],
}

impl fmt::Debug for StaticKeypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticKeypair")
            .field("private", &"<redacted>")
            .field("public", &encode_key(&self.public))
            .finish()
    }
}

impl StaticKeypair {
    /// Generates a keypair from operating-system randomness (used by `tern keygen`).
    pub fn generate() -> Result<StaticKeypair, CryptoError> {
        let params = noise_params(NOISE_PROTOCOL)?;
        let keypair = Builder::new(params)
            .generate_keypair()
            .map_err(CryptoError::Randomness)?;
        let mut out = StaticKeypair {
            private: [0; KEY_LEN],
            public: [0; KEY_LEN],
        };
        out.private.copy_from_slice(&keypair.private);
        out.public.copy_from_slice(&keypair.public);
        Ok(out)
    }

    /// Derives a keypair deterministically from `seed`, for simulation tests only.
    pub fn from_seed(seed: u64) -> StaticKeypair {
        // Distinct stream from the ephemeral-key seeds so the same number used for both
        // never yields equal keys.
        let mut rng = SeededRng::new(seed ^ 0x7465_726e_5f73_7461);
        let mut private = [0u8; KEY_LEN];
        rng.fill(&mut private);
        StaticKeypair {
            private,
            public: public_key(&private),
        }
    }
}

/// Computes the X25519 public key for `private` (the scalar is clamped as usual).
pub fn public_key(private: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    let mut public = [0u8; KEY_LEN];
    // The default resolver always provides Curve25519: `snow`'s default features (which
    // `ring-accelerated` keeps) include `use-curve25519`.
    if let Some(mut dh) = DefaultResolver.resolve_dh(&DHChoice::Curve25519) {
        dh.set(private);
        public.copy_from_slice(dh.pubkey());
    }
    public
}

/// Encodes a key as 44 characters of padded standard base64 (the WireGuard key format).
pub fn encode_key(key: &[u8; KEY_LEN]) -> String {
    let mut text = String::with_capacity(KEY_TEXT_LEN);
    let sextet = |v: u32| char::from(BASE64_ALPHABET[(v & 0x3f) as usize]);
    let mut chunks = key.chunks_exact(3);
    for chunk in &mut chunks {
        let v = u32::from(chunk[0]) << 16 | u32::from(chunk[1]) << 8 | u32::from(chunk[2]);
        text.extend([sextet(v >> 18), sextet(v >> 12), sextet(v >> 6), sextet(v)]);
    }
    // 32 = 10 * 3 + 2: two bytes remain, giving three characters and one '='.
    let rest = chunks.remainder();
    let v = u32::from(rest[0]) << 16 | u32::from(rest[1]) << 8;
    text.extend([sextet(v >> 18), sextet(v >> 12), sextet(v >> 6), '=']);
    text
}

/// Decodes a key written by [`encode_key`]; surrounding ASCII whitespace is ignored.
pub fn decode_key(text: &str) -> Result<[u8; KEY_LEN], CryptoError> {
    let text = text.trim_ascii().as_bytes();
    if text.len() != KEY_TEXT_LEN {
        return Err(CryptoError::KeyTextLength { len: text.len() });
    }
    let bad = |offset: usize| CryptoError::KeyTextCharacter {
        offset,
        found: char::from(text[offset]),
    };
    if text[KEY_TEXT_LEN - 1] != b'=' {
        return Err(bad(KEY_TEXT_LEN - 1));
    }
    let mut values = [0u8; KEY_TEXT_LEN - 1];
    for (offset, (&c, value)) in text.iter().zip(values.iter_mut()).enumerate() {
        *value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(bad(offset)),
        };
    }
    let mut key = [0u8; KEY_LEN];
    for (i, quad) in values.chunks(4).enumerate() {
        let mut v = 0u32;
        for (j, &s) in quad.iter().enumerate() {
            v |= u32::from(s) << (18 - 6 * j);
        }
        let bytes = v.to_be_bytes();
        let take = (quad.len() * 6) / 8;
        key[i * 3..i * 3 + take].copy_from_slice(&bytes[1..1 + take]);
    }
    // The last character carries two bits that do not belong to any byte.
    if values[KEY_TEXT_LEN - 2] & 0b11 != 0 {
        return Err(CryptoError::KeyTextNonCanonical);
    }
    Ok(key)
}

/// Initiator side of the handshake, waiting for message 2.
pub struct InitiatorHandshake {
    state: HandshakeState,
}

impl fmt::Debug for InitiatorHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InitiatorHandshake").finish_non_exhaustive()
    }
}

impl InitiatorHandshake {
    /// Starts a handshake with the responder whose public key is `remote_public`.
    ///
    /// `payload` is carried encrypted in message 1 (at most [`MAX_HANDSHAKE_PAYLOAD`] bytes;
    /// it is not forward secret and can be replayed, so it must not carry commands).
    /// `rng_seed`: `Some(seed)` makes the ephemeral key deterministic (simulation), `None`
    /// uses OS randomness. Returns the message bytes to send.
    pub fn start(
        local: &StaticKeypair,
        remote_public: &[u8; KEY_LEN],
        payload: &[u8],
        rng_seed: Option<u64>,
    ) -> Result<(InitiatorHandshake, Vec<u8>), CryptoError> {
        Self::start_with(NOISE_PROTOCOL, local, remote_public, payload, rng_seed)
    }

    fn start_with(
        protocol: &str,
        local: &StaticKeypair,
        remote_public: &[u8; KEY_LEN],
        payload: &[u8],
        rng_seed: Option<u64>,
    ) -> Result<(InitiatorHandshake, Vec<u8>), CryptoError> {
        check_payload(payload)?;
        let mut state = builder(protocol, rng_seed)?
            .local_private_key(&local.private)
            .and_then(|b| b.remote_public_key(remote_public))
            .and_then(Builder::build_initiator)
            .map_err(CryptoError::Noise)?;
        let mut message = vec![0u8; MESSAGE1_OVERHEAD + payload.len()];
        let len = state
            .write_message(payload, &mut message)
            .map_err(CryptoError::Noise)?;
        debug_assert_eq!(len, message.len());
        message.truncate(len);
        Ok((InitiatorHandshake { state }, message))
    }

    /// Processes message 2; returns the responder's payload and the session keys.
    pub fn finish(mut self, message2: &[u8]) -> Result<(Vec<u8>, PacketKeys), CryptoError> {
        check_message_len(2, message2, MESSAGE2_OVERHEAD)?;
        let mut payload = vec![0u8; message2.len()];
        let len = self
            .state
            .read_message(message2, &mut payload)
            .map_err(|e| handshake_read_error(2, e))?;
        payload.truncate(len);
        let keys = PacketKeys::from_handshake(self.state)?;
        Ok((payload, keys))
    }
}

/// Responder side after a valid message 1, before message 2 is written.
pub struct AcceptedInitiation {
    /// The initiator's static public key (authenticated by message 1).
    pub remote_public: [u8; KEY_LEN],
    /// The payload the initiator put in message 1.
    pub payload: Vec<u8>,
    state: HandshakeState,
}

impl fmt::Debug for AcceptedInitiation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcceptedInitiation")
            .field("remote_public", &encode_key(&self.remote_public))
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

/// Responder side: reads message 1 and returns the initiator's identity and payload.
///
/// The caller checks `remote_public` against its pinned peers before calling
/// [`AcceptedInitiation::respond`].
pub fn accept_initiation(
    local: &StaticKeypair,
    message1: &[u8],
    rng_seed: Option<u64>,
) -> Result<AcceptedInitiation, CryptoError> {
    accept_initiation_with(NOISE_PROTOCOL, local, message1, rng_seed)
}

fn accept_initiation_with(
    protocol: &str,
    local: &StaticKeypair,
    message1: &[u8],
    rng_seed: Option<u64>,
) -> Result<AcceptedInitiation, CryptoError> {
    check_message_len(1, message1, MESSAGE1_OVERHEAD)?;
    let mut state = builder(protocol, rng_seed)?
        .local_private_key(&local.private)
        .and_then(Builder::build_responder)
        .map_err(CryptoError::Noise)?;
    let mut payload = vec![0u8; message1.len()];
    let len = state
        .read_message(message1, &mut payload)
        .map_err(|e| handshake_read_error(1, e))?;
    payload.truncate(len);
    let mut remote_public = [0u8; KEY_LEN];
    match state.get_remote_static() {
        Some(key) if key.len() == KEY_LEN => remote_public.copy_from_slice(key),
        _ => return Err(CryptoError::HandshakeAuthentication { message: 1 }),
    }
    Ok(AcceptedInitiation {
        remote_public,
        payload,
        state,
    })
}

impl AcceptedInitiation {
    /// Writes message 2 carrying `payload` and returns it with the session keys.
    pub fn respond(mut self, payload: &[u8]) -> Result<(Vec<u8>, PacketKeys), CryptoError> {
        check_payload(payload)?;
        let mut message = vec![0u8; MESSAGE2_OVERHEAD + payload.len()];
        let len = self
            .state
            .write_message(payload, &mut message)
            .map_err(CryptoError::Noise)?;
        message.truncate(len);
        let keys = PacketKeys::from_handshake(self.state)?;
        Ok((message, keys))
    }
}

/// One direction's AEAD key (AES-256-GCM, nonce = packet number), with the raw key kept so
/// the next key of a key update can be derived without disturbing this one.
pub struct DirectionKey {
    key: [u8; KEY_LEN],
    cipher: Box<dyn Cipher>,
}

impl fmt::Debug for DirectionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectionKey").finish_non_exhaustive()
    }
}

impl DirectionKey {
    fn new(key: [u8; KEY_LEN]) -> Result<DirectionKey, CryptoError> {
        let mut cipher =
            primitives()
                .resolve_cipher(&CipherChoice::AESGCM)
                .ok_or(CryptoError::Noise(snow::Error::Init(
                    snow::error::InitStage::GetCipherImpl,
                )))?;
        cipher.set(&key);
        Ok(DirectionKey { key, cipher })
    }

    /// The key after one update: Noise's REKEY (the first 32 bytes of encrypting 32 zero
    /// bytes with nonce 2^64 - 1, which no packet uses). One-way: this key cannot be derived
    /// from the next, so a later key's compromise does not expose earlier traffic.
    pub fn next(&self) -> DirectionKey {
        let mut out = [0u8; KEY_LEN + PacketKeys::TAG_LEN];
        self.cipher
            .encrypt(u64::MAX, &[], &[0u8; KEY_LEN], &mut out);
        let mut key = [0u8; KEY_LEN];
        key.copy_from_slice(&out[..KEY_LEN]);
        let mut cipher = self.cipher_like();
        cipher.set(&key);
        DirectionKey { key, cipher }
    }

    fn cipher_like(&self) -> Box<dyn Cipher> {
        match primitives().resolve_cipher(&CipherChoice::AESGCM) {
            Some(c) => c,
            // The resolver provided one for `new`; it always does.
            None => unreachable!("AES-GCM resolved before"),
        }
    }

    /// Appends ciphertext and tag of `plaintext` to `out`; see [`PacketKeys::seal`].
    pub fn seal(
        &self,
        packet_number: u64,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CryptoError> {
        if plaintext.len() > MAX_PACKET_PLAINTEXT {
            return Err(CryptoError::PacketTooLarge {
                len: plaintext.len(),
            });
        }
        if packet_number == u64::MAX {
            return Err(CryptoError::PacketNumberReserved { packet_number });
        }
        let start = out.len();
        out.resize(start + plaintext.len() + PacketKeys::TAG_LEN, 0);
        let len = self
            .cipher
            .encrypt(packet_number, &[], plaintext, &mut out[start..]);
        debug_assert_eq!(len, plaintext.len() + PacketKeys::TAG_LEN);
        Ok(())
    }

    /// Decrypts `ciphertext` and appends the plaintext to `out`; see [`PacketKeys::open`].
    pub fn open(
        &self,
        packet_number: u64,
        ciphertext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CryptoError> {
        if ciphertext.len() < PacketKeys::TAG_LEN
            || ciphertext.len() > MAX_PACKET_PLAINTEXT + PacketKeys::TAG_LEN
        {
            return Err(CryptoError::PacketAuthentication { packet_number });
        }
        if packet_number == u64::MAX {
            return Err(CryptoError::PacketNumberReserved { packet_number });
        }
        let start = out.len();
        // ring opens in place; giving it room for the whole ciphertext avoids a copy.
        out.resize(start + ciphertext.len(), 0);
        match self
            .cipher
            .decrypt(packet_number, &[], ciphertext, &mut out[start..])
        {
            Ok(len) => {
                out.truncate(start + len);
                Ok(())
            }
            Err(_) => {
                out.truncate(start);
                Err(CryptoError::PacketAuthentication { packet_number })
            }
        }
    }

    /// Whether two keys are the same (tests).
    pub fn same_key(&self, other: &DirectionKey) -> bool {
        self.key == other.key
    }
}

/// Session keys: one send key and one receive key, nonce = packet number.
pub struct PacketKeys {
    /// Key for packets this side sends.
    pub send: DirectionKey,
    /// Key for packets this side receives.
    pub recv: DirectionKey,
    initiator: bool,
}

impl fmt::Debug for PacketKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PacketKeys")
            .field("initiator", &self.initiator)
            .finish_non_exhaustive()
    }
}

impl PacketKeys {
    /// Length of the authentication tag appended to each packet.
    pub const TAG_LEN: usize = 16;

    fn from_handshake(mut state: HandshakeState) -> Result<PacketKeys, CryptoError> {
        if !state.is_handshake_finished() {
            return Err(CryptoError::Noise(snow::Error::State(
                snow::error::StateProblem::HandshakeNotFinished,
            )));
        }
        let initiator = state.is_initiator();
        // Noise Split(): the first key protects initiator-to-responder traffic.
        let (k1, k2) = state.dangerously_get_raw_split();
        let (send, recv) = if initiator { (k1, k2) } else { (k2, k1) };
        Ok(PacketKeys {
            send: DirectionKey::new(send)?,
            recv: DirectionKey::new(recv)?,
            initiator,
        })
    }

    /// Appends ciphertext and tag of `plaintext` to `out`.
    ///
    /// The packet number is the nonce: it must never repeat under this key. On error `out`
    /// is left as it was.
    pub fn seal(
        &mut self,
        packet_number: u64,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CryptoError> {
        self.send.seal(packet_number, plaintext, out)
    }

    /// Decrypts `ciphertext` (ciphertext and tag) and appends the plaintext to `out`.
    ///
    /// Fails on any tampering, truncation, wrong key or wrong packet number; on error `out`
    /// is left as it was.
    pub fn open(
        &mut self,
        packet_number: u64,
        ciphertext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CryptoError> {
        self.recv.open(packet_number, ciphertext, out)
    }
}

/// Length of the MACs that end a handshake initiation (mac1, mac2) and of a cookie.
pub const MAC_LEN: usize = 16;

/// Size of a sealed cookie: the cookie and its AEAD tag.
pub const SEALED_COOKIE_LEN: usize = MAC_LEN + PacketKeys::TAG_LEN;

/// Length of the random salt that keys each cookie reply's AEAD.
pub const COOKIE_SALT_LEN: usize = 16;

fn primitives() -> FallbackResolver {
    FallbackResolver::new(Box::new(RingResolver), Box::new(DefaultResolver))
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut out = [0u8; 32];
    // Both resolvers provide SHA-256 (snow's default features, kept by ring-accelerated).
    if let Some(mut h) = primitives().resolve_hash(&HashChoice::SHA256) {
        h.reset();
        for p in parts {
            h.input(p);
        }
        h.result(&mut out);
    }
    out
}

/// HMAC-SHA-256 of `data` under `key`, truncated to [`MAC_LEN`] bytes.
pub fn mac(key: &[u8], data: &[u8]) -> [u8; MAC_LEN] {
    let mut full = [0u8; 32];
    if let Some(mut h) = primitives().resolve_hash(&HashChoice::SHA256) {
        h.hmac(key, data, &mut full);
    }
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(&full[..MAC_LEN]);
    out
}

/// Compares two MACs in time independent of where they differ.
pub fn mac_eq(a: &[u8; MAC_LEN], b: &[u8]) -> bool {
    b.len() == MAC_LEN && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The key of an initiation's mac1: a hash of the responder's static public key, so only a
/// sender that knows that key can make an initiation the responder spends work on.
pub fn mac1_key(responder_public: &[u8; KEY_LEN]) -> [u8; 32] {
    sha256(&[b"tern-transport mac1", responder_public])
}

fn cookie_cipher(responder_public: &[u8; KEY_LEN], salt: &[u8]) -> Option<Box<dyn Cipher>> {
    let key = sha256(&[b"tern-transport cookie", responder_public, salt]);
    let mut c = primitives().resolve_cipher(&CipherChoice::AESGCM)?;
    c.set(&key);
    Some(c)
}

/// Encrypts `cookie` for the initiator whose initiation carried `mac1` (bound as associated
/// data). Every reply has its own `salt`, hence its own key, so nonce 0 is never reused.
pub fn seal_cookie(
    responder_public: &[u8; KEY_LEN],
    salt: &[u8; COOKIE_SALT_LEN],
    mac1: &[u8],
    cookie: &[u8; MAC_LEN],
) -> [u8; SEALED_COOKIE_LEN] {
    let mut out = [0u8; SEALED_COOKIE_LEN];
    if let Some(c) = cookie_cipher(responder_public, salt) {
        c.encrypt(0, mac1, cookie, &mut out);
    }
    out
}

/// Decrypts a cookie reply to an initiation that carried `mac1`; None if it fails.
pub fn open_cookie(
    responder_public: &[u8; KEY_LEN],
    salt: &[u8],
    mac1: &[u8],
    sealed: &[u8],
) -> Option<[u8; MAC_LEN]> {
    if sealed.len() != SEALED_COOKIE_LEN {
        return None;
    }
    let c = cookie_cipher(responder_public, salt)?;
    let mut out = [0u8; SEALED_COOKIE_LEN];
    let n = c.decrypt(0, mac1, sealed, &mut out).ok()?;
    let mut cookie = [0u8; MAC_LEN];
    cookie.copy_from_slice(out.get(..MAC_LEN).filter(|_| n == MAC_LEN)?);
    Some(cookie)
}

/// A secret for cookies, from the node's private key (so it is unpredictable whatever the
/// seed) and a rotation counter and nonce.
pub fn cookie_secret(local: &StaticKeypair, counter: u64, nonce: u64) -> [u8; 32] {
    let mut data = [0u8; 16];
    data[..8].copy_from_slice(&counter.to_be_bytes());
    data[8..].copy_from_slice(&nonce.to_be_bytes());
    let mut out = [0u8; 32];
    if let Some(mut h) = primitives().resolve_hash(&HashChoice::SHA256) {
        h.hmac(&local.private, &data, &mut out);
    }
    out
}

/// Number of packets the replay window remembers behind the highest one received.
pub const REPLAY_WINDOW: u64 = 4096;

const REPLAY_BLOCK_BITS: u64 = 64;
/// One block more than the window so advancing only ever clears whole blocks (RFC 6479).
const REPLAY_BLOCKS: usize = (REPLAY_WINDOW / REPLAY_BLOCK_BITS) as usize + 1;

/// Sliding anti-replay window over packet numbers (RFC 6479 bitmap), [`REPLAY_WINDOW`] packets.
///
/// Accepts each packet number at most once, and nothing more than `REPLAY_WINDOW - 1` below
/// the highest accepted number.
#[derive(Clone)]
pub struct ReplayWindow {
    /// Highest accepted packet number, `None` before the first.
    highest: Option<u64>,
    bitmap: [u64; REPLAY_BLOCKS],
}

impl fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayWindow")
            .field("highest", &self.highest)
            .finish_non_exhaustive()
    }
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    /// Packets remembered behind the highest accepted one ([`REPLAY_WINDOW`]).
    pub const WINDOW: u64 = REPLAY_WINDOW;

    /// An empty window: every packet number is new.
    pub fn new() -> Self {
        ReplayWindow {
            highest: None,
            bitmap: [0; REPLAY_BLOCKS],
        }
    }

    /// Highest packet number accepted so far.
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }

    fn slot(pn: u64) -> (usize, u64) {
        let block = ((pn / REPLAY_BLOCK_BITS) % REPLAY_BLOCKS as u64) as usize;
        (block, 1u64 << (pn % REPLAY_BLOCK_BITS))
    }

    /// True if `pn` is new and not too old (does not record it).
    pub fn check(&self, pn: u64) -> bool {
        let Some(highest) = self.highest else {
            return true;
        };
        if pn > highest {
            return true;
        }
        if highest - pn >= REPLAY_WINDOW {
            return false;
        }
        let (block, bit) = Self::slot(pn);
        self.bitmap[block] & bit == 0
    }

    /// Records `pn` as received; call only after the packet authenticated.
    ///
    /// Returns false (and records nothing) if `pn` is a replay or too old.
    pub fn accept(&mut self, pn: u64) -> bool {
        if !self.check(pn) {
            return false;
        }
        match self.highest {
            Some(highest) if pn <= highest => {}
            Some(highest) => {
                let current = highest / REPLAY_BLOCK_BITS;
                let advance = (pn / REPLAY_BLOCK_BITS - current).min(REPLAY_BLOCKS as u64);
                for i in 1..=advance {
                    let block = ((current + i) % REPLAY_BLOCKS as u64) as usize;
                    self.bitmap[block] = 0;
                }
                self.highest = Some(pn);
            }
            None => self.highest = Some(pn),
        }
        let (block, bit) = Self::slot(pn);
        self.bitmap[block] |= bit;
        true
    }
}

fn noise_params(protocol: &str) -> Result<NoiseParams, CryptoError> {
    protocol.parse().map_err(CryptoError::Noise)
}

fn builder(protocol: &str, rng_seed: Option<u64>) -> Result<Builder<'static>, CryptoError> {
    let params = noise_params(protocol)?;
    let builder = match rng_seed {
        None => Builder::new(params),
        Some(seed) => Builder::with_resolver(params, Box::new(SeededResolver::new(seed))),
    };
    builder.prologue(PROLOGUE).map_err(CryptoError::Noise)
}

fn check_payload(payload: &[u8]) -> Result<(), CryptoError> {
    if payload.len() > MAX_HANDSHAKE_PAYLOAD {
        return Err(CryptoError::PayloadTooLarge { len: payload.len() });
    }
    Ok(())
}

fn check_message_len(message: u8, bytes: &[u8], overhead: usize) -> Result<(), CryptoError> {
    let (min, max) = (overhead, overhead + MAX_HANDSHAKE_PAYLOAD);
    if bytes.len() < min || bytes.len() > max {
        return Err(CryptoError::HandshakeMessageLength {
            message,
            len: bytes.len(),
            min,
            max,
        });
    }
    Ok(())
}

fn handshake_read_error(message: u8, error: snow::Error) -> CryptoError {
    match error {
        snow::Error::Decrypt | snow::Error::Dh | snow::Error::Input => {
            CryptoError::HandshakeAuthentication { message }
        }
        other => CryptoError::Noise(other),
    }
}

/// SplitMix64: a tiny deterministic generator for simulation keys (not a CSPRNG).
struct SeededRng {
    state: u64,
}

impl SeededRng {
    fn new(seed: u64) -> Self {
        SeededRng { state: seed }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

impl Random for SeededRng {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        self.fill(dest);
        Ok(())
    }
}

/// The usual ring + default resolver, with the RNG replaced by a seeded one.
struct SeededResolver {
    seed: u64,
    inner: FallbackResolver,
}

impl SeededResolver {
    fn new(seed: u64) -> Self {
        let inner: BoxedCryptoResolver = Box::new(DefaultResolver);
        SeededResolver {
            seed,
            inner: FallbackResolver::new(Box::new(RingResolver), inner),
        }
    }
}

impl CryptoResolver for SeededResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        Some(Box::new(SeededRng::new(self.seed)))
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        self.inner.resolve_dh(choice)
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        self.inner.resolve_hash(choice)
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        self.inner.resolve_cipher(choice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Same SplitMix64 as the module uses, for test inputs.
    struct TestRng(SeededRng);

    impl TestRng {
        fn new(seed: u64) -> Self {
            TestRng(SeededRng::new(seed))
        }
        fn next(&mut self) -> u64 {
            self.0.next_u64()
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn pair_with(protocol: &str, seed: u64) -> (PacketKeys, PacketKeys) {
        let client = StaticKeypair::from_seed(seed);
        let server = StaticKeypair::from_seed(seed + 1);
        let (init, m1) =
            InitiatorHandshake::start_with(protocol, &client, &server.public, b"hello", Some(seed))
                .unwrap();
        let accepted = accept_initiation_with(protocol, &server, &m1, Some(seed + 7)).unwrap();
        assert_eq!(accepted.remote_public, client.public);
        let (m2, server_keys) = accepted.respond(b"welcome").unwrap();
        let (payload, client_keys) = init.finish(&m2).unwrap();
        assert_eq!(payload, b"welcome");
        (client_keys, server_keys)
    }

    fn pair(seed: u64) -> (PacketKeys, PacketKeys) {
        pair_with(NOISE_PROTOCOL, seed)
    }

    #[test]
    fn handshake_round_trip() {
        let client = StaticKeypair::from_seed(1);
        let server = StaticKeypair::from_seed(2);
        let (init, m1) =
            InitiatorHandshake::start(&client, &server.public, b"site-a v1", Some(11)).unwrap();
        assert_eq!(m1.len(), MESSAGE1_OVERHEAD + 9);
        let accepted = accept_initiation(&server, &m1, Some(12)).unwrap();
        assert_eq!(accepted.remote_public, client.public);
        assert_eq!(accepted.payload, b"site-a v1");
        let (m2, mut server_keys) = accepted.respond(b"ok").unwrap();
        assert_eq!(m2.len(), MESSAGE2_OVERHEAD + 2);
        let (payload, mut client_keys) = init.finish(&m2).unwrap();
        assert_eq!(payload, b"ok");

        let mut wire = Vec::new();
        let mut plain = Vec::new();
        client_keys.seal(0, b"to server", &mut wire).unwrap();
        server_keys.open(0, &wire, &mut plain).unwrap();
        assert_eq!(plain, b"to server");
        wire.clear();
        plain.clear();
        server_keys.seal(0, b"to client", &mut wire).unwrap();
        client_keys.open(0, &wire, &mut plain).unwrap();
        assert_eq!(plain, b"to client");
        // Directions use different keys: a packet cannot be reflected back to its sender.
        assert!(server_keys.open(0, &wire, &mut plain).is_err());
    }

    #[test]
    fn handshake_with_os_randomness() {
        let client = StaticKeypair::generate().unwrap();
        let server = StaticKeypair::generate().unwrap();
        assert_ne!(client.public, server.public);
        assert_eq!(public_key(&client.private), client.public);
        let (init, m1) = InitiatorHandshake::start(&client, &server.public, b"", None).unwrap();
        let accepted = accept_initiation(&server, &m1, None).unwrap();
        let (m2, _) = accepted.respond(&[]).unwrap();
        let (payload, _) = init.finish(&m2).unwrap();
        assert!(payload.is_empty());
    }

    #[test]
    fn seeded_handshake_is_deterministic() {
        let client = StaticKeypair::from_seed(5);
        let server = StaticKeypair::from_seed(6);
        let (_, a) = InitiatorHandshake::start(&client, &server.public, b"x", Some(9)).unwrap();
        let (_, b) = InitiatorHandshake::start(&client, &server.public, b"x", Some(9)).unwrap();
        let (_, c) = InitiatorHandshake::start(&client, &server.public, b"x", Some(10)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(StaticKeypair::from_seed(5).private, client.private);
        assert_ne!(StaticKeypair::from_seed(6).public, client.public);
    }

    #[test]
    fn wrong_responder_key_fails() {
        let client = StaticKeypair::from_seed(1);
        let server = StaticKeypair::from_seed(2);
        let other = StaticKeypair::from_seed(3);
        let (_, m1) = InitiatorHandshake::start(&client, &other.public, b"hi", Some(1)).unwrap();
        let err = accept_initiation(&server, &m1, Some(2)).unwrap_err();
        assert!(
            matches!(err, CryptoError::HandshakeAuthentication { message: 1 }),
            "{err:?}"
        );
    }

    #[test]
    fn tampered_message1_fails() {
        let client = StaticKeypair::from_seed(1);
        let server = StaticKeypair::from_seed(2);
        let (_, m1) = InitiatorHandshake::start(&client, &server.public, b"hi", Some(1)).unwrap();
        for i in 0..m1.len() {
            let mut bad = m1.clone();
            // Even bits X25519 ignores in `e` fail: `e` is mixed into the handshake hash.
            bad[i] ^= if i == 31 { 0x80 } else { 0x01 };
            assert!(
                accept_initiation(&server, &bad, Some(2)).is_err(),
                "byte {i}"
            );
        }
        let err = accept_initiation(&server, &m1[..m1.len() - 1], Some(2)).unwrap_err();
        assert!(
            matches!(err, CryptoError::HandshakeAuthentication { message: 1 }),
            "{err:?}"
        );
        let err = accept_initiation(&server, &m1[..50], Some(2)).unwrap_err();
        assert!(
            matches!(err, CryptoError::HandshakeMessageLength { message: 1, .. }),
            "{err}"
        );
        let long = vec![0u8; MESSAGE1_OVERHEAD + MAX_HANDSHAKE_PAYLOAD + 1];
        assert!(accept_initiation(&server, &long, Some(2)).is_err());
    }

    #[test]
    fn tampered_message2_fails() {
        let client = StaticKeypair::from_seed(1);
        let server = StaticKeypair::from_seed(2);
        for i in 0..MESSAGE2_OVERHEAD + 3 {
            let (init, m1) =
                InitiatorHandshake::start(&client, &server.public, b"hi", Some(1)).unwrap();
            let accepted = accept_initiation(&server, &m1, Some(2)).unwrap();
            let (mut m2, _) = accepted.respond(b"abc").unwrap();
            m2[i] ^= if i == 31 { 0x80 } else { 0x01 };
            assert!(init.finish(&m2).is_err(), "byte {i}");
        }
        let (init, _) = InitiatorHandshake::start(&client, &server.public, b"", Some(1)).unwrap();
        let err = init.finish(&[0u8; 10]).unwrap_err();
        assert!(
            matches!(err, CryptoError::HandshakeMessageLength { message: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn oversized_payload_rejected() {
        let client = StaticKeypair::from_seed(1);
        let server = StaticKeypair::from_seed(2);
        let big = [0u8; MAX_HANDSHAKE_PAYLOAD + 1];
        let err = InitiatorHandshake::start(&client, &server.public, &big, Some(1)).unwrap_err();
        assert!(matches!(err, CryptoError::PayloadTooLarge { len: 257 }));
        let max = [7u8; MAX_HANDSHAKE_PAYLOAD];
        let (_, m1) = InitiatorHandshake::start(&client, &server.public, &max, Some(1)).unwrap();
        let accepted = accept_initiation(&server, &m1, Some(2)).unwrap();
        assert_eq!(accepted.payload, max);
        assert!(matches!(
            accepted.respond(&big),
            Err(CryptoError::PayloadTooLarge { .. })
        ));
    }

    #[test]
    fn seal_open_round_trip() {
        let (mut a, mut b) = pair(40);
        let mut rng = TestRng::new(3);
        let mut wire = Vec::new();
        let mut plain = Vec::new();
        for pn in 0..200u64 {
            let len = rng.below(1500) as usize;
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            wire.clear();
            wire.extend_from_slice(b"hdr");
            a.seal(pn, &data, &mut wire).unwrap();
            assert_eq!(wire.len(), 3 + len + PacketKeys::TAG_LEN);
            plain.clear();
            plain.extend_from_slice(b"pre");
            b.open(pn, &wire[3..], &mut plain).unwrap();
            assert_eq!(&plain[..3], b"pre");
            assert_eq!(&plain[3..], &data[..]);
        }
    }

    #[test]
    fn tampered_ciphertext_or_wrong_pn_fails() {
        let (mut a, mut b) = pair(50);
        let mut wire = Vec::new();
        a.seal(77, b"attack at dawn", &mut wire).unwrap();
        let mut plain = vec![1, 2, 3];
        for i in 0..wire.len() {
            let mut bad = wire.clone();
            bad[i] ^= 0x80;
            let err = b.open(77, &bad, &mut plain).unwrap_err();
            assert!(matches!(
                err,
                CryptoError::PacketAuthentication { packet_number: 77 }
            ));
            assert_eq!(plain, [1, 2, 3], "output untouched on failure");
        }
        assert!(b.open(78, &wire, &mut plain).is_err());
        assert!(b.open(77, &wire[..wire.len() - 1], &mut plain).is_err());
        assert!(b.open(77, &wire[..5], &mut plain).is_err());
        assert!(b.open(77, &[], &mut plain).is_err());
        let (_, mut other) = pair(51);
        assert!(other.open(77, &wire, &mut plain).is_err());
        b.open(77, &wire, &mut plain).unwrap();
        assert_eq!(&plain[3..], b"attack at dawn");
        assert!(matches!(
            a.seal(u64::MAX, b"x", &mut wire),
            Err(CryptoError::PacketNumberReserved { .. })
        ));
    }

    #[test]
    fn key_encoding_golden() {
        let mut key = [0u8; KEY_LEN];
        for (i, b) in key.iter_mut().enumerate() {
            *b = i as u8;
        }
        let text = encode_key(&key);
        assert_eq!(text, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=");
        assert_eq!(decode_key(&text).unwrap(), key);
        assert_eq!(
            encode_key(&[0xff; KEY_LEN]),
            "//////////////////////////////////////////8="
        );
        assert_eq!(
            decode_key(" AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap(),
            key
        );
        let mut rng = TestRng::new(8);
        for _ in 0..100 {
            let mut k = [0u8; KEY_LEN];
            rng.0.fill(&mut k);
            assert_eq!(decode_key(&encode_key(&k)).unwrap(), k);
        }
    }

    #[test]
    fn key_decoding_errors() {
        let good = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        assert!(matches!(
            decode_key(""),
            Err(CryptoError::KeyTextLength { len: 0 })
        ));
        assert!(matches!(
            decode_key(&good[..43]),
            Err(CryptoError::KeyTextLength { len: 43 })
        ));
        let bad = good.replace('Q', "*");
        let err = decode_key(&bad).unwrap_err();
        assert!(
            matches!(
                err,
                CryptoError::KeyTextCharacter {
                    offset: 6,
                    found: '*'
                }
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "invalid character '*' at offset 6 in key text"
        );
        let no_pad = format!("{}A", &good[..43]);
        assert!(matches!(
            decode_key(&no_pad),
            Err(CryptoError::KeyTextCharacter { offset: 43, .. })
        ));
        let inner_pad = format!("={}", &good[1..]);
        assert!(matches!(
            decode_key(&inner_pad),
            Err(CryptoError::KeyTextCharacter { offset: 0, .. })
        ));
        // '8' = 60 = 0b111100 is canonical for the last sextet, '9' = 61 sets a spare bit.
        let non_canonical = format!("{}9=", &good[..42]);
        assert!(matches!(
            decode_key(&non_canonical),
            Err(CryptoError::KeyTextNonCanonical)
        ));
    }

    #[test]
    fn debug_hides_private_key() {
        let kp = StaticKeypair::from_seed(1);
        let text = format!("{kp:?}");
        assert!(text.contains("<redacted>"));
        assert!(text.contains(&encode_key(&kp.public)));
        assert!(!text.contains(&encode_key(&kp.private)));
        assert!(!text.contains(&format!("{:?}", kp.private)));
    }

    #[test]
    fn replay_window_basics() {
        let mut w = ReplayWindow::new();
        assert!(w.check(0));
        assert!(w.accept(0));
        assert!(!w.check(0));
        assert!(!w.accept(0), "duplicate");
        assert!(w.accept(2));
        assert!(w.accept(1), "reordered within window");
        assert!(!w.accept(1));
        assert_eq!(w.highest(), Some(2));

        // Far-ahead jump: everything in the old window becomes too old or forgotten.
        assert!(w.accept(1_000_000));
        assert!(!w.check(2));
        assert!(w.check(1_000_000 - (REPLAY_WINDOW - 1)));
        assert!(!w.check(1_000_000 - REPLAY_WINDOW));
        assert!(w.accept(999_999));
        assert!(!w.accept(999_999));
        assert!(w.accept(1_000_000 - (REPLAY_WINDOW - 1)));
        assert!(!w.accept(1_000_000 - REPLAY_WINDOW), "too old");

        // Stepping forward by exactly the window clears the bit that aliases pn.
        let mut w = ReplayWindow::new();
        for pn in 0..64 {
            assert!(w.accept(pn));
        }
        assert!(w.accept(64 * REPLAY_BLOCKS as u64));
        for pn in (64 * REPLAY_BLOCKS as u64 - REPLAY_WINDOW + 1)..(64 * REPLAY_BLOCKS as u64) {
            assert!(w.check(pn), "{pn}");
        }
        assert!(w.accept(u64::MAX - 1));
        assert!(!w.accept(u64::MAX - 1));
    }

    #[test]
    fn replay_window_random_order_within_window() {
        let mut rng = TestRng::new(99);
        let mut w = ReplayWindow::new();
        let base = 10_000u64;
        let mut pns: Vec<u64> = (base..base + REPLAY_WINDOW).collect();
        // Fisher-Yates with the test PRNG.
        for i in (1..pns.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            pns.swap(i, j);
        }
        assert!(w.accept(base + REPLAY_WINDOW - 1));
        for &pn in &pns {
            let expect_new = pn != base + REPLAY_WINDOW - 1;
            assert_eq!(w.accept(pn), expect_new, "{pn}");
        }
        for &pn in &pns {
            assert!(!w.accept(pn));
        }
    }

    /// Property: the bitmap window behaves exactly like an unbounded set plus the age rule.
    #[test]
    fn replay_window_matches_model() {
        for seed in 0..20u64 {
            let mut rng = TestRng::new(seed);
            let mut w = ReplayWindow::new();
            let mut seen = std::collections::BTreeSet::new();
            let mut highest: Option<u64> = None;
            let mut next = rng.below(1000);
            for step in 0..20_000 {
                let pn = match rng.below(10) {
                    0..=4 => {
                        next += 1 + rng.below(3);
                        next
                    }
                    5 | 6 => next.saturating_sub(rng.below(REPLAY_WINDOW + 200)),
                    7 => next.saturating_sub(rng.below(40)),
                    8 => {
                        next += rng.below(REPLAY_WINDOW * 3);
                        next
                    }
                    _ => match seen.iter().next_back() {
                        Some(&last) => last - rng.below(3).min(last),
                        None => 0,
                    },
                };
                let too_old = highest.is_some_and(|h| pn < h && h - pn >= REPLAY_WINDOW);
                let expect = !too_old && !seen.contains(&pn);
                assert_eq!(w.check(pn), expect, "seed {seed} step {step} pn {pn}");
                assert_eq!(w.accept(pn), expect, "seed {seed} step {step} pn {pn}");
                if expect {
                    seen.insert(pn);
                    highest = Some(highest.map_or(pn, |h| h.max(pn)));
                }
            }
        }
    }

    fn bench_protocol(protocol: &str) -> f64 {
        let (mut a, mut b) = pair_with(protocol, 1);
        let packet = [0x5au8; 1400];
        let mut wire = Vec::with_capacity(2048);
        let mut plain = Vec::with_capacity(2048);
        let count = 200_000u64;
        let start = std::time::Instant::now();
        for pn in 0..count {
            wire.clear();
            plain.clear();
            a.seal(pn, &packet, &mut wire).unwrap();
            b.open(pn, &wire, &mut plain).unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(&plain);
        count as f64 * 1400.0 / secs / 1e6
    }

    /// `cargo test --release -p tern-transport --lib crypto::tests::bench -- --ignored --nocapture`
    #[test]
    #[ignore = "micro-benchmark; run in release with --nocapture"]
    fn bench_seal_open_1400() {
        for protocol in [
            "Noise_IK_25519_AESGCM_SHA256",
            "Noise_IK_25519_ChaChaPoly_SHA256",
        ] {
            let mbps = bench_protocol(protocol);
            println!("{protocol}: seal+open 1400-byte packets: {mbps:.0} MB/s");
        }
    }
}
