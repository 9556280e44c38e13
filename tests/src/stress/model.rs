//! What the export must hold, byte for byte, as far as the test knows.
//!
//! Every byte is either known (written, zeroed, or zero from the start) or
//! unknown (trimmed on a server that does not promise zeroes, or the target
//! of a fast zero the server refused). Unknown bytes are never checked; they
//! become known again when rewritten.

use std::fmt;
use std::ops::Range;

/// The expected contents of an export.
#[derive(Debug, Clone)]
pub struct Model {
    bytes: Vec<u8>,
    known: Vec<bool>,
}

/// The first byte where a read (or a claim of the server) disagrees with the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Export offset of the first differing byte.
    pub offset: u64,
    /// What the model holds there.
    pub expected: u8,
    /// What the server gave.
    pub got: u8,
    /// How many known bytes of the range differ in all.
    pub differing: u64,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "byte at {} is {:#04x}, the model holds {:#04x} ({} known bytes of the range differ)",
            self.offset, self.got, self.expected, self.differing
        )
    }
}

impl Model {
    /// An export of `size` bytes that reads as zeroes everywhere.
    pub fn zeroed(size: u64) -> Self {
        let size = usize::try_from(size).expect("a stress export fits in memory");
        Model {
            bytes: vec![0; size],
            known: vec![true; size],
        }
    }

    /// The export size.
    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn span(&self, offset: u64, len: u64) -> Range<usize> {
        let start = usize::try_from(offset).expect("offset inside the model");
        let end = start + usize::try_from(len).expect("length inside the model");
        assert!(
            end <= self.bytes.len(),
            "range {offset}+{len} outside the model"
        );
        start..end
    }

    /// `data` was written at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let span = self.span(offset, data.len() as u64);
        self.bytes[span.clone()].copy_from_slice(data);
        self.known[span].fill(true);
    }

    /// `offset..offset + len` now reads as zeroes.
    pub fn zero(&mut self, offset: u64, len: u64) {
        let span = self.span(offset, len);
        self.bytes[span.clone()].fill(0);
        self.known[span].fill(true);
    }

    /// `offset..offset + len` may now hold anything (old bytes or zeroes).
    pub fn forget(&mut self, offset: u64, len: u64) {
        let span = self.span(offset, len);
        self.known[span].fill(false);
    }

    /// How many bytes of `offset..offset + len` the model knows.
    pub fn known_bytes(&self, offset: u64, len: u64) -> u64 {
        let span = self.span(offset, len);
        self.known[span].iter().filter(|k| **k).count() as u64
    }

    /// Compares `got`, read at `offset`, with every known byte of the model.
    pub fn check_read(&self, offset: u64, got: &[u8]) -> Result<(), Mismatch> {
        let span = self.span(offset, got.len() as u64);
        let expected = &self.bytes[span.clone()];
        if expected == got {
            // The common case: identical, unknown bytes included.
            return Ok(());
        }
        self.first_difference(offset, got, |at| expected[at])
    }

    /// Checks that every known byte of `offset..offset + len` is zero (the
    /// server claims the range reads as zeroes).
    pub fn check_zero(&self, offset: u64, len: u64) -> Result<(), Mismatch> {
        let span = self.span(offset, len);
        if self.bytes[span.clone()].iter().all(|b| *b == 0) {
            return Ok(());
        }
        let zeroes = vec![0; span.len()];
        self.first_difference(offset, &zeroes, |at| self.bytes[span.start + at])
    }

    /// The first known byte where `got` differs from `expected(i)`, and how
    /// many differ.
    fn first_difference(
        &self,
        offset: u64,
        got: &[u8],
        expected: impl Fn(usize) -> u8,
    ) -> Result<(), Mismatch> {
        let start = self.span(offset, got.len() as u64).start;
        let mut first = None;
        let mut differing = 0;
        for (i, &byte) in got.iter().enumerate() {
            if self.known[start + i] && byte != expected(i) {
                differing += 1;
                first.get_or_insert((i, byte));
            }
        }
        match first {
            None => Ok(()),
            Some((i, byte)) => Err(Mismatch {
                offset: offset + i as u64,
                expected: expected(i),
                got: byte,
                differing,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_bytes_are_checked_and_unknown_ones_are_not() {
        let mut model = Model::zeroed(16);
        model.write(4, &[1, 2, 3, 4]);
        assert_eq!(model.check_read(2, &[0, 0, 1, 2, 3, 4, 0]), Ok(()));
        let bad = model.check_read(4, &[1, 9, 3, 8]).unwrap_err();
        assert_eq!((bad.offset, bad.expected, bad.got), (5, 2, 9));
        assert_eq!(bad.differing, 2);

        model.forget(4, 2);
        assert_eq!(model.known_bytes(0, 16), 14);
        assert_eq!(model.check_read(4, &[7, 7, 3, 4]), Ok(()));
        assert!(model.check_read(4, &[7, 7, 0, 4]).is_err());

        model.zero(0, 8);
        assert_eq!(model.check_read(0, &[0; 8]), Ok(()));
    }

    #[test]
    fn a_zero_claim_fails_only_over_known_nonzero_bytes() {
        let mut model = Model::zeroed(8);
        model.write(2, &[5, 6]);
        assert_eq!(model.check_zero(4, 4), Ok(()));
        let bad = model.check_zero(0, 8).unwrap_err();
        assert_eq!((bad.offset, bad.expected, bad.got), (2, 5, 0));
        model.forget(2, 2);
        assert_eq!(model.check_zero(0, 8), Ok(()));
    }
}
