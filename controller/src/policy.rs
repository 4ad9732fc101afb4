//! Tag policy: which nodes may see each other. Pure; no I/O.
//!
//! Model: a rule `{from: [X], to: [Y]}` lets nodes tagged X reach nodes tagged Y. WireGuard
//! tunnels are symmetric (a peer must be configured on both ends for either to send), so a
//! pair of nodes is *visible* to each other if either direction is allowed; finer-grained
//! (directional, per-port) filtering belongs in the agent's packet filter, not in the peer list.
//! With no rules at all, every approved node sees every other (the default).
//! The tag `*` in a rule matches any node, tagged or not.

use serde::Deserialize;

pub const WILDCARD: &str = "*";

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub from: Vec<String>,
    pub to: Vec<String>,
}

/// Checks a tag's syntax: 1–64 characters of `[a-z0-9_.:-]`.
pub fn validate_tag(tag: &str) -> Result<(), String> {
    let ok = !tag.is_empty()
        && tag.len() <= 64
        && tag.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.' | b':')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag {tag:?} must be 1-64 characters of a-z, 0-9, '-', '_', '.', ':'"
        ))
    }
}

impl PolicyConfig {
    pub fn validate(&self) -> Result<(), String> {
        for (i, r) in self.rules.iter().enumerate() {
            if r.from.is_empty() || r.to.is_empty() {
                return Err(format!("rule {i}: `from` and `to` must each name a tag"));
            }
            for t in r.from.iter().chain(&r.to) {
                if t != WILDCARD {
                    validate_tag(t).map_err(|e| format!("rule {i}: {e}"))?;
                }
            }
        }
        Ok(())
    }
}

/// The compiled policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    pub fn new(config: &PolicyConfig) -> Self {
        Self {
            rules: config.rules.clone(),
        }
    }

    /// A stable text form, stored by the controller so a policy change across a restart bumps
    /// the netmap serial.
    pub fn fingerprint(&self) -> String {
        let mut out = String::new();
        for r in &self.rules {
            out.push_str(&r.from.join(","));
            out.push_str("->");
            out.push_str(&r.to.join(","));
            out.push(';');
        }
        out
    }

    fn matches(selector: &[String], tags: &[String]) -> bool {
        selector
            .iter()
            .any(|s| s == WILDCARD || tags.iter().any(|t| t == s))
    }

    /// Whether a node with `from` tags may reach a node with `to` tags.
    pub fn allows(&self, from: &[String], to: &[String]) -> bool {
        self.rules.is_empty()
            || self
                .rules
                .iter()
                .any(|r| Self::matches(&r.from, from) && Self::matches(&r.to, to))
    }

    /// Whether two nodes appear in each other's netmap (either direction allowed).
    pub fn visible(&self, a: &[String], b: &[String]) -> bool {
        self.allows(a, b) || self.allows(b, a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    fn policy(rules: &[(&[&str], &[&str])]) -> Policy {
        Policy::new(&PolicyConfig {
            rules: rules
                .iter()
                .map(|(f, t)| Rule {
                    from: tags(f),
                    to: tags(t),
                })
                .collect(),
        })
    }

    #[test]
    fn without_rules_everyone_sees_everyone() {
        let p = Policy::default();
        assert!(p.visible(&tags(&[]), &tags(&["x"])));
    }

    #[test]
    fn hq_reaches_field_units_but_field_units_do_not_see_each_other() {
        let p = policy(&[(&["hq"], &["field"])]);
        let (hq, field) = (tags(&["hq"]), tags(&["field"]));
        assert!(p.allows(&hq, &field));
        assert!(!p.allows(&field, &hq));
        assert!(
            p.visible(&field, &hq),
            "either direction makes a pair visible"
        );
        assert!(!p.visible(&field, &field));
        assert!(!p.visible(&tags(&[]), &hq));
    }

    #[test]
    fn wildcard_matches_untagged_nodes() {
        let p = policy(&[(&["hq"], &["*"])]);
        assert!(p.visible(&tags(&[]), &tags(&["hq"])));
        assert!(!p.visible(&tags(&[]), &tags(&["other"])));
    }

    #[test]
    fn tag_syntax_is_checked() {
        assert!(validate_tag("site:embassy-1").is_ok());
        assert!(validate_tag("").is_err());
        assert!(validate_tag("Upper").is_err());
        assert!(validate_tag(&"a".repeat(65)).is_err());
    }
}
