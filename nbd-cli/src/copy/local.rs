//! Local files and block devices as copy ends: positioned I/O shared by every
//! worker, zeroing the cheapest way the kernel offers, and write-back control
//! so that a long copy into a file never fills the page cache with dirty pages.
//!
//! Why write-back control: the kernel lets dirty pages pile up until a
//! threshold, then throttles every writer for as long as the disk needs to
//! catch up, so plain `pwrite` calls stall for milliseconds each. Starting
//! write-back of each region soon after it is written, and dropping regions
//! from the cache once they are on disk, keeps the dirty set small and the
//! writes fast.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};

/// `BLKZEROOUT`: `_IO(0x12, 127)`, make a byte range of a block device read
/// as zeroes, keeping it allocated. (`BLKDISCARD` is not used: whether
/// discarded blocks read back as zeroes depends on the device; the kernel's
/// `fallocate(PUNCH_HOLE)` on a block device discards only where they do.)
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// What kind of local object a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    Regular,
    /// A block device: fixed size, zeroed with `BLKZEROOUT`.
    Block,
    /// Anything else (pipe, character device, socket): read or written in order only.
    Stream,
}

/// What a path is, following symlinks; `None` when it does not exist.
pub fn kind_of(path: &str) -> io::Result<Option<Kind>> {
    match std::fs::metadata(path) {
        Ok(meta) => Ok(Some(kind_of_type(meta.file_type()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn kind_of_type(ft: std::fs::FileType) -> Kind {
    if ft.is_file() {
        Kind::Regular
    } else if ft.is_block_device() {
        Kind::Block
    } else {
        Kind::Stream
    }
}

/// A regular file or block device, read and written at offsets from many threads.
#[derive(Debug)]
pub struct Local {
    file: File,
    kind: Kind,
    size: u64,
}

impl Local {
    /// Opens `path` for reading as a copy source.
    pub fn open_source(path: &str) -> io::Result<Local> {
        let file = File::open(path)?;
        let kind = kind_of_type(file.metadata()?.file_type());
        let local = Local::with_size(file, kind)?;
        // The copy reads it front to back (in a few interleaved streams):
        // ask for generous read-ahead.
        local.advise(0, 0, libc::POSIX_FADV_SEQUENTIAL);
        Ok(local)
    }

    /// Opens `path` for writing as a copy destination of `size` bytes.
    ///
    /// A block device keeps its size, which must hold `size`. A regular file
    /// is created if needed; with `keep` its content stays (an incremental
    /// copy), and it is only grown to `size` if shorter; without `keep` it is
    /// emptied and set to `size`, so it reads as zeroes until written.
    pub fn open_destination(path: &str, size: u64, keep: bool) -> io::Result<Local> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let kind = kind_of_type(file.metadata()?.file_type());
        let local = Local::with_size(file, kind)?;
        match kind {
            Kind::Block if local.size < size => Err(io::Error::other(format!(
                "block device size {} is smaller than the source size {size}",
                local.size
            ))),
            Kind::Block => Ok(local),
            _ if keep => {
                if local.size < size {
                    local.file.set_len(size)?;
                }
                Ok(Local { size, ..local })
            }
            _ => {
                local.file.set_len(0)?;
                local.file.set_len(size)?;
                Ok(Local { size, ..local })
            }
        }
    }

    fn with_size(mut file: File, kind: Kind) -> io::Result<Local> {
        // A block device reports size 0 in its metadata; seeking to the end
        // gives its real size (as BLKGETSIZE64 would).
        let size = match kind {
            Kind::Block => file.seek(SeekFrom::End(0))?,
            _ => file.metadata()?.len(),
        };
        Ok(Local { file, kind, size })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether this is a block device.
    pub fn is_block_device(&self) -> bool {
        self.kind == Kind::Block
    }

    /// Fills `buf` from `offset`; a file that ends early is an error, never zeroes.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(e.kind(), "the file ended before its size (it shrank?)")
            } else {
                e
            }
        })
    }

    /// Writes all of `data` at `offset`.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    /// Makes `len` bytes at `offset` read as zeroes. With `allocated`, the
    /// range stays allocated (no hole); otherwise a hole is punched where the
    /// file system allows. Falls back to writing zeroes from `zeroes`.
    pub fn zero(&self, offset: u64, len: u64, allocated: bool, zeroes: &[u8]) -> io::Result<()> {
        let done = match self.kind {
            Kind::Block if allocated => self.block_range_ioctl(BLKZEROOUT, offset, len),
            Kind::Block => self
                .fallocate(
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
                .or_else(|_| self.block_range_ioctl(BLKZEROOUT, offset, len)),
            _ if allocated => self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len),
            _ => self
                .fallocate(
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
                .or_else(|_| self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len)),
        };
        if done.is_ok() {
            return Ok(());
        }
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeroes.len() as u64) as usize;
            self.write_at(&zeroes[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Sets a regular file's length (a block device keeps its own).
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        match self.kind {
            Kind::Block => Ok(()),
            _ => self.file.set_len(len),
        }
    }

    /// Writes the file's data and metadata to stable storage.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (off, len) = (to_off(offset)?, to_off(len)?);
        // SAFETY: fallocate only reads its integer arguments; the descriptor
        // is owned by `self.file` and open for the duration of the call.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn block_range_ioctl(&self, request: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKZEROOUT and BLKDISCARD read exactly two u64 (start,
        // length) from the pointer, which points at `range`, alive for the call.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), request as _, range.as_ptr()) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn advise(&self, offset: u64, len: u64, advice: libc::c_int) {
        let (Ok(off), Ok(len)) = (to_off(offset), to_off(len)) else {
            return;
        };
        // SAFETY: posix_fadvise only reads its integer arguments. Advice is
        // best effort, so its result is not needed.
        unsafe { libc::posix_fadvise(self.file.as_raw_fd(), off, len, advice) };
    }

    fn sync_range(&self, offset: u64, len: u64, flags: libc::c_uint) {
        let (Ok(off), Ok(len)) = (to_off(offset), to_off(len)) else {
            return;
        };
        // SAFETY: sync_file_range only reads its integer arguments. A failure
        // here only loses the page-cache optimisation; errors of the data
        // itself surface at the final sync (with --flush) as with any write.
        unsafe { libc::sync_file_range(self.file.as_raw_fd(), off, len, flags) };
    }
}

fn to_off(n: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(n).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// Size of a region whose write-back starts as one piece.
const WRITEBACK_REGION: u64 = 8 << 20;
/// Regions in write-back at once per worker before the oldest is waited for
/// and dropped from the cache: bounds the dirty pages one worker leaves.
const WRITEBACK_DEPTH: usize = 4;

/// Regions gathering writes at once: the requests in flight span a few
/// regions, and their replies arrive in any order among them.
const OPEN_REGIONS: usize = 3;

/// One worker's write-back of what it wrote to a [`Local`] destination.
/// Writes gather by aligned region of [`WRITEBACK_REGION`] bytes; when a
/// write opens one region too many, write-back of the lowest starts (the copy
/// has moved past it); the oldest regions, once on disk, are dropped from the
/// page cache.
#[derive(Debug, Default)]
pub struct Writeback {
    /// Regions being gathered: index, and the span written in each.
    open: Vec<(u64, u64, u64)>,
    /// Spans whose write-back has started, oldest first.
    started: VecDeque<(u64, u64)>,
}

impl Writeback {
    /// Notes that `len` bytes at `offset` were just written to `local`.
    pub fn wrote(&mut self, local: &Local, offset: u64, len: u64) {
        let region = offset / WRITEBACK_REGION;
        let end = offset + len;
        match self.open.iter_mut().find(|(r, _, _)| *r == region) {
            Some((_, lo, hi)) => {
                *lo = (*lo).min(offset);
                *hi = (*hi).max(end);
            }
            None => self.open.push((region, offset, end)),
        }
        if self.open.len() > OPEN_REGIONS {
            let lowest = (0..self.open.len())
                .min_by_key(|&i| self.open[i].0)
                .unwrap_or(0);
            let (_, lo, hi) = self.open.swap_remove(lowest);
            self.start(local, (lo, hi));
        }
    }

    fn start(&mut self, local: &Local, (start, end): (u64, u64)) {
        local.sync_range(start, end - start, libc::SYNC_FILE_RANGE_WRITE);
        self.started.push_back((start, end));
        while self.started.len() > WRITEBACK_DEPTH {
            if let Some(oldest) = self.started.pop_front() {
                Self::settle(local, oldest);
            }
        }
    }

    /// Waits until `region` is on disk, then drops it from the page cache.
    fn settle(local: &Local, (start, end): (u64, u64)) {
        local.sync_range(
            start,
            end - start,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        );
        local.advise(start, end - start, libc::POSIX_FADV_DONTNEED);
    }

    /// Starts write-back of everything still gathered, and leaves the last
    /// regions to the kernel: the copy is done when its data is in the page
    /// cache, as with any write (`--flush` is what waits for the disk). At
    /// most [`WRITEBACK_DEPTH`] + [`OPEN_REGIONS`] regions per worker stay
    /// cached, already on their way to disk.
    pub fn finish(&mut self, local: &Local) {
        let mut open = std::mem::take(&mut self.open);
        open.sort_unstable();
        for (_, lo, hi) in open {
            self.start(local, (lo, hi));
        }
        self.started.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("nbd-cli-local-{}-{name}", std::process::id()))
    }

    #[test]
    fn a_new_destination_reads_as_zeroes_and_keeps_what_is_written() {
        let path = temp_path("dest");
        std::fs::write(&path, vec![7u8; 100]).unwrap();
        let p = path.to_str().unwrap();
        let local = Local::open_destination(p, 50_000, false).unwrap();
        assert_eq!(local.size(), 50_000);
        local.write_at(b"abc", 40_000).unwrap();
        let mut wb = Writeback::default();
        wb.wrote(&local, 40_000, 3);
        wb.finish(&local);
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 50_000);
        assert!(data[..40_000].iter().all(|&b| b == 0), "old bytes survived");
        assert_eq!(&data[40_000..40_003], b"abc");
        // Zeroing with and without allocation both read back as zeroes.
        let zeroes = vec![0u8; 4096];
        local.zero(40_000, 2, false, &zeroes).unwrap();
        local.zero(40_002, 1, true, &zeroes).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data.iter().all(|&b| b == 0));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_kept_destination_keeps_its_bytes_and_a_short_source_file_is_an_error() {
        let path = temp_path("keep");
        std::fs::write(&path, b"hello").unwrap();
        let p = path.to_str().unwrap();
        let local = Local::open_destination(p, 10, true).unwrap();
        assert_eq!(local.size(), 10);
        assert_eq!(std::fs::read(&path).unwrap(), b"hello\0\0\0\0\0");
        let source = Local::open_source(p).unwrap();
        let mut buf = [0u8; 4];
        let err = source.read_at(&mut buf, 8).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn kinds_are_told_apart() {
        assert_eq!(kind_of("/dev/null").unwrap(), Some(Kind::Stream));
        assert_eq!(kind_of("/nonexistent/x").unwrap(), None);
        let path = temp_path("kind");
        std::fs::write(&path, b"x").unwrap();
        assert_eq!(
            kind_of(path.to_str().unwrap()).unwrap(),
            Some(Kind::Regular)
        );
        std::fs::remove_file(&path).unwrap();
    }
}
