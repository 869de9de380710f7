//! `/metrics` for the worker daemon and the coordinator: Prometheus' text
//! format (0.0.4) over plain HTTP, what Tor's sysadmins scrape. Off unless
//! a listen address is given. The endpoint serves nothing but the numbers,
//! reads nothing but a request line and headers, and is bounded: a few
//! connections at once, one request each, a deadline on each.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::debug;

pub use prometheus;
use prometheus::{Encoder, IntCounter, Registry, TextEncoder};

/// Connections served at once; more are closed at once (Prometheus opens
/// one per scrape).
pub const MAX_CONNECTIONS: usize = 8;
/// A connection that has not been answered by then is closed.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// What renders the page, called once per scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// A bound, not yet serving, metrics listener: binding first lets a
/// daemon refuse to start on an address it cannot have.
pub struct Endpoint {
    listener: TcpListener,
}

impl Endpoint {
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Endpoint> {
        Ok(Endpoint {
            listener: TcpListener::bind(addr).await?,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until the returned handle is dropped.
    pub fn serve(self, render: Render) -> Serving {
        Serving(tokio::spawn(accept(self.listener, render)))
    }
}

/// A serving endpoint; dropping it stops the listener.
pub struct Serving(tokio::task::JoinHandle<()>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn accept(listener: TcpListener, render: Render) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, most likely: wait rather than spin.
                debug!("metrics: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!("metrics: {peer}: too many connections, closed");
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| answer(req, render.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(DEADLINE, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!("metrics: {peer}: {e}"),
                Err(_) => debug!("metrics: {peer}: no request within {DEADLINE:?}, closed"),
            }
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    render: Render,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, kind: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = kind.parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    let text = "text/plain; charset=utf-8";
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            // Rendering locks what the daemon shares with its jobs: off
            // the I/O threads.
            let page = tokio::task::spawn_blocking(move || render()).await;
            match page {
                Ok(p) => reply(StatusCode::OK, prometheus::TEXT_FORMAT, p),
                Err(_) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    text,
                    "rendering the metrics failed\n".into(),
                ),
            }
        }
        (_, "/metrics") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            text,
            "GET /metrics\n".into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            text,
            "iukfarm serves /metrics only\n".into(),
        ),
    })
}

/// Buckets of the build and verification times: a second to 20 minutes.
pub const DURATION_BUCKETS: [f64; 9] = [1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0];

/// Makes and registers one daemon's metrics, each named `<prefix>_<name>`.
/// The names and helps are the daemon's own constants, so a refusal is a
/// bug: it panics.
pub struct Registrar {
    registry: Registry,
    prefix: &'static str,
}

macro_rules! plain {
    ($($f:ident: $t:ty),*) => {$(
        pub fn $f(&self, name: &str, help: &str) -> $t {
            self.add(<$t>::with_opts(self.opts(name, help)).expect("a valid metric"))
        }
    )*};
}

macro_rules! labelled {
    ($($f:ident: $t:ty),*) => {$(
        pub fn $f(&self, name: &str, help: &str, labels: &[&str]) -> $t {
            self.add(<$t>::new(self.opts(name, help), labels).expect("a valid metric"))
        }
    )*};
}

impl Registrar {
    pub fn new(prefix: &'static str) -> Registrar {
        Registrar {
            registry: Registry::new(),
            prefix,
        }
    }

    /// The registry, for [`encode`].
    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }

    fn opts(&self, name: &str, help: &str) -> prometheus::Opts {
        prometheus::Opts::new(format!("{}_{name}", self.prefix), help)
    }

    fn add<C: prometheus::core::Collector + Clone + 'static>(&self, c: C) -> C {
        (self.registry.register(Box::new(c.clone()))).expect("every metric has its own name");
        c
    }

    plain!(int_counter: IntCounter, int_gauge: prometheus::IntGauge, gauge: prometheus::Gauge);
    labelled!(
        int_counter_vec: prometheus::IntCounterVec,
        int_gauge_vec: prometheus::IntGaugeVec,
        gauge_vec: prometheus::GaugeVec
    );

    pub fn histogram(&self, name: &str, help: &str, buckets: Vec<f64>) -> prometheus::Histogram {
        let opts = prometheus::HistogramOpts::from(self.opts(name, help)).buckets(buckets);
        self.add(prometheus::Histogram::with_opts(opts).expect("a valid histogram"))
    }
}

/// The registry in Prometheus' text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = Vec::new();
    // Writing to a Vec fails only on a metric the registry itself refused.
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut out) {
        debug!("metrics: encoding: {e}");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Raises a counter to a total counted elsewhere (a counter only grows;
/// a smaller total, from a restarted source, is ignored).
pub fn mirror(counter: &IntCounter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

/// Seconds from now to a Unix time (negative once it has passed).
pub fn seconds_until(unix: i64) -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    unix as f64 - now
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    fn endpoint_with_a_counter(rt: &tokio::runtime::Runtime) -> (SocketAddr, Serving, IntCounter) {
        let registry = Registry::new();
        let c = IntCounter::new("iukfarm_test_total", "A test counter.").unwrap();
        registry.register(Box::new(c.clone())).unwrap();
        rt.block_on(async {
            let e = Endpoint::bind("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
            let addr = e.local_addr();
            (addr, e.serve(Arc::new(move || encode(&registry))), c)
        })
    }

    #[test]
    fn serves_the_registry_and_nothing_else() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (addr, _serving, c) = endpoint_with_a_counter(&rt);
        mirror(&c, 41);
        mirror(&c, 7);
        mirror(&c, 42);
        let page = rt.block_on(get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(page.contains("text/plain; version=0.0.4"), "{page}");
        assert!(page.contains("\niukfarm_test_total 42\n"), "{page}");
        let other = rt.block_on(get(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        let post = rt.block_on(get(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        ));
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let junk = rt.block_on(get(addr, "\x00\x01 garbage\r\n\r\n"));
        assert!(!junk.contains("iukfarm_test_total"), "{junk}");
    }

    /// Idle connections beyond the cap are closed at once, and the
    /// endpoint serves again once they go.
    #[test]
    fn idle_connections_are_bounded() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (addr, _serving, _c) = endpoint_with_a_counter(&rt);
        rt.block_on(async {
            let mut idle = Vec::new();
            for _ in 0..MAX_CONNECTIONS {
                idle.push(TcpStream::connect(addr).await.unwrap());
            }
            let mut extra = TcpStream::connect(addr).await.unwrap();
            let mut buf = [0u8; 16];
            // Closed by the endpoint, not by a timeout of ours (the
            // deadline is 10 s; this waits up to 60).
            let n = tokio::time::timeout(Duration::from_secs(60), extra.read(&mut buf))
                .await
                .expect("the connection over the cap was not closed");
            assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
            // Had it been served, it would have outlived the idle ones
            // (accepted after them, same deadline): some are still open.
            let open = idle
                .iter()
                .filter(|s| {
                    matches!(s.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                })
                .count();
            assert!(open > 0, "the connection over the cap was served until its deadline");
            drop(idle);
            let mut served = false;
            for _ in 0..600 {
                let page = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
                if page.starts_with("HTTP/1.1 200") {
                    served = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(served, "not served after the idle connections went");
        });
    }
}
