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
    query::{Intent, Stage},
    settings::{ReadPolicy, Role, Settings, DEFAULT_CLUSTER},
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
    pub(crate) role: Role,
    pub(crate) cluster: &'a str,
    /// Not known to be unreachable.
    pub(crate) available: bool,
    pub(crate) outstanding: usize,
    pub(crate) latency: Option<Duration>,
    pub(crate) weight: u32,
}

/// The router's answer for one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Run on the candidate at this index.
    Use(usize),
    /// Nothing fits now; wait for a change (an endpoint coming back) until the deadline.
    Wait(String),
    /// Every fitting endpoint was tried and failed: give up with the last error.
    Exhausted,
}

/// Everything a decision depends on besides the candidates.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ask<'a> {
    pub(crate) intent: Intent,
    pub(crate) scope: &'a Scope,
    pub(crate) fallback_to_primary: bool,
    pub(crate) policy: ReadPolicy,
    /// Endpoints this message already failed on.
    pub(crate) excluded: &'a [Arc<str>],
}

/// Picks the endpoint for one attempt.
///
/// - An explicit endpoint is used whatever its role, once it is available.
/// - A write goes to the cluster's primary.
/// - A read goes to an available standby of the cluster, chosen by the read policy; when there
///   is none, to the primary if `fallback_to_primary`.
pub(crate) fn decide(
    ask: Ask<'_>,
    candidates: &[Candidate<'_>],
    balancer: &mut Balancer,
) -> Decision {
    let tried = |c: &Candidate<'_>| ask.excluded.contains(c.name);
    match ask.scope {
        Scope::Endpoint(name) => match candidates.iter().position(|c| c.name == name) {
            Some(index) if candidates[index].available => Decision::Use(index),
            Some(_) => Decision::Wait(format!("endpoint `{name}` is unreachable")),
            None => Decision::Wait(format!("endpoint `{name}` is restarting")),
        },
        Scope::Cluster(cluster) => {
            let in_cluster = |c: &&Candidate<'_>| c.cluster == &**cluster;
            let primary = candidates
                .iter()
                .position(|c| c.cluster == &**cluster && c.role == Role::Primary);
            if ask.intent == Intent::Write {
                return match primary {
                    Some(index) if candidates[index].available => Decision::Use(index),
                    Some(_) => {
                        Decision::Wait(format!("the primary of cluster `{cluster}` is unreachable"))
                    }
                    None => {
                        Decision::Wait(format!("the primary of cluster `{cluster}` is not running"))
                    }
                };
            }
            let readers: Vec<usize> = (0..candidates.len())
                .filter(|&i| {
                    let c = &candidates[i];
                    in_cluster(&c) && c.role == Role::Standby && c.available && !tried(c)
                })
                .collect();
            if !readers.is_empty() {
                let loads: Vec<Load> = readers
                    .iter()
                    .map(|&i| Load {
                        name: Arc::clone(candidates[i].name),
                        outstanding: candidates[i].outstanding,
                        latency: candidates[i].latency,
                        weight: candidates[i].weight,
                    })
                    .collect();
                return Decision::Use(readers[balancer.pick(ask.policy, &loads)]);
            }
            let any_standby = candidates
                .iter()
                .any(|c| in_cluster(&c) && c.role == Role::Standby);
            if ask.fallback_to_primary || !any_standby {
                if let Some(index) = primary {
                    let c = &candidates[index];
                    if c.available && !tried(c) {
                        return Decision::Use(index);
                    }
                }
            }
            let untried_left = candidates.iter().any(|c| {
                in_cluster(&c)
                    && !tried(c)
                    && (c.role == Role::Standby
                        || (c.role == Role::Primary && (ask.fallback_to_primary || !any_standby)))
            });
            if !ask.excluded.is_empty() && !untried_left {
                Decision::Exhausted
            } else if ask.fallback_to_primary || !any_standby {
                Decision::Wait(format!(
                    "no standby and not the primary of cluster `{cluster}` can be reached"
                ))
            } else {
                Decision::Wait(format!(
                    "no standby of cluster `{cluster}` can be reached (fallback_to_primary is off)"
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
    use crate::settings::EndpointSettings;

    fn candidate(
        name: &str,
        role: Role,
        cluster: &'static str,
        available: bool,
    ) -> Candidate<'static> {
        Candidate {
            name: Box::leak(Box::new(Arc::from(name))),
            role,
            cluster,
            available,
            outstanding: 0,
            latency: None,
            weight: 1,
        }
    }

    fn herd() -> Vec<Candidate<'static>> {
        vec![
            candidate("primary", Role::Primary, "main", true),
            candidate("standby_1", Role::Standby, "main", true),
            candidate("standby_2", Role::Standby, "main", true),
            candidate("backup", Role::Backup, "main", true),
            candidate("tenant_primary", Role::Primary, "tenant", true),
        ]
    }

    fn ask<'a>(intent: Intent, scope: &'a Scope, excluded: &'a [Arc<str>]) -> Ask<'a> {
        Ask {
            intent,
            scope,
            fallback_to_primary: true,
            policy: ReadPolicy::RoundRobin,
            excluded,
        }
    }

    fn main() -> Scope {
        Scope::Cluster(Arc::from("main"))
    }

    fn name(candidates: &[Candidate<'_>], decision: &Decision) -> String {
        match decision {
            Decision::Use(i) => candidates[*i].name.to_string(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn writes_go_to_the_primary_of_their_cluster() {
        let candidates = herd();
        let mut balancer = Balancer::default();
        let scope = main();
        for _ in 0..3 {
            let decision = decide(ask(Intent::Write, &scope, &[]), &candidates, &mut balancer);
            assert_eq!(name(&candidates, &decision), "primary");
        }
        let tenant = Scope::Cluster(Arc::from("tenant"));
        let decision = decide(ask(Intent::Write, &tenant, &[]), &candidates, &mut balancer);
        assert_eq!(name(&candidates, &decision), "tenant_primary");
    }

    #[test]
    fn reads_spread_over_standbys_only() {
        let candidates = herd();
        let mut balancer = Balancer::default();
        let scope = main();
        let chosen: Vec<String> = (0..4)
            .map(|_| {
                let decision = decide(ask(Intent::Read, &scope, &[]), &candidates, &mut balancer);
                name(&candidates, &decision)
            })
            .collect();
        assert_eq!(chosen, ["standby_1", "standby_2", "standby_1", "standby_2"]);
    }

    #[test]
    fn reads_fall_back_to_the_primary_when_no_standby_is_reachable() {
        let mut candidates = herd();
        candidates[1].available = false;
        candidates[2].available = false;
        let scope = main();
        let decision = decide(
            ask(Intent::Read, &scope, &[]),
            &candidates,
            &mut Balancer::default(),
        );
        assert_eq!(name(&candidates, &decision), "primary");

        let mut no_fallback = ask(Intent::Read, &scope, &[]);
        no_fallback.fallback_to_primary = false;
        let decision = decide(no_fallback, &candidates, &mut Balancer::default());
        assert!(
            matches!(decision, Decision::Wait(ref why) if why.contains("fallback_to_primary")),
            "{decision:?}"
        );
    }

    #[test]
    fn a_cluster_without_standbys_reads_from_its_primary() {
        let candidates = herd();
        let tenant = Scope::Cluster(Arc::from("tenant"));
        let mut no_fallback = ask(Intent::Read, &tenant, &[]);
        no_fallback.fallback_to_primary = false;
        let decision = decide(no_fallback, &candidates, &mut Balancer::default());
        assert_eq!(name(&candidates, &decision), "tenant_primary");
    }

    #[test]
    fn an_unreachable_primary_makes_writes_wait() {
        let mut candidates = herd();
        candidates[0].available = false;
        let scope = main();
        let decision = decide(
            ask(Intent::Write, &scope, &[]),
            &candidates,
            &mut Balancer::default(),
        );
        assert!(
            matches!(decision, Decision::Wait(ref why) if why.contains("unreachable")),
            "{decision:?}"
        );
        let decision = decide(
            ask(Intent::Write, &scope, &[]),
            &candidates[1..],
            &mut Balancer::default(),
        );
        assert!(
            matches!(decision, Decision::Wait(ref why) if why.contains("not running")),
            "{decision:?}"
        );
    }

    #[test]
    fn a_failed_read_moves_on_then_gives_up() {
        let candidates = herd();
        let scope = main();
        let mut balancer = Balancer::default();
        let one: Vec<Arc<str>> = vec![Arc::from("standby_1")];
        let decision = decide(ask(Intent::Read, &scope, &one), &candidates, &mut balancer);
        assert_eq!(name(&candidates, &decision), "standby_2");
        let two: Vec<Arc<str>> = vec![Arc::from("standby_1"), Arc::from("standby_2")];
        let decision = decide(ask(Intent::Read, &scope, &two), &candidates, &mut balancer);
        assert_eq!(name(&candidates, &decision), "primary");
        let all: Vec<Arc<str>> = vec![
            Arc::from("standby_1"),
            Arc::from("standby_2"),
            Arc::from("primary"),
        ];
        let decision = decide(ask(Intent::Read, &scope, &all), &candidates, &mut balancer);
        assert_eq!(decision, Decision::Exhausted);
    }

    #[test]
    fn an_explicit_target_ignores_roles() {
        let candidates = herd();
        let scope = Scope::Endpoint(Arc::from("backup"));
        for intent in [Intent::Read, Intent::Write] {
            let decision = decide(
                ask(intent, &scope, &[]),
                &candidates,
                &mut Balancer::default(),
            );
            assert_eq!(name(&candidates, &decision), "backup");
        }
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
