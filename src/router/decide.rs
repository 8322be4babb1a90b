//! The routing decisions, as plain functions of plain data: where a message may run, which
//! endpoint runs it, and whether a failed attempt may be tried again.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use super::{
    balance::{Balancer, Load},
    rule::Route,
};
use crate::{
    error::{Error, ErrorKind},
    position::Position,
    query::{Intent, Stage},
    settings::{ReadPolicy, Settings, DEFAULT_CLUSTER},
};

/// The endpoints and clusters the settings configure (whether or not their actors run now).
#[derive(Debug, Clone, Default)]
pub(crate) struct Directory {
    endpoints: BTreeMap<Arc<str>, Arc<str>>,
    clusters: BTreeSet<Arc<str>>,
}

impl Directory {
    pub(crate) fn from_settings(settings: &Settings) -> Directory {
        let mut directory = Directory::default();
        for (name, endpoint) in &settings.endpoints {
            let cluster: Arc<str> = Arc::from(endpoint.cluster.as_str());
            directory.clusters.insert(Arc::clone(&cluster));
            directory
                .endpoints
                .insert(Arc::from(name.as_str()), cluster);
        }
        directory
    }

    /// The cluster a scope belongs to.
    pub(crate) fn cluster_of<'a>(&'a self, scope: &'a Scope) -> Option<&'a Arc<str>> {
        match scope {
            Scope::Cluster(cluster) => Some(cluster),
            Scope::Endpoint(name) => self.endpoints.get(name),
        }
    }

    fn endpoint(&self, name: &str) -> Option<&Arc<str>> {
        self.endpoints.get_key_value(name).map(|(name, _)| name)
    }

    fn cluster(&self, name: &str) -> Option<&Arc<str>> {
        self.clusters.get(name)
    }

    fn names(&self) -> String {
        join(self.endpoints.keys())
    }
}

fn join<'a>(names: impl Iterator<Item = &'a Arc<str>>) -> String {
    names
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where a message may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scope {
    /// On this endpoint only, whatever its role.
    Endpoint(Arc<str>),
    /// On a fitting endpoint of this cluster.
    Cluster(Arc<str>),
}

/// Resolves where a message may run: an explicit target wins, then a rule's opinion, then the
/// message's cluster, then the default cluster (`main`, or the only one).
pub(crate) fn resolve(
    directory: &Directory,
    target: Option<&str>,
    rule: Route,
    cluster: Option<&str>,
) -> Result<Scope, Error> {
    let unknown_endpoint = |name: &str| {
        Error::new(ErrorKind::UnknownTarget).with_detail(format!(
            "there is no endpoint `{name}` in the settings (endpoints: {})",
            directory.names()
        ))
    };
    let unknown_cluster = |name: &str| {
        Error::new(ErrorKind::UnknownTarget).with_detail(format!(
            "there is no cluster `{name}` in the settings (clusters: {})",
            join(directory.clusters.iter())
        ))
    };
    if let Some(name) = target {
        return directory
            .endpoint(name)
            .map(|name| Scope::Endpoint(Arc::clone(name)))
            .ok_or_else(|| unknown_endpoint(name));
    }
    match rule {
        Route::Endpoint(name) => {
            return directory
                .endpoint(&name)
                .map(|name| Scope::Endpoint(Arc::clone(name)))
                .ok_or_else(|| {
                    Error::new(ErrorKind::UnknownTarget).with_detail(format!(
                        "a routing rule chose endpoint `{name}`, which is not in the settings \
                         (endpoints: {})",
                        directory.names()
                    ))
                });
        }
        Route::Cluster(name) => {
            return directory
                .cluster(&name)
                .map(|name| Scope::Cluster(Arc::clone(name)))
                .ok_or_else(|| unknown_cluster(&name));
        }
        Route::Default => {}
    }
    if let Some(name) = cluster {
        return directory
            .cluster(name)
            .map(|name| Scope::Cluster(Arc::clone(name)))
            .ok_or_else(|| unknown_cluster(name));
    }
    if let Some(main) = directory.cluster(DEFAULT_CLUSTER) {
        return Ok(Scope::Cluster(Arc::clone(main)));
    }
    match directory.clusters.iter().collect::<Vec<_>>().as_slice() {
        [only] => Ok(Scope::Cluster(Arc::clone(only))),
        _ => Err(Error::new(ErrorKind::UnknownTarget).with_detail(format!(
            "the message names no cluster, and there is no cluster `{DEFAULT_CLUSTER}`: name one \
             with .cluster(..) (clusters: {})",
            join(directory.clusters.iter())
        ))),
    }
}

/// What the router knows of one running endpoint when it decides.
#[derive(Debug, Clone)]
pub(crate) struct Candidate<'a> {
    pub(crate) name: &'a Arc<str>,
    pub(crate) cluster: &'a str,
    /// Written by the replicator (`role = "replica"`): its position is the source position the
    /// replicator applied, and cannot be checked on the endpoint itself.
    pub(crate) replica: bool,
    /// May get traffic: not retired, not declared down.
    pub(crate) serving: bool,
    /// Writable but not the accepted primary: no traffic at all.
    pub(crate) fenced: bool,
    /// The accepted primary of its cluster.
    pub(crate) primary: bool,
    /// A standby following its cluster's accepted primary (same system, same timeline).
    pub(crate) reader: bool,
    /// Current on a primary, replayed on a standby.
    pub(crate) position: Option<Position>,
    /// A standby's lag behind the accepted primary.
    pub(crate) lag: Option<Duration>,
    pub(crate) outstanding: usize,
    pub(crate) latency: Option<Duration>,
    pub(crate) weight: u32,
}

/// The router's answer for one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Run on the candidate at this index.
    Use(usize),
    /// Run on the candidate at this index, after checking on the same connection that it has
    /// replayed the position.
    UseChecked(usize, Position),
    /// Nothing fits now; wait for a change (an endpoint coming back, a primary being accepted)
    /// until the deadline.
    Wait(String),
    /// Every fitting endpoint was tried and failed: give up with the last error.
    Exhausted,
    /// The message can never run where it asks (e.g. a fenced endpoint).
    Refuse(String),
}

/// Everything a decision depends on besides the candidates.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ask<'a> {
    pub(crate) intent: Intent,
    pub(crate) scope: &'a Scope,
    pub(crate) fallback_to_primary: bool,
    pub(crate) policy: ReadPolicy,
    /// Standbys lagging more get no reads (`router.max_lag`, or the message's own, tighter).
    pub(crate) max_lag: Duration,
    /// Whether the lag bound is the message's own: then an unknown lag does not qualify.
    pub(crate) strict_lag: bool,
    /// A read must see this position.
    pub(crate) after: Option<Position>,
    /// Endpoints this message already failed on (or found not to have replayed `after`).
    pub(crate) excluded: &'a [Arc<str>],
}

/// Picks the endpoint for one attempt.
///
/// - An explicit endpoint is used whatever its role, once it serves (never when fenced).
/// - A write goes to the cluster's accepted primary, or waits for one.
/// - A read goes to a serving standby that follows the accepted primary and lags at most
///   `max_lag`, chosen by the read policy; with `after`, only to one known to have replayed the
///   position, else to one checked on its connection, else to the primary. With no standby left,
///   the primary serves the read if `fallback_to_primary` (or if the cluster has no standby).
pub(crate) fn decide(
    ask: Ask<'_>,
    candidates: &[Candidate<'_>],
    balancer: &mut Balancer,
) -> Decision {
    let tried = |c: &Candidate<'_>| ask.excluded.contains(c.name);
    match ask.scope {
        Scope::Endpoint(name) => match candidates.iter().position(|c| c.name == name) {
            Some(index) if candidates[index].fenced => Decision::Refuse(format!(
                "endpoint `{name}` is fenced (writable, but not the accepted primary): re-admit it \
                 with Herd::readmit first"
            )),
            Some(index)
                if candidates[index].replica
                    && ask.intent == Intent::Read
                    && ask.after.is_some_and(|after| {
                        candidates[index].position.is_none_or(|p| p < after)
                    }) =>
            {
                Decision::Wait(match candidates[index].position {
                    Some(applied) => format!(
                        "replica `{name}` has applied its cluster's writes up to {applied}, not \
                         yet the position asked for"
                    ),
                    None => format!(
                        "replica `{name}` has no applied position from its cluster's primary: \
                         this herd's replicator has applied no batch to it since it started, \
                         since the last failover or since its last session ended (a replica \
                         it does not replicate to, or whose lock another herd holds, never has \
                         one)"
                    ),
                })
            }
            Some(index) if candidates[index].serving && !tried(&candidates[index]) => {
                match ask.after {
                    Some(after)
                        if ask.intent == Intent::Read
                            && candidates[index].position.is_none_or(|p| p < after) =>
                    {
                        Decision::UseChecked(index, after)
                    }
                    _ => Decision::Use(index),
                }
            }
            Some(index) if candidates[index].serving => Decision::Wait(format!(
                "endpoint `{name}` has not replayed the position asked for"
            )),
            Some(_) => Decision::Wait(format!("endpoint `{name}` is down")),
            None => Decision::Wait(format!("endpoint `{name}` is restarting")),
        },
        Scope::Cluster(cluster) => {
            let in_cluster = |c: &&Candidate<'_>| c.cluster == &**cluster;
            let primary = candidates
                .iter()
                .position(|c| c.cluster == &**cluster && c.primary);
            if ask.intent == Intent::Write {
                return match primary {
                    Some(index) if candidates[index].serving => Decision::Use(index),
                    Some(_) => {
                        Decision::Wait(format!("the primary of cluster `{cluster}` is unreachable"))
                    }
                    None => Decision::Wait(format!(
                        "no primary is accepted in cluster `{cluster}` (starting, or failing over)"
                    )),
                };
            }
            let fresh_enough = |c: &Candidate<'_>| match c.lag {
                Some(lag) => lag <= ask.max_lag,
                None => !ask.strict_lag,
            };
            let readers: Vec<usize> = (0..candidates.len())
                .filter(|&i| {
                    let c = &candidates[i];
                    in_cluster(&c)
                        && c.reader
                        && c.serving
                        && !c.fenced
                        && !tried(c)
                        && fresh_enough(c)
                })
                .collect();
            let pick = |indexes: &[usize], balancer: &mut Balancer| {
                let loads: Vec<Load> = indexes
                    .iter()
                    .map(|&i| Load {
                        name: Arc::clone(candidates[i].name),
                        outstanding: candidates[i].outstanding,
                        latency: candidates[i].latency,
                        weight: candidates[i].weight,
                    })
                    .collect();
                indexes[balancer.pick(ask.policy, &loads)]
            };
            match ask.after {
                None if !readers.is_empty() => return Decision::Use(pick(&readers, balancer)),
                Some(after) if !readers.is_empty() => {
                    let known: Vec<usize> = readers
                        .iter()
                        .copied()
                        .filter(|&i| candidates[i].position.is_some_and(|p| p >= after))
                        .collect();
                    if !known.is_empty() {
                        return Decision::Use(pick(&known, balancer));
                    }
                    // None is known to have it yet: check the most advanced one.
                    let best = readers
                        .iter()
                        .copied()
                        .max_by_key(|&i| candidates[i].position)
                        .unwrap_or(readers[0]);
                    return Decision::UseChecked(best, after);
                }
                _ => {}
            }
            let any_standby = candidates.iter().any(|c| in_cluster(&c) && c.reader);
            let primary_may_read = ask.fallback_to_primary || !any_standby;
            if primary_may_read {
                if let Some(index) = primary {
                    let c = &candidates[index];
                    if c.serving && !tried(c) {
                        return Decision::Use(index);
                    }
                }
            }
            let untried_left = candidates.iter().any(|c| {
                in_cluster(&c)
                    && c.serving
                    && !tried(c)
                    && ((c.reader && fresh_enough(c)) || (c.primary && primary_may_read))
            });
            if !ask.excluded.is_empty() && !untried_left {
                Decision::Exhausted
            } else if primary.is_none() && !any_standby {
                Decision::Wait(format!(
                    "no primary is accepted and no standby serves in cluster `{cluster}`"
                ))
            } else if primary_may_read {
                Decision::Wait(format!(
                    "no standby and not the primary of cluster `{cluster}` can serve the read"
                ))
            } else {
                Decision::Wait(format!(
                    "no standby of cluster `{cluster}` can serve the read (fallback_to_primary is off)"
                ))
            }
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Report the error.
    No,
    /// Try another fitting endpoint.
    Elsewhere,
    /// Try the same endpoint again, after a short wait or a change.
    Again,
}

/// Whether a failed attempt may be tried again (within the deadline, which the caller checks).
///
/// - A read that failed for a connection reason goes to another endpoint (or, when its endpoint
///   was named explicitly, to the same one again).
/// - A write goes again only when it provably never reached the server, or when the message is
///   marked idempotent (and can run again). A write whose commit may have happened is never
///   retried otherwise.
/// - A refusal by the server, a panic, or a mapping error is never retried.
pub(crate) fn retry(
    intent: Intent,
    kind: ErrorKind,
    stage: Stage,
    idempotent: bool,
    rerunnable: bool,
    explicit: bool,
) -> Retry {
    let transient = matches!(
        kind,
        ErrorKind::Connection | ErrorKind::Stopped | ErrorKind::Timeout
    );
    match intent {
        // The endpoint's actor is restarting (its pool closed): its next generation will do.
        Intent::Read if kind == ErrorKind::Stopped => Retry::Again,
        Intent::Read if transient || kind == ErrorKind::CommitUnknown => {
            if explicit {
                Retry::Again
            } else {
                Retry::Elsewhere
            }
        }
        Intent::Write if transient && stage == Stage::NotSent => Retry::Again,
        Intent::Write
            if idempotent
                && rerunnable
                && matches!(
                    kind,
                    ErrorKind::Connection | ErrorKind::CommitUnknown | ErrorKind::Stopped
                ) =>
        {
            Retry::Again
        }
        _ => Retry::No,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{EndpointSettings, Role};

    struct Node {
        name: Arc<str>,
        cluster: &'static str,
        primary: bool,
        reader: bool,
        serving: bool,
        fenced: bool,
        position: Option<Position>,
        lag: Option<Duration>,
    }

    fn node(name: &str, cluster: &'static str, primary: bool, reader: bool) -> Node {
        Node {
            name: Arc::from(name),
            cluster,
            primary,
            reader,
            serving: true,
            fenced: false,
            position: None,
            lag: Some(Duration::ZERO),
        }
    }

    fn herd() -> Vec<Node> {
        vec![
            node("primary", "main", true, false),
            node("standby_1", "main", false, true),
            node("standby_2", "main", false, true),
            node("backup", "main", false, false),
            node("tenant_primary", "tenant", true, false),
        ]
    }

    fn candidates(nodes: &[Node]) -> Vec<Candidate<'_>> {
        nodes
            .iter()
            .map(|n| Candidate {
                name: &n.name,
                cluster: n.cluster,
                replica: n.name.starts_with("replica"),
                serving: n.serving,
                fenced: n.fenced,
                primary: n.primary,
                reader: n.reader,
                position: n.position,
                lag: n.lag,
                outstanding: 0,
                latency: None,
                weight: 1,
            })
            .collect()
    }

    fn ask<'a>(intent: Intent, scope: &'a Scope, excluded: &'a [Arc<str>]) -> Ask<'a> {
        Ask {
            intent,
            scope,
            fallback_to_primary: true,
            policy: ReadPolicy::RoundRobin,
            max_lag: Duration::from_secs(10),
            strict_lag: false,
            after: None,
            excluded,
        }
    }

    fn main() -> Scope {
        Scope::Cluster(Arc::from("main"))
    }

    fn chosen(nodes: &[Node], decision: &Decision) -> String {
        match decision {
            Decision::Use(i) => nodes[*i].name.to_string(),
            Decision::UseChecked(i, p) => format!("{} checked {p}", nodes[*i].name),
            other => format!("{other:?}"),
        }
    }

    fn run(nodes: &[Node], ask: Ask<'_>) -> String {
        chosen(
            nodes,
            &decide(ask, &candidates(nodes), &mut Balancer::default()),
        )
    }

    #[test]
    fn a_read_named_at_a_replica_waits_until_the_replicator_applied_its_position() {
        let mut nodes = herd();
        let mut replica = node("replica", "main", false, false);
        replica.position = Some(Position::new(100));
        nodes.push(replica);
        let scope = Scope::Endpoint(Arc::from("replica"));
        let candidates = candidates(&nodes);
        let mut balancer = Balancer::default();
        let index = candidates.len() - 1;
        let mut read = ask(Intent::Read, &scope, &[]);
        read.after = Some(Position::new(100));
        assert_eq!(
            decide(read, &candidates, &mut balancer),
            Decision::Use(index)
        );
        read.after = Some(Position::new(101));
        assert!(matches!(
            decide(read, &candidates, &mut balancer),
            Decision::Wait(why) if why.contains("up to 0/64")
        ));
        read.after = None;
        assert_eq!(
            decide(read, &candidates, &mut balancer),
            Decision::Use(index)
        );
        // Nothing applied from the accepted primary: the wait says why there is no position.
        nodes.last_mut().expect("the replica").position = None;
        let candidates = super::tests::candidates(&nodes);
        read.after = Some(Position::new(1));
        assert!(matches!(
            decide(read, &candidates, &mut balancer),
            Decision::Wait(why) if why.contains("no applied position")
        ));
    }

    #[test]
    fn writes_go_to_the_accepted_primary_of_their_cluster() {
        let nodes = herd();
        let scope = main();
        assert_eq!(run(&nodes, ask(Intent::Write, &scope, &[])), "primary");
        let tenant = Scope::Cluster(Arc::from("tenant"));
        assert_eq!(
            run(&nodes, ask(Intent::Write, &tenant, &[])),
            "tenant_primary"
        );
    }

    #[test]
    fn without_an_accepted_primary_writes_wait() {
        let mut nodes = herd();
        nodes[0].primary = false;
        let scope = main();
        let decision = run(&nodes, ask(Intent::Write, &scope, &[]));
        assert!(decision.contains("no primary is accepted"), "{decision}");
        nodes[0].primary = true;
        nodes[0].serving = false;
        let decision = run(&nodes, ask(Intent::Write, &scope, &[]));
        assert!(decision.contains("unreachable"), "{decision}");
    }

    #[test]
    fn reads_spread_over_the_standbys_only() {
        let nodes = herd();
        let scope = main();
        let cands = candidates(&nodes);
        let mut balancer = Balancer::default();
        let picks: Vec<String> = (0..4)
            .map(|_| {
                chosen(
                    &nodes,
                    &decide(ask(Intent::Read, &scope, &[]), &cands, &mut balancer),
                )
            })
            .collect();
        assert_eq!(picks, ["standby_1", "standby_2", "standby_1", "standby_2"]);
    }

    #[test]
    fn reads_fall_back_to_the_primary_when_every_standby_is_down() {
        let mut nodes = herd();
        nodes[1].serving = false;
        nodes[2].serving = false;
        let scope = main();
        assert_eq!(run(&nodes, ask(Intent::Read, &scope, &[])), "primary");
        let mut no_fallback = ask(Intent::Read, &scope, &[]);
        no_fallback.fallback_to_primary = false;
        let decision = run(&nodes, no_fallback);
        assert!(decision.contains("fallback_to_primary"), "{decision}");
    }

    #[test]
    fn lagging_standbys_get_no_reads() {
        let mut nodes = herd();
        nodes[1].lag = Some(Duration::from_secs(30));
        let scope = main();
        for _ in 0..3 {
            assert_eq!(run(&nodes, ask(Intent::Read, &scope, &[])), "standby_2");
        }
        // A message's own bound is strict: an unknown lag does not qualify.
        nodes[2].lag = None;
        let mut strict = ask(Intent::Read, &scope, &[]);
        strict.max_lag = Duration::from_millis(100);
        strict.strict_lag = true;
        assert_eq!(run(&nodes, strict), "primary");
        // The default bound lets an unknown lag through.
        assert_eq!(run(&nodes, ask(Intent::Read, &scope, &[])), "standby_2");
    }

    #[test]
    fn fenced_and_orphaned_standbys_get_no_reads() {
        let mut nodes = herd();
        nodes[1].fenced = true;
        nodes[2].reader = false; // follows a primary that is no longer accepted
        let scope = main();
        assert_eq!(run(&nodes, ask(Intent::Read, &scope, &[])), "primary");
    }

    #[test]
    fn read_your_writes_goes_where_the_position_is_known_then_checks_then_the_primary() {
        let mut nodes = herd();
        nodes[1].position = Some(Position::new(500));
        nodes[2].position = Some(Position::new(900));
        let scope = main();
        let mut after = ask(Intent::Read, &scope, &[]);
        after.after = Some(Position::new(800));
        assert_eq!(
            run(&nodes, after),
            "standby_2",
            "only standby_2 is known to have it"
        );
        after.after = Some(Position::new(1000));
        assert_eq!(
            run(&nodes, after),
            "standby_2 checked 0/3E8",
            "none is known: the most advanced is checked"
        );
        let tried: Vec<Arc<str>> = vec![Arc::from("standby_2")];
        let mut after_tried = ask(Intent::Read, &scope, &tried);
        after_tried.after = Some(Position::new(1000));
        assert_eq!(run(&nodes, after_tried), "standby_1 checked 0/3E8");
        let both: Vec<Arc<str>> = vec![Arc::from("standby_1"), Arc::from("standby_2")];
        let mut after_both = ask(Intent::Read, &scope, &both);
        after_both.after = Some(Position::new(1000));
        assert_eq!(run(&nodes, after_both), "primary");
    }

    #[test]
    fn a_failed_read_moves_on_then_gives_up() {
        let nodes = herd();
        let scope = main();
        let one: Vec<Arc<str>> = vec![Arc::from("standby_1")];
        assert_eq!(run(&nodes, ask(Intent::Read, &scope, &one)), "standby_2");
        let all: Vec<Arc<str>> = vec![
            Arc::from("standby_1"),
            Arc::from("standby_2"),
            Arc::from("primary"),
        ];
        assert_eq!(run(&nodes, ask(Intent::Read, &scope, &all)), "Exhausted");
    }

    #[test]
    fn an_explicit_target_ignores_roles_but_not_fencing() {
        let mut nodes = herd();
        let scope = Scope::Endpoint(Arc::from("backup"));
        for intent in [Intent::Read, Intent::Write] {
            assert_eq!(run(&nodes, ask(intent, &scope, &[])), "backup");
        }
        nodes[3].fenced = true;
        let decision = run(&nodes, ask(Intent::Read, &scope, &[]));
        assert!(decision.contains("fenced"), "{decision}");
    }

    fn directory() -> Directory {
        let mut settings = Settings::default();
        for (name, cluster) in [
            ("primary", "main"),
            ("standby_1", "main"),
            ("t_primary", "tenant"),
        ] {
            settings.endpoints.insert(
                name.to_owned(),
                EndpointSettings::new(Role::Primary, "h", "d", "u").with_cluster(cluster),
            );
        }
        Directory::from_settings(&settings)
    }

    #[test]
    fn resolution_order_is_target_rule_cluster_default() {
        let directory = directory();
        let endpoint = |n: &str| Scope::Endpoint(Arc::from(n));
        let cluster = |n: &str| Scope::Cluster(Arc::from(n));
        assert_eq!(
            resolve(
                &directory,
                Some("standby_1"),
                Route::Cluster("tenant".into()),
                None
            )
            .ok(),
            Some(endpoint("standby_1"))
        );
        assert_eq!(
            resolve(
                &directory,
                None,
                Route::Endpoint("t_primary".into()),
                Some("main")
            )
            .ok(),
            Some(endpoint("t_primary"))
        );
        assert_eq!(
            resolve(&directory, None, Route::Default, Some("tenant")).ok(),
            Some(cluster("tenant"))
        );
        assert_eq!(
            resolve(&directory, None, Route::Default, None).ok(),
            Some(cluster("main"))
        );
    }

    #[test]
    fn unknown_names_are_clear_errors() {
        let directory = directory();
        let error = resolve(&directory, Some("nope"), Route::Default, None).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::UnknownTarget);
        assert!(error.to_string().contains("`nope`"), "{error}");
        assert!(
            error.to_string().contains("`standby_1`"),
            "lists the known ones: {error}"
        );
        let error = resolve(&directory, None, Route::Default, Some("other")).unwrap_err();
        assert!(error.to_string().contains("cluster `other`"), "{error}");
    }

    #[test]
    fn retry_rules() {
        use ErrorKind::*;
        use Stage::*;
        // Reads move on after connection trouble, never after a refusal.
        assert_eq!(
            retry(Intent::Read, Connection, Committing, false, true, false),
            Retry::Elsewhere
        );
        assert_eq!(
            retry(Intent::Read, Connection, Committing, false, true, true),
            Retry::Again
        );
        assert_eq!(
            retry(Intent::Read, Sql, Committing, false, true, false),
            Retry::No
        );
        assert_eq!(
            retry(Intent::Read, Stopped, NotSent, false, true, false),
            Retry::Again,
            "a pool closed by a restart: wait for the next generation"
        );
        // Writes go again only when nothing was sent...
        assert_eq!(
            retry(Intent::Write, Connection, NotSent, false, true, false),
            Retry::Again
        );
        assert_eq!(
            retry(Intent::Write, Connection, InTransaction, false, true, false),
            Retry::No
        );
        assert_eq!(
            retry(Intent::Write, CommitUnknown, Committing, false, true, false),
            Retry::No
        );
        // ...or when they are idempotent and can run again.
        assert_eq!(
            retry(Intent::Write, CommitUnknown, Committing, true, true, false),
            Retry::Again
        );
        assert_eq!(
            retry(Intent::Write, CommitUnknown, Committing, true, false, false),
            Retry::No
        );
        assert_eq!(
            retry(Intent::Write, Sql, NotSent, true, true, false),
            Retry::No
        );
        assert_eq!(
            retry(Intent::Write, Panicked, Committing, true, true, false),
            Retry::No
        );
    }
}
