//! Counting a process's TCP connections from `/proc` (Linux): how many descriptors a node holds
//! at its peer, seen from outside the node.

use std::collections::BTreeSet;

/// Established TCP connections of process `pid` to remote port `port` (IPv4 and IPv6), from
/// `/proc/<pid>/fd` and `/proc/net/tcp{,6}`. 0 when the process is gone.
pub fn tcp_connections_to(pid: u32, port: u16) -> usize {
    let inodes = socket_inodes(pid);
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|text| text.lines().skip(1).map(str::to_string).collect::<Vec<_>>())
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(remote), Some(state), Some(inode)) = (fields.get(2), fields.get(3), fields.get(9))
            else {
                return false;
            };
            let remote_port = remote.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            // 01: ESTABLISHED.
            *state == "01"
                && remote_port == Some(port)
                && inode.parse().is_ok_and(|i: u64| inodes.contains(&i))
        })
        .count()
}

/// The inodes of the sockets process `pid` holds open.
fn socket_inodes(pid: u32) -> BTreeSet<u64> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return BTreeSet::new() };
    entries
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            target.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}
