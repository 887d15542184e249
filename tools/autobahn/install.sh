#!/usr/bin/env bash
# Installs Autobahn|Testsuite (wstest 25.10.1, which runs on Python 2.7 only) under the
# directory given (default target/autobahn). Debian 12 has no Python 2: its .debs come from
# Debian 11 (bullseye) through a private apt configuration (apt-get download; the system's
# sources and packages are untouched) and are unpacked with dpkg -x. The Python packages
# are pinned in constraints-py27.txt. Needs gcc (wsaccel, ujson) and python3 (pip).
# Idempotent: does nothing when it is there.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
AB_HOME=$(mkdir -p "${1:-target/autobahn}" && cd "${1:-target/autobahn}" && pwd)
R=$AB_HOME/py27root
APT=$AB_HOME/apt
PY3=${PY3:-python3}

if [ -x "$AB_HOME/py27" ] && "$AB_HOME/py27" -c 'import autobahntestsuite' 2>/dev/null; then
  echo "already installed in $AB_HOME"; exit 0
fi
command -v gcc >/dev/null || { echo "gcc required" >&2; exit 1; }

# 1. private apt config pointing at bullseye (uses the host's dpkg status only to skip already-present libs)
mkdir -p "$APT"/{lists/partial,cache/archives/partial,etc/preferences.d}
cat > "$APT/etc/sources.list" <<EOS
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
EOS
touch "$APT/etc/preferences"
cat > "$APT/apt.conf" <<EOS
Dir::Etc::SourceList "$APT/etc/sources.list";
Dir::Etc::SourceParts "/nonexistent";
Dir::Etc::Preferences "$APT/etc/preferences";
Dir::Etc::PreferencesParts "$APT/etc/preferences.d";
Dir::State::Lists "$APT/lists";
Dir::Cache "$APT/cache";
Dir::State::status "/var/lib/dpkg/status";
EOS
export APT_CONFIG=$APT/apt.conf
apt-get update -qq
cd "$APT/cache/archives"
apt-get download -qq python2.7 python2.7-minimal libpython2.7 libpython2.7-minimal libpython2.7-stdlib \
  libpython2.7-dev python2.7-dev libssl1.1 libffi7 2>&1 | grep -v 'unsandboxed' || true
mkdir -p "$R"
for f in *.deb; do dpkg -x "$f" "$R"; done

# 2. wrapper interpreter
cat > "$AB_HOME/py27" <<EOS
#!/bin/sh
export PYTHONHOME=$R/usr
export LD_LIBRARY_PATH=$R/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
exec $R/usr/bin/python2.7 "\$@"
EOS
chmod +x "$AB_HOME/py27"
"$AB_HOME/py27" -c 'import ssl, ctypes, zlib'

# 3. pip for 2.7 (wheels fetched from PyPI by the host python3's pip)
W=$AB_HOME/wheels27
$PY3 -m pip download -q --only-binary=:all: --python-version 2.7 --implementation cp --abi cp27mu \
  --platform manylinux1_x86_64 --no-deps -d "$W" pip==20.3.4 setuptools==44.1.1 wheel==0.37.1
"$AB_HOME/py27" "$W/pip-20.3.4-py2.py3-none-any.whl/pip" install -q --no-warn-script-location \
  --no-index --find-links "$W" pip==20.3.4 setuptools==44.1.1 wheel==0.37.1

# 4. the testsuite (its setup.py pins Twisted 19.10.0 / autobahn 0.10.9 etc.); C extensions need the headers
CFLAGS="-I$R/usr/include/python2.7 -I$R/usr/include" "$AB_HOME/py27" -m pip install -q \
  --no-warn-script-location -c "$HERE/constraints-py27.txt" autobahntestsuite==25.10.1
"$AB_HOME/py27" -c 'import autobahntestsuite, autobahn, twisted; print("wstest", autobahntestsuite.__version__, "autobahn", autobahn.__version__, "twisted", twisted.__version__)'
