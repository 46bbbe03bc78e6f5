//! State-of-the-world ADS: every response of a type carries the whole subscribed set.

use tonic::Status;
use weft_proto::envoy::envoy::config::core::v3::Node;
use weft_proto::envoy::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

use super::stream::{Ctx, LARGE, Protocol};
use super::view::{AllChanges, TYPES, type_index};
use super::{Subscription, legacy_wildcard_type, unknown_type};

/// Per-stream SotW state.
#[derive(Default)]
pub(crate) struct Sotw {
    types: [TypeState; TYPES],
}

#[derive(Default)]
struct TypeState {
    sub: Option<Subscription>,
    nonce: String,
}

type C<'a> = Ctx<'a, DiscoveryResponse>;

impl Protocol for Sotw {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;
    const NAME: &'static str = "sotw";

    fn node(req: &DiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    async fn handle(
        &mut self,
        ctx: &mut C<'_>,
        req: DiscoveryRequest,
    ) -> Result<(), Option<Status>> {
        let Some(ti) = type_index(&req.type_url) else {
            ctx.refused("unknown_type");
            return Err(Some(unknown_type(&req.type_url)));
        };
        let st = &mut self.types[ti];
        if !req.response_nonce.is_empty() {
            if req.response_nonce != st.nonce {
                // Stale: it answers a response that has been superseded already.
                return Ok(());
            }
            ctx.record_answer(
                ti,
                &req.response_nonce,
                req.error_detail.as_ref(),
                Some(&req.version_info),
            );
        }
        let wildcard = req.resource_names.iter().any(|n| n == "*")
            || (req.resource_names.is_empty() && legacy_wildcard_type(&req.type_url));
        let sub = Subscription {
            wildcard,
            names: req
                .resource_names
                .iter()
                .filter(|n| *n != "*")
                .cloned()
                .collect(),
        };
        let changed = st.sub.as_ref() != Some(&sub);
        st.sub = Some(sub);
        if req.response_nonce.is_empty() || changed {
            self.send(ctx, ti).await.map_err(|_| None)?;
        }
        Ok(())
    }

    async fn push(&mut self, ctx: &mut C<'_>, changes: &AllChanges) -> Result<(), ()> {
        for (ti, c) in changes.iter().enumerate() {
            let affected = match &self.types[ti].sub {
                Some(s) if s.wildcard => !c.is_empty(),
                Some(s) => c
                    .upserted
                    .iter()
                    .chain(&c.removed)
                    .any(|n| s.names.contains(n)),
                None => false,
            };
            if affected {
                self.send(ctx, ti).await?;
            }
        }
        Ok(())
    }
}

impl Sotw {
    async fn send(&mut self, ctx: &mut C<'_>, ti: usize) -> Result<(), ()> {
        let type_url = weft_proto::type_url::ALL[ti];
        let Some(sub) = self.types[ti].sub.clone() else {
            return Ok(());
        };
        let nonce = ctx.next_nonce();
        let resources: Vec<_> = ctx.snapshot.resources[ti]
            .iter()
            .filter(|(n, r)| sub.wants(n) && r.visible_from(&ctx.node.namespace))
            .map(|(_, r)| r.any.clone())
            .collect();
        let version = ctx.snapshot.version.to_string();
        self.types[ti].nonce = nonce.clone();
        ctx.record_sent(ti, &version, &nonce, sub);
        let resp = DiscoveryResponse {
            version_info: version,
            resources,
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        };
        let large = resp.resources.len() > LARGE;
        ctx.send(resp, large).await
    }
}
