//! `wsload relay`: the floor of the benchmark, not a proxy.
//!
//! A bare TCP relay: epoll, `accept4`, `recv` and `send` straight between the two sockets,
//! no HTTP, no runtime, no timers, no metrics, no logs. A WebSocket handshake passes
//! through it as bytes. Whatever any proxy that parses, routes and accounts for a request
//! spends above this is the price of that work; what this spends is what the kernel
//! charges for moving the bytes, which no user-space relay built on `recv`/`send` can
//! avoid. `scripts/bench` measures it next to wsedge, nginx and HAProxy.
//!
//! Each worker thread has its own epoll set and shares one listening socket
//! (`EPOLLEXCLUSIVE`), like nginx's workers; interest is level-triggered and changed only
//! when a destination cannot take bytes (then its source stops being read until it can).

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The epoll key of the listening socket; a connection's is `generation << 32 | slot << 1 |
/// side`. The generation tells an event for a pair closed earlier in the same batch from
/// one for the pair that reuses its slot.
const LISTENER: u64 = u64::MAX;
const CLIENT: usize = 0;
const ORIGIN: usize = 1;

/// `-1` from a libc call as the thread's `errno`.
fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn set_nodelay(fd: RawFd) {
    let on: libc::c_int = 1;
    // SAFETY: `fd` is an open socket and `on` outlives the call.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &on as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A non-blocking connect to `addr` (IPv4 or IPv6), in progress or done.
fn connect(addr: SocketAddr) -> io::Result<OwnedFd> {
    let (family, storage, len) = sockaddr(addr);
    let flags = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: plain socket creation; the fd is owned at once.
    let fd = unsafe { OwnedFd::from_raw_fd(check(libc::socket(family, flags, 0))?) };
    set_nodelay(fd.as_raw_fd());
    // SAFETY: `storage` holds a sockaddr of `len` bytes.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &storage as *const _ as *const libc::sockaddr,
            len,
        )
    };
    match check(r) {
        Ok(_) => Ok(fd),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(fd),
        Err(e) => Err(e),
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::c_int, libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            let sin = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            let len = std::mem::size_of::<libc::sockaddr_in>();
            (libc::AF_INET, storage, len as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above.
            let sin6 = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            let len = std::mem::size_of::<libc::sockaddr_in6>();
            (libc::AF_INET6, storage, len as libc::socklen_t)
        }
    }
}

/// One relayed connection: the client's socket and the origin's.
struct Pair {
    generation: u32,
    fds: [OwnedFd; 2],
    /// The origin's connect has completed.
    connected: bool,
    /// Bytes waiting to be written to `fds[side]`.
    pending: [Vec<u8>; 2],
    /// `fds[side]` has sent its FIN.
    read_done: [bool; 2],
    /// The epoll events `fds[side]` is registered for.
    interest: [u32; 2],
}

impl Pair {
    fn writable(&self, side: usize) -> bool {
        side == CLIENT || self.connected
    }

    fn wants(&self, side: usize) -> u32 {
        let mut ev = 0;
        if !self.read_done[side] && self.pending[1 - side].is_empty() {
            ev |= libc::EPOLLIN as u32;
        }
        if !self.pending[side].is_empty() || !self.writable(side) {
            ev |= libc::EPOLLOUT as u32;
        }
        ev
    }

    fn finished(&self) -> bool {
        self.read_done == [true, true] && self.pending.iter().all(Vec::is_empty)
    }
}

/// The pair is to be closed (an error, a reset, or both directions done).
struct Close;

struct Worker {
    epoll: OwnedFd,
    pairs: Vec<Option<Pair>>,
    free: Vec<usize>,
    generation: u32,
    buf: Vec<u8>,
    origin: SocketAddr,
}

fn key(generation: u32, slot: usize, side: usize) -> u64 {
    (u64::from(generation) << 32) | ((slot as u64) << 1) | side as u64
}

impl Worker {
    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, key: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: key };
        // SAFETY: both fds are open; `ev` outlives the call.
        check(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) }).map(|_| ())
    }

    fn accept(&mut self, listener: RawFd) {
        // A bounded batch: the other worker gets its turn at the queue.
        for _ in 0..16 {
            let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
            // SAFETY: null address pointers are allowed; the fd is owned at once.
            let r = unsafe {
                libc::accept4(listener, std::ptr::null_mut(), std::ptr::null_mut(), flags)
            };
            let Ok(fd) = check(r) else {
                return; // EAGAIN: another worker took it, or the queue is empty
            };
            // SAFETY: `accept4` returned a new fd that nothing else owns.
            let client = unsafe { OwnedFd::from_raw_fd(fd) };
            set_nodelay(client.as_raw_fd());
            let Ok(origin) = connect(self.origin) else {
                continue; // dropping the client closes it: the test sees the failure
            };
            let slot = self.free.pop().unwrap_or_else(|| {
                self.pairs.push(None);
                self.pairs.len() - 1
            });
            self.generation = self.generation.wrapping_add(1);
            let pair = Pair {
                generation: self.generation,
                fds: [client, origin],
                connected: false,
                pending: [Vec::new(), Vec::new()],
                read_done: [false, false],
                interest: [0, 0],
            };
            let interest = [pair.wants(CLIENT), pair.wants(ORIGIN)];
            let added = [CLIENT, ORIGIN].iter().try_for_each(|&s| {
                let fd = pair.fds[s].as_raw_fd();
                self.ctl(
                    libc::EPOLL_CTL_ADD,
                    fd,
                    interest[s],
                    key(pair.generation, slot, s),
                )
            });
            if added.is_err() {
                self.free.push(slot);
                continue;
            }
            self.pairs[slot] = Some(Pair { interest, ..pair });
        }
    }

    fn event(&mut self, token: u64, events: u32) {
        let slot = ((token as u32) >> 1) as usize;
        let side = (token & 1) as usize;
        let generation = (token >> 32) as u32;
        let Some(entry) = self.pairs.get_mut(slot) else {
            return;
        };
        let Some(mut pair) = entry.take_if(|p| p.generation == generation) else {
            return; // closed earlier in this batch of events
        };
        match self.step(&mut pair, side, events) {
            Ok(()) => {
                for s in [CLIENT, ORIGIN] {
                    let want = pair.wants(s);
                    if want != pair.interest[s] {
                        let fd = pair.fds[s].as_raw_fd();
                        let token = key(generation, slot, s);
                        let _ = self.ctl(libc::EPOLL_CTL_MOD, fd, want, token);
                        pair.interest[s] = want;
                    }
                }
                self.pairs[slot] = Some(pair);
            }
            // Closing the fds removes them from the epoll set.
            Err(Close) => self.free.push(slot),
        }
    }

    fn step(&mut self, pair: &mut Pair, side: usize, events: u32) -> Result<(), Close> {
        let err = events & (libc::EPOLLERR as u32) != 0;
        let hup = events & (libc::EPOLLHUP as u32) != 0;
        if side == ORIGIN && !pair.connected {
            let mut e: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: the fd is open; `e` and `len` outlive the call.
            unsafe {
                libc::getsockopt(
                    pair.fds[ORIGIN].as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    &mut e as *mut _ as *mut libc::c_void,
                    &mut len,
                );
            }
            if e != 0 || err {
                return Err(Close);
            }
            pair.connected = true;
            if pair.read_done[CLIENT] && pair.pending[ORIGIN].is_empty() {
                shut_write(&pair.fds[ORIGIN]);
            }
        }
        if err {
            return Err(Close);
        }
        if events & (libc::EPOLLOUT as u32) != 0 && !pair.pending[side].is_empty() {
            flush(pair, side)?;
        }
        let readable = events & (libc::EPOLLIN as u32) != 0 || hup;
        if readable && pair.wants(side) & (libc::EPOLLIN as u32) != 0 {
            self.read(pair, side)?;
        } else if hup {
            // Both directions shut, or reset, and level-triggered epoll would report it
            // forever: a floor for the benchmark closes at once, bytes waiting or not.
            return Err(Close);
        }
        // An origin that just connected takes what the client sent meanwhile.
        if pair.writable(ORIGIN) && !pair.pending[ORIGIN].is_empty() {
            flush(pair, ORIGIN)?;
        }
        match pair.finished() {
            true => Err(Close),
            false => Ok(()),
        }
    }

    /// One `recv` from `side`, sent on at once; what the other side cannot take waits.
    fn read(&mut self, pair: &mut Pair, side: usize) -> Result<(), Close> {
        let other = 1 - side;
        let fd = pair.fds[side].as_raw_fd();
        // SAFETY: `buf` is valid for `len` bytes.
        let n = unsafe { libc::recv(fd, self.buf.as_mut_ptr().cast(), self.buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(()),
                _ => Err(Close),
            };
        }
        if n == 0 {
            pair.read_done[side] = true;
            if pair.pending[other].is_empty() && pair.writable(other) {
                shut_write(&pair.fds[other]);
            }
            return Ok(());
        }
        let chunk = &self.buf[..n as usize];
        let sent = match pair.writable(other) {
            true => send(pair.fds[other].as_raw_fd(), chunk).map_err(|_| Close)?,
            false => 0,
        };
        pair.pending[other].extend_from_slice(&chunk[sent..]);
        Ok(())
    }
}

/// Writes what waits for `side`; passes the FIN on once the other side's bytes are all out.
fn flush(pair: &mut Pair, side: usize) -> Result<(), Close> {
    let m = send(pair.fds[side].as_raw_fd(), &pair.pending[side]).map_err(|_| Close)?;
    pair.pending[side].drain(..m);
    if pair.pending[side].is_empty() && pair.read_done[1 - side] {
        shut_write(&pair.fds[side]);
    }
    Ok(())
}

/// Sends a FIN (shuts the socket down for writing).
fn shut_write(fd: &OwnedFd) {
    // SAFETY: `fd` is open for as long as the borrow.
    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
}

/// A non-blocking `send`: bytes taken, 0 when the socket is full.
fn send(fd: RawFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: `bytes` is valid for its length.
    let m = unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
    if m >= 0 {
        return Ok(m as usize);
    }
    let e = io::Error::last_os_error();
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
        _ => Err(e),
    }
}

fn worker(listener: RawFd, origin: SocketAddr) -> io::Result<()> {
    // SAFETY: plain epoll creation; the fd is owned at once.
    let epoll = unsafe { OwnedFd::from_raw_fd(check(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
    let mut w = Worker {
        epoll,
        pairs: Vec::new(),
        free: Vec::new(),
        generation: 0,
        buf: vec![0; 256 * 1024],
        origin,
    };
    let exclusive = (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32;
    w.ctl(libc::EPOLL_CTL_ADD, listener, exclusive, LISTENER)?;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    loop {
        // SAFETY: `events` is valid for its length.
        let n = unsafe {
            libc::epoll_wait(
                w.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                -1,
            )
        };
        let Ok(n) = check(n) else {
            continue; // EINTR
        };
        for ev in &events[..n as usize] {
            let (token, flags) = (ev.u64, ev.events);
            match token {
                LISTENER => w.accept(listener),
                _ => w.event(token, flags),
            }
        }
    }
}

/// Serves until killed: prints `wsload: relay on ADDR` once listening.
pub fn run(listen: &str, origin: &str, threads: u64) {
    let origin: SocketAddr = origin.parse().expect("ORIGIN is an IP:port");
    let listener = TcpListener::bind(listen).expect("bind the relay");
    listener
        .set_nonblocking(true)
        .expect("a non-blocking listener");
    println!(
        "wsload: relay on {}",
        listener.local_addr().expect("the relay's address")
    );
    let fd = listener.as_raw_fd();
    let workers: Vec<_> = (0..threads.max(1))
        .map(|_| std::thread::spawn(move || worker(fd, origin)))
        .collect();
    for w in workers {
        if let Ok(Err(e)) = w.join() {
            eprintln!("wsload relay: {e}");
            std::process::exit(1);
        }
    }
}
