//! Leader election over a `coordination.k8s.io/v1` Lease: every replica serves xDS; the one
//! holding the Lease writes statuses. A holder renews every `renew_every`; another replica
//! takes the Lease over once `renewTime + leaseDurationSeconds` has passed. Every write carries
//! the Lease's resourceVersion, so two replicas racing for it cannot both win (the API
//! server answers the loser 409).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

/// Leader election settings.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// The Lease's name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a Lease not renewed stays its holder's.
    pub duration: Duration,
    /// How often the holder renews (and the others look).
    pub renew_every: Duration,
}

/// What the Lease says now, for the decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Create the Lease with us as holder.
    Create,
    /// Write it with us as holder (renewal, or taking over an expired one).
    Take {
        /// Whether the holder changes (counts a transition).
        transition: bool,
    },
    /// Someone else holds it.
    Follow(String),
}

/// Decides from the current Lease (pure).
pub fn decide(lease: Option<&Lease>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return match lease {
            None => Decision::Create,
            Some(_) => Decision::Take { transition: true },
        };
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == me {
        return Decision::Take { transition: false };
    }
    let renewed = spec.renew_time.as_ref().map(|t| t.0);
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    let expired = match renewed {
        None => true,
        Some(t) => t
            .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(duration))
            .map_or(true, |until| until < now),
    };
    if holder.is_empty() || expired {
        Decision::Take { transition: true }
    } else {
        Decision::Follow(holder)
    }
}

/// One round: acquires or renews the Lease; returns whether this replica leads now.
pub async fn round(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<bool, kube::Error> {
    let current = api.get_opt(&cfg.name).await?;
    let now = Timestamp::now();
    let spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.duration.as_secs().max(1) as i32),
        acquire_time: acquired.or(Some(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    match decide(current.as_ref(), &cfg.identity, now) {
        Decision::Follow(_) => Ok(false),
        Decision::Create => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(spec(0, None)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Decision::Take { transition } => {
            let Some(mut lease) = current else {
                return Ok(false);
            };
            let old = lease.spec.clone().unwrap_or_default();
            let transitions = old.lease_transitions.unwrap_or(0) + i32::from(transition);
            let acquired = if transition { None } else { old.acquire_time };
            lease.spec = Some(spec(transitions, acquired));
            match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Runs leader election until aborted, publishing whether this replica leads. An API error
/// counts as not leading (better no status writes than two writers).
pub async fn run(client: kube::Client, cfg: LeaseConfig, tx: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    loop {
        let leading = match round(&api, &cfg).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, lease = %cfg.name, "leader election failed this round");
                false
            }
        };
        if *tx.borrow() != leading {
            tracing::info!(identity = %cfg.identity, leading, "leadership changed");
        }
        tx.send_replace(leading);
        tokio::time::sleep(cfg.renew_every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed_secs_ago: i64, duration: i32) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(duration),
                renew_time: Some(MicroTime(
                    Timestamp::now()
                        .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(
                            renewed_secs_ago,
                        ))
                        .expect("time"),
                )),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_holder_renews_others_follow_until_it_expires() {
        let now = Timestamp::now();
        assert_eq!(decide(None, "a", now), Decision::Create);
        assert_eq!(
            decide(Some(&lease("a", 3, 15)), "a", now),
            Decision::Take { transition: false }
        );
        assert_eq!(
            decide(Some(&lease("a", 3, 15)), "b", now),
            Decision::Follow("a".into())
        );
        assert_eq!(
            decide(Some(&lease("a", 20, 15)), "b", now),
            Decision::Take { transition: true },
            "an expired lease is taken over"
        );
        assert_eq!(
            decide(Some(&lease("", 1, 15)), "b", now),
            Decision::Take { transition: true },
            "a released lease is taken"
        );
    }
}
