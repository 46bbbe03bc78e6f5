//! Progressive delivery: each `Rollout` moves its canary's weight in a TrafficSplit step by
//! step while the canary's load reports (LRS, summed over every proxy) stay healthy, holds when
//! there is too little traffic to judge, and rolls back to 0 % at once on a breach.
//!
//! The user's TrafficSplit stays as written; the controller's weights are overrides the
//! catalog applies when it builds the model. Every decision is recorded with its reason (admin
//! API `ListRollouts`, `weft_rollout_decisions_total`, `weftctl rollouts`), and the state —
//! phase, step, weight, decisions — is written to `<state-dir>/rollouts.json` so it survives a
//! restart (the judging window of the current step starts again then, since load counts are
//! the new process's).
//!
//! [`judge`] is the pure decision; [`Controller`] only moves state in and out.
//!
//! Replicated (the Kubernetes source): only the replica holding the leader Lease decides. It
//! publishes each rollout's phase and weight to the Rollout's status; the other replicas apply
//! those weights as their overrides, so every proxy of the mesh sees the same canary weight,
//! and a replica that becomes leader resumes each rollout from its status instead of starting
//! it again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, RolloutModel, WeightOverrides};
use crate::lrs::{LoadCounts, LoadStore};
use crate::metrics::Metrics;

/// Where a rollout stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Stepping up.
    Progressing,
    /// The canary takes its last step's weight (100 %): done.
    Promoted,
    /// The canary breached the policy and takes 0 %; stays so until the Rollout changes.
    RolledBack,
}

/// One recorded decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// When, milliseconds since the epoch.
    pub at_unix_ms: u64,
    /// `start`, `promote`, `hold`, `complete`, `rollback`, `restart`.
    pub kind: String,
    /// Canary weight before, percent.
    pub from: u32,
    /// Canary weight after, percent.
    pub to: u32,
    /// Why, with the numbers.
    pub reason: String,
}

/// A rollout's state, as persisted.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RolloutState {
    /// What the state was computed for (canary, split, steps): a change restarts the rollout.
    pub fingerprint: String,
    /// The phase.
    pub phase: Phase,
    /// Index of the current step.
    pub step: usize,
    /// The canary's weight, percent.
    pub weight: u32,
    /// The split the weight applies to (`TrafficSplit ns/name`).
    pub split_origin: String,
    /// The canary Service (`ns/name`).
    pub canary: String,
    /// Every decision, oldest first.
    pub decisions: Vec<Decision>,
    /// The canary's load counts when the current step started (not persisted).
    #[serde(skip)]
    baseline: LoadCounts,
    /// When the current step started (not persisted: a restart starts the window again).
    #[serde(skip, default = "std::time::Instant::now")]
    step_started: std::time::Instant,
    /// Whether a hold was recorded for the current step.
    #[serde(skip)]
    holding: bool,
}

/// What the current step's window says.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Keep going.
    Wait,
    /// The interval is over but too few requests arrived to judge.
    Hold(String),
    /// The step held: move on.
    Promote(String),
    /// The canary breached the policy.
    Rollback(String),
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{} ms", d.as_millis()))
}

/// Judges a step: a breach rolls back as soon as `min_requests` finished (not waiting for the
/// interval); a healthy window promotes once the interval is over; too few requests hold.
pub fn judge(m: &RolloutModel, window: &LoadCounts, elapsed: Duration) -> Verdict {
    let n = window.finished();
    if n < m.min_requests {
        return if elapsed >= m.interval {
            Verdict::Hold(format!(
                "only {n} canary requests finished in {}s, {} needed to judge",
                elapsed.as_secs(),
                m.min_requests
            ))
        } else {
            Verdict::Wait
        };
    }
    let rate = window.success_rate().unwrap_or(0.0);
    if rate < m.success_rate {
        return Verdict::Rollback(format!(
            "success rate {:.1} % over {n} requests is below {:.1} %",
            rate * 100.0,
            m.success_rate * 100.0
        ));
    }
    if let (Some(max), Some(p99)) = (m.max_p99, window.p99())
        && p99 > max
    {
        return Verdict::Rollback(format!(
            "p99 {} over {n} requests is above {}",
            ms(Some(p99)),
            ms(Some(max))
        ));
    }
    if elapsed >= m.interval {
        Verdict::Promote(format!(
            "success rate {:.1} %, p99 {} over {n} requests",
            rate * 100.0,
            ms(window.p99())
        ))
    } else {
        Verdict::Wait
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn fingerprint(m: &RolloutModel) -> String {
    format!("{}|{}|{:?}", m.split_origin, m.canary, m.steps)
}

/// Drives every rollout of the catalog.
pub struct Controller {
    catalog: Arc<Catalog>,
    store: Arc<LoadStore>,
    metrics: Arc<Metrics>,
    path: Option<PathBuf>,
    states: Mutex<BTreeMap<String, RolloutState>>,
    /// Whether this replica decides (always, without leader election).
    leading: Option<tokio::sync::watch::Receiver<bool>>,
    /// Where phase and weight changes go to be written to the Rollouts' status.
    publish: Option<tokio::sync::mpsc::UnboundedSender<StatusChange>>,
    /// What was last published per rollout.
    published: Mutex<BTreeMap<String, (String, u32)>>,
}

/// A rollout's phase or weight changed: write it to the Rollout's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusChange {
    /// `namespace/name` of the Rollout.
    pub key: String,
    /// `Progressing`, `Promoted` or `RolledBack`.
    pub phase: String,
    /// The canary's weight, percent.
    pub weight: u32,
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Progressing => "Progressing",
        Phase::Promoted => "Promoted",
        Phase::RolledBack => "RolledBack",
    }
}

/// How often rollouts are evaluated.
pub const TICK: Duration = Duration::from_millis(100);

impl Controller {
    /// A controller; with `state_dir`, state is loaded from and saved to `rollouts.json` there.
    pub fn new(
        catalog: Arc<Catalog>,
        store: Arc<LoadStore>,
        metrics: Arc<Metrics>,
        state_dir: Option<PathBuf>,
    ) -> Self {
        let path = state_dir.map(|d| d.join("rollouts.json"));
        let states = path
            .as_ref()
            .and_then(|p| match crate::state_file::read(p) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(path = %p.display(), error = %e, "rollout state unreadable; starting afresh (the file is kept as .bad)");
                    let _ = std::fs::rename(p, p.with_extension("json.bad"));
                    None
                }
            })
            .unwrap_or_default();
        Controller {
            catalog,
            store,
            metrics,
            path,
            states: Mutex::new(states),
            leading: None,
            publish: None,
            published: Mutex::new(BTreeMap::new()),
        }
    }

    /// Decides only while `leading` says so, publishing phase and weight changes to `publish`;
    /// otherwise follows the weights in the Rollouts' status.
    pub fn with_leadership(
        mut self,
        leading: tokio::sync::watch::Receiver<bool>,
        publish: tokio::sync::mpsc::UnboundedSender<StatusChange>,
    ) -> Self {
        self.leading = Some(leading);
        self.publish = Some(publish);
        self
    }

    /// Evaluates rollouts until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        loop {
            let leading = self.leading.as_ref().is_none_or(|l| *l.borrow());
            if leading {
                self.tick();
            } else {
                self.follow();
            }
            tokio::time::sleep(TICK).await;
        }
    }

    /// A follower: the weights the leader published, nothing decided here. Local state is
    /// dropped, so that leading later resumes from the published status.
    pub fn follow(&self) {
        let model = self.catalog.current();
        crate::lock(&self.states).clear();
        crate::lock(&self.published).clear();
        let overrides = model
            .rollouts
            .values()
            .filter_map(|m| {
                let (_, weight) = m.status.as_ref()?;
                Some((m.split_origin.clone(), (m.canary.clone(), *weight)))
            })
            .collect::<WeightOverrides>();
        self.catalog.set_overrides(overrides);
    }

    /// Every rollout's state.
    pub fn states(&self) -> BTreeMap<String, RolloutState> {
        crate::lock(&self.states).clone()
    }

    /// The canary's load in the current step's window of rollout `m` in state `st`.
    pub fn window(&self, m: &RolloutModel, st: &RolloutState) -> LoadCounts {
        self.store.sum(&m.canary_clusters).since(&st.baseline)
    }

    fn record(&self, key: &str, st: &mut RolloutState, kind: &str, to: u32, reason: String) {
        tracing::info!(rollout = key, decision = kind, from = st.weight, to, %reason, "rollout decision");
        self.metrics
            .rollout_decisions
            .get_or_create(&vec![
                ("rollout".into(), key.into()),
                ("decision".into(), kind.into()),
            ])
            .inc();
        st.decisions.push(Decision {
            at_unix_ms: now_ms(),
            kind: kind.into(),
            from: st.weight,
            to,
            reason,
        });
        st.weight = to;
    }

    fn start(&self, key: &str, m: &RolloutModel, prev: Option<RolloutState>) -> RolloutState {
        // Another replica led this rollout: resume where its status says it stands.
        if let (None, Some((phase, weight))) = (&prev, &m.status) {
            let phase = match phase.as_str() {
                "Promoted" => Phase::Promoted,
                "RolledBack" => Phase::RolledBack,
                _ => Phase::Progressing,
            };
            let step = m.steps.iter().rposition(|s| s <= weight).unwrap_or(0);
            let mut st = RolloutState {
                fingerprint: fingerprint(m),
                phase,
                step,
                weight: *weight,
                split_origin: m.split_origin.clone(),
                canary: m.canary.to_string(),
                decisions: Vec::new(),
                baseline: self.store.sum(&m.canary_clusters),
                step_started: std::time::Instant::now(),
                holding: false,
            };
            let reason = format!(
                "resumed from the Rollout's status ({} at {weight} %), as the previous leader left it",
                phase_name(phase)
            );
            self.record(key, &mut st, "resume", *weight, reason);
            return st;
        }
        let restart = prev.is_some();
        let mut st = RolloutState {
            fingerprint: fingerprint(m),
            phase: Phase::Progressing,
            step: 0,
            weight: prev.as_ref().map_or(0, |p| p.weight),
            split_origin: m.split_origin.clone(),
            canary: m.canary.to_string(),
            decisions: prev.map(|p| p.decisions).unwrap_or_default(),
            baseline: self.store.sum(&m.canary_clusters),
            step_started: std::time::Instant::now(),
            holding: false,
        };
        let first = m.steps.first().copied().unwrap_or(100);
        let (kind, reason) = if restart {
            (
                "restart",
                format!(
                    "the Rollout changed; canary {} starts again at {first} %",
                    m.canary
                ),
            )
        } else {
            ("start", format!("canary {} starts at {first} %", m.canary))
        };
        self.record(key, &mut st, kind, first, reason);
        st
    }

    /// One evaluation of every rollout.
    pub fn tick(&self) {
        let model = self.catalog.current();
        let mut changed = false;
        let overrides = {
            let mut states = crate::lock(&self.states);
            let before = states.len();
            states.retain(|k, _| model.rollouts.contains_key(k));
            changed |= states.len() != before;
            for (key, m) in &model.rollouts {
                // A state loaded from disk has an empty baseline and a window starting at load
                // time: right for a new process, whose load counts start at zero too.
                let mut st = match states.remove(key) {
                    Some(st) if st.fingerprint == fingerprint(m) => st,
                    prev => {
                        changed = true;
                        self.start(key, m, prev)
                    }
                };
                if st.phase == Phase::Progressing {
                    let window = self.store.sum(&m.canary_clusters).since(&st.baseline);
                    match judge(m, &window, st.step_started.elapsed()) {
                        Verdict::Wait => {}
                        Verdict::Hold(reason) => {
                            if !st.holding {
                                st.holding = true;
                                let w = st.weight;
                                self.record(key, &mut st, "hold", w, reason);
                                changed = true;
                            }
                        }
                        Verdict::Promote(reason) => {
                            changed = true;
                            if st.step + 1 < m.steps.len() {
                                st.step += 1;
                                let to = m.steps[st.step];
                                self.record(key, &mut st, "promote", to, reason);
                                st.baseline = self.store.sum(&m.canary_clusters);
                                st.step_started = std::time::Instant::now();
                                st.holding = false;
                            } else {
                                st.phase = Phase::Promoted;
                                let w = st.weight;
                                self.record(key, &mut st, "complete", w, reason);
                            }
                        }
                        Verdict::Rollback(reason) => {
                            changed = true;
                            st.phase = Phase::RolledBack;
                            self.record(key, &mut st, "rollback", 0, reason);
                        }
                    }
                }
                self.metrics
                    .rollout_weight
                    .get_or_create(&vec![("rollout".into(), key.clone())])
                    .set(i64::from(st.weight));
                states.insert(key.clone(), st);
            }
            states
                .iter()
                .filter_map(|(k, st)| {
                    let m = model.rollouts.get(k)?;
                    Some((st.split_origin.clone(), (m.canary.clone(), st.weight)))
                })
                .collect::<WeightOverrides>()
        };
        self.catalog.set_overrides(overrides);
        if changed {
            self.save();
        }
        self.publish_changes(&model);
    }

    /// Sends phase and weight changes to be written to the Rollouts' status (only what differs
    /// from what the status already says, or from what was sent).
    fn publish_changes(&self, model: &crate::catalog::Model) {
        let Some(tx) = &self.publish else { return };
        let mut published = crate::lock(&self.published);
        for (key, st) in self.states() {
            let now = (phase_name(st.phase).to_string(), st.weight);
            let on_object = model.rollouts.get(&key).and_then(|m| m.status.clone());
            if published.get(&key) == Some(&now) || on_object.as_ref() == Some(&now) {
                published.insert(key, now);
                continue;
            }
            let _ = tx.send(StatusChange {
                key: key.clone(),
                phase: now.0.clone(),
                weight: now.1,
            });
            published.insert(key, now);
        }
    }

    fn save(&self) {
        let Some(path) = &self.path else { return };
        let states = self.states();
        if let Err(e) = crate::state_file::write(path, &states) {
            tracing::error!(path = %path.display(), error = %e, "cannot save rollout state; it lives in memory until the next save");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::ServiceKey;

    fn model() -> RolloutModel {
        RolloutModel {
            key: "default/echo".into(),
            split_origin: "TrafficSplit default/echo".into(),
            canary: ServiceKey::new("default", "echo-v2"),
            canary_clusters: vec!["echo-v2.default.svc.cluster.local:80".into()],
            steps: vec![10, 50, 100],
            interval: Duration::from_secs(10),
            min_requests: 20,
            success_rate: 0.95,
            max_p99: Some(Duration::from_millis(100)),
            status: None,
        }
    }

    fn window(ok: u64, err: u64, slow: u64) -> LoadCounts {
        let mut latency = [0; weft_proto::load::BUCKETS];
        latency[weft_proto::load::bucket_for(Duration::from_millis(3))] = ok + err - slow;
        latency[weft_proto::load::bucket_for(Duration::from_millis(900))] = slow;
        LoadCounts {
            issued: ok + err,
            succeeded: ok,
            errored: err,
            in_progress: 0,
            latency,
        }
    }

    #[test]
    fn verdicts() {
        let m = model();
        let early = Duration::from_secs(2);
        let late = Duration::from_secs(11);
        assert_eq!(judge(&m, &window(5, 0, 0), early), Verdict::Wait);
        assert!(
            matches!(judge(&m, &window(5, 0, 0), late), Verdict::Hold(r) if r.contains("only 5"))
        );
        // A breach rolls back without waiting for the interval, once the minimum is there.
        assert!(matches!(judge(&m, &window(2, 10, 0), early), Verdict::Wait));
        assert!(
            matches!(judge(&m, &window(15, 5, 0), early), Verdict::Rollback(r) if r.contains("75.0 %"))
        );
        assert!(
            matches!(judge(&m, &window(100, 0, 5), early), Verdict::Rollback(r) if r.contains("p99"))
        );
        assert_eq!(judge(&m, &window(100, 0, 0), early), Verdict::Wait);
        assert!(
            matches!(judge(&m, &window(100, 1, 0), late), Verdict::Promote(r) if r.contains("101 requests"))
        );
    }

    #[test]
    fn canary_weights_rewrite_the_split() {
        let mut rule = crate::catalog::RouteRule {
            matches: vec![],
            backends: vec![
                crate::catalog::Backend {
                    service: ServiceKey::new("default", "echo-v1"),
                    port: 80,
                    weight: 100,
                    local: true,
                },
                crate::catalog::Backend {
                    service: ServiceKey::new("default", "echo-v2"),
                    port: 80,
                    weight: 0,
                    local: true,
                },
            ],
            timeout: None,
            retry: None,
            origin: "TrafficSplit default/echo".into(),
        };
        let canary = ServiceKey::new("default", "echo-v2");
        crate::catalog::override_weights(&mut rule, &canary, 25);
        let w: Vec<u32> = rule.backends.iter().map(|b| b.weight).collect();
        assert_eq!(w, vec![7500, 2500]);
        crate::catalog::override_weights(&mut rule, &canary, 0);
        let w: Vec<u32> = rule.backends.iter().map(|b| b.weight).collect();
        assert_eq!(w, vec![10000, 0]);
    }
}
