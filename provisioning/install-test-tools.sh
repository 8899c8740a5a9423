#!/bin/sh
# Install the real peers the tests drive (dcmtk, Orthanc) from Debian's packages
# when they are missing and we are root. Without root we only report; the tests
# themselves fail under CI=true when a tool is absent.
set -eu
need=""
command -v storescu >/dev/null 2>&1 || need="$need dcmtk"
[ -x /usr/sbin/Orthanc ] || need="$need orthanc"
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need="$need orthanc-dicomweb"
# provisioning checks (tests/test_provisioning*.py, tests/test_offline_install.py)
command -v systemd-analyze >/dev/null 2>&1 || need="$need systemd"
command -v vagrant >/dev/null 2>&1 || need="$need vagrant"
command -v cloud-init >/dev/null 2>&1 || need="$need cloud-init"
command -v debootstrap >/dev/null 2>&1 || need="$need debootstrap"
# browser end-to-end tests (Python playwright drives Debian's chromium)
[ -x /usr/bin/chromium ] || need="$need chromium"
# HTJ2K frames (ojph_compress encodes, ojph_expand reads previews in tests)
command -v ojph_compress >/dev/null 2>&1 || need="$need openjph-tools"
# sync benchmark baseline (tar | age)
command -v age >/dev/null 2>&1 || need="$need age"
# consult tests: TURN relay (coturn) and network namespaces (iproute2, iptables)
command -v turnserver >/dev/null 2>&1 || need="$need coturn"
command -v iptables >/dev/null 2>&1 || need="$need iptables"
# notify tests: SMS through gammu-smsd with gammu's dummy phone
command -v gammu-smsd >/dev/null 2>&1 || need="$need gammu-smsd gammu"
# patients: a wristband's QR code rendered (poppler) and read back (zbar)
command -v pdftoppm >/dev/null 2>&1 || need="$need poppler-utils"
command -v zbarimg >/dev/null 2>&1 || need="$need zbar-tools"
[ -z "$need" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing test tools:$need"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
else
  echo "warning: missing test tools:$need (not root: cannot apt-get install them)" >&2
fi
