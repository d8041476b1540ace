//! A minimal pcap writer: nanosecond timestamps (magic 0xa1b23c4d), raw IP link type, a snap
//! length, and a size cap after which capture stops (counted, never an error for forwarding).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

const LINKTYPE_RAW: u32 = 101;

#[derive(Debug)]
pub struct PcapWriter {
    out: BufWriter<File>,
    snaplen: u32,
    written_bytes: u64,
    max_bytes: u64,
    /// Packets not captured because the size cap was reached.
    pub skipped: u64,
}

impl PcapWriter {
    pub fn create(path: &Path, snaplen: u32, max_bytes: u64) -> io::Result<Self> {
        let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
        out.write_all(&0xa1b2_3c4du32.to_le_bytes())?;
        out.write_all(&2u16.to_le_bytes())?;
        out.write_all(&4u16.to_le_bytes())?;
        out.write_all(&0i32.to_le_bytes())?;
        out.write_all(&0u32.to_le_bytes())?;
        out.write_all(&snaplen.to_le_bytes())?;
        out.write_all(&LINKTYPE_RAW.to_le_bytes())?;
        Ok(Self {
            out,
            snaplen,
            written_bytes: 24,
            max_bytes,
            skipped: 0,
        })
    }

    pub fn record(&mut self, unix_ns: u64, pkt: &[u8]) -> io::Result<()> {
        let cap = pkt.len().min(self.snaplen as usize);
        if self.written_bytes + 16 + cap as u64 > self.max_bytes {
            self.skipped += 1;
            return Ok(());
        }
        self.out
            .write_all(&((unix_ns / 1_000_000_000) as u32).to_le_bytes())?;
        self.out
            .write_all(&((unix_ns % 1_000_000_000) as u32).to_le_bytes())?;
        self.out.write_all(&(cap as u32).to_le_bytes())?;
        self.out.write_all(&(pkt.len() as u32).to_le_bytes())?;
        self.out.write_all(&pkt[..cap])?;
        self.written_bytes += 16 + cap as u64;
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_records_have_pcap_layout() {
        let dir = std::env::temp_dir().join(format!("tern-pcap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.pcap");
        let mut w = PcapWriter::create(&path, 8, 24 + 2 * (16 + 8)).unwrap();
        w.record(1_700_000_000_123_456_789, &[0x45; 20]).unwrap();
        w.record(1_700_000_001_000_000_000, &[1, 2, 3]).unwrap();
        w.record(1_700_000_002_000_000_000, &[9; 30]).unwrap(); // over the cap
        w.flush().unwrap();
        assert_eq!(w.skipped, 1);
        let b = std::fs::read(&path).unwrap();
        assert_eq!(&b[0..4], &0xa1b2_3c4du32.to_le_bytes());
        assert_eq!(
            u32::from_le_bytes(b[20..24].try_into().unwrap()),
            LINKTYPE_RAW
        );
        assert_eq!(
            u32::from_le_bytes(b[24..28].try_into().unwrap()),
            1_700_000_000
        );
        assert_eq!(
            u32::from_le_bytes(b[28..32].try_into().unwrap()),
            123_456_789
        );
        assert_eq!(u32::from_le_bytes(b[32..36].try_into().unwrap()), 8); // captured
        assert_eq!(u32::from_le_bytes(b[36..40].try_into().unwrap()), 20); // original
        assert_eq!(b.len(), 24 + 16 + 8 + 16 + 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
