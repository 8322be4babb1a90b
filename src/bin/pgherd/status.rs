//! `pgherd status`: probe the endpoints of a settings file and show what they are.

use std::{path::Path, process::ExitCode, time::Duration};

use pgherd::{health::survey, EndpointHealth, HealthState, Settings};

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often `--watch` probes again.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Probes once, or every second with `watch`; exits 1 when the settings are invalid or an
/// endpoint does not answer.
pub(crate) async fn run(path: &Path, watch: bool) -> ExitCode {
    let settings = match Settings::load(path) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    loop {
        let endpoints = match survey(&settings, PROBE_TIMEOUT).await {
            Ok(endpoints) => endpoints,
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::FAILURE;
            }
        };
        if watch {
            // Clear the terminal and go home before each table.
            print!("\x1b[2J\x1b[H");
        }
        print!("{}", render(&endpoints));
        if settings.replicator.enabled() {
            match pgherd::replicator::survey(&settings).await {
                Ok(lags) => print!("{}", render_replication(&lags)),
                Err(error) => println!("replication: {error}"),
            }
        }
        if !watch {
            let all_up = endpoints.iter().all(|e| e.state == HealthState::Up);
            return if all_up {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
            () = tokio::time::sleep(WATCH_EVERY) => {}
        }
    }
}

/// The replication table: target, batches applied, position, lag in rows, bytes and time.
fn render_replication(lags: &[pgherd::replicator::TargetLag]) -> String {
    let mut rows = vec![[
        "replica",
        "batches",
        "applied",
        "lag rows",
        "lag bytes",
        "lag",
    ]
    .map(str::to_owned)];
    let mut problems = Vec::new();
    let dash = || "-".to_owned();
    for lag in lags {
        rows.push([
            lag.target.clone(),
            lag.batch.to_string(),
            lag.applied.map_or_else(dash, |p| p.to_string()),
            lag.lag_rows.map_or_else(dash, |r| r.to_string()),
            lag.lag_bytes.map_or_else(dash, |b| format!("{b} B")),
            lag.lag
                .map_or_else(dash, |d| format!("{:.0} ms", d.as_secs_f64() * 1000.0)),
        ]);
        if let Some(problem) = &lag.problem {
            problems.push(format!("  {}: {problem}", lag.target));
        }
    }
    let mut out = String::from("\n");
    out.push_str(&table(rows));
    for problem in problems {
        out.push_str(&problem);
        out.push('\n');
    }
    out
}

/// Rows as left-aligned columns.
fn table<const N: usize>(rows: Vec<[String; N]>) -> String {
    let widths: Vec<usize> = (0..N)
        .map(|column| rows.iter().map(|row| row[column].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The table: endpoint, role configured and seen, state, round trip, lag, position, timeline.
fn render(endpoints: &[EndpointHealth]) -> String {
    let mut rows = vec![[
        "endpoint", "cluster", "role", "seen as", "state", "rtt", "lag", "position", "timeline",
    ]
    .map(str::to_owned)];
    let mut problems = Vec::new();
    for e in endpoints {
        rows.push([
            e.name.to_string(),
            e.cluster.to_string(),
            e.configured_role.to_string(),
            e.observed_role
                .map(|r| r.to_string())
                .unwrap_or_else(|| "-".into()),
            e.state.to_string(),
            e.rtt
                .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1000.0))
                .unwrap_or_else(|| "-".into()),
            match (e.lag_bytes, e.lag) {
                (Some(bytes), Some(time)) => {
                    format!("{bytes} B, {:.0} ms", time.as_secs_f64() * 1000.0)
                }
                (Some(bytes), None) => format!("{bytes} B"),
                _ => "-".into(),
            },
            e.position
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            e.timeline
                .map(|t| t.to_string())
                .unwrap_or_else(|| "-".into()),
        ]);
        if let Some(error) = &e.last_error {
            problems.push(format!("  {}: {error}", e.name));
        }
    }
    let mut out = table(rows);
    for problem in problems {
        out.push_str(&problem);
        out.push('\n');
    }
    out
}
