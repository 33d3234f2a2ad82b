#!/usr/bin/env bash
# Checks the operators' side of monitoring without running a server:
#   1. config/alertmanager/alertmanager.yml is valid (amtool check-config);
#   2. every alerting rule of config/prometheus/rules.yml is routed to the
#      receiver its severity calls for (amtool config routes test), so that
#      no rule can fire into a route nobody reads;
#   3. the Grafana dashboard: every panel query is valid PromQL (promtool,
#      through a generated rules file), every metric it reads is one the
#      service describes (src/metrics.rs), and its datasource is the one
#      provisioned.
# Needs amtool (Debian: prometheus-alertmanager), promtool (prometheus) and
# Python 3 with PyYAML; .ci/run installs them.
#
# Usage: bash scripts/check-alerting.sh   (from anywhere)
set -euo pipefail
cd "$(dirname "$0")/.."

am=config/alertmanager/alertmanager.yml
amtool check-config "$am" >/dev/null
echo "alertmanager config: valid"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 - "$work" <<'PY'
import json
import re
import sys
from pathlib import Path

import yaml

work = Path(sys.argv[1])
errors = []

# --- routes: one line per rule, with the receiver its severity calls for -------
receiver_for = {"critical": "primary-and-secondary-oncall", "warning": "primary-oncall"}
rules = yaml.safe_load(Path("config/prometheus/rules.yml").read_text())
lines = []
for group in rules["groups"]:
    for rule in group["rules"]:
        if "alert" not in rule:
            continue
        severity = (rule.get("labels") or {}).get("severity")
        if severity not in receiver_for:
            errors.append(f"rule {rule['alert']}: severity {severity!r} is not critical or warning")
            continue
        lines.append(f"{receiver_for[severity]}\talertname={rule['alert']}\tseverity={severity}\tinstance=a:8080")
(work / "routes.tsv").write_text("\n".join(sorted(set(lines))) + "\n")

# --- dashboard --------------------------------------------------------------------
dashboard = json.loads(Path("config/grafana/dashboards/audit-service.json").read_text())
datasource = yaml.safe_load(Path("config/grafana/provisioning/datasources/prometheus.yml").read_text())
uid = datasource["datasources"][0]["uid"]
described = set(re.findall(r'describe_\w+!\(\s*"(audit_[a-z_]+)"', Path("src/metrics.rs").read_text()))
records = []
panels = [p for p in dashboard["panels"] if p["type"] != "row"]
if not panels:
    errors.append("dashboard: no panels")
for panel in panels:
    if panel.get("datasource", {}).get("uid") != uid:
        errors.append(f"dashboard panel {panel['title']!r}: datasource uid is not {uid!r}")
    if not panel.get("targets"):
        errors.append(f"dashboard panel {panel['title']!r}: no query")
    for target in panel.get("targets", []):
        expr = target["expr"]
        for name in re.findall(r"\b(audit_[a-z_]+)", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if name not in described and base not in described:
                errors.append(f"dashboard panel {panel['title']!r}: reads {name}, which the service does not describe")
        # Grafana substitutes $instance with a regex of the chosen instances.
        records.append({"record": f"dashboard:panel_{panel['id']}_{target['refId']}", "expr": expr.replace("$instance", ".*")})
(work / "dashboard_rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))

if errors:
    print("\n".join("check-alerting: " + e for e in errors), file=sys.stderr)
    sys.exit(1)
print(f"dashboard: {len(panels)} panels, {len(records)} queries; {len(lines)} rules to route")
PY

while IFS=$'\t' read -r receiver labels; do
  read -r -a label_args <<<"${labels//$'\t'/ }"
  if ! amtool config routes test --config.file="$am" --verify.receivers="$receiver" "${label_args[@]}" >/dev/null 2>&1; then
    echo "check-alerting: ${label_args[*]} is not routed to $receiver:" >&2
    amtool config routes test --config.file="$am" "${label_args[@]}" >&2 || true
    exit 1
  fi
done <"$work/routes.tsv"
echo "routes: every rule reaches the receiver of its severity"

promtool check rules "$work/dashboard_rules.yml" >/dev/null
echo "dashboard queries: valid PromQL"
