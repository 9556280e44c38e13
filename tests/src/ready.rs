//! Telling when a server process listens on its endpoint, without connecting.
//!
//! Connecting to probe would be wrong for some servers: `qemu-nbd` without
//! `--persistent` exits after its first client disconnects. Instead the
//! harness reads the kernel's socket tables (`/proc/net/tcp`,
//! `/proc/net/unix`) for a listening socket on the endpoint, and checks that
//! this socket belongs to the server process (its inode is one of
//! `/proc/PID/fd/*`), so a foreign process holding the same port never looks
//! like our server.

use std::collections::HashSet;
use std::fs;
use std::net::{IpAddr, SocketAddr};

use crate::endpoint::Endpoint;

/// Whether process `pid` holds a socket listening on `endpoint`.
pub(crate) fn is_listening(pid: u32, endpoint: &Endpoint) -> bool {
    let inodes = match endpoint {
        Endpoint::Tcp(addr) => tcp_listen_inodes(*addr),
        Endpoint::Unix(path) => unix_listen_inodes(&path.to_string_lossy()),
    };
    !inodes.is_empty() && process_owns_any_socket(pid, &inodes)
}

/// Inodes of TCP sockets in state LISTEN on `addr` (IPv4 only).
fn tcp_listen_inodes(addr: SocketAddr) -> HashSet<u64> {
    let IpAddr::V4(ip) = addr.ip() else {
        return HashSet::new();
    };
    // /proc/net/tcp prints the address as the in-memory (network order) u32
    // in hex, i.e. byte-reversed on little-endian machines.
    let want_ip = format!("{:08X}", u32::from_ne_bytes(ip.octets()));
    let want = format!("{want_ip}:{:04X}", addr.port());
    let Ok(table) = fs::read_to_string("/proc/net/tcp") else {
        return HashSet::new();
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
            (*local == want && *state == "0A").then(|| inode.parse().ok())?
        })
        .collect()
}

/// Inodes of listening Unix stream sockets bound to `path`.
fn unix_listen_inodes(path: &str) -> HashSet<u64> {
    const SO_ACCEPTCON: u32 = 0x0001_0000;
    let Ok(table) = fs::read_to_string("/proc/net/unix") else {
        return HashSet::new();
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Num RefCount Protocol Flags Type St Inode Path
            let flags = u32::from_str_radix(fields.get(3)?, 16).ok()?;
            let inode = fields.get(6)?.parse().ok()?;
            let bound = fields.get(7..)?.join(" ");
            (flags & SO_ACCEPTCON != 0 && bound == path).then_some(inode)
        })
        .collect()
}

/// Whether one of `pid`'s file descriptors is a socket with one of `inodes`.
fn process_owns_any_socket(pid: u32, inodes: &HashSet<u64>) -> bool {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    entries.flatten().any(|entry| {
        fs::read_link(entry.path())
            .ok()
            .and_then(|target| {
                let target = target.to_str()?.to_owned();
                let inode = target.strip_prefix("socket:[")?.strip_suffix(']')?;
                inode.parse::<u64>().ok()
            })
            .is_some_and(|inode| inodes.contains(&inode))
    })
}
