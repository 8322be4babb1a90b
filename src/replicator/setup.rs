//! Installing what the replicator needs, outside a running herd (`pgherd replicator install`).

use std::fmt;

use super::{install as objects, trigger};
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
                source
                    .batch_execute(&objects::trigger_sql(replicator, &tables))
                    .await
                    .map_err(source_error)?;
                trigger::ensure_installed(&source, replicator, &tables)
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
                    objects::install_publication(&source, replicator, target, &tables)
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
