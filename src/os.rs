//! The few things wsedge asks of the operating system directly (Linux), each with its
//! `unsafe` kept here: the open-file limit, socket timeouts on a tunnel's sockets, a
//! socket's descriptor duplicated for the relay, an inotify watch on a directory, and the
//! process's user and group ids (for what a file's permissions say to them).

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

/// An inotify descriptor watching `dir` for entries written, created, moved in or out,
/// deleted or changed in their attributes (what an editor's save, an atomic rename and
/// Kubernetes' swap of a ConfigMap volume's `..data` symlink do), non-blocking and
/// close-on-exec, registered with the runtime for reading (call in a runtime).
pub fn watch_dir(
    dir: &std::path::Path,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::fs::File>> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: no pointers; the flags are valid.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just made and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mask = libc::IN_CLOSE_WRITE
        | libc::IN_MOVED_TO
        | libc::IN_MOVED_FROM
        | libc::IN_CREATE
        | libc::IN_DELETE
        | libc::IN_ATTRIB
        | libc::IN_DELETE_SELF
        | libc::IN_MOVE_SELF;
    // SAFETY: `fd` is a live inotify descriptor and `name` a NUL-terminated path that
    // outlives the call.
    if unsafe { libc::inotify_add_watch(fd, name.as_ptr(), mask) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let file = std::fs::File::from(owned);
    // SAFETY: the `File` owns its descriptor, which stays open and the same until the
    // `AsyncFd` (which owns the `File`) is dropped.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(file, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into())
}

/// The process's effective user and group ids.
pub fn effective_ids() -> (u32, u32) {
    // SAFETY: no arguments; these calls cannot fail.
    unsafe { (libc::geteuid(), libc::getegid()) }
}
