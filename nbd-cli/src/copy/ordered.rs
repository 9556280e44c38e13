//! A destination that only takes bytes in order (standard output, a pipe, a
//! character device), fed by replies that arrive in any order: pieces wait
//! here until everything before them has been written.

use std::collections::BTreeMap;
use std::io::{self, Write};

use bytes::Bytes;

/// One piece of the output.
#[derive(Debug)]
pub enum Piece {
    /// These bytes.
    Data(Bytes),
    /// This many zero bytes.
    Zero(u64),
}

/// An in-order writer over `out`.
pub struct Ordered {
    out: Box<dyn Write + Send>,
    next: u64,
    waiting: BTreeMap<u64, Piece>,
}

impl Ordered {
    /// Writes to `out` from offset 0 on.
    pub fn new(out: Box<dyn Write + Send>) -> Ordered {
        Ordered {
            out,
            next: 0,
            waiting: BTreeMap::new(),
        }
    }

    /// Takes the piece at `offset`, and writes every piece that is now next
    /// in line; `zeroes` is a buffer of zero bytes to write zero pieces from.
    pub fn emit(&mut self, offset: u64, piece: Piece, zeroes: &[u8]) -> io::Result<()> {
        self.waiting.insert(offset, piece);
        while let Some(piece) = self.waiting.remove(&self.next) {
            match piece {
                Piece::Data(data) => {
                    self.out.write_all(&data)?;
                    self.next += data.len() as u64;
                }
                Piece::Zero(mut left) => {
                    while left > 0 {
                        let n = left.min(zeroes.len() as u64) as usize;
                        self.out.write_all(&zeroes[..n])?;
                        left -= n as u64;
                        self.next += n as u64;
                    }
                }
            }
        }
        Ok(())
    }

    /// Flushes the output; pieces still waiting for an earlier one are an error.
    pub fn finish(&mut self) -> io::Result<()> {
        if let Some(first) = self.waiting.keys().next() {
            return Err(io::Error::other(format!(
                "output stopped at offset {}, before the piece at {first}",
                self.next
            )));
        }
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn pieces_come_out_in_offset_order() {
        let sink = Shared::default();
        let mut ordered = Ordered::new(Box::new(sink.clone()));
        let zeroes = [0u8; 2];
        ordered
            .emit(5, Piece::Data(Bytes::from_static(b"xy")), &zeroes)
            .unwrap();
        ordered.emit(2, Piece::Zero(3), &zeroes).unwrap();
        assert!(sink.0.lock().unwrap().is_empty());
        assert!(ordered.finish().is_err(), "a gap at the start is reported");
        ordered
            .emit(0, Piece::Data(Bytes::from_static(b"ab")), &zeroes)
            .unwrap();
        ordered.finish().unwrap();
        assert_eq!(&*sink.0.lock().unwrap(), b"ab\0\0\0xy");
    }
}
