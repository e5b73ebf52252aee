//! Renders the CRDs as the YAML kept in `crds/` and in the chart.

use crate::api::all_crds;

/// All CRDs as one multi-document YAML stream.
pub fn render_all() -> Result<String, serde_saphyr::ser_error::Error> {
    let mut out = String::new();
    for crd in all_crds() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}
