//! What `aggregator check` prints, and its verdict.

use std::{io::Write, path::Path, time::Duration};

use super::{ProbeRow, probe, warnings};
use crate::{config::Config, gateway::Gateway, telemetry::metrics::Metrics};

/// How thorough the check is.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Also ask every upstream.
    pub probe: bool,
    /// Warnings fail the check too.
    pub strict: bool,
    /// Bound on each probe of each source.
    pub timeout: Duration,
}

/// Checks the config at `path` and writes the report to `out`; whether the
/// config passes. Every problem is named by file and key.
pub async fn run(path: &Path, options: Options, out: &mut impl Write) -> std::io::Result<bool> {
    let origin = path.display();
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            writeln!(out, "error: {error}")?;
            return Ok(false);
        }
    };
    // The clients are built as at startup (TLS material included); the
    // gRPC ones connect lazily, so nothing is dialed here.
    if let Err(error) = Gateway::new(&config, &Metrics::default()) {
        writeln!(out, "error: {origin}: {error}")?;
        return Ok(false);
    }
    let warnings = warnings(&config);
    for warning in &warnings {
        writeln!(
            out,
            "warning: {origin}: `{}`: {}",
            warning.key, warning.message
        )?;
    }
    let mut errors = 0;
    if options.probe {
        let rows = probe(&config, options.timeout).await;
        write_table(out, &rows)?;
        for row in &rows {
            let failures = [
                ("connect", row.reachable.as_ref().err()),
                ("schema", row.schema.as_ref().err()),
                (
                    "health check",
                    row.health.as_ref().and_then(|h| h.as_ref().err()),
                ),
            ];
            for (what, reason) in failures {
                if let Some(reason) = reason {
                    errors += 1;
                    writeln!(
                        out,
                        "error: {origin}: `sources.{}`: {what}: {reason}",
                        row.source
                    )?;
                }
            }
        }
    }
    writeln!(
        out,
        "{origin}: {} sources, {} aggregations: {errors} errors, {} warnings",
        config.sources.len(),
        config.aggregations.len(),
        warnings.len()
    )?;
    Ok(errors == 0 && (warnings.is_empty() || !options.strict))
}

/// One row per source: reachable, schema, health, latency.
fn write_table(out: &mut impl Write, rows: &[ProbeRow]) -> std::io::Result<()> {
    let verdict = |r: &Result<(), String>| if r.is_ok() { "yes" } else { "no" };
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|row| {
            [
                row.source.to_string(),
                row.kind.to_owned(),
                verdict(&row.reachable).to_owned(),
                match &row.schema {
                    Ok(schema) => schema.clone(),
                    Err(_) => "failed".to_owned(),
                },
                row.health.as_ref().map_or("-", verdict).to_owned(),
                format!("{:.1}ms", row.latency.as_secs_f64() * 1e3),
            ]
        })
        .collect();
    let header = [
        "SOURCE",
        "KIND",
        "REACHABLE",
        "SCHEMA",
        "HEALTHY",
        "LATENCY",
    ]
    .map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    for row in std::iter::once(&header).chain(&cells) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        writeln!(out, "{}", line.join("  ").trim_end())?;
    }
    Ok(())
}
