//! `HealthActor`: probes every endpoint, keeps each one's health with hysteresis, decides
//! failover and fencing, tells the routing core, and publishes events.
//!
//! - Each endpoint is probed on a connection of its own, never through the application's pool (a
//!   saturated pool is not a dead server): reachability, round trip, `pg_is_in_recovery()`, the
//!   position (current, or replayed on a standby), the timeline, the system identifier.
//! - A probe starts only when the previous one of that endpoint has finished, and the next is
//!   scheduled from its end, so probes never overlap and never come in a burst after a stall.
//! - A connection error seen by a query makes its endpoint be probed at once.
//! - The decisions are plain functions: [`state`] (hysteresis) and [`crate::failover`].
//! - The failover state (which primary is accepted, which endpoints are fenced) lives outside the
//!   actor, so a restart of the actor forgets none of it.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use actix::{
    Actor, ActorContext as _, ActorFutureExt as _, AsyncContext as _, Context, Handler, Message,
    Recipient, SpawnHandle, WrapFuture as _,
};
use tokio::sync::Notify;

mod probe;
mod state;

use self::probe::{lag, ProbeReport, POSITIONS_SQL, PROBE_SQL};
pub use self::state::HealthState;
pub(crate) use self::state::{Thresholds, Tracker};
use crate::{
    child::{ExitGuard, Stop},
    database::{Connector, DatabaseSpec},
    error::{Error, ErrorKind},
    failover::{
        choose_new_primary, Action, Candidate, ClusterFailover, Completed, Lineage, Observed,
        PromoteOutcome,
    },
    position::Position,
    router::Routing,
    settings::{FailoverSettings, HealthSettings, Role},
};

/// What an endpoint is, as its probes see it (not as the settings say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ObservedRole {
    /// Out of recovery: it takes writes.
    Primary,
    /// In recovery: a standby.
    Standby,
}

impl std::fmt::Display for ObservedRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            ObservedRole::Primary => "primary",
            ObservedRole::Standby => "standby",
        })
    }
}

/// An endpoint's health or observed role changed. Published only on real changes (the
/// hysteresis absorbs flapping), to the subscribers of the herd's health.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
#[non_exhaustive]
pub struct StateChanged {
    /// The endpoint.
    pub endpoint: Arc<str>,
    /// Its health before.
    pub from: HealthState,
    /// Its health now.
    pub to: HealthState,
    /// Its role as last observed.
    pub role: Option<ObservedRole>,
    /// Why, for people.
    pub reason: String,
    /// When.
    pub at: SystemTime,
}

/// A failover, step by step, and fencing. Subscribe with `HerdBuilder::subscribe_failover`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
#[non_exhaustive]
pub enum FailoverEvent {
    /// The accepted primary was withdrawn: writes wait for a new one within their deadlines.
    PrimaryLost {
        /// The cluster.
        cluster: Arc<str>,
        /// The primary that was lost.
        endpoint: Arc<str>,
        /// Why.
        reason: String,
        /// When.
        at: SystemTime,
    },
    /// pgherd is promoting a standby.
    Promoting {
        /// The cluster.
        cluster: Arc<str>,
        /// The standby.
        endpoint: Arc<str>,
        /// Why this one.
        reason: String,
        /// When.
        at: SystemTime,
    },
    /// Writes go to `endpoint` from now on. After a failover, `report` tells its course.
    PrimaryAccepted {
        /// The cluster.
        cluster: Arc<str>,
        /// The new primary.
        endpoint: Arc<str>,
        /// Why.
        reason: String,
        /// When.
        at: SystemTime,
        /// The failover that ended here, if one did.
        report: Option<FailoverReport>,
    },
    /// `endpoint` gets no traffic: it is writable but not the accepted primary.
    Fenced {
        /// The cluster.
        cluster: Arc<str>,
        /// The fenced endpoint.
        endpoint: Arc<str>,
        /// Why.
        reason: String,
        /// When.
        at: SystemTime,
    },
    /// `endpoint` may get traffic again.
    Unfenced {
        /// The cluster.
        cluster: Arc<str>,
        /// The endpoint.
        endpoint: Arc<str>,
        /// Why.
        reason: String,
        /// When.
        at: SystemTime,
    },
    /// Something an operator should know (e.g. the primary is down and nothing can replace it).
    Warning {
        /// The cluster.
        cluster: Arc<str>,
        /// What.
        message: String,
        /// When.
        at: SystemTime,
    },
}

/// The course of one failover: when the failure was first seen, when it was declared, which
/// endpoint was chosen and why, and the positions that bound what may have been lost.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FailoverReport {
    /// The cluster.
    pub cluster: Arc<str>,
    /// The primary that was lost.
    pub old_primary: Arc<str>,
    /// The primary accepted instead.
    pub new_primary: Arc<str>,
    /// Why it was chosen.
    pub reason: String,
    /// When a probe of the old primary first failed.
    pub first_failure: SystemTime,
    /// When it was declared down (writes stopped going to it).
    pub declared_down: SystemTime,
    /// When pgherd started promoting the new primary, if it did.
    pub promoted: Option<SystemTime>,
    /// When the new primary was accepted.
    pub accepted: SystemTime,
    /// The furthest position known on the old primary: its last probe, or the last write
    /// acknowledged by this herd, whichever is further.
    pub old_position: Option<Position>,
    /// Where the new primary's history starts: what it had received while still a standby
    /// during the failover, else its position when it was accepted.
    pub new_position: Option<Position>,
    /// How many bytes of WAL the old primary had beyond what the new one started from: writes
    /// in that window may be lost. `Some(0)` means nothing this herd knew of was lost; `None`
    /// that it cannot be told (a position is unknown, or the new primary is another database,
    /// such as a backup, whose positions do not compare).
    pub possible_loss_bytes: Option<u64>,
}

impl FailoverReport {
    /// From the first failed probe to the acceptance of the new primary.
    pub fn duration(&self) -> Duration {
        self.accepted
            .duration_since(self.first_failure)
            .unwrap_or_default()
    }

    /// From the first failed probe to the declaration.
    pub fn detection(&self) -> Duration {
        self.declared_down
            .duration_since(self.first_failure)
            .unwrap_or_default()
    }
}

/// One endpoint's health, as the health actor sees it now.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EndpointHealth {
    /// The endpoint.
    pub name: Arc<str>,
    /// Its cluster.
    pub cluster: Arc<str>,
    /// Its role in the settings.
    pub configured_role: Role,
    /// Its health.
    pub state: HealthState,
    /// Its role as last observed.
    pub observed_role: Option<ObservedRole>,
    /// Whether writes go to it.
    pub accepted_primary: bool,
    /// Whether it gets no traffic at all (writable, but not the accepted primary).
    pub fenced: bool,
    /// The last probe's round trip.
    pub rtt: Option<Duration>,
    /// Its position: current on a primary, replayed on a standby.
    pub position: Option<Position>,
    /// A standby's received position.
    pub received: Option<Position>,
    /// Its timeline.
    pub timeline: Option<u32>,
    /// A standby's lag behind its cluster's accepted primary, in bytes.
    pub lag_bytes: Option<u64>,
    /// A standby's lag behind its cluster's accepted primary, in time.
    pub lag: Option<Duration>,
    /// Why the last probe failed, if it did.
    pub last_error: Option<String>,
}

/// Probes every endpoint of `settings` once, all at once, each within `timeout`, without
/// starting a herd (what `pgherd status` shows). An endpoint is `Up` if its probe answered,
/// `Down` otherwise; a standby's lag is measured against the writable endpoint of its cluster on
/// the newest timeline.
///
/// # Errors
///
/// A [`Config`](ErrorKind::Config) error when an endpoint's TLS or password cannot be set up.
pub async fn survey(
    settings: &crate::settings::Settings,
    timeout: Duration,
) -> Result<Vec<EndpointHealth>, Error> {
    let specs = settings
        .endpoints
        .iter()
        .map(|(name, endpoint)| DatabaseSpec::new(name, endpoint, &settings.pool_for(name)))
        .collect::<Result<Vec<_>, _>>()?;
    // Connect everywhere first, then probe everywhere: the round trips measured are then the
    // queries', not the time this thread spent authenticating the other connections.
    let connects = specs.iter().map(|spec| async move {
        let connector = spec.connector();
        match tokio::time::timeout(timeout, connector.connect()).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(error)) => Err(crate::database::describe(&error)),
            Err(_) => Err(format!(
                "no connection within {}",
                humantime::format_duration(timeout)
            )),
        }
    });
    let clients = futures_util::future::join_all(connects).await;
    let probes = specs.iter().zip(clients).map(|(spec, client)| async move {
        let result = match client {
            Err(error) => Err(error),
            Ok(client) => {
                let started = Instant::now();
                match tokio::time::timeout(timeout, client.query_one(PROBE_SQL, &[])).await {
                    Ok(Ok(row)) => ProbeReport::from_row(&row, Instant::now(), started.elapsed())
                        .map_err(|error| crate::database::describe(&error)),
                    Ok(Err(error)) => Err(crate::database::describe(&error)),
                    Err(_) => Err(format!(
                        "no answer within {}",
                        humantime::format_duration(timeout)
                    )),
                }
            }
        };
        (spec, result)
    });
    let results = futures_util::future::join_all(probes).await;
    // Each cluster's writable endpoint on the newest timeline, to measure lag against: its
    // primary, or a standby promoted. Not a replica or a backup, which are other systems
    // whose positions say nothing of the standbys'.
    let mut primaries: BTreeMap<&str, (Option<u32>, Option<Position>)> = BTreeMap::new();
    for (spec, result) in &results {
        if let Ok(report) = result {
            if !report.in_recovery && matches!(spec.settings.role, Role::Primary | Role::Standby) {
                let entry = primaries
                    .entry(spec.settings.cluster.as_str())
                    .or_insert((None, None));
                if report.timeline >= entry.0 {
                    *entry = (report.timeline, report.position);
                }
            }
        }
    }
    let mut results = results;
    results.sort_by(|(a, _), (b, _)| {
        (&a.settings.cluster, a.settings.role, &a.name).cmp(&(
            &b.settings.cluster,
            b.settings.role,
            &b.name,
        ))
    });
    Ok(results
        .into_iter()
        .map(|(spec, result)| {
            let report = result.as_ref().ok();
            let primary = primaries
                .get(spec.settings.cluster.as_str())
                .and_then(|(_, position)| *position);
            let (lag_bytes, lag) = match report {
                Some(r) if r.in_recovery => lag(r.position, r.replay_age, primary),
                _ => (None, None),
            };
            EndpointHealth {
                name: Arc::clone(&spec.name),
                cluster: Arc::from(spec.settings.cluster.as_str()),
                configured_role: spec.settings.role,
                state: if report.is_some() {
                    HealthState::Up
                } else {
                    HealthState::Down
                },
                observed_role: report.map(|r| {
                    if r.in_recovery {
                        ObservedRole::Standby
                    } else {
                        ObservedRole::Primary
                    }
                }),
                accepted_primary: false,
                fenced: false,
                rtt: report.map(|r| r.rtt),
                position: report.and_then(|r| r.position),
                received: report.and_then(|r| r.received),
                timeline: report.and_then(|r| r.timeline),
                lag_bytes,
                lag,
                last_error: result.err(),
            }
        })
        .collect())
}

/// Asks for the health of every endpoint.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "Vec<EndpointHealth>")]
pub struct GetHealth;

/// Makes `endpoint` the primary of its cluster (an operator's decision, e.g. failback after a
/// backup took the writes). It must be up and out of recovery; every other writable endpoint of
/// the cluster is fenced.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), Error>")]
pub struct AcceptPrimary {
    /// The endpoint.
    pub endpoint: String,
}

/// Lets a fenced endpoint have traffic again (an operator's decision).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), Error>")]
pub struct Readmit {
    /// The endpoint.
    pub endpoint: String,
}

/// Subscribes to [`StateChanged`] events.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SubscribeState(pub Recipient<StateChanged>);

/// Subscribes to [`FailoverEvent`]s.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SubscribeFailover(pub Recipient<FailoverEvent>);

/// Endpoints whose queries met connection errors, to be probed at once. Shared by the endpoints
/// (which ask) and the health actor (which answers), across restarts of either.
#[derive(Debug, Default)]
pub(crate) struct ProbeRequests {
    pending: Mutex<BTreeSet<Arc<str>>>,
    notify: Notify,
}

impl ProbeRequests {
    pub(crate) fn request(&self, endpoint: &Arc<str>) {
        let fresh = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(Arc::clone(endpoint));
        if fresh {
            self.notify.notify_one();
        }
    }

    fn take(&self) -> BTreeSet<Arc<str>> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// What the routing core needs to know of one endpoint.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EndpointFacts {
    pub(crate) state: HealthState,
    /// Why the last probe failed, if it did.
    pub(crate) last_error: Option<String>,
    pub(crate) writable: Option<bool>,
    pub(crate) fenced: bool,
    pub(crate) system_id: Option<u64>,
    pub(crate) timeline: Option<u32>,
    pub(crate) position: Option<Position>,
    pub(crate) lag: Option<Duration>,
}

/// The health actor's view, as the routing core uses it.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct HealthView {
    pub(crate) endpoints: BTreeMap<Arc<str>, EndpointFacts>,
    /// The accepted primary of each cluster, if any.
    pub(crate) primaries: BTreeMap<Arc<str>, Option<Arc<str>>>,
    /// Whose standbys may serve each cluster's reads (the accepted primary's system and
    /// timeline, or the old primary's while failing over).
    pub(crate) lineages: BTreeMap<Arc<str>, Lineage>,
}

/// The failover state of every cluster, kept outside the actor so that it survives restarts.
pub(crate) type FailoverState = Arc<Mutex<BTreeMap<Arc<str>, ClusterFailover>>>;

/// Builds the failover state of `specs`' clusters.
pub(crate) fn failover_state(specs: &[DatabaseSpec], settings: &FailoverSettings) -> FailoverState {
    let mut clusters = BTreeMap::new();
    for spec in specs.iter().filter(|s| s.settings.role == Role::Primary) {
        clusters.insert(
            Arc::from(spec.settings.cluster.as_str()),
            ClusterFailover::new(
                settings.mode,
                settings.failback,
                settings.promote_timeout,
                Arc::clone(&spec.name),
            ),
        );
    }
    Arc::new(Mutex::new(clusters))
}

/// One endpoint's probing.
struct Probed {
    name: Arc<str>,
    cluster: Arc<str>,
    role: Role,
    connector: Arc<Connector>,
    /// The dedicated connection, when open and not in use by a probe.
    client: Option<tokio_postgres::Client>,
    in_flight: bool,
    /// The next scheduled probe, and when it runs.
    next: Option<(SpawnHandle, Instant)>,
    /// When the last probe ended.
    last_end: Option<Instant>,
    tracker: Tracker,
    report: Option<ProbeReport>,
    last_error: Option<String>,
}

/// What the health actor is started with.
pub(crate) struct HealthParts {
    pub(crate) specs: Vec<DatabaseSpec>,
    pub(crate) settings: HealthSettings,
    pub(crate) failover: FailoverSettings,
    pub(crate) state: FailoverState,
    pub(crate) routing: Arc<Routing>,
    pub(crate) requests: Arc<ProbeRequests>,
    pub(crate) state_subscribers: Vec<Recipient<StateChanged>>,
    pub(crate) failover_subscribers: Vec<Recipient<FailoverEvent>>,
    pub(crate) guard: ExitGuard,
}

/// The thread the health actor of one herd runs on, apart from the application's: probes and
/// their timeouts must not wait behind a busy application thread, or a slow event loop would be
/// taken for a dead server (and, in `promote` mode, lead to a needless promotion).
#[derive(Debug)]
pub(crate) struct HealthArbiter(actix::Arbiter);

impl HealthArbiter {
    pub(crate) fn new() -> HealthArbiter {
        HealthArbiter(actix::Arbiter::new())
    }

    /// Starts a health actor on this thread.
    pub(crate) fn start(&self, parts: HealthParts) -> actix::Addr<HealthActor> {
        HealthActor::start_in_arbiter(&self.0.handle(), move |_| HealthActor::new(parts))
    }

    /// Ends the thread (after the actor was stopped).
    pub(crate) fn stop(&self) {
        self.0.stop();
    }
}

/// The actor that probes endpoints and decides failover.
pub struct HealthActor {
    endpoints: BTreeMap<Arc<str>, Probed>,
    settings: HealthSettings,
    failover: FailoverSettings,
    state: FailoverState,
    routing: Arc<Routing>,
    requests: Arc<ProbeRequests>,
    state_subscribers: Vec<Recipient<StateChanged>>,
    failover_subscribers: Vec<Recipient<FailoverEvent>>,
    _guard: ExitGuard,
}

impl std::fmt::Debug for HealthActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthActor")
            .field("endpoints", &self.endpoints.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Whether `pg_promote` failed before it signalled the promotion, so that nothing was started:
/// not in recovery (55000), no privilege (42501), a bad wait (22023), or the signal file could
/// not be written (class 58, 53100). Any other error (a cancel or a statement timeout while it
/// waited, say) may come after the signal: the promotion may go on.
fn refused_before_signal(error: &tokio_postgres::Error) -> bool {
    error
        .as_db_error()
        .is_some_and(|db| refused_code(db.code().code()))
}

fn refused_code(sqlstate: &str) -> bool {
    matches!(sqlstate, "55000" | "42501" | "22023" | "53100") || sqlstate.starts_with("58")
}

/// An `Instant` as wall-clock time, for events.
fn wall(at: Instant) -> SystemTime {
    SystemTime::now()
        .checked_sub(at.elapsed())
        .unwrap_or_else(SystemTime::now)
}

impl HealthActor {
    pub(crate) fn new(parts: HealthParts) -> HealthActor {
        let thresholds = Thresholds {
            failures_to_down: parts.settings.failures_to_down,
            successes_to_up: parts.settings.successes_to_up,
        };
        let endpoints = parts
            .specs
            .iter()
            .map(|spec| {
                (
                    Arc::clone(&spec.name),
                    Probed {
                        name: Arc::clone(&spec.name),
                        cluster: Arc::from(spec.settings.cluster.as_str()),
                        role: spec.settings.role,
                        connector: spec.connector(),
                        client: None,
                        in_flight: false,
                        next: None,
                        last_end: None,
                        // A restarted actor keeps what the last one judged: a down endpoint
                        // must earn its way back.
                        tracker: Tracker::resume(thresholds, parts.routing.last_health(&spec.name)),
                        report: None,
                        last_error: None,
                    },
                )
            })
            .collect();
        // Whatever a previous actor had in flight is gone with it.
        for state in parts
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values_mut()
        {
            state.restarted(Instant::now());
        }
        HealthActor {
            endpoints,
            settings: parts.settings,
            failover: parts.failover,
            state: parts.state,
            routing: parts.routing,
            requests: parts.requests,
            state_subscribers: parts.state_subscribers,
            failover_subscribers: parts.failover_subscribers,
            _guard: parts.guard,
        }
    }

    fn clusters(&self) -> std::sync::MutexGuard<'_, BTreeMap<Arc<str>, ClusterFailover>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a probe of `name` now, unless one runs.
    fn probe(&mut self, name: &Arc<str>, ctx: &mut Context<Self>) {
        let timeout = self.settings.timeout;
        let Some(endpoint) = self.endpoints.get_mut(name) else {
            return;
        };
        if endpoint.in_flight {
            return;
        }
        if let Some((next, _)) = endpoint.next.take() {
            ctx.cancel_future(next);
        }
        endpoint.in_flight = true;
        let client = endpoint.client.take();
        let connector = Arc::clone(&endpoint.connector);
        let name = Arc::clone(name);
        let probe = async move {
            let attempt = async {
                let client = match client {
                    Some(client) if !client.is_closed() => client,
                    _ => connector.connect().await?,
                };
                // The round trip of the query alone, not of connecting.
                let started = Instant::now();
                let row = client.query_one(PROBE_SQL, &[]).await?;
                let report = ProbeReport::from_row(&row, Instant::now(), started.elapsed())?;
                Ok::<_, tokio_postgres::Error>((client, report))
            };
            match tokio::time::timeout(timeout, attempt).await {
                Ok(Ok((client, report))) => (Some(client), Ok(report)),
                Ok(Err(error)) => (None, Err(crate::database::describe(&error))),
                Err(_) => (
                    None,
                    Err(format!(
                        "no answer within {} (health.timeout)",
                        humantime::format_duration(timeout)
                    )),
                ),
            }
        };
        ctx.spawn(
            probe
                .into_actor(self)
                .map(move |(client, result), actor, ctx| {
                    actor.probed(&name, client, result, ctx);
                }),
        );
    }

    fn probed(
        &mut self,
        name: &Arc<str>,
        client: Option<tokio_postgres::Client>,
        result: Result<ProbeReport, String>,
        ctx: &mut Context<Self>,
    ) {
        let now = Instant::now();
        let Some(endpoint) = self.endpoints.get_mut(name) else {
            return;
        };
        endpoint.in_flight = false;
        endpoint.last_end = Some(now);
        endpoint.client = client;
        let before_role = endpoint.report.as_ref().map(|r| r.in_recovery);
        let (flip, reason) = match &result {
            Ok(report) => {
                endpoint.last_error = None;
                endpoint.report = Some(report.clone());
                (endpoint.tracker.success(now), "probes succeed".to_owned())
            }
            Err(error) => {
                endpoint.last_error = Some(error.clone());
                let flip = endpoint.tracker.failure(now);
                (flip, format!("probes fail: {error}"))
            }
        };
        let role = endpoint.report.as_ref().map(|r| {
            if r.in_recovery {
                ObservedRole::Standby
            } else {
                ObservedRole::Primary
            }
        });
        let state = endpoint.tracker.state();
        let wait = endpoint
            .tracker
            .next_probe(self.settings.interval, self.settings.suspect_interval);
        let again = Arc::clone(name);
        endpoint.next = Some((
            ctx.run_later(wait, move |actor, ctx| actor.probe(&again, ctx)),
            now + wait,
        ));

        if let Some(flip) = flip {
            if flip.to == HealthState::Down {
                tracing::warn!(endpoint = %name, %reason, "endpoint down");
            } else {
                tracing::info!(endpoint = %name, from = %flip.from, to = %flip.to, "endpoint health changed");
            }
            self.publish_state(StateChanged {
                endpoint: Arc::clone(name),
                from: flip.from,
                to: flip.to,
                role,
                reason,
                at: wall(now),
            });
        }
        let after_role = result.as_ref().ok().map(|r| r.in_recovery);
        if let (Some(before), Some(after)) = (before_role, after_role) {
            if before != after {
                let reason = format!(
                    "role changed: now a {}",
                    if after { "standby" } else { "primary" }
                );
                tracing::info!(endpoint = %name, %reason, "endpoint role changed");
                self.publish_state(StateChanged {
                    endpoint: Arc::clone(name),
                    from: state,
                    to: state,
                    role,
                    reason,
                    at: wall(now),
                });
            }
        }
        self.decide(now, ctx);
    }

    fn publish_state(&mut self, event: StateChanged) {
        self.state_subscribers.retain(Recipient::connected);
        for subscriber in &self.state_subscribers {
            subscriber.do_send(event.clone());
        }
    }

    fn publish_failover(&mut self, event: FailoverEvent) {
        self.failover_subscribers.retain(Recipient::connected);
        for subscriber in &self.failover_subscribers {
            subscriber.do_send(event.clone());
        }
    }

    fn observed(&self, cluster: &str) -> Vec<Observed> {
        self.endpoints
            .values()
            .filter(|e| &*e.cluster == cluster)
            .map(|e| Observed {
                name: Arc::clone(&e.name),
                role: e.role,
                state: e.tracker.state(),
                first_failure: e.tracker.first_failure(),
                writable: e.report.as_ref().map(|r| !r.in_recovery),
                system_id: e.report.as_ref().and_then(|r| r.system_id),
                timeline: e.report.as_ref().and_then(|r| r.timeline),
                position: e.report.as_ref().and_then(|r| r.position),
                received: e.report.as_ref().and_then(|r| r.received),
            })
            .collect()
    }

    /// Runs the failover decisions of every cluster and applies them; then tells the routing
    /// core.
    fn decide(&mut self, now: Instant, ctx: &mut Context<Self>) {
        let clusters: Vec<Arc<str>> = self.clusters().keys().cloned().collect();
        for cluster in clusters {
            let observed = self.observed(&cluster);
            let acked = self.routing.acked(&cluster);
            let (actions, completed) = {
                let mut clusters = self.clusters();
                let Some(state) = clusters.get_mut(&cluster) else {
                    continue;
                };
                let actions = state.step(&observed, acked, now);
                (actions, state.take_completed())
            };
            self.apply(&cluster, actions, completed, ctx);
        }
        self.routing.apply_view(self.view());
    }

    fn apply(
        &mut self,
        cluster: &Arc<str>,
        actions: Vec<Action>,
        mut completed: Option<Completed>,
        ctx: &mut Context<Self>,
    ) {
        let at = SystemTime::now();
        for action in actions {
            match action {
                Action::Accept { endpoint, reason } => {
                    tracing::warn!(%cluster, %endpoint, %reason, "primary accepted");
                    let report = completed.take().map(|c| self.report(cluster, c));
                    if let Some(report) = &report {
                        tracing::warn!(
                            %cluster,
                            old = %report.old_primary,
                            new = %report.new_primary,
                            detection_ms = report.detection().as_millis(),
                            total_ms = report.duration().as_millis(),
                            possible_loss_bytes = ?report.possible_loss_bytes,
                            "failover complete"
                        );
                    }
                    self.publish_failover(FailoverEvent::PrimaryAccepted {
                        cluster: Arc::clone(cluster),
                        endpoint,
                        reason,
                        at,
                        report,
                    });
                }
                Action::Withdraw { endpoint, reason } => {
                    tracing::warn!(%cluster, %endpoint, %reason, "primary withdrawn: writes wait");
                    self.publish_failover(FailoverEvent::PrimaryLost {
                        cluster: Arc::clone(cluster),
                        endpoint,
                        reason,
                        at,
                    });
                }
                Action::Fence { endpoint, reason } => {
                    tracing::warn!(%cluster, %endpoint, %reason, "fenced");
                    self.publish_failover(FailoverEvent::Fenced {
                        cluster: Arc::clone(cluster),
                        endpoint,
                        reason,
                        at,
                    });
                }
                Action::Unfence { endpoint, reason } => {
                    tracing::info!(%cluster, %endpoint, %reason, "unfenced");
                    self.publish_failover(FailoverEvent::Unfenced {
                        cluster: Arc::clone(cluster),
                        endpoint,
                        reason,
                        at,
                    });
                }
                Action::Warn(message) => {
                    tracing::warn!(%cluster, %message, "failover");
                    self.publish_failover(FailoverEvent::Warning {
                        cluster: Arc::clone(cluster),
                        message,
                        at,
                    });
                }
                Action::Promote { old, candidates } => {
                    self.promote(cluster, &old, &candidates, ctx);
                }
                Action::PromoteAgain { endpoint } => {
                    tracing::warn!(%cluster, %endpoint, "asking again for a promotion");
                    self.send_promote(cluster, &endpoint, ctx);
                }
            }
        }
    }

    fn report(&self, cluster: &Arc<str>, completed: Completed) -> FailoverReport {
        let Completed {
            failing,
            new,
            reason,
            new_position,
            same_system,
        } = completed;
        let promoted = failing.promoted_at().map(wall);
        FailoverReport {
            cluster: Arc::clone(cluster),
            old_primary: failing.old,
            new_primary: new,
            reason,
            first_failure: wall(failing.first_failure),
            declared_down: wall(failing.declared),
            promoted,
            accepted: SystemTime::now(),
            old_position: failing.old_position,
            new_position,
            // Positions of two systems (a move to the backup) do not compare.
            possible_loss_bytes: failing
                .old_position
                .zip(new_position)
                .filter(|_| same_system)
                .map(|(old, new)| old.bytes_after(new)),
        }
    }

    /// Reads the candidates' positions afresh while looking once more at the old primary on a
    /// fresh connection, and, unless the old primary answers as a primary, promotes the most
    /// advanced candidate.
    fn promote(
        &mut self,
        cluster: &Arc<str>,
        old: &Arc<str>,
        candidates: &[Arc<str>],
        ctx: &mut Context<Self>,
    ) {
        let connectors: Vec<(Arc<str>, Arc<Connector>)> = candidates
            .iter()
            .filter_map(|name| {
                self.endpoints
                    .get(name)
                    .map(|e| (Arc::clone(name), Arc::clone(&e.connector)))
            })
            .collect();
        let old_connector = self.endpoints.get(old).map(|e| Arc::clone(&e.connector));
        let probe_timeout = self.settings.timeout;
        let old = Arc::clone(old);
        let work = async move {
            // Every candidate at once: the failover waits for the slowest, not for the sum.
            let reads = connectors.iter().map(|(name, connector)| async move {
                let positions = tokio::time::timeout(probe_timeout, async {
                    let client = connector.connect().await?;
                    let row = client.query_one(POSITIONS_SQL, &[]).await?;
                    let received: Option<tokio_postgres::types::PgLsn> = row.try_get(0)?;
                    let replayed: Option<tokio_postgres::types::PgLsn> = row.try_get(1)?;
                    Ok::<_, tokio_postgres::Error>((received, replayed))
                })
                .await;
                match positions {
                    Ok(Ok((received, replayed))) => Some(Candidate {
                        name: Arc::clone(name),
                        received: received.map(Position::from),
                        replayed: replayed.map(Position::from),
                    }),
                    _ => None,
                }
            });
            // Meanwhile, one last look at the old primary on a fresh connection: if it answers as
            // a primary, it was slow, not dead, and promoting would make two writable servers.
            let confirm = async {
                let connector = old_connector.as_ref()?;
                let answer = tokio::time::timeout(probe_timeout, async {
                    let client = connector.connect().await?;
                    let row = client.query_one("SELECT pg_is_in_recovery()", &[]).await?;
                    Ok::<bool, tokio_postgres::Error>(row.get(0))
                })
                .await;
                matches!(answer, Ok(Ok(false))).then_some(())
            };
            let (read, alive) =
                futures_util::future::join(futures_util::future::join_all(reads), confirm).await;
            if alive.is_some() {
                return Err(format!(
                    "not promoting: the primary `{old}` answered a fresh connection as a primary \
                     (it was slow, not dead)"
                ));
            }
            let read: Vec<Candidate> = read.into_iter().flatten().collect();
            let (chosen, reason) = choose_new_primary(&read)
                .ok_or_else(|| "no standby could be read to choose whom to promote".to_owned())?;
            let received = read
                .iter()
                .find(|c| c.name == chosen)
                .and_then(|c| c.received.or(c.replayed));
            Ok((chosen, reason, received))
        };
        let cluster = Arc::clone(cluster);
        ctx.spawn(
            work.into_actor(self)
                .map(move |chosen, actor, ctx| match chosen {
                    Err(why) => actor.promotion_ended(&cluster, &PromoteOutcome::NotSent(why)),
                    Ok((chosen, reason, received)) => {
                        let at = Instant::now();
                        tracing::warn!(%cluster, endpoint = %chosen, %reason, "promoting");
                        let wanted = actor
                            .clusters()
                            .get_mut(&cluster)
                            .is_some_and(|state| {
                                state.promotion_chosen(&chosen, reason.clone(), received)
                            });
                        if !wanted {
                            // Decided otherwise meanwhile (an operator accepted a primary).
                            tracing::info!(%cluster, endpoint = %chosen, "promotion no longer wanted");
                            return;
                        }
                        actor.publish_failover(FailoverEvent::Promoting {
                            cluster: Arc::clone(&cluster),
                            endpoint: Arc::clone(&chosen),
                            reason,
                            at: wall(at),
                        });
                        actor.send_promote(&cluster, &chosen, ctx);
                    }
                }),
        );
    }

    /// Sends `pg_promote` to `endpoint`, within `failover.promote_timeout` (plus the probe
    /// timeout to connect). From the moment it may have been sent, the failover is committed to
    /// `endpoint`.
    fn send_promote(&mut self, cluster: &Arc<str>, endpoint: &Arc<str>, ctx: &mut Context<Self>) {
        let Some(connector) = self
            .endpoints
            .get(endpoint)
            .map(|e| Arc::clone(&e.connector))
        else {
            self.promotion_ended(
                cluster,
                &PromoteOutcome::NotSent(format!("`{endpoint}` is not an endpoint")),
            );
            return;
        };
        if let Some(state) = self.clusters().get_mut(cluster) {
            state.promotion_requested(endpoint, Instant::now());
        }
        let promote_timeout = self.failover.promote_timeout;
        let connect_timeout = self.settings.timeout;
        let seconds = i32::try_from(promote_timeout.as_secs().max(1)).unwrap_or(60);
        let name = Arc::clone(endpoint);
        let run = async move {
            let client = match tokio::time::timeout(connect_timeout, connector.connect()).await {
                Ok(Ok(client)) => client,
                Ok(Err(error)) => {
                    return PromoteOutcome::NotSent(format!(
                        "cannot connect to `{name}` to promote it: {}",
                        crate::database::describe(&error)
                    ))
                }
                Err(_) => {
                    return PromoteOutcome::NotSent(format!(
                        "cannot connect to `{name}` to promote it within {}",
                        humantime::format_duration(connect_timeout)
                    ))
                }
            };
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&seconds];
            let request = client.query_one("SELECT pg_promote(true, $1)", &params);
            match tokio::time::timeout(promote_timeout + connect_timeout, request).await {
                Ok(Ok(row)) if row.get::<_, bool>(0) => PromoteOutcome::Promoted,
                Ok(Ok(_)) => PromoteOutcome::Unknown(format!(
                    "`{name}` did not finish its promotion within {seconds} s; it goes on in the \
                     server"
                )),
                Ok(Err(error)) if refused_before_signal(&error) => {
                    PromoteOutcome::Refused(format!(
                        "`{name}` refused to be promoted: {}",
                        crate::database::describe(&error)
                    ))
                }
                Ok(Err(error)) => PromoteOutcome::Unknown(format!(
                    "the answer of `{name}` to pg_promote was lost: {}",
                    crate::database::describe(&error)
                )),
                Err(_) => PromoteOutcome::Unknown(format!(
                    "`{name}` did not answer pg_promote within {}",
                    humantime::format_duration(promote_timeout + connect_timeout)
                )),
            }
        };
        let cluster = Arc::clone(cluster);
        let endpoint = Arc::clone(endpoint);
        ctx.spawn(run.into_actor(self).map(move |outcome, actor, ctx| {
            actor.promotion_ended(&cluster, &outcome);
            // Probe it at once: accepted as soon as it is out of recovery.
            actor.probe(&endpoint, ctx);
        }));
    }

    fn promotion_ended(&mut self, cluster: &Arc<str>, outcome: &PromoteOutcome) {
        let retry = self
            .clusters()
            .get_mut(cluster)
            .and_then(|state| state.promotion_ended(outcome, Instant::now()));
        let message = match (outcome, retry) {
            (PromoteOutcome::Promoted, _) => return,
            (PromoteOutcome::NotSent(why) | PromoteOutcome::Refused(why), Some(wait)) => format!(
                "{why}; the next attempt in {}",
                humantime::format_duration(wait)
            ),
            (PromoteOutcome::NotSent(why) | PromoteOutcome::Refused(why), None) => format!(
                "{why}; the promotion requested earlier may still complete: it is asked again \
                 after failover.promote_timeout"
            ),
            (PromoteOutcome::Unknown(why), _) => format!(
                "{why}; no other standby is promoted while it may complete: it is asked again \
                 after failover.promote_timeout if it stays in recovery"
            ),
        };
        tracing::error!(%cluster, %message, "promotion did not complete");
        self.publish_failover(FailoverEvent::Warning {
            cluster: Arc::clone(cluster),
            message,
            at: SystemTime::now(),
        });
    }

    /// What the routing core needs: each endpoint's facts, and each cluster's accepted primary.
    fn view(&self) -> HealthView {
        let clusters = self.clusters();
        let primaries: BTreeMap<Arc<str>, Option<Arc<str>>> = clusters
            .iter()
            .map(|(cluster, state)| {
                (
                    Arc::clone(cluster),
                    state.accepted().map(|a| Arc::clone(&a.name)),
                )
            })
            .collect();
        let primary_position = |cluster: &str| {
            primaries
                .get(cluster)
                .and_then(Option::as_ref)
                .and_then(|name| self.endpoints.get(name))
                .and_then(|e| e.report.as_ref())
                .and_then(|r| r.position)
        };
        let endpoints = self
            .endpoints
            .values()
            .map(|e| {
                let report = e.report.as_ref();
                let (_, lag) = match report {
                    Some(r) if r.in_recovery => {
                        lag(r.position, r.replay_age, primary_position(&e.cluster))
                    }
                    _ => (None, None),
                };
                let fenced = clusters
                    .get(&e.cluster)
                    .is_some_and(|state| state.is_fenced(&e.name));
                (
                    Arc::clone(&e.name),
                    EndpointFacts {
                        state: e.tracker.state(),
                        last_error: e.last_error.clone(),
                        writable: report.map(|r| !r.in_recovery),
                        fenced,
                        system_id: report.and_then(|r| r.system_id),
                        timeline: report.and_then(|r| r.timeline),
                        position: report.and_then(|r| r.position),
                        lag,
                    },
                )
            })
            .collect();
        let lineages = clusters
            .iter()
            .filter_map(|(cluster, state)| Some((Arc::clone(cluster), state.lineage()?)))
            .collect();
        HealthView {
            endpoints,
            primaries,
            lineages,
        }
    }

    fn snapshot(&self) -> Vec<EndpointHealth> {
        let view = self.view();
        let primary_position = |cluster: &str| {
            view.primaries
                .get(cluster)
                .and_then(Option::as_ref)
                .and_then(|name| view.endpoints.get(name))
                .and_then(|f| f.position)
        };
        self.endpoints
            .values()
            .map(|e| {
                let report = e.report.as_ref();
                let facts = view.endpoints.get(&e.name);
                let (lag_bytes, lag) = match report {
                    Some(r) if r.in_recovery => {
                        lag(r.position, r.replay_age, primary_position(&e.cluster))
                    }
                    _ => (None, None),
                };
                EndpointHealth {
                    name: Arc::clone(&e.name),
                    cluster: Arc::clone(&e.cluster),
                    configured_role: e.role,
                    state: e.tracker.state(),
                    observed_role: report.map(|r| {
                        if r.in_recovery {
                            ObservedRole::Standby
                        } else {
                            ObservedRole::Primary
                        }
                    }),
                    accepted_primary: view
                        .primaries
                        .get(&e.cluster)
                        .and_then(Option::as_ref)
                        .is_some_and(|p| *p == e.name),
                    fenced: facts.is_some_and(|f| f.fenced),
                    rtt: report.map(|r| r.rtt),
                    position: report.and_then(|r| r.position),
                    received: report.and_then(|r| r.received),
                    timeline: report.and_then(|r| r.timeline),
                    lag_bytes,
                    lag,
                    last_error: e.last_error.clone(),
                }
            })
            .collect()
    }

    fn cluster_of(&self, endpoint: &str) -> Result<Arc<str>, Error> {
        self.endpoints
            .get(endpoint)
            .map(|e| Arc::clone(&e.cluster))
            .ok_or_else(|| {
                Error::new(ErrorKind::UnknownTarget)
                    .with_detail(format!("there is no endpoint `{endpoint}` in the settings"))
            })
    }
}

impl Actor for HealthActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let names: Vec<Arc<str>> = self.endpoints.keys().cloned().collect();
        for name in &names {
            self.probe(name, ctx);
        }
        // Endpoints whose queries failed are probed at once.
        let requests = Arc::clone(&self.requests);
        let listen = async move {
            requests.notify.notified().await;
            requests.take()
        };
        ctx.spawn(listen.into_actor(self).map(|names, actor, ctx| {
            actor.requested(names, ctx);
        }));
        self.routing.apply_view(self.view());
    }
}

impl HealthActor {
    /// Probes endpoints whose queries met connection errors: at once, but never sooner than
    /// `health.suspect_interval` after the endpoint's last probe, so that a burst of failing
    /// queries cannot run the hysteresis down in a millisecond.
    fn requested(&mut self, names: BTreeSet<Arc<str>>, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let spacing = self.settings.suspect_interval;
        for name in &names {
            let Some(endpoint) = self.endpoints.get_mut(name) else {
                continue;
            };
            if endpoint.in_flight {
                continue;
            }
            let earliest = endpoint.last_end.map_or(now, |end| end + spacing);
            if earliest <= now {
                self.probe(name, ctx);
            } else if endpoint.next.as_ref().is_none_or(|(_, at)| *at > earliest) {
                if let Some((next, _)) = endpoint.next.take() {
                    ctx.cancel_future(next);
                }
                let again = Arc::clone(name);
                endpoint.next = Some((
                    ctx.run_later(earliest - now, move |actor, ctx| actor.probe(&again, ctx)),
                    earliest,
                ));
            }
        }
        let requests = Arc::clone(&self.requests);
        let listen = async move {
            requests.notify.notified().await;
            requests.take()
        };
        ctx.spawn(listen.into_actor(self).map(|names, actor, ctx| {
            actor.requested(names, ctx);
        }));
    }
}

impl Handler<GetHealth> for HealthActor {
    type Result = actix::MessageResult<GetHealth>;

    fn handle(&mut self, _: GetHealth, _ctx: &mut Context<Self>) -> Self::Result {
        actix::MessageResult(self.snapshot())
    }
}

impl Handler<AcceptPrimary> for HealthActor {
    type Result = Result<(), Error>;

    fn handle(&mut self, message: AcceptPrimary, ctx: &mut Context<Self>) -> Result<(), Error> {
        let cluster = self.cluster_of(&message.endpoint)?;
        let observed = self.observed(&cluster);
        let actions = {
            let mut clusters = self.clusters();
            let state = clusters.get_mut(&cluster).ok_or_else(|| {
                Error::new(ErrorKind::UnknownTarget).with_detail(format!(
                    "cluster `{cluster}` has no primary in the settings"
                ))
            })?;
            state
                .accept_manually(&message.endpoint, &observed)
                .map_err(|why| Error::new(ErrorKind::NoTarget).with_detail(why))?
        };
        self.apply(&cluster, actions, None, ctx);
        self.decide(Instant::now(), ctx);
        Ok(())
    }
}

impl Handler<Readmit> for HealthActor {
    type Result = Result<(), Error>;

    fn handle(&mut self, message: Readmit, ctx: &mut Context<Self>) -> Result<(), Error> {
        let cluster = self.cluster_of(&message.endpoint)?;
        let action = self
            .clusters()
            .get_mut(&cluster)
            .and_then(|state| state.readmit(&message.endpoint));
        match action {
            Some(action) => {
                self.apply(&cluster, vec![action], None, ctx);
                self.routing.apply_view(self.view());
                Ok(())
            }
            None => Err(Error::new(ErrorKind::UnknownTarget)
                .with_detail(format!("`{}` is not fenced", message.endpoint))),
        }
    }
}

impl Handler<SubscribeState> for HealthActor {
    type Result = ();

    fn handle(&mut self, SubscribeState(recipient): SubscribeState, _ctx: &mut Context<Self>) {
        self.state_subscribers.push(recipient);
    }
}

impl Handler<SubscribeFailover> for HealthActor {
    type Result = ();

    fn handle(
        &mut self,
        SubscribeFailover(recipient): SubscribeFailover,
        _ctx: &mut Context<Self>,
    ) {
        self.failover_subscribers.push(recipient);
    }
}

impl Handler<Stop> for HealthActor {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::refused_code;

    #[test]
    fn only_errors_raised_before_the_promotion_signal_count_as_refused() {
        for before in ["55000", "42501", "22023", "53100", "58P01", "58030"] {
            assert!(refused_code(before), "{before}");
        }
        // A cancel or statement timeout while pg_promote waited, a terminated backend, an
        // administrator shutdown: the promotion may go on.
        for after in ["57014", "57P01", "57P02", "25P03", "XX000"] {
            assert!(!refused_code(after), "{after}");
        }
    }
}
