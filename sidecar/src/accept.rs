//! What every accept loop does when `accept` fails: out of file descriptors (EMFILE, ENFILE),
//! buffers or memory, retrying at once would spin a core at 100 % and starve the connections
//! that are open. Back off a little (so closing connections can free descriptors), and log
//! at most once a second per listener.

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
