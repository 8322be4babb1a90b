//! Installing what the replicator needs, outside a running herd (`pgherd replicator install`).

use std::fmt;

use super::install as objects;
use crate::{
    database::DatabaseSpec,
    error::{Error, ErrorKind},
    settings::{CaptureMode, Role, Settings},
};

/// What [`install`] did, one line per step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InstallReport {
    /// The steps, for people.
    pub steps: Vec<String>,
}

impl fmt::Display for InstallReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for step in &self.steps {
            writeln!(f, "{step}")?;
        }
        Ok(())
    }
}

/// Installs, idempotently, what the replicator needs: on each cluster's primary the change
/// tables and capture triggers (`trigger` mode) or each target's publication (`logical` mode),
/// and on each target the progress table, checking that every replicated table exists there
/// with its primary key and columns. A running herd does the same by itself when something is
/// missing; this call (or `pgherd replicator install`) does it ahead of time, and re-applies the
/// triggers after `replicator.notify` changed.
///
/// # Errors
///
/// A [`Config`](ErrorKind::Config) error when the replicator is off, a table is missing or has
/// no primary key; a connection or SQL error naming the endpoint otherwise.
pub async fn install(settings: &Settings) -> Result<InstallReport, Error> {
    let replicator = &settings.replicator;
    if !replicator.enabled() {
        return Err(Error::new(ErrorKind::Config).with_detail(
            "the replicator is off: list the tables to replicate in replicator.tables",
        ));
    }
    let mut report = InstallReport::default();
    let targets = settings.replication_targets();
    for cluster in settings.clusters() {
        let cluster_targets: Vec<_> = targets
            .iter()
            .filter(|(_, e)| e.cluster == cluster)
            .collect();
        if cluster_targets.is_empty() {
            continue;
        }
        let Some((primary, endpoint)) = settings
            .endpoints_with_role(Role::Primary)
            .find(|(_, e)| e.cluster == cluster)
        else {
            continue;
        };
        let source = connect(settings, primary, endpoint).await?;
        let tables = objects::tables(&source, replicator, primary).await?;
        let source_error = |e| Error::from_postgres(e).with_endpoint(&primary.into());
        match replicator.mode {
            CaptureMode::Trigger => {
                objects::install_triggers(&source, replicator, &tables)
                    .await
                    .map_err(source_error)?;
                report.steps.push(format!(
                    "{primary}: change tables and capture triggers on {} table(s) in schema {}",
                    tables.len(),
                    replicator.schema
                ));
            }
            CaptureMode::Logical => {
                for (target, _) in &cluster_targets {
                    objects::install_publication(&source, replicator, target, &tables, false)
                        .await
                        .map_err(source_error)?;
                    report.steps.push(format!(
                        "{primary}: publication {} for {} table(s)",
                        objects::publication(replicator, target),
                        tables.len()
                    ));
                }
            }
        }
        for (name, endpoint) in &cluster_targets {
            let target = connect(settings, name, endpoint).await?;
            target
                .batch_execute(&objects::progress_sql(&replicator.schema))
                .await
                .map_err(|e| Error::from_postgres(e).with_endpoint(&(*name).into()))?;
            for table in &tables {
                objects::target_types(&target, table, name).await?;
            }
            report.steps.push(format!(
                "{name}: progress table {}.progress; all {} table(s) present",
                replicator.schema,
                tables.len()
            ));
        }
    }
    Ok(report)
}

async fn connect(
    settings: &Settings,
    name: &str,
    endpoint: &crate::settings::EndpointSettings,
) -> Result<tokio_postgres::Client, Error> {
    let spec = DatabaseSpec::new(name, endpoint, &settings.pool_for(name))?;
    spec.connector()
        .connect()
        .await
        .map_err(|e| Error::from_postgres(e).with_endpoint(&name.into()))
}

/// How far one target is behind, read from the target's progress row and the primary (see
/// [`survey`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TargetLag {
    /// The target endpoint.
    pub target: String,
    /// Batches applied to it so far (its progress row).
    pub batch: i64,
    /// The source position it holds everything up to, once a batch was applied.
    pub applied: Option<crate::Position>,
    /// Changes on the primary it has not applied yet, counted as the keys the capture triggers
    /// logged (a row changed by two statements counts twice; an update logs its old and new
    /// key). `trigger` mode only: `None` in `logical` mode, where counting would mean decoding.
    pub lag_rows: Option<u64>,
    /// WAL bytes of the primary after `applied`.
    pub lag_bytes: Option<u64>,
    /// How long ago its last batch was applied, when it is behind (zero when nothing is
    /// pending). In `logical` mode "behind" means the primary wrote WAL after the applied
    /// position, which may hold nothing for this target: an upper bound.
    pub lag: Option<std::time::Duration>,
    /// Why the numbers are missing, when they are.
    pub problem: Option<String>,
}

/// Reads how far each replication target is behind its cluster's primary, outside a running
/// herd (`pgherd status` shows it). The primary is the endpoint of the target's cluster that
/// accepts writes and is the system the target was filled from (its identifier, in the target's
/// progress row): after a failover, the promoted standby (the one on the timeline the target
/// last applied, else the latest).
///
/// # Errors
///
/// A [`Config`](ErrorKind::Config) error when the replicator is off. An unreachable endpoint is
/// not an error: its line says why in `problem`.
pub async fn survey(settings: &Settings) -> Result<Vec<TargetLag>, Error> {
    /// How long one target's measure may take: a server that stopped answering (tokio-postgres'
    /// connect timeout covers only the connection) must not hang `pgherd status`.
    const SURVEY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
    let replicator = &settings.replicator;
    if !replicator.enabled() {
        return Err(Error::new(ErrorKind::Config).with_detail("the replicator is off"));
    }
    let mut lags = Vec::new();
    for (name, endpoint) in settings.replication_targets() {
        // The configured primary first, then what may have replaced it.
        let mut sources: Vec<(&str, &crate::settings::EndpointSettings)> = settings
            .endpoints
            .iter()
            .filter(|(source, e)| {
                e.cluster == endpoint.cluster
                    && *source != name
                    && matches!(e.role, Role::Primary | Role::Standby | Role::Backup)
            })
            .map(|(name, e)| (name.as_str(), e))
            .collect();
        sources.sort_by_key(|(_, e)| e.role != Role::Primary);
        let mut lag = TargetLag {
            target: name.to_owned(),
            batch: 0,
            applied: None,
            lag_rows: None,
            lag_bytes: None,
            lag: None,
            problem: None,
        };
        let measured = tokio::time::timeout(
            SURVEY_TIMEOUT,
            measure(settings, name, endpoint, &sources, &mut lag),
        );
        match measured.await {
            Ok(Ok(())) => {}
            Ok(Err(problem)) => lag.problem = Some(problem.to_string()),
            Err(_) => {
                lag.problem = Some(format!(
                    "no answer within {} s from the target or its cluster's endpoints (a server \
                     that stopped answering, a network cut)",
                    SURVEY_TIMEOUT.as_secs()
                ));
            }
        }
        lags.push(lag);
    }
    Ok(lags)
}

/// The endpoint among `sources` that accepts writes and is the system the target was filled
/// from (`filled_from`, its identifier), with its connection: the one on the timeline the
/// target last applied (`applied_timeline`), else the one on the latest timeline (a primary
/// that came back writable after its standby was promoted stays on the old one; a standby
/// promoted outside the herd while it replicates from the primary is on a later one). Before
/// the target was filled from anything, only a configured primary or a promoted standby.
async fn find_source<'a>(
    settings: &Settings,
    sources: &[(&'a str, &crate::settings::EndpointSettings)],
    filled_from: Option<&str>,
    applied_timeline: Option<i32>,
) -> Result<Option<(&'a str, tokio_postgres::Client)>, Error> {
    let mut best: Option<(&str, tokio_postgres::Client, i32)> = None;
    let mut last_error = None;
    for &(name, endpoint) in sources {
        if filled_from.is_none() && endpoint.role == Role::Backup {
            continue;
        }
        let identity = async {
            let client = connect(settings, name, endpoint).await?;
            let query_error = |e| Error::from_postgres(e).with_endpoint(&name.into());
            let in_recovery: bool = client
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .map_err(query_error)?
                .get(0);
            if in_recovery {
                return Ok(None);
            }
            let row = client
                .query_one(&format!("SELECT {}", super::run::Identity::SQL), &[])
                .await
                .map_err(query_error)?;
            Ok::<_, Error>(Some((
                client,
                row.get::<_, String>(0),
                row.get::<_, i32>(1),
            )))
        };
        match identity.await {
            Err(error) => last_error = Some(error),
            Ok(None) => {}
            Ok(Some((_, system_id, _))) if filled_from.is_some_and(|s| s != system_id) => {}
            Ok(Some((client, _, timeline))) => {
                if prefer(
                    timeline,
                    best.as_ref().map(|(_, _, t)| *t),
                    applied_timeline,
                ) {
                    best = Some((name, client, timeline));
                }
            }
        }
    }
    match (best, last_error) {
        (Some((name, client, _)), _) => Ok(Some((name, client))),
        (None, Some(error)) => Err(error),
        (None, None) if sources.is_empty() => Ok(None),
        (None, None) => Err(Error::new(ErrorKind::Config).with_detail(
            "no endpoint of the target's cluster accepts writes as the system the target was \
             filled from",
        )),
    }
}

/// Whether a writable endpoint on `timeline` is a better source than the best so far (on
/// `best`): the timeline the target last applied (`applied`) first, then the latest.
fn prefer(timeline: i32, best: Option<i32>, applied: Option<i32>) -> bool {
    let rank = |timeline: i32| (Some(timeline) == applied, timeline);
    best.is_none_or(|best| rank(timeline) > rank(best))
}

async fn measure(
    settings: &Settings,
    name: &str,
    endpoint: &crate::settings::EndpointSettings,
    sources: &[(&str, &crate::settings::EndpointSettings)],
    lag: &mut TargetLag,
) -> Result<(), Error> {
    let replicator = &settings.replicator;
    let schema = crate::sql::quote_ident(&replicator.schema);
    let target = connect(settings, name, endpoint).await?;
    let row = target
        .query_opt(
            &format!(
                "SELECT batch, lsn::text, snapshot::text, \
                 extract(epoch FROM now() - applied_at)::float8, system_id, timeline \
                 FROM {schema}.progress WHERE source = $1"
            ),
            &[&endpoint.cluster],
        )
        .await
        .map_err(|e| Error::from_postgres(e).with_endpoint(&name.into()))?
        .ok_or_else(|| {
            Error::new(ErrorKind::Config).with_detail("no batch applied yet (no progress row)")
        })?;
    lag.batch = row.get(0);
    lag.applied = row
        .get::<_, Option<String>>(1)
        .and_then(|text| text.parse().ok());
    let snapshot: Option<String> = row.get(2);
    let since = std::time::Duration::from_secs_f64(row.get::<_, f64>(3).max(0.0));
    let filled_from: Option<String> = row.get(4);
    let timeline: Option<i32> = row.get(5);
    let Some((primary, source)) =
        find_source(settings, sources, filled_from.as_deref(), timeline).await?
    else {
        return Ok(());
    };
    let source_error = |e| Error::from_postgres(e).with_endpoint(&primary.into());
    let current: String = source
        .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
        .await
        .map_err(source_error)?
        .get(0);
    let current: Option<crate::Position> = current.parse().ok();
    lag.lag_bytes = current.zip(lag.applied).map(|(c, a)| c.bytes_after(a));
    let pending = match (replicator.mode, snapshot) {
        (CaptureMode::Trigger, Some(snapshot)) => {
            let tables = objects::tables(&source, replicator, primary).await?;
            let mut rows = 0u64;
            for table in &tables {
                let count: i64 = source
                    .query_one(
                        &format!(
                            "SELECT coalesce(sum(cardinality({})), 0)::int8 FROM {} \
                             WHERE txid >= pg_snapshot_xmin($1::text::pg_snapshot) \
                             AND NOT pg_visible_in_snapshot(txid, $1::text::pg_snapshot)",
                            crate::sql::quote_ident(&table.columns[table.key[0]].name),
                            objects::change_table(&replicator.schema, table)
                        ),
                        &[&snapshot],
                    )
                    .await
                    .map_err(source_error)?
                    .get(0);
                rows += u64::try_from(count).unwrap_or(0);
            }
            lag.lag_rows = Some(rows);
            rows > 0
        }
        _ => lag.lag_bytes.is_some_and(|bytes| bytes > 0),
    };
    lag.lag = Some(if pending {
        since
    } else {
        std::time::Duration::ZERO
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::prefer;

    #[test]
    fn the_source_is_on_the_timeline_the_target_applied_else_the_latest() {
        // A standby promoted outside the herd (timeline 3) while the target applies from the
        // primary (timeline 2): the primary.
        assert!(!prefer(3, Some(2), Some(2)));
        assert!(prefer(2, Some(3), Some(2)));
        // After a failover the target applied from the promoted standby: not the old primary
        // that came back writable.
        assert!(!prefer(1, Some(2), Some(2)));
        // Nothing applied on any of them: the latest.
        assert!(prefer(4, Some(2), Some(1)));
        assert!(!prefer(2, Some(4), None));
        assert!(prefer(2, None, None));
    }
}
