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

/// Whether a connection moved bytes (read or written), shared by its wrapped halves. A read
/// or write only sets a flag (no clock read per I/O: the request path's hottest calls);
/// [`Activity::idle_for`] looks at it a few times per idle period.
#[derive(Clone, Debug, Default)]
pub struct Activity {
    moved: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// How many times per idle period [`Activity::idle_for`] looks: a connection is closed between
/// `idle` and `idle × (1 + 2/IDLE_CHECKS)` after its last byte, never earlier.
pub const IDLE_CHECKS: u32 = 8;

impl Activity {
    fn touch(&self) {
        self.moved.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Completes once nothing moved for `idle` (never when `idle` is zero).
    pub async fn idle_for(&self, idle: Duration) {
        if idle.is_zero() {
            return std::future::pending().await;
        }
        let tick = idle / IDLE_CHECKS;
        // When bytes were last seen moving (at the latest: never before they did).
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(tick).await;
            if self.moved.swap(false, std::sync::atomic::Ordering::Relaxed) {
                last = tokio::time::Instant::now();
            } else if last.elapsed() >= idle {
                return;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_means_no_byte_for_the_whole_period_and_is_seen_soon_after() {
        let idle = Duration::from_millis(800);
        let a = Activity::default();
        // Traffic every 300 ms for 4 s: never idle.
        let busy = {
            let a = a.clone();
            async move {
                for _ in 0..13 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    a.touch();
                }
            }
        };
        tokio::select! {
            _ = a.idle_for(idle) => panic!("closed while bytes kept moving"),
            _ = busy => {}
        }
        // Then quiet: idle after 800 ms, and at most two checks later.
        let quiet = tokio::time::Instant::now();
        a.idle_for(idle).await;
        let took = quiet.elapsed();
        assert!(took >= idle, "early: {took:?}");
        assert!(took <= idle + 2 * (idle / IDLE_CHECKS), "late: {took:?}");
    }
}
