//! Message and label templates, and number formatting for people.
//!
//! Two small template languages, both with `{name}` placeholders replaced in one pass (so a
//! series containing `{value}` is never substituted twice):
//!
//! - **Labels** are built from the series key's segments: `{0}` is the first segment, `{1}`
//!   the second, `{-1}` the last, `{series}` the whole key. A segment that does not exist
//!   renders as the empty string. Every rule has `device = "{0}"` and `metric = "{-1}"`
//!   unless it sets them (the combining rules, whose series *is* the device, have only
//!   `device`).
//! - **Messages** use [`MESSAGE_PLACEHOLDERS`] plus the name of any label of the rule.
//!
//! Numbers are written for people: at most three decimals, trailing zeros trimmed
//! (`80` not `80.000`, `0.125`, `1.5`), see [`format_number`].

use std::collections::BTreeMap;

/// The placeholders every message template may use (labels add their own names).
pub const MESSAGE_PLACEHOLDERS: [&str; 8] =
    ["rule", "series", "value", "threshold", "state", "severity", "device", "metric"];

/// `v` with at most three decimals and no trailing zeros: `80`, `81.5`, `0.333`, `-2`.
pub fn format_number(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let text = format!("{v:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" { "0".to_string() } else { text.to_string() }
}

/// The `{name}` placeholders of a template, in order.
pub fn placeholders(template: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) => {
                names.push(&after[..close]);
                rest = &after[close + 1..];
            }
            None => break,
        }
    }
    names
}

/// Replaces the known placeholders of `template` in one pass; unknown ones and an unclosed
/// `{` are kept as written.
pub fn render(template: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) => {
                let name = &after[..close];
                match lookup(name) {
                    Some(value) => out.push_str(&value),
                    None => {
                        out.push('{');
                        out.push_str(name);
                        out.push('}');
                    }
                }
                rest = &after[close + 1..];
            }
            None => {
                out.push_str(&rest[open..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Problems of a message template: unknown placeholders, naming the allowed ones.
pub fn check_message<'a>(template: &str, labels: impl Iterator<Item = &'a str>) -> Vec<String> {
    let labels: Vec<&str> = labels.collect();
    let mut problems = Vec::new();
    for name in placeholders(template) {
        if !MESSAGE_PLACEHOLDERS.contains(&name) && !labels.contains(&name) {
            let mut allowed: Vec<String> =
                MESSAGE_PLACEHOLDERS.iter().map(|p| format!("{{{p}}}")).collect();
            allowed.extend(labels.iter().map(|l| format!("{{{l}}}")));
            problems.push(format!(
                "unknown placeholder `{{{name}}}`; use {} (or a label's name)",
                allowed.join(", ")
            ));
        }
    }
    problems
}

/// One piece of a label template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    /// Segment index; negative counts from the end (-1 = last).
    Segment(i64),
    Series,
}

/// A parsed label template such as `{0}` or `{1}-{-1}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelTemplate {
    pieces: Vec<Piece>,
}

impl LabelTemplate {
    /// Parses a template; refuses unknown placeholders and unclosed braces.
    pub fn parse(text: &str) -> Result<LabelTemplate, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let Some(close) = after.find('}') else {
                return Err(format!("unclosed `{{` in `{text}`"));
            };
            let name = &after[..close];
            pieces.push(match name {
                "series" => Piece::Series,
                n => match n.parse::<i64>() {
                    Ok(i) => Piece::Segment(i),
                    Err(_) => {
                        return Err(format!(
                            "unknown placeholder `{{{n}}}` in `{text}`; use a segment of the \
                             series: {{0}} first, {{1}} second, {{-1}} last, or {{series}}"
                        ));
                    }
                },
            });
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        Ok(LabelTemplate { pieces })
    }

    /// The label for `series`.
    pub fn render(&self, series: &str) -> String {
        let segments: Vec<&str> = series.split('/').collect();
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Series => out.push_str(series),
                Piece::Segment(i) => {
                    let index = if *i < 0 { segments.len() as i64 + i } else { *i };
                    if let Some(s) = usize::try_from(index).ok().and_then(|i| segments.get(i)) {
                        out.push_str(s);
                    }
                }
            }
        }
        out
    }
}

/// The compiled labels of a rule: defaults overlaid by the configured templates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels {
    templates: BTreeMap<String, LabelTemplate>,
}

impl Labels {
    /// Labels of an ordinary rule: `device = "{0}"`, `metric = "{-1}"`, then `configured`.
    pub const SERIES_DEFAULTS: [(&'static str, &'static str); 2] =
        [("device", "{0}"), ("metric", "{-1}")];
    /// Labels of a combining rule, whose series is the device: `device = "{0}"`.
    pub const DEVICE_DEFAULTS: [(&'static str, &'static str); 1] = [("device", "{0}")];

    /// Compiles `defaults` overlaid by `configured`; the first problem as `(label, reason)`.
    pub fn compile(
        defaults: &[(&str, &str)],
        configured: &BTreeMap<String, String>,
    ) -> Result<Labels, (String, String)> {
        let mut templates = BTreeMap::new();
        let given = configured.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        for (key, text) in defaults.iter().copied().chain(given) {
            let template = LabelTemplate::parse(text).map_err(|e| (key.to_string(), e))?;
            templates.insert(key.to_string(), template);
        }
        Ok(Labels { templates })
    }

    /// The label values for `series`.
    pub fn render(&self, series: &str) -> BTreeMap<String, String> {
        self.templates.iter().map(|(k, t)| (k.clone(), t.render(series))).collect()
    }

    /// One label's value for `series` (`None` when the rule has no such label).
    pub fn get(&self, key: &str, series: &str) -> Option<String> {
        self.templates.get(key).map(|t| t.render(series))
    }

    /// The label names.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.templates.keys().map(String::as_str)
    }
}

/// Problems of the configured labels as `(key, message)`: bad names and bad templates.
pub fn check_labels(configured: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    for (key, text) in configured {
        let at = format!("labels.{key}");
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            problems.push((at.clone(), "label names use letters, digits and `_`".into()));
        }
        if MESSAGE_PLACEHOLDERS.contains(&key.as_str())
            && !matches!(key.as_str(), "device" | "metric")
        {
            problems.push((
                at.clone(),
                format!("`{key}` is a message placeholder already; choose another label name"),
            ));
        }
        if let Err(reason) = LabelTemplate::parse(text) {
            problems.push((at, reason));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_get_at_most_three_decimals_without_trailing_zeros() {
        assert_eq!(format_number(80.0), "80");
        assert_eq!(format_number(81.5), "81.5");
        assert_eq!(format_number(1.0 / 3.0), "0.333");
        assert_eq!(format_number(0.125), "0.125");
        assert_eq!(format_number(2.0004), "2");
        assert_eq!(format_number(-0.0001), "0");
        assert_eq!(format_number(-7.25), "-7.25");
        assert_eq!(format_number(1e6), "1000000");
        assert_eq!(format_number(f64::NAN), "NaN");
    }

    #[test]
    fn rendering_keeps_unknown_and_unclosed_braces_as_written() {
        let lookup = |name: &str| (name == "a").then(|| "1".to_string());
        assert_eq!(render("{a}{b} {a", lookup), "1{b} {a");
    }

    #[test]
    fn label_templates_pick_segments_from_either_end() {
        let t = |s: &str| LabelTemplate::parse(s).unwrap();
        assert_eq!(t("{0}").render("site/pump-1/temperature"), "site");
        assert_eq!(t("{1}").render("site/pump-1/temperature"), "pump-1");
        assert_eq!(t("{-1}").render("site/pump-1/temperature"), "temperature");
        assert_eq!(t("{0}:{-2}").render("a/b/c"), "a:b");
        assert_eq!(t("{5}x{-9}").render("a/b"), "x", "missing segments are empty");
        assert_eq!(t("all={series}").render("a/b"), "all=a/b");
        assert!(LabelTemplate::parse("{dev}").unwrap_err().contains("unknown placeholder"));
        assert!(LabelTemplate::parse("{0").unwrap_err().contains("unclosed"));
    }

    #[test]
    fn configured_labels_overlay_the_defaults() {
        let configured = BTreeMap::from([
            ("device".to_string(), "{1}".to_string()),
            ("site".to_string(), "{0}".to_string()),
        ]);
        let labels = Labels::compile(&Labels::SERIES_DEFAULTS, &configured).unwrap();
        let got = labels.render("plant-a/pump-1/vibration");
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            vec![
                ("device".to_string(), "pump-1".to_string()),
                ("metric".to_string(), "vibration".to_string()),
                ("site".to_string(), "plant-a".to_string()),
            ]
        );
    }

    #[test]
    fn message_checks_name_the_allowed_placeholders() {
        assert!(check_message("{rule} {device} {site}", ["site"].into_iter()).is_empty());
        let problems = check_message("{valeu}", std::iter::empty());
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("`{valeu}`") && problems[0].contains("{threshold}"));
    }

    #[test]
    fn label_checks_point_at_the_label() {
        let configured = BTreeMap::from([
            ("bad name".to_string(), "{0}".to_string()),
            ("site".to_string(), "{x}".to_string()),
        ]);
        let keys: Vec<String> = check_labels(&configured).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec!["labels.bad name", "labels.site"]);
    }
}
