//! Placeholder until the metrics part lands: `/metrics` answers 503.
pub fn render(_report: &crate::control::StatusReport) -> anyhow::Result<String> {
    anyhow::bail!("metrics are not built yet")
}
