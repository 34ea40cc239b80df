//! The two kinds of socket a manager can live on: TCP (`HOST:PORT`) and Unix-domain
//! (`/run/app/queue.sock`, or Linux's abstract `\0name`), as Python's managers accept
//! both for `address=`.
//!
//! [`Stream`] and [`Listener`] are small enums over the std types, so `conn.rs`,
//! `server.rs` and `client.rs` have one code path for both; what only applies to TCP
//! (`TCP_NODELAY`, `TCP_QUICKACK`) goes through [`Stream::as_tcp`]. A Unix socket needs
//! neither: there is no Nagle algorithm and no delayed ACK on a local stream.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where a server listens or a client connects: `HOST:PORT`, or a Unix socket path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Address {
    /// `HOST:PORT`, resolved when used.
    Tcp(String),
    /// A socket file, or (starting with a NUL byte) a Linux abstract name.
    Unix(PathBuf),
}

impl Address {
    /// Reads `text` as a Unix socket path if it starts with `/`, `./` or `\0` (abstract,
    /// Linux), else as `HOST:PORT` (not checked here: the binaries' `cli::address` refuses a malformed one). Since a
    /// command-line argument cannot hold a NUL byte, the two characters `\0` typed at
    /// the start (`--bind '\0distq'`) mean it too.
    pub fn parse(text: &str) -> Address {
        if let Some(name) = text.strip_prefix("\\0") {
            Address::Unix(PathBuf::from(format!("\0{name}")))
        } else if is_unix_path(text) {
            Address::Unix(PathBuf::from(text))
        } else {
            Address::Tcp(text.to_string())
        }
    }

    /// The address as a command-line argument that [`Address::parse`] reads back: an
    /// abstract name as `\0name` (two characters, since an argument cannot hold a NUL).
    pub fn to_arg(&self) -> String {
        match self {
            Address::Tcp(a) => a.clone(),
            Address::Unix(p) => match abstract_name(p) {
                Some(name) => format!("\\0{}", String::from_utf8_lossy(name)),
                None => p.to_string_lossy().into_owned(),
            },
        }
    }

    /// Whether this is a Unix-domain address.
    pub fn is_unix(&self) -> bool {
        matches!(self, Address::Unix(_))
    }
}

impl From<SocketAddr> for Address {
    fn from(addr: SocketAddr) -> Address {
        Address::Tcp(addr.to_string())
    }
}

impl fmt::Display for Address {
    /// `HOST:PORT`, the path, or `@name` for an abstract name (as `ss` shows it).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(a) => f.write_str(a),
            Address::Unix(p) => match abstract_name(p) {
                Some(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
                None => write!(f, "{}", p.display()),
            },
        }
    }
}

/// Whether a command-line address names a Unix socket: `/...`, `./...` or `\0...` (a
/// NUL byte, or the two characters backslash and zero).
pub fn is_unix_path(text: &str) -> bool {
    text.starts_with('/')
        || text.starts_with("./")
        || text.starts_with('\0')
        || text.starts_with("\\0")
}

/// The name of a Linux abstract address (the bytes after the leading NUL), if `path`
/// is one.
pub fn abstract_name(path: &Path) -> Option<&[u8]> {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes().strip_prefix(b"\0")
}

/// Connects to a Unix socket path or abstract name.
///
/// # Errors
/// As `connect(2)`: `ConnectionRefused` when the file exists but nothing listens,
/// `NotFound` when it does not exist.
pub fn connect_unix(path: &Path) -> io::Result<UnixStream> {
    match abstract_name(path) {
        Some(name) => connect_abstract(name),
        None => UnixStream::connect(path),
    }
}

/// Binds a Unix socket path or abstract name (no stale-file handling: see `server.rs`).
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    match abstract_name(path) {
        Some(name) => bind_abstract(name),
        None => UnixListener::bind(path),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn connect_abstract(name: &[u8]) -> io::Result<UnixStream> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    UnixStream::connect_addr(&std::os::unix::net::SocketAddr::from_abstract_name(name)?)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn bind_abstract(name: &[u8]) -> io::Result<UnixListener> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    UnixListener::bind_addr(&std::os::unix::net::SocketAddr::from_abstract_name(name)?)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn connect_abstract(_name: &[u8]) -> io::Result<UnixStream> {
    Err(no_abstract())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn bind_abstract(_name: &[u8]) -> io::Result<UnixListener> {
    Err(no_abstract())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn no_abstract() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract Unix socket names exist only on Linux",
    )
}

/// Wakes a thread blocked in `accept` on `listener` (or on another handle on it): a
/// listening socket shut down for reading makes `accept` fail at once (Linux: EINVAL),
/// and no connection, hence no socket file, is needed for it.
///
/// # Errors
/// When the platform refuses to shut a listening socket down.
#[allow(unsafe_code)]
pub fn wake_listener(listener: &UnixListener) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket descriptor owned by `listener`.
    if unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A connected socket: TCP or Unix-domain.
#[derive(Debug)]
pub enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix-domain stream connection.
    Unix(UnixStream),
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Stream {
        Stream::Tcp(s)
    }
}

impl From<UnixStream> for Stream {
    fn from(s: UnixStream) -> Stream {
        Stream::Unix(s)
    }
}

/// Who is at the other end, for logs: `IP:PORT`, or `unix peer` (a Unix client's
/// socket is normally unnamed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// A TCP peer's address.
    Tcp(SocketAddr),
    /// A Unix-domain peer.
    Unix,
}

impl Peer {
    /// The TCP peer's address (`None` for a Unix peer).
    pub fn tcp(self) -> Option<SocketAddr> {
        match self {
            Peer::Tcp(a) => Some(a),
            Peer::Unix => None,
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(a) => write!(f, "{a}"),
            Peer::Unix => f.write_str("unix peer"),
        }
    }
}

impl Stream {
    /// A second handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Shuts down one or both directions (every handle on the socket sees it).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }

    /// `SO_RCVTIMEO`.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// `SO_SNDTIMEO`.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// The peer, for logs.
    ///
    /// # Errors
    /// When the socket is no longer connected.
    pub fn peer(&self) -> io::Result<Peer> {
        match self {
            Stream::Tcp(s) => s.peer_addr().map(Peer::Tcp),
            Stream::Unix(_) => Ok(Peer::Unix),
        }
    }

    /// The TCP stream, where only TCP applies (`TCP_NODELAY`, `TCP_QUICKACK`).
    pub fn as_tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Tcp(s) => Some(s),
            Stream::Unix(_) => None,
        }
    }

    /// Whether the peer still has the connection open, without blocking: end-of-stream
    /// or an error means it is gone; pending bytes or nothing yet mean it is there.
    pub fn peer_alive(&self) -> bool {
        match self {
            Stream::Tcp(s) => {
                // MSG_PEEK on a non-blocking socket; the flag is shared by all clones of
                // the socket, which is safe here because the connection's own thread is
                // the one asking.
                if s.set_nonblocking(true).is_err() {
                    return false;
                }
                let alive = match s.peek(&mut [0u8; 1]) {
                    Ok(0) => false,
                    Ok(_) => true,
                    Err(e) => e.kind() == io::ErrorKind::WouldBlock,
                };
                s.set_nonblocking(false).is_ok() && alive
            }
            Stream::Unix(s) => peek_unix(s),
        }
    }
}

/// `recv(MSG_PEEK | MSG_DONTWAIT)`: std's `UnixStream::peek` is not stable, and the
/// per-call flag leaves the socket's own blocking mode alone.
#[allow(unsafe_code)]
fn peek_unix(stream: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: a valid socket descriptor and a one-byte buffer we own.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            std::ptr::addr_of_mut!(byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => false,
        n if n > 0 => true,
        _ => io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock,
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }

    // Kept vectored: a frame's header and payload leave in one `writev`.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&*s).write_vectored(bufs),
            Stream::Unix(s) => (&*s).write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening socket: TCP or Unix-domain.
#[derive(Debug)]
pub enum Listener {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A Unix-domain listener.
    Unix(UnixListener),
}

impl Listener {
    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_unix_and_the_rest_is_tcp() {
        assert_eq!(
            Address::parse("/tmp/q.sock"),
            Address::Unix("/tmp/q.sock".into())
        );
        assert!(Address::parse("./q.sock").is_unix());
        assert!(Address::parse("\0distq").is_unix());
        assert_eq!(Address::parse(r"\0distq"), Address::parse("\0distq"));
        assert_eq!(Address::parse("\0distq").to_arg(), r"\0distq");
        assert_eq!(Address::parse("/a b/q.sock").to_arg(), "/a b/q.sock");
        assert_eq!(Address::parse("\0distq").to_string(), "@distq");
        assert_eq!(
            Address::parse("127.0.0.1:5000"),
            Address::Tcp("127.0.0.1:5000".into())
        );
        assert!(!Address::parse("q.sock").is_unix());
    }

    #[test]
    fn a_unix_pair_reads_writes_and_peeks() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, b) = (Stream::from(a), Stream::from(b));
        assert!(a.peer_alive());
        (&b).write_all(b"x").unwrap();
        assert!(a.peer_alive());
        let mut got = [0u8; 1];
        (&a).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"x");
        drop(b);
        assert!(!a.peer_alive());
        assert_eq!(a.peer().unwrap().to_string(), "unix peer");
    }
}
