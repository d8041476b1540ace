//! Per-stream send and receive state: buffering, retransmission ranges, reassembly, FIN and
//! flow-control offsets.
//!
//! ```text
//! send:  Open --finish()--> FinQueued --FIN sent--> FinSent --all acked--> Done
//!          \--reset()/peer RESET--> Reset (buffer dropped)
//! recv:  Open --FIN received--> SizeKnown --app read to FIN--> Done
//!          \--RESET received--> Reset
//! ```

use std::collections::{BTreeMap, VecDeque};

use crate::rangeset::RangeSet;

#[derive(Debug)]
pub struct SendStream {
    /// Unacknowledged and unsent bytes, starting at offset `base`.
    buf: VecDeque<u8>,
    base: u64,
    /// Offset one past the last byte written by the application.
    pub written: u64,
    /// Next offset never sent before.
    pub sent: u64,
    /// Acknowledged offsets at or above `base`.
    acked: RangeSet,
    /// Sent offsets declared lost and not yet resent.
    pub retransmit: RangeSet,
    pub fin_written: bool,
    pub fin_sent: bool,
    pub fin_acked: bool,
    /// Flow-control limit granted by the peer.
    pub max_data: u64,
    pub reset: Option<u64>,
}

impl SendStream {
    pub fn new(max_data: u64) -> Self {
        Self {
            buf: VecDeque::new(),
            base: 0,
            written: 0,
            sent: 0,
            acked: RangeSet::new(),
            retransmit: RangeSet::new(),
            fin_written: false,
            fin_sent: false,
            fin_acked: false,
            max_data,
            reset: None,
        }
    }

    /// Offset of the first byte not yet acknowledged: the peer has received everything below.
    pub fn unacked_start(&self) -> u64 {
        self.base
    }

    /// Bytes buffered (unacknowledged or unsent).
    pub fn buffered(&self) -> u64 {
        self.written - self.base
    }

    pub fn write(&mut self, data: &[u8]) {
        self.buf.extend(data);
        self.written += data.len() as u64;
    }

    /// Copies `len` bytes at `offset` into `out`.
    pub fn copy_range(&self, offset: u64, len: usize, out: &mut Vec<u8>) {
        let start = (offset - self.base) as usize;
        let (a, b) = self.buf.as_slices();
        let end = start + len;
        if end <= a.len() {
            out.extend_from_slice(&a[start..end]);
        } else if start >= a.len() {
            out.extend_from_slice(&b[start - a.len()..end - a.len()]);
        } else {
            out.extend_from_slice(&a[start..]);
            out.extend_from_slice(&b[..end - a.len()]);
        }
    }

    /// Records an acknowledged range; returns bytes freed from the buffer.
    pub fn on_acked(&mut self, range: std::ops::Range<u64>, fin: bool) -> u64 {
        if fin {
            self.fin_acked = true;
        }
        if range.end <= self.base {
            return 0;
        }
        self.acked.insert(range.start.max(self.base)..range.end);
        self.retransmit.remove(range);
        let mut freed = 0;
        if let Some(first) = self.acked.first()
            && first.start == self.base
        {
            let n = first.end - self.base;
            self.buf.drain(..n as usize);
            self.base = first.end;
            self.acked.remove_below(self.base);
            freed = n;
        }
        freed
    }

    /// A packet carrying `range` was lost: queue what is still unacknowledged.
    pub fn on_lost(&mut self, range: std::ops::Range<u64>, fin: bool) {
        if self.reset.is_some() {
            return;
        }
        if fin && !self.fin_acked {
            self.fin_sent = false;
        }
        let start = range.start.max(self.base);
        if start < range.end {
            self.retransmit.insert(start..range.end);
            for a in self.acked.iter().collect::<Vec<_>>() {
                self.retransmit.remove(a);
            }
        }
    }

    /// Something to send (retransmission, new data within the limit, or FIN)?
    pub fn has_pending(&self) -> bool {
        self.reset.is_none()
            && (!self.retransmit.is_empty()
                || (self.sent < self.written && self.sent < self.max_data)
                || (self.fin_written && !self.fin_sent && self.sent == self.written))
    }

    pub fn is_done(&self) -> bool {
        self.reset.is_some() || (self.fin_acked && self.base == self.written)
    }

    pub fn drop_buffer(&mut self) {
        self.buf = VecDeque::new();
        self.retransmit = RangeSet::new();
        self.base = self.written;
    }
}

#[derive(Debug)]
pub struct RecvStream {
    /// Contiguous data ready for the application.
    ready: VecDeque<Vec<u8>>,
    ready_head: usize,
    ready_bytes: u64,
    /// Offset of the next byte the application reads.
    pub read_offset: u64,
    /// Offset one past the contiguous received data.
    contiguous: u64,
    /// Out-of-order segments by offset: disjoint, all above `contiguous`, so they never hold
    /// more than the advertised window (`max_advertised - contiguous`) however a peer makes
    /// them overlap.
    pending: BTreeMap<u64, Vec<u8>>,
    /// Bytes held in `pending`.
    pending_bytes: u64,
    /// Highest offset received (flow-control accounting).
    pub highest: u64,
    pub fin_offset: Option<u64>,
    /// Limit we advertised to the peer.
    pub max_advertised: u64,
    pub reset: Option<u64>,
}

/// Most disjoint out-of-order segments one stream holds. Bytes are bounded by the window;
/// this bounds the per-segment overhead a peer can make us allocate with tiny segments.
/// A sender adds a segment only per hole it leaves (loss or reordering) within the window,
/// so a real sender stays far below; beyond it the frame is refused with
/// [`RecvError::TooManySegments`] (the connection closes with a protocol error).
pub const MAX_RECV_SEGMENTS: usize = 8192;

#[derive(Debug, PartialEq, Eq)]
pub enum RecvError {
    /// Data beyond the FIN, or a FIN that contradicts an earlier one.
    FinalSize,
    /// Storing the frame would exceed [`MAX_RECV_SEGMENTS`] (nothing was stored).
    TooManySegments,
}

impl RecvStream {
    pub fn new(window: u64) -> Self {
        Self {
            ready: VecDeque::new(),
            ready_head: 0,
            ready_bytes: 0,
            read_offset: 0,
            contiguous: 0,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            highest: 0,
            fin_offset: None,
            max_advertised: window,
            reset: None,
        }
    }

    /// Incoming STREAM frame. Returns true if new contiguous data (or the FIN) became readable.
    pub fn on_data(&mut self, offset: u64, data: &[u8], fin: bool) -> Result<bool, RecvError> {
        let end = offset + data.len() as u64;
        if let Some(f) = self.fin_offset
            && (end > f || (fin && end != f))
        {
            return Err(RecvError::FinalSize);
        }
        if end > self.contiguous && offset > self.contiguous && self.reset.is_none() {
            // Checked before any state changes, so a refused frame leaves nothing behind.
            let pieces = self.uncovered(offset, end);
            if self.pending.len() + pieces.len() > MAX_RECV_SEGMENTS {
                return Err(RecvError::TooManySegments);
            }
        }
        if fin {
            if end < self.highest {
                return Err(RecvError::FinalSize);
            }
            self.fin_offset = Some(end);
        }
        if self.reset.is_some() {
            return Ok(false);
        }
        self.highest = self.highest.max(end);
        let before = self.contiguous;
        if end > self.contiguous {
            if offset <= self.contiguous {
                let skip = (self.contiguous - offset) as usize;
                self.push_ready(data[skip..].to_vec());
                self.drain_pending();
            } else {
                for (a, b) in self.uncovered(offset, end) {
                    let piece = &data[(a - offset) as usize..(b - offset) as usize];
                    self.pending_bytes += b - a;
                    // A piece right behind the previous segment extends it (the usual case
                    // after a loss: later packets arrive in order behind the hole).
                    if let Some((&o, prev)) = self.pending.range_mut(..a).next_back()
                        && o + prev.len() as u64 == a
                    {
                        prev.extend_from_slice(piece);
                    } else {
                        self.pending.insert(a, piece.to_vec());
                    }
                }
            }
        }
        Ok(self.contiguous > before || (fin && self.contiguous == end))
    }

    /// The parts of `offset..end` (all above `contiguous`) that no pending segment holds.
    fn uncovered(&self, offset: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut cursor = offset;
        let from = self
            .pending
            .range(..=offset)
            .next_back()
            .map_or(offset, |(&o, _)| o);
        for (&o, seg) in self.pending.range(from..end) {
            let seg_end = o + seg.len() as u64;
            if seg_end <= cursor {
                continue;
            }
            if o > cursor {
                out.push((cursor, o));
            }
            cursor = cursor.max(seg_end);
            if cursor >= end {
                break;
            }
        }
        if cursor < end {
            out.push((cursor, end));
        }
        out
    }

    /// Out-of-order bytes held (at most the advertised window above the contiguous data).
    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes
    }

    /// Out-of-order segments held (at most [`MAX_RECV_SEGMENTS`]).
    pub fn pending_segments(&self) -> usize {
        self.pending.len()
    }

    fn push_ready(&mut self, chunk: Vec<u8>) {
        if chunk.is_empty() {
            return;
        }
        self.contiguous += chunk.len() as u64;
        self.ready_bytes += chunk.len() as u64;
        self.ready.push_back(chunk);
    }

    fn drain_pending(&mut self) {
        while let Some((&off, _)) = self.pending.first_key_value() {
            if off > self.contiguous {
                break;
            }
            let (off, chunk) = self.pending.pop_first().expect("non-empty");
            self.pending_bytes -= chunk.len() as u64;
            let end = off + chunk.len() as u64;
            if end > self.contiguous {
                let skip = (self.contiguous - off) as usize;
                self.push_ready(chunk[skip..].to_vec());
            }
        }
    }

    pub fn readable_bytes(&self) -> u64 {
        self.ready_bytes
    }

    /// True when the application has read everything up to the FIN.
    pub fn is_finished(&self) -> bool {
        self.fin_offset == Some(self.read_offset)
    }

    /// Copies up to `out.len()` bytes; returns the count.
    pub fn read(&mut self, out: &mut [u8]) -> usize {
        let mut n = 0;
        while n < out.len() {
            let Some(front) = self.ready.front() else {
                break;
            };
            let avail = &front[self.ready_head..];
            let take = avail.len().min(out.len() - n);
            out[n..n + take].copy_from_slice(&avail[..take]);
            n += take;
            self.ready_head += take;
            if self.ready_head == front.len() {
                self.ready.pop_front();
                self.ready_head = 0;
            }
        }
        self.read_offset += n as u64;
        self.ready_bytes -= n as u64;
        n
    }

    /// Discards everything (RESET).
    pub fn drop_buffers(&mut self) {
        self.ready.clear();
        self.ready_head = 0;
        self.ready_bytes = 0;
        self.pending.clear();
        self.pending_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reassembles_out_of_order_and_overlapping_segments() {
        let data: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        let mut r = RecvStream::new(1 << 20);
        let cuts = [
            (3000, 4000),
            (0, 1000),
            (900, 2100),
            (4000, 5000),
            (2100, 3000),
        ];
        for (i, &(a, b)) in cuts.iter().enumerate() {
            let fin = b == 5000;
            r.on_data(a as u64, &data[a..b], fin).unwrap();
            if i == 0 {
                assert_eq!(r.readable_bytes(), 0);
            }
        }
        let mut out = vec![0; 6000];
        let n = r.read(&mut out);
        assert_eq!(&out[..n], &data[..]);
        assert!(r.is_finished());
        assert_eq!(r.on_data(4000, &data[4000..5000], false), Ok(false));
        assert_eq!(r.on_data(5000, b"x", false), Err(RecvError::FinalSize));
    }

    /// Regression: overlapping out-of-order segments at distinct offsets were each stored
    /// whole, so 1,000 frames of 1,000 bytes shifted by one byte held ~1 MB for ~2 KB of
    /// stream. Now the held bytes never exceed the span they cover.
    #[test]
    fn overlapping_out_of_order_segments_are_stored_once() {
        let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let mut r = RecvStream::new(1 << 20);
        for i in 0..1000usize {
            let a = 10 + i;
            r.on_data(a as u64, &data[a..a + 1000], false).unwrap();
        }
        // Offsets 10..2009 are covered: 1,999 bytes, merged into one segment.
        assert_eq!(r.pending_bytes(), 1999);
        assert_eq!(r.pending_segments(), 1);
        // A segment spanning existing ones keeps only the holes' bytes.
        r.on_data(3000, &data[3000..3100], false).unwrap();
        r.on_data(1500, &data[1500..4000], false).unwrap();
        assert_eq!(r.pending_bytes(), 4000 - 10);
        r.on_data(0, &data[..10], false).unwrap();
        assert_eq!(r.pending_bytes(), 0);
        let mut out = vec![0; 10_000];
        let n = r.read(&mut out);
        assert_eq!(&out[..n], &data[..4000]);
    }

    /// Regression: one-byte segments with one-byte holes made one map entry (~100 bytes of
    /// overhead) per byte; the count is bounded and a frame beyond it is refused whole.
    #[test]
    fn out_of_order_segment_count_is_bounded() {
        let mut r = RecvStream::new(1 << 30);
        for i in 0..MAX_RECV_SEGMENTS as u64 {
            r.on_data(2 + 2 * i, b"x", false).unwrap();
        }
        assert_eq!(r.pending_segments(), MAX_RECV_SEGMENTS);
        let far = 2 + 2 * MAX_RECV_SEGMENTS as u64;
        assert_eq!(r.on_data(far, b"y", false), Err(RecvError::TooManySegments));
        assert_eq!(r.pending_segments(), MAX_RECV_SEGMENTS);
        // Filling a hole (or extending a segment) still works at the bound.
        assert_eq!(r.on_data(0, b"ab", false), Ok(true));
        assert_eq!(r.readable_bytes(), 3);
    }

    #[test]
    fn send_buffer_frees_on_contiguous_ack_and_requeues_losses() {
        let mut s = SendStream::new(1 << 20);
        s.write(&[1u8; 1000]);
        s.sent = 1000;
        assert_eq!(s.on_acked(500..1000, false), 0);
        s.on_lost(0..500, false);
        assert_eq!(s.retransmit.first(), Some(0..500));
        assert_eq!(s.on_acked(0..500, false), 1000);
        assert!(s.retransmit.is_empty());
        assert_eq!(s.buffered(), 0);
    }
}
