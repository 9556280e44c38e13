//! The export behind a fake server: sparse bytes plus an allocation map.
//!
//! Pages that were never written take no memory, so an export can be far
//! larger than the machine's memory (a 2^50-byte export for extended-header
//! tests costs nothing until written). Allocation is tracked to the byte:
//! writes allocate, trims and hole-punching zero writes deallocate, so
//! `base:allocation` and read holes describe exactly what a test did.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use nbd_proto::context::{STATE_HOLE, STATE_ZERO};
use nbd_proto::Extent;

/// Size of one stored page.
const PAGE: u64 = 4096;

/// An image shared by a test and every connection of a fake server.
pub type SharedImage = Arc<Mutex<Image>>;

/// Locks a shared image; a poisoned lock (a panicking test thread) still
/// gives the data, which is all a test wants to inspect.
pub fn lock(image: &SharedImage) -> MutexGuard<'_, Image> {
    image
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A sparse in-memory export.
///
/// ```
/// use nbd_testkit::Image;
/// let mut image = Image::new(1 << 20);
/// image.write(4096, b"hello");
/// assert_eq!(image.read(4096, 5), b"hello");
/// assert!(image.is_allocated(4096) && !image.is_allocated(0));
/// image.zero(4096, 5, true);
/// assert_eq!(image.read(4096, 5), [0; 5]);
/// assert!(!image.is_allocated(4096));
/// ```
#[derive(Clone, Default)]
pub struct Image {
    size: u64,
    pages: BTreeMap<u64, Box<[u8]>>,
    /// Allocated ranges: start -> end, disjoint, never adjacent.
    allocated: BTreeMap<u64, u64>,
}

/// A summary, not the bytes: an assertion message must stay readable.
impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("size", &self.size)
            .field("pages_stored", &self.pages.len())
            .field("allocated_ranges", &self.allocated.len())
            .finish()
    }
}

impl Image {
    /// An image of `size` zero bytes, none of them allocated.
    pub fn new(size: u64) -> Self {
        Image {
            size,
            ..Image::default()
        }
    }

    /// An image holding `bytes`, all allocated.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut image = Image::new(bytes.len() as u64);
        image.write(0, bytes);
        image
    }

    /// Wraps the image for sharing.
    pub fn shared(self) -> SharedImage {
        Arc::new(Mutex::new(self))
    }

    /// The export size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether `offset..offset + len` lies inside the export.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.size)
    }

    /// `len` bytes at `offset`; bytes past the end read as zeroes.
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        self.read_into(offset, &mut out);
        out
    }

    /// Fills `buf` from `offset`; bytes never written read as zeroes.
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) {
        buf.fill(0);
        let Some(end) = offset.checked_add(buf.len() as u64) else {
            return;
        };
        if end == offset {
            return;
        }
        let first = offset / PAGE;
        let last = (end - 1) / PAGE;
        for (&index, page) in self.pages.range(first..=last) {
            let page_start = index * PAGE;
            let from = page_start.max(offset);
            let to = (page_start + PAGE).min(end);
            let dst = (from - offset) as usize..(to - offset) as usize;
            let src = (from - page_start) as usize..(to - page_start) as usize;
            buf[dst].copy_from_slice(&page[src]);
        }
    }

    /// The whole image (for small test images).
    pub fn to_vec(&self) -> Vec<u8> {
        self.read(0, self.size as usize)
    }

    /// Writes `data` at `offset` and marks it allocated; bytes past the end
    /// of the export are dropped (the server refuses such writes first).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let len = (data.len() as u64).min(self.size.saturating_sub(offset));
        if len == 0 {
            return;
        }
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let index = at / PAGE;
            let page_start = index * PAGE;
            let to = (page_start + PAGE).min(end);
            let page = self
                .pages
                .entry(index)
                .or_insert_with(|| vec![0; PAGE as usize].into_boxed_slice());
            page[(at - page_start) as usize..(to - page_start) as usize]
                .copy_from_slice(&data[(at - offset) as usize..(to - offset) as usize]);
            at = to;
        }
        self.allocate(offset, end);
    }

    /// Zeroes `len` bytes at `offset`; with `punch` they also become a hole
    /// (unallocated), as a trim or a `WRITE_ZEROES` without `NO_HOLE` does.
    pub fn zero(&mut self, offset: u64, len: u64, punch: bool) {
        let len = len.min(self.size.saturating_sub(offset));
        if len == 0 {
            return;
        }
        let end = offset + len;
        let first = offset / PAGE;
        let last = (end - 1) / PAGE;
        let touched: Vec<u64> = self.pages.range(first..=last).map(|(i, _)| *i).collect();
        for index in touched {
            let page_start = index * PAGE;
            let from = page_start.max(offset);
            let to = (page_start + PAGE).min(end);
            if from == page_start && to == page_start + PAGE {
                self.pages.remove(&index);
            } else if let Some(page) = self.pages.get_mut(&index) {
                page[(from - page_start) as usize..(to - page_start) as usize].fill(0);
            }
        }
        if punch {
            self.deallocate(offset, end);
        } else {
            self.allocate(offset, end);
        }
    }

    /// Whether the byte at `offset` is allocated.
    pub fn is_allocated(&self, offset: u64) -> bool {
        self.allocated
            .range(..=offset)
            .next_back()
            .is_some_and(|(_, &end)| offset < end)
    }

    /// The allocated ranges, in order, as `(start, end)`.
    pub fn allocated_ranges(&self) -> Vec<(u64, u64)> {
        self.allocated.iter().map(|(s, e)| (*s, *e)).collect()
    }

    /// Runs of equal allocation from `offset` for up to `len` bytes (cut at
    /// the export's end), at most `max` of them: `(length, allocated)`.
    pub fn allocation_runs(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, bool)> {
        let end = offset.saturating_add(len).min(self.size);
        let mut runs = Vec::new();
        let mut at = offset;
        while at < end && runs.len() < max {
            let (allocated, run_end) = self.run_at(at);
            let run_end = run_end.min(end);
            runs.push((run_end - at, allocated));
            at = run_end;
        }
        runs
    }

    /// `base:allocation` extents from `offset` for up to `len` bytes, at most
    /// `max` of them: holes read as zeroes, so they carry both flags.
    pub fn extents(&self, offset: u64, len: u64, max: usize) -> Vec<Extent> {
        self.allocation_runs(offset, len, max)
            .into_iter()
            .map(|(length, allocated)| Extent {
                length,
                flags: if allocated {
                    0
                } else {
                    STATE_HOLE | STATE_ZERO
                },
            })
            .collect()
    }

    /// Whether `at` is allocated, and where that run ends.
    fn run_at(&self, at: u64) -> (bool, u64) {
        if let Some((_, &end)) = self.allocated.range(..=at).next_back() {
            if at < end {
                return (true, end);
            }
        }
        let next = self
            .allocated
            .range(at..)
            .next()
            .map_or(u64::MAX, |(s, _)| *s);
        (false, next)
    }

    fn allocate(&mut self, start: u64, end: u64) {
        let (mut start, mut end) = (start, end);
        // Merge every range that overlaps or touches start..end.
        let merging: Vec<(u64, u64)> = self
            .allocated
            .range(..=end)
            .rev()
            .take_while(|(_, &e)| e >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in merging {
            self.allocated.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.allocated.insert(start, end);
    }

    fn deallocate(&mut self, start: u64, end: u64) {
        let cut: Vec<(u64, u64)> = self
            .allocated
            .range(..end)
            .rev()
            .take_while(|(_, &e)| e > start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in cut {
            self.allocated.remove(&s);
            if s < start {
                self.allocated.insert(s, start);
            }
            if e > end {
                self.allocated.insert(end, e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;

    /// A plain model: bytes and a flag per byte.
    fn check_against_model(seed: u64) {
        let size = 20_000u64;
        let mut rng = Rng::new(seed);
        let mut image = Image::new(size);
        let mut bytes = vec![0u8; size as usize];
        let mut alloc = vec![false; size as usize];
        for _ in 0..200 {
            let off = rng.below(size);
            let len = rng.range(1..size - off + 1).min(9000);
            let r = off as usize..(off + len) as usize;
            match rng.below(3) {
                0 => {
                    let data = rng.bytes(len as usize);
                    image.write(off, &data);
                    bytes[r.clone()].copy_from_slice(&data);
                    alloc[r].fill(true);
                }
                1 => {
                    image.zero(off, len, true);
                    bytes[r.clone()].fill(0);
                    alloc[r].fill(false);
                }
                _ => {
                    image.zero(off, len, false);
                    bytes[r.clone()].fill(0);
                    alloc[r].fill(true);
                }
            }
        }
        assert_eq!(image.to_vec(), bytes, "seed {seed}");
        let mut at = 0usize;
        for (len, allocated) in image.allocation_runs(0, size, usize::MAX) {
            let run = &alloc[at..at + len as usize];
            assert!(run.iter().all(|a| *a == allocated), "seed {seed} at {at}");
            at += len as usize;
            if at < alloc.len() {
                assert_ne!(alloc[at], allocated, "runs must be maximal (seed {seed})");
            }
        }
        assert_eq!(at, size as usize);
    }

    #[test]
    fn matches_a_plain_model() {
        for seed in 0..20 {
            check_against_model(seed);
        }
    }

    #[test]
    fn huge_sparse_image_costs_nothing_until_written() {
        let mut image = Image::new(1 << 50);
        image.write((1 << 49) + 3, b"xyz");
        assert_eq!(image.read((1 << 49) + 2, 5), b"\0xyz\0");
        let runs = image.allocation_runs(0, u64::MAX, 10);
        assert_eq!(
            runs,
            [
                ((1 << 49) + 3, false),
                (3, true),
                ((1 << 50) - (1 << 49) - 6, false)
            ]
        );
        image.zero(0, 1 << 50, true);
        assert!(image.allocated_ranges().is_empty());
        assert_eq!(image.pages.len(), 0);
    }
}
