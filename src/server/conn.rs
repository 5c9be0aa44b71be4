//! Connection hygiene below HTTP/2, where hyper has no timeouts of its own: a connection that has not
//! sent its first bytes (the HTTP/2 preface and first frame, or a TLS hello) within
//! `--handshake-timeout` is closed, and so is one that has had no call open for `--idle-timeout`. Each
//! accepted socket is wrapped in [`Guarded`]; its [`ConnState`] rides into every request's extensions
//! (tonic's `ConnectInfo`), where the edge layer counts the calls open on it ([`ConnState::open`]).
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Bytes a client must have sent before the handshake counts as done: HTTP/2's 24-byte preface and the
/// 9-byte header of the SETTINGS frame that must follow it (a TLS ClientHello is longer than this).
const FIRST_BYTES: usize = 33;

/// The two timeouts, from the flags.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub handshake_timeout: Duration,
    /// `None`: connections may stay idle for ever (keepalive pings still close dead ones).
    pub idle_timeout: Option<Duration>,
}

/// What the server knows of one connection: the calls open on it, and since when none has been.
#[derive(Debug)]
pub struct ConnState {
    open: AtomicUsize,
    idle_since: Mutex<Option<Instant>>,
    /// The connection's reading task, woken when its last call ends so that it arms the idle timer.
    reader: Mutex<Option<Waker>>,
}

impl ConnState {
    fn new(now: Instant) -> Arc<Self> {
        Arc::new(Self { open: AtomicUsize::new(0), idle_since: Mutex::new(Some(now)), reader: Mutex::new(None) })
    }

    /// Counts a call as open until the returned guard is dropped (with the response body).
    pub fn open(self: &Arc<Self>) -> OpenCall {
        self.open.fetch_add(1, Ordering::AcqRel);
        *self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
        OpenCall(self.clone())
    }

    fn idle_since(&self) -> Option<Instant> {
        *self.idle_since.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One open call on a connection; see [`ConnState::open`].
#[derive(Debug)]
pub struct OpenCall(Arc<ConnState>);

impl Drop for OpenCall {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            if let Some(w) = self.0.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
                w.wake();
            }
        }
    }
}

/// An accepted socket with the two timeouts.
pub struct Guarded {
    io: TcpStream,
    state: Arc<ConnState>,
    limits: ConnLimits,
    accepted: Instant,
    read: usize,
    timer: Pin<Box<Sleep>>,
}

impl Guarded {
    pub fn new(io: TcpStream, limits: ConnLimits) -> Self {
        let now = Instant::now();
        Self {
            io,
            state: ConnState::new(now),
            limits,
            accepted: now,
            read: 0,
            timer: Box::pin(tokio::time::sleep_until(now + limits.handshake_timeout)),
        }
    }

    /// When the connection must be closed if nothing changes, and why.
    fn deadline(&self) -> Option<(Instant, &'static str)> {
        if self.read < FIRST_BYTES {
            return Some((
                self.accepted + self.limits.handshake_timeout,
                "no HTTP/2 preface within --handshake-timeout",
            ));
        }
        let idle = self.limits.idle_timeout?;
        Some((self.state.idle_since()? + idle, "no call for --idle-timeout"))
    }
}

impl AsyncRead for Guarded {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        if let Poll::Ready(r) = Pin::new(&mut self.io).poll_read(cx, buf) {
            self.read = self.read.saturating_add(buf.filled().len() - before);
            return Poll::Ready(r);
        }
        *self.state.reader.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        let Some((deadline, why)) = self.deadline() else { return Poll::Pending };
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// What a request learns of its connection (through tonic's `ConnectInfo` extension).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    tcp: TcpConnectInfo,
    pub state: Arc<ConnState>,
}

impl ConnInfo {
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.tcp.remote_addr()
    }
}

impl Connected for Guarded {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo { tcp: self.io.connect_info(), state: self.state.clone() }
    }
}

/// The listener's connections, each with Nagle off (a request-response protocol wants every frame out
/// at once) and wrapped in [`Guarded`].
pub fn incoming(
    listener: tokio::net::TcpListener,
    limits: ConnLimits,
) -> impl Stream<Item = io::Result<Guarded>> + Send + 'static {
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(move |conn| {
        let io = conn?;
        io.set_nodelay(true)?;
        Ok(Guarded::new(io, limits))
    })
}

/// What is known of the connection a request came on, with or without TLS.
pub fn info_of<B>(req: &http::Request<B>) -> Option<&ConnInfo> {
    let ext = req.extensions();
    ext.get::<ConnInfo>()
        .or_else(|| ext.get::<tonic::transport::server::TlsConnectInfo<ConnInfo>>().map(|t| t.get_ref()))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn pair(limits: ConnLimits) -> (Guarded, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Guarded::new(server, limits), client)
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_after_the_handshake_timeout() {
        let limits = ConnLimits { handshake_timeout: Duration::from_millis(100), idle_timeout: None };
        let (mut server, mut client) = pair(limits).await;
        client.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap(); // part of the preface, then silence
        let mut buf = [0u8; 64];
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(n, 16);
        let started = Instant::now();
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_but_never_while_a_call_is_open() {
        let limits =
            ConnLimits { handshake_timeout: Duration::from_secs(10), idle_timeout: Some(Duration::from_millis(150)) };
        let (mut server, mut client) = pair(limits).await;
        client.write_all(&[0u8; FIRST_BYTES]).await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(server.read(&mut buf).await.unwrap(), FIRST_BYTES);
        // A call stays open longer than the idle timeout: the connection lives.
        let call = server.state.open();
        let read = tokio::time::timeout(Duration::from_millis(400), server.read(&mut buf)).await;
        assert!(read.is_err(), "closed while a call was open: {read:?}");
        drop(call);
        let started = Instant::now();
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(100), "{:?}", started.elapsed());
    }
}
