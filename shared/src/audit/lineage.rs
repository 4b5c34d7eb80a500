//! Lineage from the trail: who touched which relation (or tagged data set),
//! when, how (read or write), and whether they saw it masked or clear.
//!
//! Built from the statement events (their relations and tags), their
//! completions (the result columns, with origin, tags and how each was
//! masked) and the sessions they ran in (identity, labels such as an AI
//! agent's model, application, and whether the session held the unmask
//! grant). Only statements that ran count.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::event::{ColumnRecord, Detail};
use super::sqlite::StoredEvent;

/// What to look for: a relation, a tag or an identity (any combination).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LineageQuery {
    /// A relation as statements name it (`customers`, `public.customers`):
    /// matched on the table name, and on the schema when both give one.
    pub relation: Option<String>,
    pub tag: Option<String>,
    pub identity: Option<String>,
}

/// One way one identity touched one relation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineageRow {
    pub identity: String,
    /// The identity's labels (`kind = "agent"`, `model = "..."`).
    pub labels: BTreeMap<String, String>,
    pub applications: BTreeSet<String>,
    pub target: String,
    pub relation: String,
    /// "read", "write" or "ddl".
    pub access: String,
    pub tags: BTreeSet<String>,
    /// Whether results came back masked (no unmask grant in the session).
    pub masked: bool,
    /// Result columns that came from this relation (by name), with how
    /// their values left the gateway ("rule", "expression", "detectors",
    /// "clear"): known for the columns of tagged relations and for tagged
    /// and masked columns.
    #[serde(default)]
    pub columns: BTreeMap<String, BTreeSet<String>>,
    pub statements: u64,
    pub first: String,
    pub last: String,
}

struct SessionFacts {
    labels: BTreeMap<String, String>,
    application: String,
    clear: bool,
}

/// Splits `schema.name (access)` as the trail writes relations.
fn split_relation(text: &str) -> Option<(&str, &str)> {
    let (name, access) = text.rsplit_once(" (")?;
    Some((name, access.strip_suffix(')')?))
}

fn relation_matches(wanted: &str, relation: &str) -> bool {
    let unquote = |s: &str| s.trim_matches('"').to_ascii_lowercase();
    let (want_schema, want_name) = match wanted.rsplit_once('.') {
        Some((schema, name)) => (Some(unquote(schema)), unquote(name)),
        None => (None, unquote(wanted)),
    };
    let (schema, name) = match relation.rsplit_once('.') {
        Some((schema, name)) => (Some(unquote(schema)), unquote(name)),
        None => (None, unquote(relation)),
    };
    name == want_name
        && match (want_schema, schema) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
}

/// The lineage rows of `events` (in trail order) that answer `query`.
pub fn lineage(events: &[StoredEvent], query: &LineageQuery) -> Vec<LineageRow> {
    let mut sessions: HashMap<&str, SessionFacts> = HashMap::new();
    let mut rows: BTreeMap<(String, String, String, String, bool), LineageRow> = BTreeMap::new();
    // Each statement's result columns, from its completion.
    let results: HashMap<(&str, u64), &[ColumnRecord]> = events
        .iter()
        .filter_map(|stored| match &stored.event.detail {
            Detail::StatementDone { seq, columns, .. } if !columns.is_empty() => Some((
                (stored.event.session.as_deref().unwrap_or(""), *seq),
                columns.as_slice(),
            )),
            _ => None,
        })
        .collect();
    for stored in events {
        let event = &stored.event;
        let session = event.session.as_deref().unwrap_or("");
        match &event.detail {
            Detail::SessionOpened {
                labels, application, ..
            } => {
                sessions.insert(
                    session,
                    SessionFacts {
                        labels: labels.clone(),
                        application: application.clone(),
                        clear: false,
                    },
                );
            }
            Detail::UnmaskGrantUsed { .. } => {
                if let Some(facts) = sessions.get_mut(session) {
                    facts.clear = true;
                }
            }
            Detail::Statement {
                seq,
                decision,
                statements,
                ..
            } if decision == "allow" => {
                let identity = event.identity.clone().unwrap_or_default();
                if query.identity.as_ref().is_some_and(|want| *want != identity) {
                    continue;
                }
                let facts = sessions.get(session);
                let columns = results.get(&(session, *seq)).copied().unwrap_or_default();
                for statement in statements {
                    for relation in &statement.relations {
                        let Some((name, access)) = split_relation(relation) else {
                            continue;
                        };
                        if query
                            .relation
                            .as_ref()
                            .is_some_and(|want| !relation_matches(want, name))
                        {
                            continue;
                        }
                        // The result columns that came from this relation.
                        let from_here: Vec<(&str, &ColumnRecord)> = if access == "read" {
                            columns
                                .iter()
                                .filter_map(|c| {
                                    let (table, column) = c.origin.as_deref()?.rsplit_once('.')?;
                                    relation_matches(name, table).then_some((column, c))
                                })
                                .collect()
                        } else {
                            Vec::new()
                        };
                        if let Some(tag) = &query.tag
                            && !statement.tags.contains(tag)
                            && !from_here.iter().any(|(_, c)| c.tags.contains(tag))
                        {
                            continue;
                        }
                        let masked = !facts.is_some_and(|f| f.clear);
                        let target = event.target.clone().unwrap_or_default();
                        let key = (
                            identity.clone(),
                            target.clone(),
                            name.to_string(),
                            access.to_string(),
                            masked,
                        );
                        let at = event.at_text();
                        let row = rows.entry(key).or_insert_with(|| LineageRow {
                            identity: identity.clone(),
                            labels: facts.map(|f| f.labels.clone()).unwrap_or_default(),
                            applications: BTreeSet::new(),
                            target,
                            relation: name.to_string(),
                            access: access.to_string(),
                            tags: BTreeSet::new(),
                            masked,
                            columns: BTreeMap::new(),
                            statements: 0,
                            first: at.clone(),
                            last: at.clone(),
                        });
                        row.statements += 1;
                        row.last = at;
                        row.tags.extend(statement.tags.iter().cloned());
                        for (column, record) in from_here {
                            row.tags.extend(record.tags.iter().cloned());
                            row.columns
                                .entry(column.to_string())
                                .or_default()
                                .insert(record.masking.clone());
                        }
                        if let Some(facts) = facts
                            && !facts.application.is_empty()
                        {
                            row.applications.insert(facts.application.clone());
                        }
                    }
                }
            }
            _ => {}
        }
    }
    rows.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Event, StatementRecord};

    fn stored(id: u64, session: &str, identity: &str, detail: Detail) -> StoredEvent {
        StoredEvent {
            id,
            event: Event::now(detail).in_session(session).by(identity, "shop"),
        }
    }

    fn statement(relations: &[&str], tags: &[&str], decision: &str) -> Detail {
        Detail::Statement {
            seq: 1,
            source: "query".into(),
            text: "...".into(),
            decision: decision.into(),
            rule: None,
            refusal: None,
            statements: vec![StatementRecord {
                kind: "read".into(),
                command: "SELECT".into(),
                relations: relations.iter().map(|r| r.to_string()).collect(),
                features: vec![],
                tags: tags.iter().map(|t| t.to_string()).collect(),
            }],
            done: None,
        }
    }

    fn opened(labels: &[(&str, &str)]) -> Detail {
        Detail::SessionOpened {
            client: "127.0.0.1:1".into(),
            application: "psql".into(),
            tls: false,
            upstream_role: "r".into(),
            subject: "s".into(),
            email: None,
            groups: vec![],
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    #[test]
    fn who_touched_what_and_how() {
        let events = vec![
            stored(1, "a", "alice", opened(&[])),
            stored(2, "a", "alice", statement(&["customers (read)"], &["pii"], "allow")),
            stored(
                3,
                "a",
                "alice",
                statement(&["public.customers (read)"], &["pii"], "allow"),
            ),
            stored(4, "b", "bot", opened(&[("kind", "agent"), ("model", "m1")])),
            stored(
                5,
                "b",
                "bot",
                statement(&["orders (write)", "customers (read)"], &["pii"], "allow"),
            ),
            stored(6, "c", "carol", opened(&[])),
            stored(7, "c", "carol", Detail::UnmaskGrantUsed { grant: "leads".into() }),
            stored(8, "c", "carol", statement(&["customers (read)"], &["pii"], "allow")),
            stored(9, "a", "alice", statement(&["customers (read)"], &["pii"], "deny")),
        ];
        let by_relation = lineage(
            &events,
            &LineageQuery {
                relation: Some("customers".into()),
                ..Default::default()
            },
        );
        let summary: Vec<(String, String, bool, u64)> = by_relation
            .iter()
            .map(|r| (r.identity.clone(), r.relation.clone(), r.masked, r.statements))
            .collect();
        assert_eq!(
            summary,
            [
                ("alice".into(), "customers".into(), true, 1),
                ("alice".into(), "public.customers".into(), true, 1),
                ("bot".into(), "customers".into(), true, 1),
                ("carol".into(), "customers".into(), false, 1),
            ],
            "refused statements do not count"
        );
        assert_eq!(by_relation[2].labels["model"], "m1");
        let by_identity = lineage(
            &events,
            &LineageQuery {
                identity: Some("bot".into()),
                ..Default::default()
            },
        );
        assert_eq!(by_identity.len(), 2);
        assert!(
            by_identity
                .iter()
                .any(|r| r.relation == "orders" && r.access == "write")
        );
        let by_tag = lineage(
            &events,
            &LineageQuery {
                tag: Some("finance".into()),
                ..Default::default()
            },
        );
        assert!(by_tag.is_empty());
        assert!(relation_matches("public.customers", "customers"));

        // Columns: a statement over an untagged relation whose result has a
        // tagged column answers for that tag, with how it was masked.
        let column = |name: &str, origin: &str, masking: &str, tags: &[&str]| ColumnRecord {
            name: name.into(),
            origin: Some(origin.into()),
            masking: masking.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
        };
        let mut events = events;
        events.push(stored(
            10,
            "c",
            "carol",
            statement(&["public.staff (read)"], &[], "allow"),
        ));
        events.push(stored(
            11,
            "c",
            "carol",
            Detail::StatementDone {
                seq: 1,
                rows: Some(1),
                duration_us: 5,
                sqlstate: None,
                skipped: false,
                columns: vec![
                    column("who", "public.staff.name", "detectors", &[]),
                    column("mail", "public.staff.email", "clear", &["pii"]),
                ],
                sample: vec![],
            },
        ));
        let pii = lineage(
            &events,
            &LineageQuery {
                tag: Some("pii".into()),
                identity: Some("carol".into()),
                ..Default::default()
            },
        );
        let staff = pii
            .iter()
            .find(|r| r.relation == "public.staff")
            .expect("the tagged column counts");
        assert_eq!(staff.columns["email"], BTreeSet::from(["clear".to_string()]));
        assert_eq!(staff.columns["name"], BTreeSet::from(["detectors".to_string()]));
        assert!(staff.tags.contains("pii"));
        assert!(!relation_matches("billing.customers", "public.customers"));
    }
}
