//! The few things wsedge asks of the operating system directly (Linux), each with its
//! `unsafe` kept here: the open-file limit, socket timeouts on a tunnel's sockets, and a
//! socket's descriptor duplicated for the relay.

#![allow(unsafe_code)]

use pingora::protocols::IO;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

/// Raises the soft limit on open files to the hard limit (every connection is a file, a
/// tunnel two; the usual soft limit of 1024 would make a busy edge answer 502 at about 500
/// tunnels) and returns the limit now in force, or why it could not be read.
pub fn raise_nofile_limit() -> Result<u64, std::io::Error> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the call to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit; the call only reads it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    Ok(lim.rlim_cur)
}

/// Sets `TCP_USER_TIMEOUT` on the TCP socket under `stream` (plain or TLS): data the peer
/// has not acknowledged for `limit` ends the connection. A tunnel whose client vanished
/// without a FIN or RST (a phone out of coverage, a NAT that forgot the flow) is then ended
/// by the kernel once the other side talks to it, instead of after TCP's 15 minutes of
/// retransmissions; a silent one is ended by the idle timeout.
pub fn set_user_timeout(stream: &dyn IO, limit: Duration) {
    let fd = stream.id();
    if fd < 0 {
        return; // not a socket (a test's in-memory stream)
    }
    // SAFETY: `stream` owns the descriptor `fd` and outlives this call; the borrow does
    // not close or keep it.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let ms = u32::try_from(limit.as_millis()).unwrap_or(u32::MAX);
    if let Err(e) =
        socket2::SockRef::from(&fd).set_tcp_user_timeout(Some(Duration::from_millis(u64::from(ms))))
    {
        log::debug!("TCP_USER_TIMEOUT: {e}");
    }
}

/// A second descriptor for the socket `fd` (close-on-exec), owned by the caller.
pub fn dup_socket(fd: std::os::fd::RawFd) -> std::io::Result<OwnedFd> {
    if fd < 0 {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    // SAFETY: the caller's stream owns `fd` for the duration of this call (a negative
    // descriptor, which Pingora's virtual streams report, was refused above).
    unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()
}
