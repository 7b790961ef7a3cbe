//! Series patterns: which series a rule watches.
//!
//! A pattern is split into segments by `/`, like an MQTT topic filter:
//!
//! ```text
//!   pump-*/temperature     `*` matches any run of characters within one segment
//!   +/temperature          `+` matches exactly one segment
//!   site/#                 `#` (last segment only) matches the rest: zero or more segments
//! ```
//!
//! Matching is linear in the series length and allocates nothing.

/// A parsed series pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesPattern {
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Matches this exact text.
    Literal(String),
    /// Text with at least one `*`.
    Glob(String),
    /// `+`
    One,
    /// `#`
    Rest,
}

impl SeriesPattern {
    /// Parses a pattern such as `pump-*/temperature` or `site/+/#`.
    pub fn parse(pattern: &str) -> Result<SeriesPattern, String> {
        if pattern.is_empty() {
            return Err("the pattern is empty; write e.g. `pump-*/temperature` or `#`".into());
        }
        let parts: Vec<&str> = pattern.split('/').collect();
        let last = parts.len() - 1;
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let segment = match *part {
                "+" => Segment::One,
                "#" if i == last => Segment::Rest,
                "#" => {
                    return Err(format!(
                        "`#` matches the rest of the series and must be the last segment \
                         (in `{pattern}`)"
                    ));
                }
                p if p.contains('+') || p.contains('#') => {
                    return Err(format!(
                        "`+` and `#` must stand alone as a whole segment, found `{p}` in \
                         `{pattern}`; use `*` to match characters within a segment"
                    ));
                }
                p if p.contains('*') => Segment::Glob(p.to_string()),
                p => Segment::Literal(p.to_string()),
            };
            segments.push(segment);
        }
        Ok(SeriesPattern { segments })
    }

    /// Whether `series` matches the pattern.
    pub fn matches(&self, series: &str) -> bool {
        let mut parts = series.split('/');
        for segment in &self.segments {
            match segment {
                Segment::Rest => return true,
                Segment::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(text) => {
                    if parts.next() != Some(text.as_str()) {
                        return false;
                    }
                }
                Segment::Glob(glob) => match parts.next() {
                    Some(part) if glob_matches(glob, part) => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }
}

/// One segment of the series keys a source can produce, as far as the configuration tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// Exactly this text.
    Literal(String),
    /// One segment whose text is only known at run time (an MQTT `+`).
    Any,
    /// Zero or more segments known only at run time (an MQTT `#`, or a template the check
    /// cannot see through).
    Rest,
}

impl SeriesPattern {
    /// Whether some series of `shape` could match: used by `edgewise check` to warn about a
    /// rule whose pattern can never match what the sources produce. Errs on the side of
    /// "could": a warning must never be wrong.
    pub fn could_match(&self, shape: &[Shape]) -> bool {
        fn walk(pattern: &[Segment], shape: &[Shape]) -> bool {
            match (pattern.first(), shape.first()) {
                (Some(Segment::Rest), _) | (_, Some(Shape::Rest)) => true,
                (None, None) => true,
                (None, Some(_)) | (Some(_), None) => false,
                (Some(p), Some(s)) => {
                    let fits = match (p, s) {
                        (Segment::One, _) | (_, Shape::Any) => true,
                        (Segment::Literal(text), Shape::Literal(lit)) => text == lit,
                        (Segment::Glob(glob), Shape::Literal(lit)) => glob_matches(glob, lit),
                        (Segment::Rest, _) | (_, Shape::Rest) => true,
                    };
                    fits && walk(&pattern[1..], &shape[1..])
                }
            }
        }
        walk(&self.segments, shape)
    }
}

/// `*` matches any run of characters (including none); everything else matches itself.
/// Greedy with backtracking to the last star: linear in practice, no recursion.
fn glob_matches(glob: &str, text: &str) -> bool {
    // Bytes, not chars: `*` is ASCII and UTF-8 never hides an ASCII byte inside a multi-byte
    // character, so byte-wise matching gives the same answer without allocating (this runs
    // for every glob rule on every event).
    let (g, t) = (glob.as_bytes(), text.as_bytes());
    let (mut gi, mut ti) = (0, 0);
    // Position of the last `*` seen and the text position it was tried at.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if gi < g.len() && g[gi] == b'*' {
            star = Some((gi, ti));
            gi += 1;
        } else if gi < g.len() && g[gi] == t[ti] {
            gi += 1;
            ti += 1;
        } else if let Some((sg, st)) = star {
            // Let the star swallow one more byte and retry.
            gi = sg + 1;
            ti = st + 1;
            star = Some((sg, st + 1));
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_literal_plus_hash_and_star_segments() {
        let p = |s: &str| SeriesPattern::parse(s).unwrap();
        assert!(p("pump-1/temperature").matches("pump-1/temperature"));
        assert!(!p("pump-1/temperature").matches("pump-1/temperature/x"));
        assert!(!p("pump-1/temperature").matches("pump-1"));
        assert!(p("+/temperature").matches("pump-7/temperature"));
        assert!(!p("+/temperature").matches("site/pump-7/temperature"));
        assert!(p("site/#").matches("site/a/b/c"));
        assert!(p("site/#").matches("site"));
        assert!(!p("site/#").matches("other/a"));
        assert!(p("#").matches("anything/at/all"));
        assert!(p("pump-*/temperature").matches("pump-12/temperature"));
        assert!(p("pump-*/temperature").matches("pump-/temperature"));
        assert!(!p("pump-*/temperature").matches("fan-1/temperature"));
        assert!(!p("pump-*").matches("pump-1/temperature"), "* stays within a segment");
        assert!(p("*-*-x").matches("a-b-c-x"));
        assert!(!p("*-*-x").matches("a-x"));
        assert!(p("t*e*p").matches("temp"));
    }

    #[test]
    fn malformed_patterns_are_refused_with_a_reason() {
        assert!(SeriesPattern::parse("").unwrap_err().contains("empty"));
        assert!(SeriesPattern::parse("a/#/b").unwrap_err().contains("last segment"));
        assert!(SeriesPattern::parse("a/b+/c").unwrap_err().contains("whole segment"));
        assert!(SeriesPattern::parse("a/x#").unwrap_err().contains("whole segment"));
    }

    #[test]
    fn could_match_sees_through_wildcards_and_refuses_what_cannot_match() {
        let lit = |s: &str| Shape::Literal(s.into());
        let pump = SeriesPattern::parse("pump-*/temperature").unwrap();
        assert!(pump.could_match(&[Shape::Any, lit("temperature")]));
        assert!(pump.could_match(&[lit("pump-3"), Shape::Rest]));
        assert!(!pump.could_match(&[lit("fan-3"), lit("temperature")]));
        assert!(!pump.could_match(&[Shape::Any, lit("vibration")]));
        assert!(!pump.could_match(&[Shape::Any]), "too few segments");
        assert!(SeriesPattern::parse("#").unwrap().could_match(&[lit("x")]));
    }

    #[test]
    fn globs_match_non_ascii_segments_like_chars_would() {
        assert!(glob_matches("kühl*", "kühlhaus-3"));
        assert!(glob_matches("*ß", "straß"));
        assert!(glob_matches("*ß*", "straße"));
        assert!(!glob_matches("*ß", "straße"));
        assert!(glob_matches("p*e", "pümpe"));
        assert!(!glob_matches("*ü", "straße"));
        assert!(glob_matches("*", ""));
        assert!(!glob_matches("a*b", "a"));
    }
}
