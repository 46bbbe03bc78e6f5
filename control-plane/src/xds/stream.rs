//! What SotW and delta streams share: reading the first request, registering the proxy,
//! following translations, and the request loop.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tonic::{Status, Streaming};
use weft_proto::envoy::envoy::config::core::v3::Node;

use super::nack_detail;
use super::registry::{NodeInfo, Registration, lock, now_ms};
use super::view::{AllChanges, PlaceSnapshot};
use super::{ConnectedGuard, Shared};
use crate::metrics::type_label;
use crate::translate::Translation;

/// One protocol's per-stream logic.
pub(crate) trait Protocol: Send {
    /// Request message.
    type Req: prost::Message + Default + Send + 'static;
    /// Response message.
    type Resp: Send + 'static;
    /// `sotw` or `delta`.
    const NAME: &'static str;
    /// The request's node.
    fn node(req: &Self::Req) -> Option<&Node>;
    /// Whether queued work waits (delta's chunks).
    fn has_pending(&self) -> bool {
        false
    }
    /// Sends one piece of queued work; the loop calls it between requests, so reading the
    /// client's ACKs never waits behind a long initial sync.
    async fn pump(&mut self, _ctx: &mut Ctx<'_, Self::Resp>) -> Result<(), ()> {
        Ok(())
    }
    /// Handles one request; `Err(Some)` ends the stream with that status, `Err(None)` quietly.
    async fn handle(
        &mut self,
        ctx: &mut Ctx<'_, Self::Resp>,
        req: Self::Req,
    ) -> Result<(), Option<Status>>;
    /// Pushes what changed since the snapshot the proxy had.
    async fn push(&mut self, ctx: &mut Ctx<'_, Self::Resp>, changes: &AllChanges)
    -> Result<(), ()>;
}

/// A stream's context: shared state, its proxy's record, the current snapshot, the sender.
pub(crate) struct Ctx<'a, R> {
    pub shared: &'a Shared,
    pub reg: &'a Registration,
    pub node: NodeInfo,
    pub snapshot: Arc<PlaceSnapshot>,
    pub tx: &'a mpsc::Sender<Result<R, Status>>,
    pub nonce: u64,
}

/// Responses with more resources than this are large: they pass the global push gate, and
/// delta sends them in chunks of this many.
pub(crate) const LARGE: usize = 64;

/// How long a large response keeps its push-gate permit while its stream's transport has not
/// taken it: a client that never opens its flow-control window gives the permit back after
/// this, so stalled clients cannot hold the whole gate and freeze pushes to everyone.
pub(crate) const PERMIT_HOLD: std::time::Duration = std::time::Duration::from_secs(2);

/// Queues `msg` on `tx`; through `gate` (a large response) it holds one permit until the
/// transport took it off the one-slot queue, or `hold` passed. Returns whether the hold ran
/// out (the message stays queued; the permit goes back).
///
/// The queue slot is taken first, with no permit held, so a stream whose client stopped
/// reading waits for its own slot without keeping a permit from anyone else.
pub(crate) async fn send_gated<T>(
    tx: &mpsc::Sender<T>,
    gate: Option<&Arc<tokio::sync::Semaphore>>,
    msg: T,
    hold: std::time::Duration,
) -> Result<bool, ()> {
    let slot = tx.reserve().await.map_err(|_| ())?;
    let permit = match gate {
        Some(g) => Some(g.clone().acquire_owned().await.map_err(|_| ())?),
        None => None,
    };
    slot.send(msg);
    if permit.is_none() {
        return Ok(false);
    }
    // Free again means the transport took the message.
    match tokio::time::timeout(hold, tx.reserve()).await {
        Ok(slot) => {
            drop(slot.map_err(|_| ())?);
            Ok(false)
        }
        Err(_) => Ok(true),
    }
}

impl<R> Ctx<'_, R> {
    /// Sends a response ([`send_gated`]): a large one holds a permit of the global push gate
    /// until the transport has taken it off the stream's one-slot queue, or [`PERMIT_HOLD`].
    ///
    /// Why: a thousand proxies connecting at once would otherwise each get their whole initial
    /// config encoded at the same moment; the gate bounds how many large responses are being
    /// taken by transports at once. Each stream holds at most one queued response besides the
    /// one it is building, so a client that stopped reading costs one response, not a permit.
    pub async fn send(&self, resp: R, large: bool) -> Result<(), ()> {
        let gate = large.then_some(&self.shared.push_gate);
        if send_gated(self.tx, gate, Ok(resp), PERMIT_HOLD).await? {
            tracing::debug!(node = %self.node.id, "push-gate permit returned: the client is not reading its stream");
            self.shared.metrics.push_gate_timeouts.inc();
        }
        Ok(())
    }

    /// A fresh nonce.
    pub fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        self.nonce.to_string()
    }

    /// Records the client's answer to the response `nonce` of type `ti`: a NACK (with its
    /// message; the ACKed version stays what it was) or an ACK of `version` (SotW) or of the
    /// version sent (delta).
    pub fn record_answer(
        &self,
        ti: usize,
        nonce: &str,
        nack: Option<&weft_proto::envoy::google::rpc::Status>,
        version: Option<&str>,
    ) {
        let type_url = weft_proto::type_url::ALL[ti];
        let mut rec = lock(&self.reg.record);
        let t = &mut rec.types[ti];
        let metrics = &self.shared.metrics;
        match nack {
            Some(err) => {
                let detail = nack_detail(err);
                tracing::warn!(node = %self.node.id, type_url, nonce, %detail, "NACK");
                t.nack = Some(detail);
                metrics.nacks.get_or_create(&type_label(type_url)).inc();
            }
            None => {
                t.acked_version = version.map_or_else(|| t.sent_version.clone(), str::to_string);
                t.last_ack_ms = now_ms();
                t.nack = None;
                metrics.acks.get_or_create(&type_label(type_url)).inc();
            }
        }
    }

    /// Records a response about to be sent: what the proxy will hold, under which version and
    /// nonce, for which subscription.
    pub fn record_sent(&self, ti: usize, version: &str, nonce: &str, sub: super::Subscription) {
        {
            let mut rec = lock(&self.reg.record);
            rec.snapshot = Some(self.snapshot.clone());
            let t = &mut rec.types[ti];
            t.sent = true;
            t.sent_version = version.to_string();
            t.sent_nonce = nonce.to_string();
            t.sub = Some(sub);
        }
        let type_url = weft_proto::type_url::ALL[ti];
        self.shared
            .metrics
            .pushes
            .get_or_create(&type_label(type_url))
            .inc();
    }

    /// Records what the proxy now subscribes to (a subscription change that sent nothing,
    /// an unsubscribe, is seen by the admin API at once).
    pub fn record_sub(&self, ti: usize, sub: &super::Subscription) {
        let mut rec = lock(&self.reg.record);
        let t = &mut rec.types[ti];
        if t.sub.is_some() {
            t.sub = Some(sub.clone());
        }
    }

    /// Counts a refused request.
    pub fn refused(&self, reason: &str) {
        self.shared
            .metrics
            .request_errors
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }
}

/// The snapshot a proxy should hold at `t`, and its use of the snapshot's key. A Weft sidecar's
/// includes its inbound Listener; other clients (Envoy, gRPC) get none.
fn snapshot_for(
    shared: &Shared,
    t: &Translation,
    info: &NodeInfo,
) -> (Arc<PlaceSnapshot>, super::view::KeyUse) {
    let inbound = info
        .sidecar
        .then(|| crate::inbound::inbound_listener(t, &info.workload()));
    let key = super::view::SnapshotKey {
        place: info.place.clone(),
        inbound: inbound.as_ref().map(|r| r.version.clone()),
    };
    let used = shared.snapshots.acquire(key);
    (shared.snapshots.get(t, &info.place, inbound.as_ref()), used)
}

/// Runs one stream to its end.
pub(crate) async fn run<P: Protocol>(
    mut proto: P,
    shared: Arc<Shared>,
    mut requests: Streaming<P::Req>,
    tx: mpsc::Sender<Result<P::Resp, Status>>,
    peer: Option<SocketAddr>,
    identity: Option<weft_proto::SpiffeId>,
) {
    let first = match requests.message().await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(?peer, error = %e, protocol = P::NAME, "ADS stream failed before its first request");
            return;
        }
    };
    let Some(node) = P::node(&first) else {
        shared
            .metrics
            .request_errors
            .get_or_create(&vec![("reason".into(), "no_node".into())])
            .inc();
        let _ = tx
            .send(Err(Status::invalid_argument(
                "the first request of an ADS stream must carry node",
            )))
            .await;
        return;
    };
    let mut info = NodeInfo::from_node(node);
    // Over mTLS the certificate says who the proxy is: a workload cannot claim another
    // namespace's node (and with it that namespace's inbound Listener or load reports).
    if let Some(id) = &identity {
        if info.namespace != id.namespace() || info.service_account != id.service_account() {
            tracing::info!(node = %info.id, claimed = %info.namespace, %id, "node metadata names another identity than its certificate; the certificate wins");
        }
        info.namespace = id.namespace().to_string();
        info.service_account = id.service_account().to_string();
    }
    // A proxy that does not say where it is (an injected sidecar) is placed by its pod.
    info.place = shared
        .translations
        .borrow()
        .place_of(&info.id, &info.namespace, &info.place);
    tracing::info!(node = %info.id, ?peer, namespace = %info.namespace, protocol = P::NAME, "proxy connected");
    let reg = shared.registry.register(info.clone(), P::NAME, identity);
    let _connected = ConnectedGuard::new(shared.metrics.clone());
    let mut translations: watch::Receiver<Arc<Translation>> = shared.translations.clone();
    let t = translations.borrow_and_update().clone();
    let (snapshot, mut key_use) = snapshot_for(&shared, &t, &info);
    let mut ctx = Ctx {
        shared: &shared,
        reg: &reg,
        node: info.clone(),
        snapshot,
        tx: &tx,
        nonce: 0,
    };
    let mut next = Some(first);
    // The stream's end of life, jittered so proxies that connected together do not all
    // reconnect together; the proxy resumes from the versions it holds (delta) or re-ACKs.
    let end_of_life = shared
        .max_stream_age
        .map(|age| tokio::time::Instant::now() + age.mul_f64(0.9 + rand::random::<f64>() * 0.2));
    let aged = async move {
        match end_of_life {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(aged);
    loop {
        let pending = proto.has_pending();
        let req = match next.take() {
            Some(r) => r,
            None => tokio::select! {
                biased;
                msg = requests.message() => match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(node = %info.id, error = %e, "ADS stream ended");
                        break;
                    }
                },
                changed = translations.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let t = translations.borrow_and_update().clone();
                    let (snap, used) = snapshot_for(&shared, &t, &info);
                    let same_key = used.key() == key_use.key();
                    key_use = used;
                    if snap.version == ctx.snapshot.version && same_key {
                        continue;
                    }
                    // Another key (its inbound Listener changed): the diff chain is another
                    // snapshot's, so walk.
                    let changes = if same_key {
                        snap.changes_since(&ctx.snapshot)
                    } else {
                        snap.walk(&ctx.snapshot)
                    };
                    ctx.snapshot = snap;
                    if proto.push(&mut ctx, &changes).await.is_err() {
                        break;
                    }
                    continue;
                }
                _ = &mut aged => {
                    tracing::info!(node = %info.id, "xDS stream reached its max age; closing it so the proxy reconnects (and may land on another replica)");
                    shared.metrics.streams_aged.inc();
                    break;
                }
                _ = std::future::ready(()), if pending => {
                    if proto.pump(&mut ctx).await.is_err() {
                        break;
                    }
                    continue;
                }
            },
        };
        match proto.handle(&mut ctx, req).await {
            Ok(()) => {}
            Err(Some(status)) => {
                let _ = tx.send(Err(status)).await;
                break;
            }
            Err(None) => break,
        }
    }
    tracing::info!(node = %info.id, protocol = P::NAME, "proxy disconnected");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streams whose client never takes its responses cannot keep the push gate: with one
    /// permit and two stalled streams, a healthy stream still gets a permit, within the hold.
    /// (Before the hold was bounded the stalled stream kept the permit forever.)
    #[tokio::test]
    async fn a_stalled_stream_gives_its_permit_back() {
        let gate = Arc::new(tokio::sync::Semaphore::new(1));
        let hold = std::time::Duration::from_millis(200);
        let mut stalled = Vec::new();
        for _ in 0..2 {
            // A queue nobody reads: the first message fills the slot for good.
            let (tx, rx) = mpsc::channel::<u32>(1);
            let g = gate.clone();
            stalled.push(rx);
            tokio::spawn(async move { send_gated(&tx, Some(&g), 1, hold).await });
        }
        let (tx, mut rx) = mpsc::channel::<u32>(1);
        // Reads one message and stays open (a healthy client).
        let reader = tokio::spawn(async move {
            let got = rx.recv().await;
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            (got, rx)
        });
        let sent = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            send_gated(&tx, Some(&gate), 7, hold),
        )
        .await
        .expect("the healthy stream waited for a permit a stalled stream kept");
        assert_eq!(sent, Ok(false), "the healthy stream's message was taken");
        assert_eq!(reader.await.ok().and_then(|(got, _)| got), Some(7));
        assert_eq!(gate.available_permits(), 1, "every permit came back");
        drop(stalled);
    }
}
