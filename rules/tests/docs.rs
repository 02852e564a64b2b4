//! docs/metrics.md documents every metric of the built-in catalogue.

use tollgate_rules::Catalogue;

#[test]
fn test_every_built_in_metric_is_documented() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md");
    let text = std::fs::read_to_string(&path).expect("docs/metrics.md");
    let catalogue = Catalogue::default();
    let mut missing = Vec::new();
    for group in &catalogue.groups {
        assert!(text.contains(&format!("`{}_`", group.service_prefix)), "prefix {} undocumented", group.service_prefix);
        assert!(
            text.contains(&format!("`{}_`", group.instance_prefix)),
            "prefix {} undocumented",
            group.instance_prefix
        );
        for rule in &group.metrics {
            let row = format!("| `{}` |", rule.name);
            let documented =
                text.lines().any(|line| line.starts_with(&row) && line.contains(&format!("| {} |", rule.unit)));
            if !documented {
                missing.push(format!("{} ({})", rule.name, rule.unit));
            }
        }
    }
    assert!(missing.is_empty(), "metrics missing from docs/metrics.md (or with another unit): {missing:?}");
    for label in catalogue.labels.keys() {
        assert!(text.contains(&format!("| `{label}` |")), "label {label} undocumented");
    }
}
