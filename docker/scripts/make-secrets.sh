#!/usr/bin/env bash
# Create the two secrets docker/compose.yaml reads, once: the PostgreSQL password of the
# MLflow backend store and the Ray cluster token. They never enter a URI, an image or git
# (docker/secrets/ is git-ignored). The folder is private to you (0700); the files are 0644
# because compose bind-mounts them unchanged and the containers run as uid 10001.
set -euo pipefail
dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/secrets"
mkdir -p "${dir}"
chmod 700 "${dir}"
for name in postgres_password ray_auth_token; do
    if [ -s "${dir}/${name}" ]; then
        echo "kept ${dir}/${name}"
        continue
    fi
    python3 -c 'import secrets; print(secrets.token_hex(32), end="")' > "${dir}/${name}"
    chmod 644 "${dir}/${name}"
    echo "wrote ${dir}/${name}"
done
