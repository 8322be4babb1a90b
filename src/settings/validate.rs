//! The checks `Settings::validate` runs. Each problem names its key, the bad value and what would
//! be accepted.

use std::{collections::BTreeMap, time::Duration};

use super::{
    duration,
    endpoint::Role,
    error::SettingsProblem,
    pool::{PoolOverrides, PoolSettings, MAX_POOL_SIZE},
    Settings,
};

/// The longest `replicator.schema`: the capture triggers' names (`<schema>_capture_truncate`)
/// must fit PostgreSQL's 63 bytes.
const MAX_SCHEMA_LEN: usize = 63 - "_capture_truncate".len();

/// The largest read weight accepted.
pub const MAX_WEIGHT: u32 = 1000;
/// The largest router queue accepted.
pub const MAX_QUEUE_CAPACITY: usize = 1_000_000;

/// The longest endpoint name: names become PostgreSQL `application_name`s and identifiers.
pub const MAX_ENDPOINT_NAME_LEN: usize = 63;

/// Every problem in `settings`, in a stable order (by endpoint name, then by key).
pub(crate) fn problems(settings: &Settings) -> Vec<SettingsProblem> {
    let mut problems = Vec::new();
    check_pool("pool", &settings.pool, &mut problems);
    check_router(settings, &mut problems);
    check_supervisor(settings, &mut problems);
    check_health(settings, &mut problems);
    if settings.endpoints.is_empty() {
        problems.push(SettingsProblem::new(
            "endpoints",
            "no endpoint is configured: add an [endpoints.<name>] table with role = \"primary\"",
        ));
        return problems;
    }
    for (name, endpoint) in &settings.endpoints {
        let key = format!("endpoints.{name}");
        check_name(name, &key, &mut problems);
        check_text(&format!("{key}.host"), &endpoint.host, &mut problems);
        check_host(&format!("{key}.host"), &endpoint.host, &mut problems);
        if endpoint.port == 0 {
            problems.push(SettingsProblem::new(
                format!("{key}.port"),
                "0 is not a TCP port: expected a number from 1 to 65535",
            ));
        }
        check_text(&format!("{key}.dbname"), &endpoint.dbname, &mut problems);
        check_text(&format!("{key}.user"), &endpoint.user, &mut problems);
        if let Some(variable) = &endpoint.password_env {
            if variable.to_ascii_uppercase().starts_with("PGHERD_") {
                problems.push(SettingsProblem::new(
                    format!("{key}.password_env"),
                    format!(
                        "`{variable}` starts with PGHERD_, and every PGHERD_* variable is read as a \
                         setting: pick another name, e.g. `APP_{}_PASSWORD`",
                        name.to_ascii_uppercase()
                    ),
                ));
            }
        }
        if let Err(problem) = endpoint.resolve_password(&key) {
            problems.push(problem);
        }
        check_overrides(&format!("{key}.pool"), &endpoint.pool, &mut problems);
        if !is_identifier(&endpoint.cluster) {
            problems.push(SettingsProblem::new(
                format!("{key}.cluster"),
                format!(
                    "`{}` is not a valid cluster name: expected lowercase letters, digits and `_`, \
                     starting with a letter",
                    endpoint.cluster
                ),
            ));
        }
        if endpoint.weight == 0 || endpoint.weight > MAX_WEIGHT {
            problems.push(SettingsProblem::new(
                format!("{key}.weight"),
                format!(
                    "{} is not a usable weight: expected a number from 1 to {MAX_WEIGHT}",
                    endpoint.weight
                ),
            ));
        }
        if let Some(path) = &endpoint.sslrootcert {
            if !endpoint.sslmode.verifies() {
                problems.push(SettingsProblem::new(
                    format!("{key}.sslrootcert"),
                    format!(
                        "is only used with sslmode \"verify-ca\" or \"verify-full\", but sslmode is \
                         \"{}\": set sslmode = \"verify-full\" to check the server's certificate",
                        endpoint.sslmode
                    ),
                ));
            } else if let Err(error) = std::fs::metadata(path) {
                problems.push(SettingsProblem::new(
                    format!("{key}.sslrootcert"),
                    format!(
                        "cannot read `{}` ({error}): point it at a PEM file of trusted authorities",
                        path.display()
                    ),
                ));
            }
        }
    }
    check_roles(settings, &mut problems);
    check_duplicates(settings, &mut problems);
    check_failover(settings, &mut problems);
    check_replicator(settings, &mut problems);
    problems
}

fn check_replicator(settings: &Settings, problems: &mut Vec<SettingsProblem>) {
    let replicator = &settings.replicator;
    for (index, table) in replicator.tables.iter().enumerate() {
        if super::split_table(table).is_none() {
            problems.push(SettingsProblem::new(
                format!("replicator.tables[{index}]"),
                format!(
                    "`{table}` is not a table name: expected \"schema.table\" or \"table\" \
                     (schema public)"
                ),
            ));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for table in &replicator.tables {
        let qualified = super::split_table(table);
        if qualified.is_some() && !seen.insert(qualified) {
            problems.push(SettingsProblem::new(
                "replicator.tables",
                format!("`{table}` is listed twice: list each table once"),
            ));
        }
    }
    for (index, name) in replicator.targets.iter().enumerate() {
        let key = format!("replicator.targets[{index}]");
        match settings.endpoints.get(name) {
            None => problems.push(SettingsProblem::new(
                key,
                format!("`{name}` is not an endpoint: name an endpoint with role = \"replica\""),
            )),
            Some(endpoint) if endpoint.role != Role::Replica => {
                problems.push(SettingsProblem::new(
                    key,
                    format!(
                        "`{name}` has role = \"{}\", but only endpoints with role = \"replica\" \
                         are written by the replicator",
                        endpoint.role
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    if !is_identifier(&replicator.schema) || replicator.schema.len() > MAX_SCHEMA_LEN {
        problems.push(SettingsProblem::new(
            "replicator.schema",
            format!(
                "`{}` is not a usable schema name: expected lowercase letters, digits and `_`, \
                 starting with a letter, at most {MAX_SCHEMA_LEN} of them (the capture \
                 triggers are named `<schema>_capture_truncate`, and PostgreSQL cuts names at \
                 63 bytes)",
                replicator.schema
            ),
        ));
    }
    for (key, value) in [
        ("replicator.batch_rows", replicator.batch_rows),
        ("replicator.batch_bytes", replicator.batch_bytes),
    ] {
        if value == 0 {
            problems.push(SettingsProblem::new(
                key,
                "0 would never move a row: expected at least 1",
            ));
        }
    }
    check_timeout(
        "replicator.poll_interval",
        replicator.poll_interval,
        problems,
    );
    // 0 is allowed: the next step starts as soon as one has applied changes.
    check_longest(
        "replicator.poll_after_changes",
        replicator.poll_after_changes,
        problems,
    );
    check_timeout(
        "replicator.retry_interval",
        replicator.retry_interval,
        problems,
    );
    check_timeout("replicator.step_timeout", replicator.step_timeout, problems);
    // 0 is allowed: every step acknowledges.
    check_longest(
        "replicator.idle_ack_interval",
        replicator.idle_ack_interval,
        problems,
    );
    if replicator.enabled() && settings.replication_targets().is_empty() {
        problems.push(SettingsProblem::new(
            "replicator.tables",
            "tables are listed, but there is no endpoint with role = \"replica\" to replicate \
             to: add one, or remove the tables",
        ));
    }
}

/// Lowercase letters, digits and `_`, starting with a letter.
fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn check_name(name: &str, key: &str, problems: &mut Vec<SettingsProblem>) {
    if !is_identifier(name) {
        problems.push(SettingsProblem::new(
            key,
            format!(
                "`{name}` is not a valid endpoint name: expected lowercase letters, digits and `_`, \
                 starting with a letter (environment overrides are lowercased, so a name with \
                 capitals could never be overridden), e.g. `{}`",
                suggest_name(name)
            ),
        ));
    } else if name.len() > MAX_ENDPOINT_NAME_LEN {
        problems.push(SettingsProblem::new(
            key,
            format!(
                "the endpoint name is {} characters long: expected at most {MAX_ENDPOINT_NAME_LEN}",
                name.len()
            ),
        ));
    }
}

fn suggest_name(name: &str) -> String {
    let mut suggestion: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if !suggestion
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase())
    {
        suggestion.insert_str(0, "db_");
    }
    suggestion
}

fn check_text(key: &str, value: &str, problems: &mut Vec<SettingsProblem>) {
    if value.trim().is_empty() {
        problems.push(SettingsProblem::new(key, "is empty: give a value"));
    } else if value.trim() != value {
        problems.push(SettingsProblem::new(
            key,
            format!("{value:?} has leading or trailing spaces: remove them"),
        ));
    }
}

fn check_host(key: &str, host: &str, problems: &mut Vec<SettingsProblem>) {
    if host.contains("://") {
        problems.push(SettingsProblem::new(
            key,
            format!(
                "`{host}` looks like a URL: give only the host name or IP address, and the port, \
                 database and user in their own keys"
            ),
        ));
    } else if !host.starts_with('/') && host.chars().any(|c| c.is_whitespace() || c == '/') {
        problems.push(SettingsProblem::new(
            key,
            format!(
                "`{host}` is not a host name, an IP address or a Unix socket directory \
                 (which starts with `/`)"
            ),
        ));
    }
}

fn check_pool(key: &str, pool: &PoolSettings, problems: &mut Vec<SettingsProblem>) {
    check_size(&format!("{key}.max_size"), pool.max_size, problems);
    check_timeout(&format!("{key}.wait_timeout"), pool.wait_timeout, problems);
    check_timeout(
        &format!("{key}.connect_timeout"),
        pool.connect_timeout,
        problems,
    );
    check_timeout(
        &format!("{key}.recycle_timeout"),
        pool.recycle_timeout,
        problems,
    );
}

fn check_router(settings: &Settings, problems: &mut Vec<SettingsProblem>) {
    let router = &settings.router;
    if router.queue_capacity == 0 || router.queue_capacity > MAX_QUEUE_CAPACITY {
        problems.push(SettingsProblem::new(
            "router.queue_capacity",
            format!(
                "{} is not a usable capacity: expected a number from 1 to {MAX_QUEUE_CAPACITY}",
                router.queue_capacity
            ),
        ));
    }
    check_timeout("router.default_timeout", router.default_timeout, problems);
    check_timeout("router.max_lag", router.max_lag, problems);
}

fn check_health(settings: &Settings, problems: &mut Vec<SettingsProblem>) {
    let health = &settings.health;
    check_timeout("health.interval", health.interval, problems);
    check_timeout("health.suspect_interval", health.suspect_interval, problems);
    check_timeout("health.timeout", health.timeout, problems);
    for (key, count) in [
        ("health.failures_to_down", health.failures_to_down),
        ("health.successes_to_up", health.successes_to_up),
    ] {
        if count == 0 {
            problems.push(SettingsProblem::new(
                key,
                "0 would never change: expected at least 1",
            ));
        }
    }
    check_longest(
        "failover.promote_timeout",
        settings.failover.promote_timeout,
        problems,
    );
    if settings.failover.promote_timeout < Duration::from_secs(1) {
        problems.push(SettingsProblem::new(
            "failover.promote_timeout",
            format!(
                "\"{}\" is below a second, and pg_promote waits in whole seconds: expected at least \"1s\"",
                duration::format(settings.failover.promote_timeout)
            ),
        ));
    }
}

fn check_failover(settings: &Settings, problems: &mut Vec<SettingsProblem>) {
    if settings.failover.mode != super::FailoverMode::Backup {
        return;
    }
    for cluster in settings.clusters() {
        let has_backup = settings
            .endpoints
            .values()
            .any(|e| e.cluster == cluster && e.role == Role::Backup);
        if !has_backup {
            problems.push(SettingsProblem::new(
                "failover.mode",
                format!(
                    "\"backup\" moves writes to a backup, but cluster `{cluster}` has no endpoint \
                     with role = \"backup\": add one, or pick \"follow\", \"promote\" or \"manual\""
                ),
            ));
        }
    }
}

fn check_supervisor(settings: &Settings, problems: &mut Vec<SettingsProblem>) {
    let supervisor = &settings.supervisor;
    if supervisor.max_restarts == 0 {
        problems.push(SettingsProblem::new(
            "supervisor.max_restarts",
            "0 would give up at the first crash: expected at least 1",
        ));
    }
    check_timeout(
        "supervisor.restart_period",
        supervisor.restart_period,
        problems,
    );
    check_timeout(
        "supervisor.backoff_initial",
        supervisor.backoff_initial,
        problems,
    );
    check_longest("supervisor.backoff_max", supervisor.backoff_max, problems);
    check_longest(
        "supervisor.shutdown_grace",
        supervisor.shutdown_grace,
        problems,
    );
    if supervisor.backoff_max < supervisor.backoff_initial {
        problems.push(SettingsProblem::new(
            "supervisor.backoff_max",
            format!(
                "\"{}\" is shorter than backoff_initial (\"{}\"): expected at least that",
                duration::format(supervisor.backoff_max),
                duration::format(supervisor.backoff_initial)
            ),
        ));
    }
}

fn check_overrides(key: &str, pool: &PoolOverrides, problems: &mut Vec<SettingsProblem>) {
    if let Some(size) = pool.max_size {
        check_size(&format!("{key}.max_size"), size, problems);
    }
    let timeouts = [
        ("wait_timeout", pool.wait_timeout),
        ("connect_timeout", pool.connect_timeout),
        ("recycle_timeout", pool.recycle_timeout),
    ];
    for (name, timeout) in timeouts {
        if let Some(timeout) = timeout {
            check_timeout(&format!("{key}.{name}"), timeout, problems);
        }
    }
}

fn check_size(key: &str, size: usize, problems: &mut Vec<SettingsProblem>) {
    if size == 0 || size > MAX_POOL_SIZE {
        problems.push(SettingsProblem::new(
            key,
            format!(
                "{size} is not a usable pool size: expected a number from 1 to {MAX_POOL_SIZE}"
            ),
        ));
    }
}

/// The longest duration accepted anywhere in the settings.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

fn check_longest(key: &str, duration: Duration, problems: &mut Vec<SettingsProblem>) {
    if duration > MAX_DURATION {
        problems.push(SettingsProblem::new(
            key,
            format!(
                "\"{}\" is longer than a day: expected at most \"24h\"",
                duration::format(duration)
            ),
        ));
    }
}

fn check_timeout(key: &str, timeout: Duration, problems: &mut Vec<SettingsProblem>) {
    check_longest(key, timeout, problems);
    if timeout.is_zero() {
        problems.push(SettingsProblem::new(
            key,
            format!(
                "\"{}\" would fail every attempt at once: expected a duration above zero, e.g. \"2s\"",
                duration::format(timeout)
            ),
        ));
    }
}

fn check_roles(settings: &Settings, problems: &mut Vec<SettingsProblem>) {
    for cluster in settings.clusters() {
        let primaries: Vec<&str> = settings
            .endpoints
            .iter()
            .filter(|(_, endpoint)| endpoint.cluster == cluster && endpoint.role == Role::Primary)
            .map(|(name, _)| name.as_str())
            .collect();
        let scope = if settings.clusters().len() > 1 {
            format!(" in cluster `{cluster}`")
        } else {
            String::new()
        };
        match primaries.as_slice() {
            [] => problems.push(SettingsProblem::new(
                "endpoints",
                format!(
                    "no endpoint{scope} has role = \"primary\": exactly one endpoint must be the \
                     primary (the others are \"standby\", \"replica\" or \"backup\")"
                ),
            )),
            [_] => {}
            [first, rest @ ..] => {
                for other in rest {
                    problems.push(SettingsProblem::new(
                        format!("endpoints.{other}.role"),
                        format!(
                            "\"primary\" is already the role of `{first}`{scope}: there is exactly \
                             one primary per cluster; make this one \"standby\", \"replica\" or \
                             \"backup\", or put it in another cluster"
                        ),
                    ));
                }
            }
        }
    }
}

fn check_duplicates(settings: &Settings, problems: &mut Vec<SettingsProblem>) {
    let mut seen: BTreeMap<(String, u16, &str, &str), &str> = BTreeMap::new();
    for (name, endpoint) in &settings.endpoints {
        let identity = (
            endpoint.host.to_ascii_lowercase(),
            endpoint.port,
            endpoint.dbname.as_str(),
            endpoint.user.as_str(),
        );
        if let Some(first) = seen.get(&identity) {
            problems.push(SettingsProblem::new(
                format!("endpoints.{name}"),
                format!(
                    "points at the same server, database and user as `{first}` ({}): each endpoint \
                     must be a different server or database (was a port left unchanged?)",
                    endpoint.address()
                ),
            ));
        } else {
            seen.insert(identity, name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_are_valid_names() {
        assert_eq!(suggest_name("Primary"), "primary");
        assert_eq!(suggest_name("9lives"), "db_9lives");
        assert_eq!(suggest_name("read-replica"), "read_replica");
    }
}
