//! Inbound: connections from other workloads, forwarded to the local application
//! (`--app-addr`, else the original destination of a redirected connection). mTLS termination will sit between accept and forward.

use std::net::SocketAddr;
use std::sync::Arc;

use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::admin::Metrics;

/// The inbound proxy.
pub struct Inbound {
    listener: TcpListener,
    app: Option<SocketAddr>,
    metrics: Arc<Metrics>,
}

impl Inbound {
    /// Binds the listener.
    pub async fn bind(
        addr: SocketAddr,
        app: Option<SocketAddr>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        Ok(Inbound {
            listener: TcpListener::bind(addr).await?,
            app,
            metrics,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `drain` fires, then stops accepting and gives open connections up to
    /// `drain_timeout` to end by themselves.
    pub async fn run(self, mut drain: watch::Receiver<bool>, drain_timeout: Duration) {
        // Each connection task holds a clone; the count tells how many are still open.
        let open = Arc::new(());
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = drain.wait_for(|d| *d) => break,
            };
            let (mut client, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "inbound accept failed");
                    continue;
                }
            };
            // The application: --app-addr, else where the redirected connection was going.
            let orig = crate::detect::original_dst(&client)
                .filter(|o| Some(*o) != client.local_addr().ok());
            let Some(app) = self.app.or(orig) else {
                tracing::warn!(%peer, "inbound connection closed: no --app-addr and not redirected");
                self.metrics.connection_error("inbound");
                continue;
            };
            let metrics = self.metrics.clone();
            metrics.inbound_connections.inc();
            let open = open.clone();
            tokio::spawn(async move {
                let _open = open;
                match TcpStream::connect(app).await {
                    Ok(mut upstream) => {
                        let _ = upstream.set_nodelay(true);
                        let _ = client.set_nodelay(true);
                        if let Err(e) =
                            tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                        {
                            tracing::debug!(%peer, error = %e, "inbound connection ended");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%peer, %app, error = %e, "inbound: cannot reach the application")
                    }
                }
            });
        }
        drop(self.listener);
        let deadline = tokio::time::Instant::now() + drain_timeout;
        while Arc::strong_count(&open) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
