#!/usr/bin/env bash
# Installs what the baselines of `cargo bench --bench pipeline` need:
#   (c) kcat, jq, psql (Debian packages; librdkafka with zstd)
#   (d) confluent-kafka and psycopg 3 (PyPI wheels; bundled librdkafka with zstd)
# Benchmarks do not run in CI; run this once on a machine before benchmarking.
#
#   bash benches/baselines/setup.sh
set -euo pipefail

missing=()
for tool in kcat jq psql; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
  packages=()
  for tool in "${missing[@]}"; do
    case $tool in
      psql) packages+=(postgresql-client) ;;
      *) packages+=("$tool") ;;
    esac
  done
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import confluent_kafka, psycopg' 2>/dev/null; then
  "$python" -m pip install --quiet confluent-kafka 'psycopg[binary]'
fi

kcat -V 2>&1 | grep -q 'zstd' || { echo "kcat's librdkafka lacks zstd" >&2; exit 1; }
"$python" -c 'import confluent_kafka, psycopg; print("confluent-kafka", confluent_kafka.__version__, "librdkafka", confluent_kafka.libversion()[0], "psycopg", psycopg.__version__)'
echo "baselines ready: kcat $(kcat -V 2>&1 | sed -n 's/^Version \([^ ]*\).*/\1/p'), $(jq --version), $(psql --version)"
