//! The coordinator's listener, bounded: at most [`MAX_CONNECTIONS`] open at
//! once (more wait in the kernel's backlog), at most [`PER_ADDRESS`] from
//! one address (more are closed at once), and a connection that has not
//! both sent and been answered within [`HANDSHAKE`] (a TLS handshake, or
//! an HTTP/2 preface without TLS) is closed, so that idle or half-open
//! connections from one host cannot lock the RM out. Once established,
//! HTTP/2 keep-alives find dead peers.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Sleep;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, warn};

pub const MAX_CONNECTIONS: usize = 256;
/// Connections from one address at once.
pub const PER_ADDRESS: usize = 32;
/// Time a new connection has to send its first bytes and be answered.
pub const HANDSHAKE: Duration = Duration::from_secs(10);

/// Open connections per address.
type Counts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// A connection holding one of the listener's permits and its address's
/// count until it closes.
pub struct Conn {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
    _slot: AddressSlot,
    /// Until the connection has been both read from and written to.
    handshake: Option<Pin<Box<Sleep>>>,
    read_any: bool,
    wrote_any: bool,
}

/// One of an address's [`PER_ADDRESS`] connections.
struct AddressSlot {
    ip: IpAddr,
    counts: Counts,
}

impl AddressSlot {
    fn take(counts: &Counts, ip: IpAddr) -> Option<AddressSlot> {
        let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = c.entry(ip).or_insert(0);
        if *n >= PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            ip,
            counts: counts.clone(),
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = c.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.ip);
            }
        }
    }
}

/// Accepts connections while fewer than `MAX_CONNECTIONS` are open.
pub fn bounded(listener: TcpListener) -> ReceiverStream<std::io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(1);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let counts = Counts::default();
    tokio::spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let conn = match listener.accept().await {
                Ok((io, peer)) => {
                    let Some(slot) = AddressSlot::take(&counts, peer.ip()) else {
                        debug!(
                            "{peer}: {PER_ADDRESS} connections from its address already; closed"
                        );
                        continue;
                    };
                    let _ = io.set_nodelay(true);
                    Ok(Conn {
                        io,
                        _permit: permit,
                        _slot: slot,
                        handshake: Some(Box::pin(tokio::time::sleep(HANDSHAKE))),
                        read_any: false,
                        wrote_any: false,
                    })
                }
                Err(e) => {
                    // EMFILE and the like: say so, back off, go on.
                    warn!("accepting a connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.send(conn).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

impl Conn {
    /// An error once the handshake time is over with the connection not
    /// established; registers the timer's wake-up until then.
    fn check_handshake(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        if self.read_any && self.wrote_any {
            self.handshake = None;
        }
        if let Some(h) = &mut self.handshake
            && h.as_mut().poll(cx).is_ready()
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no handshake within the time allowed",
            ));
        }
        Ok(())
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if let Err(e) = me.check_handshake(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut me.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            me.read_any = true;
        }
        r
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        let r = Pin::new(&mut me.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            me.wrote_any = true;
        }
        r
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        let r = Pin::new(&mut me.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            me.wrote_any = true;
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
