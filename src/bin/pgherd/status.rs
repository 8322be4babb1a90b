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
    let widths: Vec<usize> = (0..rows[0].len())
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
    for problem in problems {
        out.push_str(&problem);
        out.push('\n');
    }
    out
}
