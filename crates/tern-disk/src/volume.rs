//! Volumes on this host: sparse raw files, their block hashes, and a small state file.
//!
//! `PATH` is the data (a raw image whose holes read as zeros); `PATH.tern.json` records the
//! replication state that must survive a restart (`consistent`: the copy is whole as of a
//! completed sync, or was never a secondary). Both are written atomically.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::wire::{ChunkHash, Hash};
use crate::{BLOCK_BYTES, CHUNK, block_hash, chunk_hash, zero_hash};

/// Largest volume tern creates (64 TiB); the hash list of one is 16 GiB / 1 MiB = 16 MiB.
pub const MAX_VOLUME_BYTES: u64 = 64 << 40;

#[derive(Debug, Error)]
pub enum VolumeError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("qemu-img {args}: {msg}")]
    QemuImg { args: String, msg: String },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> VolumeError {
    let path = path.to_path_buf();
    move |source| VolumeError::Io { what, path, source }
}

/// Parses `10G`, `512M`, `64k` or plain bytes (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_lowercase();
            let mul: u64 = match unit.trim_end_matches("ib").trim_end_matches('b') {
                "" => 1,
                "k" => 1 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                "t" => 1 << 40,
                _ => return Err(format!("unknown size unit in {s:?} (k, M, G, T)")),
            };
            (&s[..i], mul)
        }
        None => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad size {s:?} (e.g. 2G, 512M)"))?;
    n.checked_mul(mul)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

fn check_size(size: u64) -> Result<(), VolumeError> {
    if size == 0 || size % CHUNK as u64 != 0 || size > MAX_VOLUME_BYTES {
        return Err(VolumeError::Invalid(format!(
            "volume size {size} must be a multiple of 4096 between 4 KiB and 64 TiB"
        )));
    }
    Ok(())
}

/// Creates an empty (all-hole) volume of `size` bytes; refuses to overwrite.
pub fn create(path: &Path, size: u64) -> Result<(), VolumeError> {
    check_size(size)?;
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err("create", path))?;
    f.set_len(size).map_err(io_err("size", path))?;
    f.sync_all().map_err(io_err("sync", path))?;
    // A new volume has no write log (`backup.rs`); one left by an old volume of this name
    // must not be replayed into it.
    let _ = fs::remove_file(crate::backup::log_path(path));
    write_state(path, &State::default())
}

/// The size of the volume at `path`, checked.
pub fn size_of(path: &Path) -> Result<u64, VolumeError> {
    let size = fs::metadata(path).map_err(io_err("stat", path))?.len();
    check_size(size)?;
    Ok(size)
}

/// The offset of the first data byte at or after `offset` (`lseek(SEEK_DATA)`), `None` when
/// only a hole follows.
pub fn next_data(f: &File, offset: u64) -> io::Result<Option<u64>> {
    // SAFETY: lseek on an open descriptor we own; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(r as u64))
}

/// Per-block hashes of a volume (holes are not read), calling `progress(done, total)` every
/// 64 MiB.
pub fn hashes(f: &File, size: u64, mut progress: impl FnMut(u64, u64)) -> io::Result<Vec<Hash>> {
    let blocks = size.div_ceil(BLOCK_BYTES);
    let mut out = Vec::with_capacity(blocks as usize);
    let mut buf = vec![0u8; BLOCK_BYTES as usize];
    let mut data_at = next_data(f, 0)?;
    for b in 0..blocks {
        let off = b * BLOCK_BYTES;
        let len = (size - off).min(BLOCK_BYTES) as usize;
        if data_at.is_some_and(|d| d < off) {
            data_at = next_data(f, off)?;
        }
        match data_at {
            Some(d) if d < off + len as u64 => {
                f.read_exact_at(&mut buf[..len], off)?;
                out.push(block_hash(&buf[..len]));
            }
            _ => out.push(zero_hash(len)),
        }
        if b % 1024 == 1023 {
            progress(b + 1, blocks);
        }
    }
    progress(blocks, blocks);
    Ok(out)
}

/// Per-block 8-byte hashes ([`crate::chunk_hash`] of each 64 KiB block, 0 when it is all
/// zeros), as a secondary reports them; holes are not read.
pub fn block_hashes(f: &File, size: u64) -> io::Result<Vec<ChunkHash>> {
    let blocks = size.div_ceil(BLOCK_BYTES) as usize;
    let mut out = vec![0; blocks];
    let mut buf = vec![0u8; BLOCK_BYTES as usize];
    let mut b = 0u64;
    while b < blocks as u64 {
        let Some(d) = next_data(f, b * BLOCK_BYTES)? else {
            break;
        };
        b = b.max(d / BLOCK_BYTES);
        if b >= blocks as u64 {
            break;
        }
        let off = b * BLOCK_BYTES;
        let len = (size - off).min(BLOCK_BYTES) as usize;
        f.read_exact_at(&mut buf[..len], off)?;
        out[b as usize] = chunk_hash(&buf[..len]);
        b += 1;
    }
    Ok(out)
}

/// The 8-byte hashes of a block's 4 KiB chunks.
pub fn chunk_hashes_of(block: &[u8]) -> Vec<ChunkHash> {
    block.chunks(CHUNK).map(chunk_hash).collect()
}

/// One hash of a volume's whole content (BLAKE3 over its block hashes): equal volumes, equal
/// digest, whatever their holes.
pub fn content_digest(block_hashes: &[Hash]) -> String {
    let mut h = blake3::Hasher::new();
    for b in block_hashes {
        h.update(b);
    }
    h.finalize().to_hex()[..32].to_string()
}

#[derive(Debug, Clone, Serialize)]
pub struct Info {
    pub path: PathBuf,
    pub size: u64,
    pub allocated_bytes: u64,
    pub data_blocks: u64,
    pub zero_blocks: u64,
    pub digest: String,
    pub state: State,
}

pub fn info(path: &Path) -> Result<Info, VolumeError> {
    let size = size_of(path)?;
    let f = File::open(path).map_err(io_err("open", path))?;
    let meta = f.metadata().map_err(io_err("stat", path))?;
    let hs = hashes(&f, size, |_, _| {}).map_err(io_err("read", path))?;
    let zero_blocks = hs
        .iter()
        .enumerate()
        .filter(|(i, h)| {
            let len = (size - *i as u64 * BLOCK_BYTES).min(BLOCK_BYTES) as usize;
            **h == zero_hash(len)
        })
        .count() as u64;
    Ok(Info {
        path: path.to_path_buf(),
        size,
        allocated_bytes: std::os::unix::fs::MetadataExt::blocks(&meta) * 512,
        data_blocks: hs.len() as u64 - zero_blocks,
        zero_blocks,
        digest: content_digest(&hs),
        state: read_state(path)?,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct Verify {
    pub equal: bool,
    pub size_a: u64,
    pub size_b: u64,
    pub differing_blocks: u64,
    /// Byte offset of the first differing 64 KiB block.
    pub first_difference: Option<u64>,
    pub digest_a: String,
    pub digest_b: String,
}

/// Compares two volumes by content (block hashes).
pub fn verify(a: &Path, b: &Path) -> Result<Verify, VolumeError> {
    let open = |p: &Path| -> Result<(u64, Vec<Hash>), VolumeError> {
        let size = fs::metadata(p).map_err(io_err("stat", p))?.len();
        let f = File::open(p).map_err(io_err("open", p))?;
        Ok((
            size,
            hashes(&f, size, |_, _| {}).map_err(io_err("read", p))?,
        ))
    };
    let (size_a, ha) = open(a)?;
    let (size_b, hb) = open(b)?;
    let diffs: Vec<usize> = (0..ha.len().max(hb.len()))
        .filter(|&i| ha.get(i) != hb.get(i))
        .collect();
    Ok(Verify {
        equal: size_a == size_b && diffs.is_empty(),
        size_a,
        size_b,
        differing_blocks: diffs.len() as u64,
        first_difference: diffs.first().map(|&i| i as u64 * BLOCK_BYTES),
        digest_a: content_digest(&ha),
        digest_b: content_digest(&hb),
    })
}

fn qemu_img(args: &[&str]) -> Result<String, VolumeError> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| VolumeError::QemuImg {
            args: args.join(" "),
            msg: format!("cannot run qemu-img ({e}); install qemu-utils"),
        })?;
    if !out.status.success() {
        return Err(VolumeError::QemuImg {
            args: args.join(" "),
            msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Imports any image qemu-img reads (qcow2, vmdk, raw…) as a sparse raw volume.
pub fn import(src: &Path, dst: &Path) -> Result<u64, VolumeError> {
    if dst.exists() {
        return Err(VolumeError::Invalid(format!(
            "{} exists; tern disk import does not overwrite",
            dst.display()
        )));
    }
    let (s, d) = (src.to_string_lossy(), dst.to_string_lossy());
    qemu_img(&["convert", "-O", "raw", "-S", "4k", &s, &d])?;
    let size = fs::metadata(dst).map_err(io_err("stat", dst))?.len();
    if size % CHUNK as u64 != 0 {
        // Round up to whole chunks; the tail reads as zeros.
        let f = OpenOptions::new()
            .write(true)
            .open(dst)
            .map_err(io_err("open", dst))?;
        f.set_len(size.next_multiple_of(CHUNK as u64))
            .map_err(io_err("size", dst))?;
    }
    write_state(dst, &State::default())?;
    size_of(dst)
}

/// Exports a volume to `format` (`raw`, `qcow2`, …) with qemu-img.
pub fn export(src: &Path, dst: &Path, format: &str) -> Result<(), VolumeError> {
    size_of(src)?;
    let (s, d) = (src.to_string_lossy(), dst.to_string_lossy());
    qemu_img(&["convert", "-f", "raw", "-O", format, &s, &d]).map(|_| ())
}

/// What must survive a restart of the volume's server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The content is whole: never a secondary, or a secondary whose last sync completed.
    pub consistent: bool,
    /// Fencing epoch: bumped by every promotion of this copy, adopted from a primary
    /// with a later one; a replication session from an older epoch is refused.
    #[serde(default)]
    pub epoch: u64,
}

impl Default for State {
    fn default() -> State {
        State {
            consistent: true,
            epoch: 0,
        }
    }
}

pub fn state_path(volume: &Path) -> PathBuf {
    let mut p = volume.as_os_str().to_owned();
    p.push(".tern.json");
    PathBuf::from(p)
}

pub fn read_state(volume: &Path) -> Result<State, VolumeError> {
    let p = state_path(volume);
    match fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            VolumeError::Invalid(format!("{}: {e} (delete it to reset)", p.display()))
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(io_err("read", &p)(e)),
    }
}

/// Writes the state file atomically and durably.
pub fn write_state(volume: &Path, st: &State) -> Result<(), VolumeError> {
    let p = state_path(volume);
    let tmp = p.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(st).expect("state serializes");
    let f = File::create(&tmp).map_err(io_err("create", &tmp))?;
    f.write_all_at(&body, 0).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("sync", &tmp))?;
    fs::rename(&tmp, &p).map_err(io_err("rename", &p))?;
    // The rename is durable only once the directory is: a state a caller acts on (a
    // consistent copy) must not silently revert after a crash.
    let dir = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync the directory of", &p))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("2X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn hashes_skip_holes_and_match_reads() {
        let dir = std::env::temp_dir().join(format!("tern-vol-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.img");
        let b = dir.join("b.img");
        create(&a, 1 << 20).unwrap();
        assert!(create(&a, 1 << 20).is_err(), "no overwrite");
        assert!(create(&dir.join("odd.img"), 1000).is_err());
        let f = OpenOptions::new().write(true).open(&a).unwrap();
        f.write_all_at(&[7u8; 5000], 300_000).unwrap();
        // b: the same bytes, written densely (zeros as data, no holes).
        let mut dense = vec![0u8; 1 << 20];
        dense[300_000..305_000].fill(7);
        fs::write(&b, &dense).unwrap();
        let v = verify(&a, &b).unwrap();
        assert!(v.equal, "{v:?}");
        let i = info(&a).unwrap();
        assert_eq!(
            i.data_blocks,
            1 + u64::from(300_000 / 65536 != 304_999 / 65536)
        );
        f.write_all_at(&[8], 999_999).unwrap();
        let v = verify(&a, &b).unwrap();
        assert!(!v.equal);
        assert_eq!(v.differing_blocks, 1);
        assert_eq!(
            v.first_difference,
            Some(999_999 / BLOCK_BYTES * BLOCK_BYTES)
        );
        let ch = block_hashes(&File::open(&a).unwrap(), 1 << 20).unwrap();
        assert_eq!(ch.len(), 16);
        let dense_ch: Vec<u64> = dense.chunks(BLOCK_BYTES as usize).map(chunk_hash).collect();
        assert_ne!(ch, dense_ch, "the byte at 999999 differs");
        assert_eq!(ch[..15], dense_ch[..15]);
        assert_eq!(ch.iter().filter(|&&h| h != 0).count(), 2);
        assert!(read_state(&a).unwrap().consistent);
        write_state(
            &a,
            &State {
                consistent: false,
                epoch: 0,
            },
        )
        .unwrap();
        assert!(!read_state(&a).unwrap().consistent);
        fs::remove_dir_all(&dir).unwrap();
    }
}
