//! `[telemetry]`: where traces go. Without `otlp_endpoint` nothing is
//! exported; the caller's trace context still reaches every upstream.

use serde::Deserialize;

use super::{ConfigError, Validator};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TelemetryModel {
    otlp_endpoint: Option<String>,
    service_name: Option<String>,
    sample_ratio: Option<f64>,
}

/// `[telemetry]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySpec {
    /// The OTLP/gRPC collector, e.g. `http://collector:4317`; none: no export.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the spans (default `aggregator`).
    pub service_name: String,
    /// Fraction of calls without a sampled parent that are traced (a
    /// caller's sampled flag is followed).
    pub sample_ratio: f64,
}

impl Validator<'_> {
    pub(super) fn telemetry(&self, model: &TelemetryModel) -> Result<TelemetrySpec, ConfigError> {
        if let Some(endpoint) = &model.otlp_endpoint {
            let ok = endpoint.parse::<http::Uri>().ok().filter(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some()
            });
            if ok.is_none() {
                return Err(self.err(
                    "telemetry.otlp_endpoint",
                    "expected the collector's OTLP/gRPC URL, e.g. \"http://collector:4317\"",
                ));
            }
        }
        let sample_ratio = model.sample_ratio.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&sample_ratio) {
            return Err(self.err("telemetry.sample_ratio", "expected a fraction, 0.0 to 1.0"));
        }
        let service_name = model
            .service_name
            .clone()
            .unwrap_or_else(|| "aggregator".to_owned());
        if service_name.is_empty() {
            return Err(self.err("telemetry.service_name", "must not be empty"));
        }
        Ok(TelemetrySpec {
            otlp_endpoint: model.otlp_endpoint.clone(),
            service_name,
            sample_ratio,
        })
    }
}
