#!/bin/sh
# Install (or upgrade, or repair) the field appliance from this offline kit, as root, on
# Debian 12. Needs no network. Safe to run again: it repairs what is missing, never
# touches the data, and applies database migrations after an upgrade.
#
#   ./install.sh [--site-name NAME] [--ae-title AE] [--dicom-port N] [--web-port N]
#                [--answers provision.yaml] [--data-dir /var/lib/appliance] [--no-start]
#                [--log FILE]   (all output to FILE only, made 0600 before its first byte)
#
# What it does: checks the kit's checksums; installs the Debian packages this machine lacks;
# makes /opt/appliance/venv from the wheels (pip --no-index); creates the 'appliance' system
# user; creates the site in /var/lib/appliance (config linked from /etc/appliance) unless one
# is there; installs and starts the systemd units when systemd runs; prints where to send
# studies, the web address and, on first install, the admin login.
set -eu

KIT=$(cd "$(dirname "$0")" && pwd)
PREFIX=/opt/appliance
DATA_DIR=/var/lib/appliance
ETC=/etc/appliance
SITE_NAME="Field site"; AE_TITLE=FIELDAPP; DICOM_PORT=11112; WEB_PORT=8443
ANSWERS=""; START=1; LOG=""

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "install.sh: error: $*" >&2; exit 1; }
say() { echo "==> $*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --site-name) SITE_NAME="$2"; shift ;;
    --ae-title) AE_TITLE="$2"; shift ;;
    --dicom-port) DICOM_PORT="$2"; shift ;;
    --web-port) WEB_PORT="$2"; shift ;;
    --answers) ANSWERS=$(cd "$(dirname "$2")" && pwd)/$(basename "$2"); shift ;;
    --data-dir) DATA_DIR="$2"; shift ;;
    --no-start) START=0 ;;
    --log) LOG="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done

# The log keeps the admin password of a first install: it is made (or tightened) 0600
# before anything is written to it, never opened wider and fixed up afterwards.
open_log() {
  [ -n "$LOG" ] || return 0
  (umask 077 && : >> "$LOG") || die "cannot create the log $LOG"
  chmod 0600 "$LOG" || die "cannot make the log $LOG private"
  exec >> "$LOG" 2>&1
}
open_log

[ "$(id -u)" = 0 ] || die "run as root (sudo $0)"
[ -f "$KIT/SHA256SUMS" ] || die "$KIT is not an appliance kit (no SHA256SUMS)"
[ -z "$ANSWERS" ] || [ -f "$ANSWERS" ] || die "answers file $ANSWERS not found"

check_kit() {
  say "checking the kit"
  (cd "$KIT" && sha256sum --quiet --strict -c SHA256SUMS) \
    || die "the kit is damaged (checksum mismatch above): copy it again"
}

# Install the kit's .deb files this machine does not already have (same or newer version).
install_debs() {
  [ -d "$KIT/debs" ] || return 0
  wanted=""
  for deb in "$KIT"/debs/*.deb; do
    [ -e "$deb" ] || continue
    pkg=$(dpkg-deb -f "$deb" Package)
    ver=$(dpkg-deb -f "$deb" Version)
    have=$(dpkg-query -W -f '${Status} ${Version}' "$pkg" 2>/dev/null || true)
    case "$have" in
      "install ok installed "*)
        dpkg --compare-versions "${have##* }" ge "$ver" && continue ;;
    esac
    wanted="$wanted $deb"
  done
  if [ -z "$wanted" ]; then
    say "Debian packages: all present"
    return 0
  fi
  say "installing $(echo "$wanted" | wc -w) Debian packages from the kit"
  # Local files only: no source lists, so apt never reaches for the network.
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts=/nonexistent \
    -o Dpkg::Options::=--force-confold $wanted >/dev/null
}

install_python() {
  command -v python3 >/dev/null || die "python3 is missing and the kit has no python3 package"
  if [ ! -x "$PREFIX/venv/bin/python" ]; then
    say "creating $PREFIX/venv"
    mkdir -p "$PREFIX"
    python3 -m venv "$PREFIX/venv" || die "python3 -m venv failed (is python3-venv in the kit?)"
  fi
  pip="$PREFIX/venv/bin/python -m pip --disable-pip-version-check -q"
  say "installing the appliance from the wheelhouse (no network)"
  $pip install --no-index --find-links "$KIT/wheels" --upgrade field-appliance
  # Same version number, newer build: always replace the project itself.
  $pip install --no-index --no-deps --force-reinstall "$KIT"/wheels/field_appliance-*.whl
  ln -sf "$PREFIX/venv/bin/appliance" /usr/local/bin/appliance
  [ -f "$KIT/README.md" ] && cp "$KIT/README.md" "$PREFIX/README.md"
  [ -f "$KIT/KIT-VERSION" ] && cp "$KIT/KIT-VERSION" "$PREFIX/KIT-VERSION"
  if [ -d "$KIT/viewer" ]; then
    static=$("$PREFIX/venv/bin/python" -c \
      'import pathlib, appliance.web as w; print(pathlib.Path(w.__file__).parent / "static")')
    mkdir -p "$static"
    rm -rf "$static/viewer.new"
    cp -a "$KIT/viewer" "$static/viewer.new"
    rm -rf "$static/viewer"
    mv "$static/viewer.new" "$static/viewer"
  fi
  return 0
}

make_user() {
  if ! getent passwd appliance >/dev/null; then
    say "creating the 'appliance' system user"
    useradd --system --user-group --home-dir "$DATA_DIR" --no-create-home \
      --shell /usr/sbin/nologin --comment "field appliance" appliance
  fi
}

as_appliance() { runuser -u appliance -- env APPLIANCE_DATA_DIR="$DATA_DIR" "$@"; }

make_site() {
  FIRST_INSTALL=0
  if [ -f "$DATA_DIR/appliance.yaml" ]; then
    say "keeping the site in $DATA_DIR; applying database migrations"
    chown -R appliance:appliance "$DATA_DIR"
    as_appliance "$PREFIX/venv/bin/appliance" migrate --data-dir "$DATA_DIR"
    return 0
  fi
  if [ -d "$DATA_DIR" ] && [ -n "$(ls -A "$DATA_DIR")" ]; then
    die "$DATA_DIR holds files but no appliance.yaml: move them away, then run again"
  fi
  [ -d "$DATA_DIR" ] && rmdir "$DATA_DIR"
  FIRST_INSTALL=1
  say "creating the site in $DATA_DIR"
  if [ -n "$ANSWERS" ]; then
    "$PREFIX/venv/bin/appliance" provision --answers "$ANSWERS" --data-dir "$DATA_DIR" \
      > "$KIT_TMP/init.out"
  else
    "$PREFIX/venv/bin/appliance" init --data-dir "$DATA_DIR" --site-name "$SITE_NAME" \
      --ae-title "$AE_TITLE" --dicom-port "$DICOM_PORT" --web-port "$WEB_PORT" \
      > "$KIT_TMP/init.out"
  fi
  chown -R appliance:appliance "$DATA_DIR"
  chmod 0700 "$DATA_DIR"
}

write_etc() {
  mkdir -p "$ETC"
  chmod 0755 "$ETC"
  printf 'APPLIANCE_DATA_DIR=%s\n' "$DATA_DIR" > "$ETC/appliance.env.new"
  chmod 0644 "$ETC/appliance.env.new"
  mv "$ETC/appliance.env.new" "$ETC/appliance.env"
  # The site config stays in the data directory (edits are atomic renames there);
  # /etc/appliance shows it where an administrator looks first.
  ln -sfn "$DATA_DIR/appliance.yaml" "$ETC/appliance.yaml"
  # coturn's config (with the TURN shared secret the web app signs credentials with) is
  # written from appliance.yaml into the data directory, 0600; shown in /etc/appliance too.
  if [ -x /usr/bin/turnserver ] && has_command media turn-config; then
    as_appliance "$PREFIX/venv/bin/appliance" media turn-config >/dev/null
    ln -sfn "$DATA_DIR/turn/turnserver.conf" "$ETC/turnserver.conf"
  fi
}

# Does the installed appliance have this command (e.g. "media serve")?
has_command() {
  "$PREFIX/venv/bin/appliance" "$@" --help >/dev/null 2>&1
}

install_units() {
  for unit in "$KIT"/systemd/*.service "$KIT"/systemd/*.target; do
    install -m 0644 "$unit" /etc/systemd/system/
  done
  if [ ! -d /run/systemd/system ]; then
    say "systemd is not running here: units installed, not started"
    return 0
  fi
  systemctl daemon-reload
  # Debian's own coturn service would take port 3478 from ours.
  systemctl disable --now coturn.service >/dev/null 2>&1 || true
  units="appliance-dicom.service appliance-web.service appliance-worker.service"
  has_command media serve && units="$units appliance-media.service"
  [ -e "$ETC/turnserver.conf" ] && units="$units appliance-turn.service"
  if [ "$START" = 1 ]; then
    say "starting: $units"
    # shellcheck disable=SC2086
    systemctl enable appliance.target $units >/dev/null 2>&1
    # shellcheck disable=SC2086
    systemctl restart $units
  fi
}

summary() {
  port=$(awk '/^dicom:/{d=1} d&&/^  port:/{print $2; exit}' "$DATA_DIR/appliance.yaml")
  ae=$(awk '/^dicom:/{d=1} d&&/^  ae_title:/{print $2; exit}' "$DATA_DIR/appliance.yaml" \
    | tr -d '"')
  web=$(awk '/^web:/{d=1} d&&/^  port:/{print $2; exit}' "$DATA_DIR/appliance.yaml")
  addr=$(hostname -I 2>/dev/null | awk '{print $1}')
  [ -n "$addr" ] || addr=$(hostname)
  echo
  echo "Field appliance installed ($(cat "$PREFIX/KIT-VERSION" 2>/dev/null | head -1))"
  echo "  DICOM:  AE title $ae  at  $addr:$port"
  echo "  web:    https://$addr:$web/   (status: https://$addr:$web/status)"
  if [ "$FIRST_INSTALL" = 1 ]; then
    password=$(tail -n 1 "$KIT_TMP/init.out" | tr -d ' ')
    echo "  admin login: user 'admin', password (shown once, write it down):"
    echo "    $password"
  else
    echo "  admin login: unchanged (existing site kept)"
  fi
  if [ ! -d /run/systemd/system ] || [ "$START" = 0 ]; then
    echo "  start by hand: runuser -u appliance -- $PREFIX/venv/bin/appliance up --data-dir $DATA_DIR"
  fi
}

# pip must see the kit and nothing else: no index, no find-links, no config of this machine.
for var in $(env | sed -n 's/^\(PIP_[A-Z_]*\)=.*/\1/p'); do unset "$var"; done
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1

KIT_TMP=$(mktemp -d)
trap 'rm -rf "$KIT_TMP"' EXIT
check_kit
install_debs
install_python
make_user
make_site
write_etc
install_units
summary
