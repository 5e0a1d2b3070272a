#!/usr/bin/env bash
# Install fedmq on a Raspberry Pi (or any systemd Linux host): a venv under /opt, configuration
# under /etc/fedmq, the fedmq system user, and the systemd unit, enabled. Safe to run again: it
# upgrades the package, keeps an existing configuration and rewrites only the unit.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: install-pi.sh [options]

Install fedmq as a systemd service (the edge agent by default).

options:
  --source PATH     fedmq source directory or wheel to install (default: the repository this script is in)
  --role ROLE       agent (default) or aggregator
  --prefix DIR      install prefix; the venv goes to DIR/venv (default /opt/fedmq)
  --root DIR        stage into DIR as if it were / (tests): no useradd, offline systemctl enable;
                    the venv is not relocatable, so for an image run this script inside it instead
  --python PATH     Python 3.11+ used to create the venv (default python3)
  --no-onnx         do not try the onnx extra (ONNX Runtime backend)
  --start           start (or restart) the service after installing; default: enable only
  --dry-run         print what would be done, change nothing
  -h, --help        this help

After installing, edit /etc/fedmq/<role>.toml (device_id, broker url, credentials), then:
  sudo systemctl start fedmq-<role>      and      journalctl -u fedmq-<role> -f
USAGE
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source_path="$(dirname "$here")"
role=agent
prefix=/opt/fedmq
root=""
python=python3
onnx=yes
start=no
dry_run=no

while [[ $# -gt 0 ]]; do
    case "$1" in
        --source) source_path="${2:?--source needs a path}"; shift 2 ;;
        --role) role="${2:?--role needs agent or aggregator}"; shift 2 ;;
        --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
        --root) root="${2:?--root needs a directory}"; shift 2 ;;
        --python) python="${2:?--python needs a path}"; shift 2 ;;
        --no-onnx) onnx=no; shift ;;
        --start) start=yes; shift ;;
        --dry-run) dry_run=yes; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install-pi.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

case "$role" in
    agent|aggregator) ;;
    *) echo "install-pi.sh: --role must be agent or aggregator, not $role" >&2; exit 2 ;;
esac
root="${root%/}"
if [[ -n "$root" && "$root" != /* ]]; then
    echo "install-pi.sh: --root must be an absolute path" >&2; exit 2
fi
if [[ ! -e "$source_path" ]]; then
    echo "install-pi.sh: source $source_path does not exist (pass --source DIR_OR_WHEEL)" >&2; exit 2
fi
if [[ "$dry_run" == no && -z "$root" && "$(id -u)" -ne 0 ]]; then
    echo "install-pi.sh: run as root (sudo), or use --dry-run to see the steps" >&2; exit 1
fi

unit="fedmq-$role.service"
venv="$prefix/venv"
config="/etc/fedmq/$role.toml"
unit_dir="/etc/systemd/system"
live=yes  # whether to touch the running system (users, systemctl)
[[ -n "$root" ]] && live=no

say() { printf '==> %s\n' "$*"; }
run() {
    if [[ "$dry_run" == yes ]]; then
        printf '+ %s\n' "$*"
    else
        "$@"
    fi
}

# 1. the system user (sysusers.d when systemd has it, useradd otherwise)
if [[ "$live" == no ]]; then
    say "skipping the fedmq user under --root (create it in the image: deploy/systemd/fedmq.sysusers)"
elif id -u fedmq >/dev/null 2>&1; then
    say "user fedmq exists"
else
    say "creating system user fedmq"
    run useradd --system --user-group --home-dir /var/lib/fedmq --no-create-home --shell /usr/sbin/nologin fedmq
fi

# 2. the venv and the package
if [[ -x "$root$venv/bin/python" ]]; then
    say "venv $venv exists: upgrading fedmq in it"
else
    say "creating venv $venv"
    run mkdir -p "$root$prefix"
    run "$python" -m venv "$root$venv"
    run "$root$venv/bin/python" -m pip install --quiet --upgrade pip
fi
spec="$source_path"
[[ -d "$source_path" ]] && spec="$(cd "$source_path" && pwd)"
installed=no
if [[ "$onnx" == yes ]]; then
    # onnxruntime ships wheels for 64-bit Pi OS (aarch64) but not for 32-bit (armv7l): fall back to numpy
    say "installing fedmq[onnx] from $spec"
    if run "$root$venv/bin/python" -m pip install --upgrade "$spec[onnx]"; then
        installed=yes
    else
        say "the onnx extra is not installable here; installing fedmq without it (numpy backend)"
    fi
fi
if [[ "$installed" == no ]]; then
    say "installing fedmq from $spec"
    run "$root$venv/bin/python" -m pip install --upgrade "$spec"
fi

# 3. configuration, kept if present
run mkdir -p "$root/etc/fedmq"
if [[ -e "$root$config" ]]; then
    say "keeping existing $config"
else
    say "writing $config from deploy/$role.example.toml: edit it before starting"
    run install -m 0640 "$here/$role.example.toml" "$root$config"
    if [[ "$live" == yes ]]; then
        run chgrp fedmq "$root$config"
    fi
fi

# 4. the unit, with ExecStart pointing into this prefix
say "installing $unit_dir/$unit"
run mkdir -p "$root$unit_dir"
if [[ "$dry_run" == yes ]]; then
    printf '+ sed s#/opt/fedmq#%s#g %s > %s\n' "$prefix" "$here/systemd/$unit" "$root$unit_dir/$unit"
else
    sed "s#/opt/fedmq#$prefix#g" "$here/systemd/$unit" > "$root$unit_dir/$unit.tmp"
    chmod 0644 "$root$unit_dir/$unit.tmp"
    mv "$root$unit_dir/$unit.tmp" "$root$unit_dir/$unit"
fi

if [[ "$live" == yes ]]; then
    run systemctl daemon-reload
    run systemctl enable "$unit"
    if [[ "$start" == yes ]]; then
        run systemctl restart "$unit"
    fi
else
    # offline: creates the multi-user.target.wants symlink inside the root
    run systemctl --root="$root" enable "$unit"
fi

say "done: edit $config, then: systemctl start fedmq-$role; journalctl -u fedmq-$role -f"
