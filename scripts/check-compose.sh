#!/usr/bin/env bash
# Checks docker-compose.yml and the Dockerfile it builds without a Docker
# engine (none runs in CI):
#   1. consistency checks in Python (PyYAML): services and dependencies,
#      health checks, mounted files, ports, broker/database/scrape addresses,
#      topics against config/audit-service.toml, the Dockerfile's inputs;
#   2. `docker compose config` (or docker-compose v1), which validates the
#      file against the Compose schema client-side, with an empty environment
#      so that every ${VAR} needs its default.
# Step 2 is skipped with a message when no Compose implementation is
# installed, unless CI=true or REQUIRE_COMPOSE=1.
#
# Usage: bash scripts/check-compose.sh   (from anywhere)
set -euo pipefail
cd "$(dirname "$0")/.."

python=""
for candidate in python3 /usr/bin/python3; do
  if command -v "$candidate" >/dev/null && "$candidate" -c 'import yaml, tomllib' 2>/dev/null; then
    python="$candidate"
    break
  fi
done
if [ -z "$python" ]; then
  echo "check-compose: needs Python 3.11+ with PyYAML (apt-get install python3-yaml)" >&2
  exit 1
fi

"$python" - <<'PY'
import os
import re
import sys
import tomllib
from pathlib import Path

import yaml

root = Path.cwd()
errors = []


def err(msg):
    errors.append(msg)


compose = yaml.safe_load((root / "docker-compose.yml").read_text())
services = compose.get("services") or {}
declared_volumes = set((compose.get("volumes") or {}).keys())


def env_of(name):
    env = services.get(name, {}).get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def expand_defaults(text):
    """${VAR:-default} -> default; $$ -> $ (what Compose does with an empty env)."""
    text = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", text)
    return text.replace("$$", "$")


# --- the stack is there ------------------------------------------------------
for name in ["kafka", "kafka-init", "postgres", "audit-service", "prometheus", "alertmanager", "mailpit", "grafana"]:
    if name not in services:
        err(f"service `{name}` is missing")

# --- images pinned -------------------------------------------------------------
for name, svc in services.items():
    image = svc.get("image")
    if image and "build" not in svc:
        tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else None
        if not tag or tag == "latest":
            err(f"{name}: image `{image}` is not pinned to a version")

# --- dependencies ------------------------------------------------------------
dockerfile = root / "Dockerfile"
dockerfile_text = dockerfile.read_text() if dockerfile.exists() else ""


def has_healthcheck(name):
    svc = services[name]
    hc = svc.get("healthcheck")
    if hc is not None:
        return not hc.get("disable", False) and hc.get("test") not in (None, ["NONE"])
    # a service built from our Dockerfile inherits its HEALTHCHECK
    return "build" in svc and re.search(r"^HEALTHCHECK\s+(?!NONE)", dockerfile_text, re.M) is not None


for name, svc in services.items():
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        deps = {d: {"condition": "service_started"} for d in deps}
    for dep, spec in deps.items():
        if dep not in services:
            err(f"{name}: depends on undefined service `{dep}`")
            continue
        cond = (spec or {}).get("condition", "service_started")
        if cond == "service_healthy" and not has_healthcheck(dep):
            err(f"{name}: waits for `{dep}` to be healthy but `{dep}` has no health check")
        if cond == "service_completed_successfully" and services[dep].get("restart", "no") not in ("no", "on-failure"):
            err(f"{name}: waits for `{dep}` to complete but `{dep}` restarts ({services[dep].get('restart')})")

for name in ["kafka", "postgres", "audit-service"]:
    if name in services and not has_healthcheck(name):
        err(f"{name}: no health check")

deps_of_service = services.get("audit-service", {}).get("depends_on") or {}
if not isinstance(deps_of_service, dict):
    err("audit-service: depends_on must use conditions")
else:
    want = {"postgres": "service_healthy", "kafka-init": "service_completed_successfully"}
    for dep, cond in want.items():
        got = (deps_of_service.get(dep) or {}).get("condition")
        if got != cond:
            err(f"audit-service: must wait for {dep} with condition {cond} (has {got})")
init_deps = services.get("kafka-init", {}).get("depends_on") or {}
if not isinstance(init_deps, dict) or (init_deps.get("kafka") or {}).get("condition") != "service_healthy":
    err("kafka-init: must wait for kafka with condition service_healthy")

# --- volumes and mounted files ----------------------------------------------------
used_volumes = set()
for name, svc in services.items():
    for vol in svc.get("volumes") or []:
        source = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source", "")
        if source.startswith((".", "/", "~")):
            path = (root / source).resolve()
            if not path.exists():
                err(f"{name}: mounted path `{source}` does not exist in the repository")
        else:
            used_volumes.add(source)
            if source not in declared_volumes:
                err(f"{name}: named volume `{source}` is not declared under top-level volumes")
for vol in declared_volumes - used_volumes:
    err(f"top-level volume `{vol}` is not used")

# --- ports -------------------------------------------------------------------------
published = {}
for name, svc in services.items():
    for port in svc.get("ports") or []:
        parts = str(port).split(":")
        host = parts[-2] if len(parts) >= 2 else parts[-1]
        if host in published:
            err(f"host port {host} published by both {published[host]} and {name}")
        published[host] = name

# --- Dockerfile and its build context ------------------------------------------------
svc = services.get("audit-service", {})
build = svc.get("build")
context = root / (build if isinstance(build, str) else (build or {}).get("context", "."))
if not (context / "Dockerfile").exists():
    err("audit-service: build context has no Dockerfile")
froms = re.findall(r"^FROM\s+(\S+)", dockerfile_text, re.M)
if not froms or froms[0] != "rust:1.95-bookworm":
    err(f"Dockerfile: build stage must be FROM rust:1.95-bookworm (has {froms[:1]})")
if not froms or froms[-1] != "debian:bookworm-slim":
    err(f"Dockerfile: runtime stage must be FROM debian:bookworm-slim (has {froms[-1:]})")
if "cargo build --release --locked" not in dockerfile_text:
    err("Dockerfile: must build with `cargo build --release --locked`")
for line in re.findall(r"^COPY\s+(.+)$", dockerfile_text, re.M):
    args = [a for a in line.split() if not a.startswith("--")]
    if "--from=" in line:
        continue
    for src in args[:-1]:
        if not (context / src).exists():
            err(f"Dockerfile: COPY source `{src}` does not exist")
if not re.search(r"^USER\s+(?!root\b|0\b)\S+", dockerfile_text, re.M):
    err("Dockerfile: the runtime stage must switch to a non-root USER")
if 'ENTRYPOINT ["audit-service"]' not in dockerfile_text or 'CMD ["run"]' not in dockerfile_text:
    err('Dockerfile: needs ENTRYPOINT ["audit-service"] and CMD ["run"]')
expose = re.findall(r"^EXPOSE\s+(\d+)", dockerfile_text, re.M)
dockerignore = (root / ".dockerignore").read_text().split() if (root / ".dockerignore").exists() else []
for must in ["target/", ".git/"]:
    if must not in dockerignore and must.rstrip("/") not in dockerignore:
        err(f".dockerignore: must exclude {must}")

# The health check URL is a route the service serves.
# (any quoted absolute path in src/: routes are registered in more than one way)
routes = set()
for rs in (root / "src").rglob("*.rs"):
    routes.update(re.findall(r'"(/[A-Za-z0-9_./{}-]*)"', rs.read_text()))
health_urls = re.findall(r"http://[^\s\"']+", dockerfile_text)
hc = (svc.get("healthcheck") or {}).get("test") or []
health_urls += re.findall(r"http://[^\s\"']+", " ".join(hc) if isinstance(hc, list) else hc)
for url in health_urls:
    m = re.match(r"http://([^/:]+):(\d+)(/\S*)", url)
    if not m:
        err(f"health check URL `{url}` has no explicit port and path")
        continue
    if m.group(3) not in routes:
        err(f"health check path `{m.group(3)}` is not a route in src/ (routes: {sorted(routes)})")
    listen = env_of("audit-service").get("AUDIT__HTTP__LISTEN", "")
    if not listen.endswith(":" + m.group(2)):
        err(f"health check port {m.group(2)} differs from AUDIT__HTTP__LISTEN={listen}")

# --- addresses between services ---------------------------------------------------
kenv = env_of("kafka")
advertised = {}
for item in kenv.get("KAFKA_ADVERTISED_LISTENERS", "").split(","):
    if "://" in item:
        lname, addr = item.split("://", 1)
        advertised[lname] = addr
listeners = {}
for item in kenv.get("KAFKA_LISTENERS", "").split(","):
    if "://" in item:
        lname, addr = item.split("://", 1)
        listeners[lname] = addr
protocol_map = dict(p.split(":", 1) for p in kenv.get("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", "").split(",") if ":" in p)
for lname in set(listeners) | set(advertised):
    if lname not in protocol_map:
        err(f"kafka: listener {lname} has no entry in KAFKA_LISTENER_SECURITY_PROTOCOL_MAP")
for lname in advertised:
    if lname not in listeners:
        err(f"kafka: advertised listener {lname} is not in KAFKA_LISTENERS")
if kenv.get("KAFKA_CONTROLLER_LISTENER_NAMES", "") not in listeners:
    err("kafka: KAFKA_CONTROLLER_LISTENER_NAMES is not one of KAFKA_LISTENERS")
if kenv.get("KAFKA_INTER_BROKER_LISTENER_NAME", "") not in advertised:
    err("kafka: KAFKA_INTER_BROKER_LISTENER_NAME is not an advertised listener")
voters = kenv.get("KAFKA_CONTROLLER_QUORUM_VOTERS", "")
ctrl = listeners.get(kenv.get("KAFKA_CONTROLLER_LISTENER_NAMES", ""), "")
if not ctrl or voters.split(":")[-1] != ctrl.split(":")[-1]:
    err(f"kafka: quorum voters `{voters}` do not use the controller listener port `{ctrl}`")
if not re.fullmatch(r"[A-Za-z0-9_-]{22}", kenv.get("CLUSTER_ID", "")):
    err("kafka: CLUSTER_ID must be a base64 UUID (22 characters)")
if kenv.get("KAFKA_PROCESS_ROLES") != "broker,controller":
    err("kafka: must run KRaft with KAFKA_PROCESS_ROLES=broker,controller")

in_network = {a for a in advertised.values() if a.split(":")[0] in services}
brokers = env_of("audit-service").get("KAFKA_BROKERS", "")
for b in brokers.split(","):
    if b not in in_network:
        err(f"audit-service: KAFKA_BROKERS `{b}` is not an advertised in-network listener {sorted(in_network)}")
for ap in advertised.values():
    host, port = ap.rsplit(":", 1)
    if host in ("localhost", "127.0.0.1") and port not in published:
        err(f"kafka: host listener {ap} is advertised but port {port} is not published")

# the topic init uses the in-network listener and creates the service's topics
init_cmd = services.get("kafka-init", {}).get("command") or []
init_script = expand_defaults(init_cmd if isinstance(init_cmd, str) else "\n".join(init_cmd))
for bs in re.findall(r"--bootstrap-server\s+(\S+)", init_script):
    if bs not in in_network:
        err(f"kafka-init: --bootstrap-server {bs} is not an advertised in-network listener")
created = set(re.findall(r"--create\b[^\n]*--topic\s+(\S+)", init_script))
for line in init_script.splitlines():
    if "--create" in line and "--if-not-exists" not in line:
        err(f"kafka-init: topic creation must be idempotent (--if-not-exists): {line.strip()}")
cfg = tomllib.loads((root / "config/audit-service.toml").read_text())
kafka_cfg = cfg.get("kafka", {})
for key, default in [("events_topic", "auth.events"), ("dlq_topic", "auth.events.dlq"), ("alerts_topic", "auth.alerts")]:
    topic = kafka_cfg.get(key, default)
    if topic not in created:
        err(f"kafka-init: does not create `{topic}` (kafka.{key}); creates {sorted(created)}")

db_url = expand_defaults(env_of("audit-service").get("DATABASE_URL", ""))
m = re.match(r"postgres(?:ql)?://([^:@/]+)(?::([^@/]*))?@([^:/]+):(\d+)/(\w+)", db_url)
penv = {k: expand_defaults(v) for k, v in env_of("postgres").items()}
if not m:
    err(f"audit-service: DATABASE_URL `{db_url}` is not postgres://user:password@host:port/db")
else:
    user, password, host, port, db = m.groups()
    if host != "postgres" or port != "5432":
        err(f"audit-service: DATABASE_URL points at {host}:{port}, not postgres:5432")
    if user != penv.get("POSTGRES_USER", "postgres"):
        err("audit-service: DATABASE_URL user differs from POSTGRES_USER")
    if (password or "") != penv.get("POSTGRES_PASSWORD", ""):
        err("audit-service: DATABASE_URL password differs from POSTGRES_PASSWORD (with an empty environment)")
    if db != penv.get("POSTGRES_DB", user):
        err("audit-service: DATABASE_URL database differs from POSTGRES_DB")
if services.get("postgres", {}).get("image", "").split(":")[-1].split(".")[0] != "15":
    err("postgres: must be PostgreSQL 15")

listen = env_of("audit-service").get("AUDIT__HTTP__LISTEN", "")
if not listen.startswith("0.0.0.0:"):
    err("audit-service: AUDIT__HTTP__LISTEN must bind 0.0.0.0 inside the container")
http_port = listen.rsplit(":", 1)[-1]
if expose != [http_port]:
    err(f"Dockerfile: EXPOSE {expose} differs from the listen port {http_port}")
targets = [str(p).split(":")[-1] for p in svc.get("ports") or []]
if http_port not in targets:
    err(f"audit-service: listen port {http_port} is not published ({targets})")
if "ADMIN_TOKEN" not in env_of("audit-service"):
    err("audit-service: ADMIN_TOKEN is not passed")
else:
    # the service refuses to start with a shorter ADMIN_TOKEN
    min_len = 16
    auth_rs = root / "src/api/auth.rs"
    if auth_rs.exists():
        m = re.search(r"MIN_ENV_TOKEN_BYTES\s*:\s*usize\s*=\s*(\d+)", auth_rs.read_text())
        if m:
            min_len = int(m.group(1))
    token = expand_defaults(env_of("audit-service")["ADMIN_TOKEN"])
    if len(token.encode()) < min_len:
        err(f"audit-service: the default ADMIN_TOKEN is shorter than {min_len} bytes; the service would refuse it")

# --- Prometheus -----------------------------------------------------------------
prom = services.get("prometheus", {})
prom_dir = None
for vol in prom.get("volumes") or []:
    src, dst = vol.split(":")[:2]
    if dst == "/etc/prometheus":
        prom_dir = root / src
if prom_dir is None:
    err("prometheus: config/prometheus is not mounted at /etc/prometheus")
else:
    pconf_path = prom_dir / "prometheus.yml"
    if not pconf_path.exists():
        err(f"prometheus: {pconf_path.relative_to(root)} does not exist")
    else:
        pconf = yaml.safe_load(pconf_path.read_text())
        rule_files = pconf.get("rule_files") or []
        if not rule_files:
            err("prometheus.yml: no rule_files")
        rules_text = ""
        for rf in rule_files:
            if not (prom_dir / rf).exists():
                err(f"prometheus.yml: rule file {rf} does not exist beside it")
            else:
                rules_text += (prom_dir / rf).read_text()
        jobs = {}
        for sc in pconf.get("scrape_configs") or []:
            for st in sc.get("static_configs") or []:
                for t in st.get("targets") or []:
                    jobs[t] = sc["job_name"]
        want = f"audit-service:{http_port}"
        if want not in jobs:
            err(f"prometheus.yml: does not scrape {want} (targets: {sorted(jobs)})")
        else:
            job = jobs[want]
            if f'job="{job}"' not in rules_text:
                err(f"rules: no rule refers to the scrape job `{job}` (up{{job=\"{job}\"}})")
        for t in jobs:
            host = t.split(":")[0]
            if host not in services and host not in ("localhost", "127.0.0.1"):
                err(f"prometheus.yml: scrape target {t} is not a compose service")
        am_targets = [t for am in (pconf.get("alerting") or {}).get("alertmanagers") or []
                      for st in am.get("static_configs") or [] for t in st.get("targets") or []]
        if am_targets != ["alertmanager:9093"]:
            err(f"prometheus.yml: alerts must go to alertmanager:9093 (has {am_targets})")

# --- Alertmanager, its mail relay, Grafana ------------------------------------------
def mounts(name):
    out = {}
    for vol in services.get(name, {}).get("volumes") or []:
        parts = vol.split(":")
        out[parts[1]] = parts[0]
    return out


am_mounts = mounts("alertmanager")
if am_mounts.get("/etc/alertmanager") != "./config/alertmanager":
    err("alertmanager: config/alertmanager is not mounted at /etc/alertmanager")
am_conf = yaml.safe_load((root / "config/alertmanager/alertmanager.yml").read_text())
if "--config.file=/etc/alertmanager/alertmanager.yml" not in (services.get("alertmanager", {}).get("command") or []):
    err("alertmanager: does not load /etc/alertmanager/alertmanager.yml")
smarthost = (am_conf.get("global") or {}).get("smtp_smarthost", "")
if smarthost.split(":")[0] not in services:
    err(f"alertmanager.yml: smtp_smarthost {smarthost} is not a compose service")
gf_mounts = mounts("grafana")
for dst, src in [("/etc/grafana/provisioning", "./config/grafana/provisioning"),
                 ("/var/lib/grafana/dashboards", "./config/grafana/dashboards")]:
    if gf_mounts.get(dst) != src:
        err(f"grafana: {src} is not mounted at {dst}")
gf_ds = yaml.safe_load((root / "config/grafana/provisioning/datasources/prometheus.yml").read_text())
for ds in gf_ds.get("datasources") or []:
    m = re.match(r"https?://([^:/]+):(\d+)", ds.get("url", ""))
    if not m or m.group(1) != "prometheus" or m.group(2) != "9090":
        err(f"grafana datasource {ds.get('name')}: url {ds.get('url')} is not http://prometheus:9090")
gf_dash = yaml.safe_load((root / "config/grafana/provisioning/dashboards/audit-service.yml").read_text())
for prov in gf_dash.get("providers") or []:
    if prov.get("options", {}).get("path") not in gf_mounts:
        err(f"grafana dashboards provider {prov.get('name')}: path is not a mount")

# --- every ${VAR} has a default ---------------------------------------------------
raw = (root / "docker-compose.yml").read_text()
for var in re.findall(r"(?<!\$)\$\{([^}]*)\}", raw):
    if ":-" not in var and "-" not in var:
        err(f"${{{var}}} has no default: `docker compose up` would need it set")
for var in re.findall(r"(?<!\$)\$([A-Za-z_][A-Za-z0-9_]*)", raw):
    err(f"${var} without braces or default (write $$ for a literal $)")

if errors:
    for e in errors:
        print(f"check-compose: {e}", file=sys.stderr)
    sys.exit(1)
print(f"check-compose: docker-compose.yml consistent ({len(services)} services), Dockerfile inputs present")
PY

# --- the Compose schema (client-side, no engine) ------------------------------------
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null; then
  compose=(docker-compose)
else
  compose=()
fi
if [ ${#compose[@]} -eq 0 ]; then
  if [ "${CI:-}" = "true" ] || [ "${REQUIRE_COMPOSE:-}" = "1" ]; then
    echo "check-compose: no Compose implementation (docker compose / docker-compose) to validate the schema" >&2
    exit 1
  fi
  echo "check-compose: schema validation skipped (no docker compose / docker-compose installed)"
  exit 0
fi
# An empty environment: every variable must have its default in the file.
env -i PATH="$PATH" HOME="${HOME:-/root}" "${compose[@]}" -f docker-compose.yml config -q
echo "check-compose: '${compose[*]} config' accepts docker-compose.yml"
