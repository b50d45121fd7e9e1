//! Header values (and gRPC metadata values) from templates.

use super::{Inputs, RenderError, StrTemplate};

/// Renders a header value; control characters in a value are refused.
pub fn render_header(
    template: &StrTemplate,
    inputs: &Inputs,
) -> Result<http::HeaderValue, RenderError> {
    let mut out = String::new();
    template.render_into(inputs, &mut out, |name, value, out| {
        if value.bytes().any(|b| b.is_ascii_control()) {
            return Err(RenderError::Invalid {
                name: name.clone(),
                reason: "must not contain control characters (it fills a header)",
            });
        }
        out.push_str(value);
        Ok(())
    })?;
    // Literal parts were validated at load and values above, so this holds.
    http::HeaderValue::try_from(out).map_err(|_| RenderError::Invalid {
        name: "header".into(),
        reason: "is not a valid header value",
    })
}
