//! What every accept loop does when `accept` fails: out of file descriptors (EMFILE, ENFILE),
//! buffers or memory, retrying at once would spin a core at 100 % and starve the connections
//! that are open. Back off a little (so closing connections can free descriptors), and log
//! at most once a second (across listeners).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an accept loop pauses after a failed accept.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

static LAST_LOG: Mutex<Option<Instant>> = Mutex::new(None);

/// Call after a failed accept on `listener`: logs (rate-limited) and pauses.
pub async fn failed(listener: &'static str, error: &std::io::Error) {
    let log = match LAST_LOG.lock() {
        Ok(mut last) => {
            let now = Instant::now();
            let due = last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
            if due {
                *last = Some(now);
            }
            due
        }
        Err(_) => true,
    };
    if log {
        tracing::warn!(listener, error = %error, "accept failed; backing off (out of file descriptors?)");
    }
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// A connection's last activity (bytes read or written), shared by its wrapped halves.
#[derive(Clone, Debug)]
pub struct Activity {
    start: tokio::time::Instant,
    last_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            start: tokio::time::Instant::now(),
            last_ms: std::sync::Arc::default(),
        }
    }
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Completes once nothing moved for `idle` (never when `idle` is zero).
    pub async fn idle_for(&self, idle: Duration) {
        if idle.is_zero() {
            return std::future::pending().await;
        }
        loop {
            let last =
                Duration::from_millis(self.last_ms.load(std::sync::atomic::Ordering::Relaxed));
            let quiet_until = self.start + last + idle;
            if tokio::time::Instant::now() >= quiet_until {
                return;
            }
            tokio::time::sleep_until(quiet_until).await;
        }
    }

    /// Wraps `io` so that its reads and writes count as activity.
    pub fn wrap<T>(&self, io: T) -> Tracked<T> {
        Tracked {
            inner: io,
            activity: self.clone(),
        }
    }
}

/// An IO whose traffic stamps an [`Activity`].
#[derive(Debug)]
pub struct Tracked<T> {
    inner: T,
    activity: Activity,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A listener's connection cap: a slot per open connection.
#[derive(Clone, Debug)]
pub struct Cap(std::sync::Arc<tokio::sync::Semaphore>);

impl Cap {
    /// At most `max` open connections (0: no cap).
    pub fn new(max: usize) -> Self {
        let n = if max == 0 {
            tokio::sync::Semaphore::MAX_PERMITS
        } else {
            max
        };
        Cap(std::sync::Arc::new(tokio::sync::Semaphore::new(n)))
    }

    /// A slot for one more connection, if there is one (held until the connection ends).
    pub fn admit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.0.clone().try_acquire_owned().ok()
    }
}
