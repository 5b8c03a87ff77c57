//! Open files: every client connection is a socket, and a central serving thousands of edges holds
//! a few per edge (the link stream, batch connections). A process out of descriptors cannot accept,
//! and cannot open its own store files either; so the node raises its soft limit to the hard one at
//! start and accepts no more connections than the limit leaves room for (the others are closed at
//! accept, as past `limits.max_connections`, and the node serves on).

/// Descriptors kept for what is not a client connection (the store's files and pools, upstream and
/// route connections, logs), at most this many or a quarter of a small limit.
const RESERVED: u64 = 512;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, and returns `max_connections` or, when the
/// limit leaves less room, what it does leave (with a warning naming both).
pub fn connection_budget(max_connections: u32) -> u32 {
    let Some(limit) = raise_open_file_limit() else { return max_connections };
    let budget = limit.saturating_sub(RESERVED.min(limit / 4)).max(1);
    if u64::from(max_connections) <= budget {
        return max_connections;
    }
    tracing::warn!(
        max_connections,
        open_file_limit = limit,
        accepted = budget,
        "limits.max_connections is above what the open-file limit allows: at most {budget} \
         connections are accepted (raise `ulimit -n` / LimitNOFILE= to serve more)"
    );
    budget as u32
}

/// The soft open-file limit after raising it to the hard one (`None`: unknown or unlimited).
fn raise_open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads only the struct it is given; raising the soft limit up to the
        // hard one needs no privilege (it fails only for an unlimited hard limit past nr_open).
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
        }
    }
    (limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}
