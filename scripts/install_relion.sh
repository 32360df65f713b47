#!/usr/bin/env bash
# Install RELION 3.1.3 (Debian/Ubuntu package "relion") for the RELION integration tests.
# Idempotent: does nothing when relion_refine is already on PATH. Never fails the build: when it
# cannot install, it says why, loudly, and exits 0 (the tests marked "relion" then skip, loudly).
set -u

if command -v relion_refine >/dev/null 2>&1; then
    echo "install_relion: RELION already installed: $(command -v relion_refine) ($(relion_refine --version 2>/dev/null | grep -m1 -i 'version' || echo 'version unknown'))"
    exit 0
fi

loud() {
    echo "################################################################################" >&2
    echo "install_relion: RELION NOT INSTALLED: $*" >&2
    echo "install_relion: the RELION integration tests (pytest -m relion) will be SKIPPED." >&2
    echo "################################################################################" >&2
    exit 0
}

command -v apt-get >/dev/null 2>&1 || loud "no apt-get on this machine (install RELION 3.1.3 by hand and put relion_refine on PATH)"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        loud "not root and no password-less sudo (run: sudo apt-get install -y relion)"
    fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "install_relion: apt-get update && apt-get install -y relion"
$SUDO apt-get update -q || loud "apt-get update failed"
$SUDO apt-get install -y -q --no-install-recommends relion || loud "apt-get install relion failed (the package is in Debian >= 11 / Ubuntu >= 22.04 'universe')"

command -v relion_refine >/dev/null 2>&1 || loud "package installed but relion_refine is not on PATH"
echo "install_relion: installed $(command -v relion_refine)"
