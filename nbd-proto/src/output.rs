//! Bytes waiting to go to the server, as slices for one vectored write.
//!
//! Headers are encoded into a reused buffer and runs of them coalesce into one
//! slice; write payloads are the caller's own `Bytes`, queued without a copy.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};

/// How much header space is reserved at a time.
const ARENA_CHUNK: usize = 16 * 1024;

pub(crate) struct Output {
    /// Frozen pieces in send order; the first may be partly sent.
    queue: VecDeque<Bytes>,
    /// Bytes of `queue[0]` already sent.
    front_sent: usize,
    /// Headers queued after everything in `queue`, not yet frozen.
    tail: BytesMut,
    /// Total unsent bytes.
    pending: usize,
    /// Bytes marked sent since the connection began (its `bytes_sent`).
    sent_total: u64,
}

impl Output {
    pub(crate) fn new() -> Self {
        Output {
            queue: VecDeque::new(),
            front_sent: 0,
            tail: BytesMut::new(),
            pending: 0,
            sent_total: 0,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pending == 0
    }

    /// Appends small bytes (a header) built by `encode`.
    pub(crate) fn push_with(&mut self, encode: impl FnOnce(&mut BytesMut)) {
        if self.tail.capacity() - self.tail.len() < 256 {
            self.tail.reserve(ARENA_CHUNK);
        }
        let before = self.tail.len();
        encode(&mut self.tail);
        self.pending += self.tail.len() - before;
    }

    /// Appends a caller's payload without copying it.
    pub(crate) fn push_payload(&mut self, payload: Bytes) {
        if payload.is_empty() {
            return;
        }
        self.freeze_tail();
        self.pending += payload.len();
        self.queue.push_back(payload);
    }

    fn freeze_tail(&mut self) {
        if !self.tail.is_empty() {
            let piece = self.tail.split().freeze();
            self.queue.push_back(piece);
        }
    }

    /// Fills `out` with the unsent bytes in order; returns how many slices were set.
    pub(crate) fn slices<'a>(&'a self, out: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (i, piece) in self.queue.iter().enumerate() {
            if n == out.len() {
                return n;
            }
            let start = if i == 0 { self.front_sent } else { 0 };
            out[n] = IoSlice::new(&piece[start..]);
            n += 1;
        }
        if n < out.len() && !self.tail.is_empty() {
            out[n] = IoSlice::new(&self.tail);
            n += 1;
        }
        n
    }

    /// The first unsent contiguous piece (for a non-vectored write or a TLS session).
    pub(crate) fn first(&self) -> &[u8] {
        match self.queue.front() {
            Some(piece) => &piece[self.front_sent..],
            None => &self.tail,
        }
    }

    /// Marks `n` bytes as sent. Callers pass at most what `slices` or `first`
    /// listed (the connection checks it); more is clamped, never a panic.
    pub(crate) fn consume(&mut self, mut n: usize) {
        n = n.min(self.pending);
        self.pending -= n;
        self.sent_total += n as u64;
        while n > 0 {
            match self.queue.front() {
                Some(piece) => {
                    let left = piece.len() - self.front_sent;
                    if n >= left {
                        n -= left;
                        self.queue.pop_front();
                        self.front_sent = 0;
                    } else {
                        self.front_sent += n;
                        n = 0;
                    }
                }
                None => {
                    self.tail.advance(n);
                    n = 0;
                }
            }
        }
    }

    /// Every byte marked sent so far.
    pub(crate) fn sent_total(&self) -> u64 {
        self.sent_total
    }

    pub(crate) fn clear(&mut self) {
        self.queue.clear();
        self.front_sent = 0;
        self.tail.clear();
        self.pending = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn flatten(out: &Output) -> Vec<u8> {
        let mut iov = [IoSlice::new(&[]); 16];
        let n = out.slices(&mut iov);
        iov[..n].iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn headers_coalesce_and_payloads_stay_separate() {
        let mut out = Output::new();
        out.push_with(|b| b.put_slice(b"ab"));
        out.push_with(|b| b.put_slice(b"cd"));
        let payload = Bytes::from_static(b"PAYLOAD");
        out.push_payload(payload.clone());
        out.push_with(|b| b.put_slice(b"ef"));
        let mut iov = [IoSlice::new(&[]); 8];
        assert_eq!(out.slices(&mut iov), 3);
        // The payload slice is the caller's memory, not a copy.
        assert_eq!(iov[1].as_ptr(), payload.as_ptr());
        assert_eq!(flatten(&out), b"abcdPAYLOADef");
        out.consume(5);
        assert_eq!(flatten(&out), b"AYLOADef");
        assert_eq!(out.first(), b"AYLOAD");
        out.consume(7);
        assert_eq!(flatten(&out), b"f");
        out.consume(1);
        assert!(out.is_empty());
    }
}
