//! `pgherd check`: validate a settings file and show what it describes.

use std::{path::Path, process::ExitCode};

use pgherd::{EndpointSettings, Settings};

/// Loads and validates `path`; prints the endpoints on success, every problem on failure.
pub(crate) fn run(path: &Path) -> ExitCode {
    match Settings::load(path) {
        Ok(settings) => {
            print!("{}", render(path, &settings));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

/// The report printed for valid settings. Passwords appear only as where they come from.
pub(crate) fn render(path: &Path, settings: &Settings) -> String {
    let mut rows = vec![[
        "endpoint".to_owned(),
        "role".to_owned(),
        "cluster".to_owned(),
        "address".to_owned(),
        "dbname".to_owned(),
        "user".to_owned(),
        "password".to_owned(),
        "tls".to_owned(),
        "pool".to_owned(),
    ]];
    let mut endpoints: Vec<_> = settings.endpoints.iter().collect();
    endpoints
        .sort_by_key(|(name, endpoint)| (endpoint.cluster.as_str(), endpoint.role, name.as_str()));
    for (name, endpoint) in endpoints {
        let pool = settings.pool_for(name);
        rows.push([
            name.clone(),
            endpoint.role.to_string(),
            endpoint.cluster.clone(),
            endpoint.address(),
            endpoint.dbname.clone(),
            endpoint.user.clone(),
            password_source(endpoint),
            endpoint.sslmode.to_string(),
            format!(
                "{} conns, wait {}, connect {}",
                pool.max_size,
                humantime::format_duration(pool.wait_timeout),
                humantime::format_duration(pool.connect_timeout)
            ),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|column| rows.iter().map(|row| row[column].len()).max().unwrap_or(0))
        .collect();
    let mut out = format!(
        "{}: valid, {} endpoint{}\n",
        path.display(),
        settings.endpoints.len(),
        if settings.endpoints.len() == 1 {
            ""
        } else {
            "s"
        }
    );
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str("  ");
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    let router = &settings.router;
    let supervisor = &settings.supervisor;
    out.push_str(&format!(
        "router: reads {}, fallback to primary {}, capacity {}, default deadline {}\n",
        router.read_policy,
        if router.fallback_to_primary {
            "on"
        } else {
            "off"
        },
        router.queue_capacity,
        humantime::format_duration(router.default_timeout)
    ));
    out.push_str(&format!(
        "health: probe every {}, timeout {}, down after {} failures, up after {} successes\n",
        humantime::format_duration(settings.health.interval),
        humantime::format_duration(settings.health.timeout),
        settings.health.failures_to_down,
        settings.health.successes_to_up
    ));
    out.push_str(&format!(
        "failover: {}, failback {}\n",
        settings.failover.mode.as_str(),
        match settings.failover.failback {
            pgherd::settings::FailbackMode::Manual => "manual",
            _ => "automatic",
        }
    ));
    out.push_str(&format!(
        "supervisor: at most {} restarts per {}, backoff {} to {}\n",
        supervisor.max_restarts,
        humantime::format_duration(supervisor.restart_period),
        humantime::format_duration(supervisor.backoff_initial),
        humantime::format_duration(supervisor.backoff_max)
    ));
    out
}

fn password_source(endpoint: &EndpointSettings) -> String {
    if endpoint.password.is_some() {
        "inline (hidden)".to_owned()
    } else if let Some(variable) = &endpoint.password_env {
        format!("env {variable}")
    } else if let Some(file) = &endpoint.password_file {
        format!("file {}", file.display())
    } else {
        "none".to_owned()
    }
}
