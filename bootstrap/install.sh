#!/usr/bin/env bash
# Install forge-factory on a fresh hive node, or bring an installed one up to
# date. Idempotent: every step first checks whether it is already done, so a
# second run changes nothing (and says so).
#
#   sudo bootstrap/install.sh                 # root /srv/factory, venv /opt/forge-factory/venv
#   sudo bootstrap/install.sh --root /data/factory --no-start
#   bootstrap/install.sh --dry-run            # print what would be done; touches nothing
#
# Steps: system user `forge`; venv (CPU-only torch first on nodes without an
# NVIDIA GPU); the package from this checkout; the factory root (`factory
# init`, as forge); the GGUF tools (bootstrap/format-tools.sh: llama.cpp
# built for this CPU, cached after the first build); the service's environment file (mode 0600, root only: it
# holds HF_TOKEN); the systemd unit (+ a drop-in making cold tiers writable);
# a `factory` wrapper in /usr/local/bin; daemon-reload; enable --now.
#
# Environment: FACTORY_ROOT (default root), PYTHON (interpreter for the venv,
# default /usr/bin/python3), HF_TOKEN (the Hugging Face token for gated or
# private models: written to the environment file, never shown or passed on
# a command line; unset keeps the file's current token). For tests and
# unusual layouts: FORGE_USER (default forge), FORGE_UNIT_DIR (default
# /etc/systemd/system), FORGE_BIN_DIR (default /usr/local/bin),
# FORGE_ENV_FILE (default /etc/forge-factory/env).
set -euo pipefail

# The CPU build of torch: on a node without a GPU this is installed before the
# package, so its `torch>=2.4` requirement is already met and pip does not
# download the multi-GB CUDA build from PyPI.
TORCH_VERSION="2.13.0"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"
UNIT_NAME="forge-factory.service"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="${FACTORY_ROOT:-/srv/factory}"
PREFIX="/opt/forge-factory"
START=1
GGUF=1
DRY_RUN=0
SVC_USER="${FORGE_USER:-forge}"
UNIT_DIR="${FORGE_UNIT_DIR:-/etc/systemd/system}"
BIN_DIR="${FORGE_BIN_DIR:-/usr/local/bin}"
ENV_FILE="${FORGE_ENV_FILE:-/etc/forge-factory/env}"
# The system interpreter: the venv links to it, so the service user must be
# able to run it (a pyenv under /root would not do).
PYTHON="${PYTHON:-$(command -v /usr/bin/python3 || command -v python3 || echo python3)}"

usage() {
    # The header comment above, without its '#'s.
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
    cat <<EOF

Options:
  --root DIR     factory root to create and serve (default: \$FACTORY_ROOT or /srv/factory)
  --prefix DIR   install prefix; the venv goes to DIR/venv (default: /opt/forge-factory)
  --no-start     install and enable nothing to run: skip 'systemctl enable --now'
  --no-gguf      skip the GGUF tools (llama.cpp is compiled on first install: minutes)
  --dry-run      print every step and what it would run; change nothing
  -h, --help     this text
EOF
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
        --root=*) ROOT="${1#*=}"; shift ;;
        --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
        --prefix=*) PREFIX="${1#*=}"; shift ;;
        --no-start) START=0; shift ;;
        --no-gguf) GGUF=0; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

[[ "$ROOT" == /* ]] || ROOT="$(pwd)/$ROOT"
[[ "$PREFIX" == /* ]] || PREFIX="$(pwd)/$PREFIX"
VENV="$PREFIX/venv"
FACTORY="$VENV/bin/factory"
CHANGED=0  # set when something the running service depends on changed

step() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
# run CMD...: do it (or, with --dry-run, only show it). Every change goes through here.
run() {
    if [[ $DRY_RUN -eq 1 ]]; then
        printf '    would run:'; printf ' %q' "$@"; printf '\n'
    else
        printf '    +'; printf ' %q' "$@"; printf '\n'
        "$@"
    fi
}
die() { echo "install.sh: $*" >&2; exit 1; }
as_user() { run runuser -u "$SVC_USER" -- "$@"; }
# The user's primary group (its own, for the `forge` user useradd creates).
svc_group() { id -gn "$SVC_USER" 2>/dev/null || echo "$SVC_USER"; }

# install_file SRC_CONTENT_FILE DEST MODE: copy only when the bytes differ.
install_file() {
    local src="$1" dest="$2" mode="$3"
    if [[ -f "$dest" ]] && cmp -s "$src" "$dest"; then
        note "$dest is up to date"
        return 1
    fi
    run install -D -m "$mode" "$src" "$dest"
    return 0
}

have_systemd() { [[ -d /run/systemd/system ]]; }

# A fingerprint of everything pip would install from this checkout, so an
# unchanged checkout is not reinstalled (pip always rebuilds a local path).
source_fingerprint() {
    (cd "$REPO" && find pyproject.toml factory adapters stations -type f \
        ! -name '*.pyc' ! -path '*/__pycache__/*' 2>/dev/null | LC_ALL=C sort | xargs sha256sum) \
        | sha256sum | cut -d' ' -f1
}

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# -- 0. preconditions ---------------------------------------------------------------
step "checking preconditions"
if [[ $DRY_RUN -eq 0 && $(id -u) -ne 0 ]]; then
    die "must run as root (it creates a user, $PREFIX and a systemd unit); try: sudo $0 (or --dry-run)"
fi
[[ -f "$REPO/pyproject.toml" && -d "$REPO/factory" ]] || die "$REPO is not a forge-factory checkout"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$PYTHON is older than 3.10; install python3.10+ (and python3-venv) or set PYTHON=/path/to/python3.x"
note "repository $REPO, root $ROOT, venv $VENV, user $SVC_USER$([[ $DRY_RUN -eq 1 ]] && echo ', DRY RUN')"

# -- 1. the service user ------------------------------------------------------------
step "system user '$SVC_USER'"
if getent passwd "$SVC_USER" >/dev/null; then
    note "exists"
else
    run useradd --system --user-group --home-dir /var/lib/forge-factory --no-create-home \
        --shell /usr/sbin/nologin --comment "forge-factory worker" "$SVC_USER"
fi

# -- 2. the virtual environment -------------------------------------------------------
step "virtual environment $VENV"
if [[ -x "$VENV/bin/python" ]]; then
    note "exists"
else
    run "$PYTHON" -m venv "$VENV"
    run "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi

if [[ $DRY_RUN -eq 0 ]] && ! runuser -u "$SVC_USER" -- "$VENV/bin/python" -c '' 2>/dev/null; then
    die "$SVC_USER cannot run $VENV/bin/python (-> $(readlink -f "$VENV/bin/python")); remove $VENV and rerun with PYTHON=/usr/bin/python3 (a system interpreter)"
fi

step "torch"
installed_torch() {
    [[ -x "$VENV/bin/python" ]] || return 0
    "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true
}
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    note "NVIDIA GPU present: torch comes from PyPI with the package (CUDA build)"
elif [[ "$(installed_torch)" == "$TORCH_VERSION"* ]]; then
    note "no GPU; torch $(installed_torch) already installed"
else
    note "no GPU (no working nvidia-smi): installing the CPU build of torch $TORCH_VERSION first"
    run "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX"
fi

step "forge-factory package from $REPO"
STAMP="$PREFIX/.installed-source"
FINGERPRINT="$(source_fingerprint)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$FINGERPRINT" && -x "$FACTORY" ]]; then
    note "installed and unchanged (source fingerprint ${FINGERPRINT:0:12})"
else
    run "$VENV/bin/python" -m pip install --quiet "$REPO"
    printf '%s\n' "$FINGERPRINT" >"$TMP/stamp"
    run install -m 0644 "$TMP/stamp" "$STAMP"
    CHANGED=1
fi
step "GGUF tools (llama.cpp)"
if [[ $GGUF -eq 0 ]]; then
    note "skipped (--no-gguf): quant stages in gguf are refused at plan time on this node"
elif [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -m stations.llama_cpp_runtime selftest >/dev/null 2>&1; then
    note "installed and working (a tiny model converted, quantized and run)"
else
    run env PYTHON="$VENV/bin/python" "$REPO/bootstrap/format-tools.sh"
fi
cp "$REPO/docs/OPERATOR.md" "$TMP/OPERATOR.md" 2>/dev/null && \
    install_file "$TMP/OPERATOR.md" "$PREFIX/docs/OPERATOR.md" 0644 || true

# -- 3. the factory root ----------------------------------------------------------------
step "factory root $ROOT"
root_complete() {
    local d
    [[ -f "$ROOT/factory_node.toml" ]] || return 1
    for d in line/intake line/assembly line/finished line/rework line/deferred line/.incoming work calibration; do
        [[ -d "$ROOT/$d" ]] || return 1
    done
}
if [[ ! -d "$ROOT" ]]; then
    run install -d -o "$SVC_USER" -g "$(svc_group)" -m 0755 "$ROOT"
elif [[ $(stat -c %U "$ROOT") != "$SVC_USER" ]]; then
    run chown "$SVC_USER:$(svc_group)" "$ROOT"
fi
if root_complete; then
    note "initialised already (factory_node.toml and every station present)"
else
    as_user "$FACTORY" init "$ROOT"
fi
# Files someone else created in the root (a hand-made config, a root
# initialised as another user) would lock the daemon out of its own line.
if [[ -d "$ROOT" ]] && foreign="$(find "$ROOT" -maxdepth 3 ! -user "$SVC_USER" -print -quit)" && [[ -n "$foreign" ]]; then
    note "not owned by $SVC_USER: $foreign (and maybe more)"
    run chown -R "$SVC_USER:$(svc_group)" "$ROOT"
fi

# -- 4. the service environment, the systemd unit, its cold-tier drop-in, the CLI wrapper
step "service environment $ENV_FILE (mode 0600)"
# The unit reads it (EnvironmentFile=): systemd, as root, loads it before it
# starts the daemon as $SVC_USER, so only root may read the file. The token
# never appears on a command line (printf is a shell builtin) or in output.
env_file_content() {
    if [[ -n "${HF_TOKEN:-}" ]]; then
        # Keep every other line an operator put there; replace only HF_TOKEN.
        if [[ -f "$ENV_FILE" ]]; then grep -v '^HF_TOKEN=' "$ENV_FILE" || true; else env_file_header; fi
        printf 'HF_TOKEN=%s\n' "$HF_TOKEN"
    elif [[ -f "$ENV_FILE" ]]; then
        cat "$ENV_FILE"  # no token given: keep the file (and any token in it) as it is
    else
        env_file_header
        printf '# HF_TOKEN=hf_...   (or rerun: sudo HF_TOKEN=hf_... bootstrap/install.sh)\n'
    fi
}
env_file_header() {
    printf '# forge-factory service environment (systemd EnvironmentFile), written by bootstrap/install.sh.\n'
    printf '# Mode 0600, owned by root: systemd reads it before starting the daemon. KEY=VALUE lines.\n'
}
[[ ! -L "$ENV_FILE" ]] || die "$ENV_FILE is a symbolic link; remove it (the token file must be a plain file) and rerun"
if [[ -n "${HF_TOKEN:-}" && ! "$HF_TOKEN" =~ ^[A-Za-z0-9_.-]+$ ]]; then
    die "HF_TOKEN holds characters other than letters, digits, '_', '.' and '-' (not shown); it was not written"
fi
if [[ $DRY_RUN -eq 1 ]]; then
    note "would write $ENV_FILE, mode 0600, root-owned$([[ -n "${HF_TOKEN:-}" ]] && echo ': HF_TOKEN from the environment (value not shown)')"
else
    old_umask="$(umask)"
    umask 077  # the scratch copy and the installed file are never readable by others, not even briefly
    env_file_content >"$TMP/env"
    if install_file "$TMP/env" "$ENV_FILE" 0600; then
        CHANGED=1
        note "written$([[ -n "${HF_TOKEN:-}" ]] && echo ' (HF_TOKEN from the environment, not shown)')"
    fi
    umask "$old_umask"
    if [[ "$(stat -c '%a %u' "$ENV_FILE")" != "600 0" ]]; then
        run chown 0:0 "$ENV_FILE"
        run chmod 0600 "$ENV_FILE"
    fi
fi

step "systemd unit $UNIT_DIR/$UNIT_NAME"
# The unit in the repository names the default root, prefix and environment
# file; substitute ours.
sed -e "/^#/!s#/opt/forge-factory#$PREFIX#g" -e "/^#/!s#/srv/factory#$ROOT#g" \
    -e "/^#/!s#/etc/forge-factory/env#$ENV_FILE#g" \
    -e "s#^User=forge\$#User=$SVC_USER#" -e "s#^Group=forge\$#Group=$(svc_group)#" \
    "$REPO/bootstrap/$UNIT_NAME" >"$TMP/unit"
if install_file "$TMP/unit" "$UNIT_DIR/$UNIT_NAME" 0644; then CHANGED=1; fi

step "drop-in: cold tiers writable"
# ProtectSystem=strict makes every path read-only except ReadWritePaths=;
# cleanup and streaming loads write to the cold tiers of factory_node.toml.
DROPIN="$UNIT_DIR/$UNIT_NAME.d/cold-tiers.conf"
if [[ -x "$VENV/bin/python" && -f "$ROOT/factory_node.toml" ]]; then
    if cold="$("$VENV/bin/python" - "$ROOT/factory_node.toml" <<'PY'
import sys
from pathlib import Path
from factory.nodeconfig import load_node_config
# "-": skip a tier that is absent; quotes keep a path with spaces one entry.
paths = [f"-{c.path}" for c in load_node_config(Path(sys.argv[1])).storage.cold]
print(" ".join(f'"{p}"' if any(ch.isspace() for ch in p) else p for p in paths))
PY
)"; then
        if [[ -n "$cold" ]]; then
            printf '# Written by bootstrap/install.sh from %s; rerun it after editing [[storage.cold]].\n[Service]\n# "-": a tier that is not mounted does not stop the service.\nReadWritePaths=%s\n' \
                "$ROOT/factory_node.toml" "$cold" >"$TMP/dropin"
            if install_file "$TMP/dropin" "$DROPIN" 0644; then CHANGED=1; fi
        elif [[ -f "$DROPIN" ]]; then
            run rm -f "$DROPIN"; CHANGED=1
        else
            note "no cold tiers configured"
        fi
    else
        note "WARNING: $ROOT/factory_node.toml does not load (see above); the daemon will exit 78 until it is fixed"
    fi
else
    note "would be derived from $ROOT/factory_node.toml once the venv and root exist"
fi

step "command wrapper $BIN_DIR/factory"
# Foreman commands must run as $SVC_USER (the line's files are its own):
#   sudo -u $SVC_USER factory status
printf '#!/bin/sh\n# Written by forge-factory bootstrap/install.sh.\n: "${FACTORY_ROOT:=%s}"\nexport FACTORY_ROOT\nexec %s "$@"\n' \
    "$ROOT" "$FACTORY" >"$TMP/wrapper"
install_file "$TMP/wrapper" "$BIN_DIR/factory" 0755 || true

# -- 5. systemd ---------------------------------------------------------------------------
step "systemd: reload, enable, start"
if ! have_systemd && [[ $DRY_RUN -eq 0 ]]; then
    note "not booted with systemd (no /run/systemd/system): skipping; start with: sudo -u $SVC_USER $FACTORY run --root $ROOT"
    exit 0
fi
if [[ $CHANGED -eq 1 ]]; then
    run systemctl daemon-reload
fi
if [[ $START -eq 1 && $DRY_RUN -eq 1 ]] && ! have_systemd; then
    # This host has no systemd: show what a node would get.
    run systemctl enable --now forge-factory
    exit 0
fi
if [[ $START -eq 0 ]]; then
    note "--no-start: not enabling; later: systemctl enable --now forge-factory"
    exit 0
fi
if ! systemctl is-enabled --quiet forge-factory 2>/dev/null; then
    run systemctl enable --now forge-factory
elif systemctl is-active --quiet forge-factory; then
    if [[ $CHANGED -eq 1 ]]; then
        note "package or unit changed: restarting (a running part is released and resumes from its checkpoint)"
        run systemctl restart forge-factory
    else
        note "enabled and running"
    fi
else
    # A unit that hit StartLimitBurst refuses to start until its failure is cleared.
    if systemctl is-failed --quiet forge-factory; then run systemctl reset-failed forge-factory; fi
    run systemctl start forge-factory
fi
