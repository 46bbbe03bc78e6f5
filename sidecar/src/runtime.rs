//! A cluster's live counters, kept across config versions: requests, retries and connections
//! in flight (what the circuit breakers and the retry budget of [`crate::policy`] count), the
//! pending queue, cached metric handles and per-locality load counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::policy::ClusterPolicy;

/// A cluster's live counters, kept across config versions.
#[derive(Debug, Default)]
pub struct ClusterRuntime {
    requests: AtomicU32,
    retries: AtomicU32,
    connections: AtomicU32,
    pending: AtomicU32,
    /// Used since the last idle sweep (on-demand discovery unsubscribes what stays unused).
    touched: std::sync::atomic::AtomicBool,
    /// Wakes an attempt waiting for a connection when one is released.
    released: tokio::sync::Notify,
    /// Cached metric handles of this cluster's 200s.
    pub hot: crate::metrics::HotCache,
    /// Load counters per locality (zone), for load reports.
    localities:
        std::sync::Mutex<std::collections::BTreeMap<String, Arc<crate::load::LocalityLoad>>>,
}

/// Releases a counted slot when dropped.
pub struct Slot<'a>(&'a AtomicU32);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection slot; releasing it wakes one waiting attempt.
pub struct ConnectionSlot {
    runtime: Arc<ClusterRuntime>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.runtime.connections.fetch_sub(1, Ordering::AcqRel);
        self.runtime.released.notify_one();
    }
}

fn try_take(counter: &AtomicU32, limit: u32) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < limit).then(|| n + 1)
        })
        .is_ok()
}

fn take(counter: &AtomicU32, limit: u32) -> Option<Slot<'_>> {
    // Lazily: a Slot made and dropped on refusal would release a slot never taken.
    try_take(counter, limit).then(|| Slot(counter))
}

/// Why an attempt got no connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionRefused {
    /// `max_connections` in use and `max_pending_requests` already waiting.
    PendingOverflow,
}

impl ClusterRuntime {
    /// A request slot, or `None` when `max_requests` are in flight (the breaker is open).
    pub fn request(&self, p: &ClusterPolicy) -> Option<Slot<'_>> {
        take(&self.requests, p.max_requests)
    }

    /// A retry slot, or `None` when the budget or `max_retries` says no.
    pub fn retry(&self, p: &ClusterPolicy) -> Option<Slot<'_>> {
        let allowance = p.retry_allowance(self.requests.load(Ordering::Relaxed));
        take(&self.retries, allowance)
    }

    /// Marks the cluster used (a request routed or a connection opened to it).
    pub fn touch(&self) {
        if !self.touched.load(Ordering::Relaxed) {
            self.touched.store(true, Ordering::Relaxed);
        }
    }

    /// Whether it was used since the last call, or has requests or connections in flight
    /// now; clears the mark.
    pub fn take_used(&self) -> bool {
        self.touched.swap(false, Ordering::Relaxed) || self.requests() > 0 || self.connections() > 0
    }

    /// Requests in flight.
    pub fn requests(&self) -> u32 {
        self.requests.load(Ordering::Relaxed)
    }

    /// A connection for one attempt: at once while fewer than `max_connections` are in use,
    /// else after waiting as one of at most `max_pending_requests` (Envoy's pending queue);
    /// beyond that, refused at once.
    pub async fn connection(
        self: &Arc<Self>,
        p: &ClusterPolicy,
    ) -> Result<ConnectionSlot, ConnectionRefused> {
        let slot = || ConnectionSlot {
            runtime: self.clone(),
        };
        if try_take(&self.connections, p.max_connections) {
            return Ok(slot());
        }
        let Some(_pending) = take(&self.pending, p.max_pending_requests) else {
            return Err(ConnectionRefused::PendingOverflow);
        };
        loop {
            // Register for a wake-up before checking, so a release in between is not lost.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if try_take(&self.connections, p.max_connections) {
                return Ok(slot());
            }
            released.await;
        }
    }

    /// The load counters of this cluster's endpoints in `zone` (made once, kept across config
    /// versions; only config compilation and load reports take the lock).
    pub fn locality(&self, zone: &str) -> Arc<crate::load::LocalityLoad> {
        let mut l = match self.localities.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        l.entry(zone.to_string())
            .or_insert_with(|| Arc::new(crate::load::LocalityLoad::new(zone)))
            .clone()
    }

    /// Every locality's load counters.
    pub fn localities(&self) -> Vec<Arc<crate::load::LocalityLoad>> {
        match self.localities.lock() {
            Ok(g) => g.values().cloned().collect(),
            Err(p) => p.into_inner().values().cloned().collect(),
        }
    }

    /// Connections in use.
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Attempts waiting for a connection.
    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }
}

/// Shared runtime handle.
pub type Runtime = Arc<ClusterRuntime>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ClusterPolicy;

    #[test]
    fn breaker_and_budget_bound_concurrency() {
        let p = ClusterPolicy {
            max_requests: 2,
            max_retries: 10,
            budget: Some((20.0, 1)),
            ..ClusterPolicy::default()
        };
        let rt = ClusterRuntime::default();
        let a = rt.request(&p).expect("first");
        let b = rt.request(&p).expect("second");
        assert!(rt.request(&p).is_none(), "third overflows");
        // Two requests in flight: 20 % is 0.4, the minimum concurrency 1 wins.
        let r1 = rt.retry(&p).expect("one retry");
        assert!(rt.retry(&p).is_none(), "budget exhausted");
        drop((a, b, r1));
        assert!(rt.request(&p).is_some(), "slots come back");
        // max_retries caps even a generous budget.
        let p2 = ClusterPolicy {
            max_requests: 100,
            max_retries: 1,
            budget: Some((100.0, 50)),
            ..ClusterPolicy::default()
        };
        let rt2 = ClusterRuntime::default();
        let _r = rt2.retry(&p2).expect("one");
        assert!(rt2.retry(&p2).is_none());
    }

    #[tokio::test]
    async fn connections_queue_up_to_max_pending_then_refuse() {
        let p = ClusterPolicy {
            max_connections: 1,
            max_pending_requests: 1,
            ..ClusterPolicy::default()
        };
        let rt = Arc::new(ClusterRuntime::default());
        let first = rt.connection(&p).await.expect("a free connection");
        // The second waits (pending); the third finds the queue full and is refused at once.
        let rt2 = rt.clone();
        let p2 = p.clone();
        let waiter = tokio::spawn(async move { rt2.connection(&p2).await.map(|_| ()) });
        while rt.pending() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            rt.connection(&p).await.err(),
            Some(ConnectionRefused::PendingOverflow)
        );
        assert!(!waiter.is_finished());
        drop(first);
        assert_eq!(
            waiter.await.ok(),
            Some(Ok(())),
            "released connection goes to the waiter"
        );
        assert_eq!((rt.connections(), rt.pending()), (0, 0));
    }
}
