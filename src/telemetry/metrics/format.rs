//! The classic Prometheus text format, from the OpenMetrics text that
//! `prometheus-client` writes. The two differ in three ways that matter
//! here: a counter's family is named with its `_total` (OpenMetrics names it
//! without), there are no `# UNIT` lines, and no `# EOF`. Histograms, gauges
//! and label escaping are the same.

/// `openmetrics`, rewritten in the classic format.
pub fn classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut counters: Vec<&str> = Vec::new();
    // TYPE lines come after HELP lines: find the counter families first.
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.strip_suffix(" counter") {
                counters.push(name);
            }
        }
    }
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_with_total_and_the_eof_goes() {
        let om = "# HELP a_calls Calls.\n# TYPE a_calls counter\na_calls_total{code=\"OK\"} 3\n\
                  # HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n# UNIT a_up seconds\n# EOF\n";
        assert_eq!(
            classic(om),
            "# HELP a_calls_total Calls.\n# TYPE a_calls_total counter\na_calls_total{code=\"OK\"} 3\n\
             # HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n"
        );
    }
}
