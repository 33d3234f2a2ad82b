//! The OpenAPI 3 document served at `GET /api/v1/openapi.json`, written by
//! hand next to the route table; `tests` check that both list the same
//! routes.

use std::sync::OnceLock;

use serde_json::{Value, json};

/// The document as JSON text (built once).
pub fn document_text() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| serde_json::to_string_pretty(&document()).unwrap_or_default())
}

fn query(name: &str, description: &str, schema: Value) -> Value {
    json!({"name": name, "in": "query", "required": false, "description": description, "schema": schema})
}

fn string() -> Value {
    json!({"type": "string"})
}

fn timestamp() -> Value {
    json!({"type": "string", "description": "RFC 3339 timestamp or YYYY-MM-DD (midnight UTC)"})
}

fn limit(max: u64, default: u64) -> Value {
    json!({"type": "integer", "minimum": 1, "maximum": max, "default": default})
}

fn errors(codes: &[&str]) -> Value {
    let mut out = serde_json::Map::new();
    for code in codes {
        let description = match *code {
            "400" => "bad parameter or body",
            "401" => "missing, malformed, unknown, expired or badly signed token",
            "403" => "not an admin, or the client network is not allowed",
            "409" => "conflicting work in progress",
            "413" => "request body too large",
            "415" => "body is not JSON",
            "429" => "rate limited (see Retry-After)",
            "503" => "database unavailable, busy or query timeout",
            _ => "error",
        };
        out.insert((*code).to_owned(), json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}));
    }
    Value::Object(out)
}

fn admin_get(summary: &str, parameters: Value, schema: Value) -> Value {
    let mut responses = errors(&["400", "401", "403", "429", "503"]);
    responses["200"] = json!({"description": "OK", "content": {"application/json": {"schema": schema}}});
    json!({"get": {"summary": summary, "security": [{"bearer": []}], "parameters": parameters, "responses": responses}})
}

fn admin_post(summary: &str, body: Value, schema: Value, extra_errors: &[&str]) -> Value {
    let mut codes = vec!["400", "401", "403", "413", "415", "429", "503"];
    codes.extend_from_slice(extra_errors);
    let mut responses = errors(&codes);
    responses["200"] = json!({"description": "OK", "content": {"application/json": {"schema": schema}}});
    json!({"post": {
        "summary": summary,
        "security": [{"bearer": []}],
        "requestBody": {"required": true, "content": {"application/json": {"schema": body}}},
        "responses": responses
    }})
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// Pages of `item`.
fn page_of(item: &str) -> Value {
    json!({"type": "object", "required": ["items", "next_cursor", "limit"], "properties": {
        "items": {"type": "array", "items": schema_ref(item)},
        "next_cursor": {"type": ["string", "null"], "description": "pass as cursor for the next page; null on the last"},
        "limit": {"type": "integer"}
    }})
}

pub fn document() -> Value {
    let log_filters = json!([
        query("user_id", "exact user id", string()),
        query("action", "exact action, or a prefix ending in * (SECURITY_*)", string()),
        query("ip", "an address or a CIDR network", string()),
        query("session_id", "exact session id", string()),
        query("from", "inclusive start (event time)", timestamp()),
        query("to", "exclusive end (event time)", timestamp()),
        query("limit", "page size (json); row cap (ndjson)", limit(1000, 100)),
        query("cursor", "next_cursor of the previous page", string()),
        query(
            "format",
            "json (pages) or ndjson (streams the whole range)",
            json!({"type": "string", "enum": ["json", "ndjson"]})
        ),
    ]);
    let mut paths = serde_json::Map::new();
    paths.insert("/api/v1/health".into(), json!({"get": {
        "summary": "Liveness (no token)",
        "responses": {"200": {"description": "the process answers", "content": {"application/json": {"schema": {"type": "object", "properties": {"status": {"type": "string", "enum": ["ok"]}}}}}}}
    }}));
    paths.insert(
        "/api/v1/openapi.json".into(),
        json!({"get": {
            "summary": "This document (no token)",
            "responses": {"200": {"description": "OpenAPI 3 document", "content": {"application/json": {}}}}
        }}),
    );
    paths.insert(
        "/metrics".into(),
        json!({"get": {
            "summary": "Prometheus metrics (no token unless api.metrics_require_token)",
            "responses": {"200": {"description": "text exposition format 0.0.4", "content": {"text/plain": {}}}}
        }}),
    );
    paths.insert("/api/v1/audit/health".into(), {
        let mut h = admin_get("Kafka, ingest, PostgreSQL and storage health", json!([]), schema_ref("Health"));
        h["get"]["responses"]["503"] = json!({"description": "status failing (PostgreSQL unreachable)", "content": {"application/json": {"schema": schema_ref("Health")}}});
        h
    });
    paths.insert(
        "/api/v1/audit/security".into(),
        admin_get(
            "Failed logins (last minute/hour, top users), suspicious IPs, open alerts, recent SECURITY_* events",
            json!([
                query("top", "users listed per window", limit(100, 10)),
                query("limit", "events, alerts and IPs listed", limit(500, 50)),
                query("since", "start of the SECURITY_* list (default 24 h ago)", timestamp()),
                query(
                    "ip_threshold",
                    "suspicious above this many failures in the last hour",
                    json!({"type": "integer", "minimum": 0, "default": 10})
                ),
            ]),
            json!({"type": "object"}),
        ),
    );
    paths.insert(
        "/api/v1/audit/alerts".into(),
        admin_get(
            "Alert history, newest first",
            json!([
                query("state", "", json!({"type": "string", "enum": ["firing", "escalated", "resolved"]})),
                query("rule", "", string()),
                query("subject", "", string()),
                query("severity", "", json!({"type": "string", "enum": ["warning", "critical"]})),
                query("since", "detected at or after", timestamp()),
                query("limit", "", limit(1000, 100)),
                query("cursor", "", string()),
            ]),
            page_of("Alert"),
        ),
    );
    paths.insert("/api/v1/audit/logs".into(), {
        let mut logs = admin_get("Search the audit log, newest first", log_filters, page_of("LogRow"));
        logs["get"]["responses"]["200"]["content"]["application/x-ndjson"] =
            json!({"schema": schema_ref("LogRow"), "description": "format=ndjson: one LogRow per line; an {\"error\":...} line ends a failed stream"});
        logs
    });
    paths.insert("/api/v1/audit/cleanup".into(), admin_post(
        "Remove events older than retention_days (whole partitions dropped; boundary rows deleted); recorded as ADMIN_AUDIT_CLEANUP",
        json!({"type": "object", "required": ["retention_days"], "additionalProperties": false, "properties": {
            "retention_days": {"type": "integer", "minimum": 1, "description": "refused below retention.min_days"},
            "dry_run": {"type": "boolean", "default": false}
        }}),
        schema_ref("CleanupOutcome"),
        &["409"],
    ));
    let mut maintenance = admin_get("Maintenance mode state", json!([]), schema_ref("Maintenance"));
    maintenance["post"] = admin_post(
        "Pause (true) or resume (false) consumption of the events topic on every instance (stored; instances follow it within a second and start paused while it is set)",
        json!({"type": "object", "required": ["paused"], "additionalProperties": false, "properties": {
            "paused": {"type": "boolean"}, "reason": {"type": "string"}
        }}),
        schema_ref("Maintenance"),
        &[],
    )["post"]
        .clone();
    paths.insert("/api/v1/audit/maintenance".into(), maintenance);
    paths.insert(
        "/api/v1/audit/reports/daily".into(),
        admin_get(
            "Events per action for a UTC day (default: the last 24 hours)",
            json!([query("date", "YYYY-MM-DD", json!({"type": "string", "format": "date"}))]),
            json!({"type": "object"}),
        ),
    );
    paths.insert(
        "/api/v1/audit/reports/security-incidents".into(),
        admin_get(
            "SECURITY_* events, newest first",
            json!([
                query("since", "default 24 h ago", timestamp()),
                query("limit", "", limit(1000, 100)),
                query("cursor", "", string()),
            ]),
            page_of("LogRow"),
        ),
    );
    paths.insert(
        "/api/v1/audit/reports/retention".into(),
        admin_get(
            "Oldest event, events older than the policy, partitions, last cleanup",
            json!([query(
                "retention_days",
                "policy to check (default retention.days)",
                json!({"type": "integer", "minimum": 1})
            )]),
            json!({"type": "object"}),
        ),
    );
    paths.insert(
        "/api/v1/audit/reports/completeness".into(),
        admin_get(
            "Events per UTC hour, empty hours flagged (at most 31 days)",
            json!([query("from", "default: to - 24 h", timestamp()), query("to", "default: now", timestamp())]),
            json!({"type": "object"}),
        ),
    );
    paths.insert("/api/v1/audit/users/{user_id}/activity".into(), admin_get(
        "A user's open and recent sessions, logins and failed logins (24 h, 7 d, 30 d), actions per day, distinct IPs and user agents",
        json!([
            {"name": "user_id", "in": "path", "required": true, "schema": string()},
            query("days", "how far back (default 30, at most 366)", json!({"type": "integer", "minimum": 1, "maximum": 366})),
        ]),
        json!({"type": "object"}),
    ));
    paths.insert(
        "/api/v1/audit/activity/summary".into(),
        admin_get(
            "Active sessions and users, top actions, admin actions per admin, busiest hours (from the rollups)",
            json!([query("from", "default: to - 24 h", timestamp()), query("to", "default: now", timestamp())]),
            json!({"type": "object"}),
        ),
    );

    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "audit-service admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Health, security review, alerts, audit log search, retention, maintenance mode and compliance reports. Admin routes need Authorization: Bearer <token> (static token, ADMIN_TOKEN, or an admin JWT)."
        },
        "paths": Value::Object(paths),
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "static admin token or JWT"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
                    "code": {"type": "string"}, "message": {"type": "string"}}}}},
                "LogRow": {"type": "object", "properties": {
                    "event_id": {"type": "string", "format": "uuid"},
                    "created_at": {"type": "string", "format": "date-time", "description": "event time"},
                    "received_at": {"type": "string", "format": "date-time"},
                    "action": {"type": "string"},
                    "user_id": {"type": ["string", "null"]},
                    "username": {"type": ["string", "null"]},
                    "ip_address": {"type": ["string", "null"]},
                    "user_agent": {"type": ["string", "null"]},
                    "session_id": {"type": ["string", "null"]},
                    "request_id": {"type": ["string", "null"]},
                    "metadata": {"type": ["object", "null"]},
                    "kafka_partition": {"type": "integer", "description": "-1 for admin actions"},
                    "kafka_offset": {"type": "integer"}
                }},
                "Alert": {"type": "object", "properties": {
                    "id": {"type": "integer"}, "alert_id": {"type": "string", "format": "uuid"}, "rule": {"type": "string"},
                    "subject": {"type": "string"}, "state": {"type": "string"}, "severity": {"type": "string"},
                    "count": {"type": "integer"}, "threshold": {"type": "integer"}, "window_seconds": {"type": "integer"},
                    "episode_start": {"type": "string", "format": "date-time"},
                    "first_event_at": {"type": ["string", "null"], "format": "date-time"},
                    "last_event_at": {"type": ["string", "null"], "format": "date-time"},
                    "sample_event_ids": {"type": "array", "items": {"type": "string", "format": "uuid"}},
                    "recommended_action": {"type": "string"},
                    "detected_at": {"type": "string", "format": "date-time"}, "published": {"type": "boolean"}
                }},
                "Health": {"type": "object", "required": ["status", "problems"], "properties": {
                    "status": {"type": "string", "enum": ["ok", "degraded", "failing"]},
                    "problems": {"type": "array", "items": {"type": "string"}},
                    "kafka": {"type": "object"}, "ingest": {"type": "object"}, "database": {"type": "object"},
                    "storage": {"type": ["object", "null"]}
                }},
                "CleanupOutcome": {"type": "object", "properties": {
                    "dry_run": {"type": "boolean"}, "retention_days": {"type": "integer"}, "min_retention_days": {"type": "integer"},
                    "cutoff": {"type": "string", "format": "date-time"}, "partitions_dropped": {"type": "integer"},
                    "rows_removed": {"type": "integer"}, "rows_removed_exact": {"type": "boolean"},
                    "changes": {"type": "array", "items": {"type": "object"}},
                    "activity": {"type": "array", "items": {"type": "object", "properties": {
                        "action": {"type": "string"}, "table": {"type": "string"}, "rows": {"type": "integer"}
                    }}},
                    "audit_event_id": {"type": ["string", "null"], "format": "uuid"}, "duration_ms": {"type": "integer"}
                }},
                "Maintenance": {"type": "object", "properties": {
                    "paused": {"type": "boolean"}, "backpressure_paused": {"type": "boolean"}, "consumer_lag": {"type": "integer"},
                    "shared": {"type": ["object", "null"], "properties": {
                        "paused": {"type": "boolean"}, "reason": {"type": ["string", "null"]},
                        "changed_by": {"type": "string"}, "changed_at": {"type": "string", "format": "date-time"},
                        "version": {"type": "integer"}
                    }},
                    "recorded": {"type": "boolean"}, "audit_event_id": {"type": "string", "format": "uuid"}
                }}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn every_route_of_the_router_is_documented_and_nothing_else() {
        let doc = document();
        let documented: BTreeSet<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, ops)| ops.as_object().unwrap().keys().map(move |m| (m.to_uppercase(), path.clone())))
            .collect();
        let routed: BTreeSet<(String, String)> =
            crate::api::routes().into_iter().map(|r| (r.method.to_string(), r.path.to_owned())).collect();
        assert_eq!(documented, routed);
        // Admin routes say they need the bearer token; public ones do not.
        for route in crate::api::routes() {
            let op = &doc["paths"][route.path][route.method.as_str().to_lowercase()];
            assert_eq!(op.get("security").is_some(), route.access == crate::api::Access::Admin, "{}", route.path);
        }
        assert_eq!(doc["openapi"], "3.1.0");
    }
}
