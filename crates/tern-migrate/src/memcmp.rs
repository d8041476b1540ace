//! Byte-for-byte comparison of two guest RAM dumps (QMP `pmemsave`), page by page.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

pub const PAGE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemCompare {
    pub bytes: u64,
    pub pages_differing: u64,
    /// Guest-physical address of the first differing page.
    pub first_difference: Option<u64>,
    /// Where both dumps were kept when they differ (for diagnosis).
    pub evidence: Option<String>,
}

pub fn compare_files(a: &Path, b: &Path) -> io::Result<MemCompare> {
    compare(File::open(a)?, File::open(b)?)
}

pub fn compare(mut a: impl Read, mut b: impl Read) -> io::Result<MemCompare> {
    const CHUNK: usize = 256 * PAGE;
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut out = MemCompare {
        bytes: 0,
        pages_differing: 0,
        first_difference: None,
        evidence: None,
    };
    loop {
        let na = read_full(&mut a, &mut ba)?;
        let nb = read_full(&mut b, &mut bb)?;
        if na != nb {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("dumps differ in size near offset {}", out.bytes),
            ));
        }
        if na == 0 {
            return Ok(out);
        }
        for (i, (pa, pb)) in ba[..na].chunks(PAGE).zip(bb[..nb].chunks(PAGE)).enumerate() {
            if pa != pb {
                out.pages_differing += 1;
                out.first_difference
                    .get_or_insert(out.bytes + (i * PAGE) as u64);
            }
        }
        out.bytes += na as u64;
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_differing_pages() {
        let a: Vec<u8> = (0..PAGE * 600).map(|i| (i % 251) as u8).collect();
        let mut b = a.clone();
        assert_eq!(compare(&a[..], &b[..]).unwrap().pages_differing, 0);
        b[PAGE * 300 + 7] ^= 1;
        b[PAGE * 599] ^= 0x80;
        let r = compare(&a[..], &b[..]).unwrap();
        assert_eq!(r.pages_differing, 2);
        assert_eq!(r.first_difference, Some((PAGE * 300) as u64));
        assert_eq!(r.bytes, (PAGE * 600) as u64);
        assert!(compare(&a[..], &b[..PAGE]).is_err());
    }
}
