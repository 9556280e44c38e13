//! Plaintext received from the server and not yet parsed.
//!
//! Headers and small payloads are parsed from here. Reads are bounded so that at
//! most one stage of a large data payload is copied; the rest of such a payload
//! is read straight into the caller's buffer.

/// Capacity of the stage: the largest message buffered whole plus room to read ahead.
pub(crate) const STAGE_CAPACITY: usize = 32 * 1024;
/// Largest payload that is buffered whole before parsing (option replies, error chunks).
pub(crate) const MAX_BUFFERED_PAYLOAD: usize = 16 * 1024;

pub(crate) struct Stage {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Stage {
    pub(crate) fn new() -> Self {
        Stage {
            buf: vec![0; STAGE_CAPACITY],
            start: 0,
            end: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.end - self.start
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub(crate) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Drops `n` parsed bytes. Callers take at most `len()` (every caller
    /// bounds `n` by it); more is clamped, never a panic.
    pub(crate) fn consume(&mut self, n: usize) {
        self.start += n.min(self.len());
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Free space to read into, after moving unparsed bytes to the front if that helps.
    pub(crate) fn space(&mut self) -> &mut [u8] {
        if self.start > 0 && self.buf.len() - self.end < MAX_BUFFERED_PAYLOAD {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// Marks `n` bytes read into `space()` as data. Callers pass at most what
    /// `space()` offered (`notify_read` checks it against the offer, the TLS
    /// path against what it gave the session); more is clamped, never a panic.
    pub(crate) fn commit(&mut self, n: usize) {
        self.end += n.min(self.buf.len() - self.end);
    }

    /// Takes exactly `N` bytes, if that many are there.
    pub(crate) fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        if self.len() < N {
            return None;
        }
        let mut out = [0; N];
        out.copy_from_slice(&self.data()[..N]);
        self.consume(N);
        Some(out)
    }

    /// Takes exactly `n` bytes (`n` at most [`MAX_BUFFERED_PAYLOAD`]), if that many are there.
    pub(crate) fn take_vec(&mut self, n: usize) -> Option<Vec<u8>> {
        if self.len() < n {
            return None;
        }
        let out = self.data()[..n].to_vec();
        self.consume(n);
        Some(out)
    }

    pub(crate) fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }
}
