#!/usr/bin/env bash
# Debian packages that carry bundled real data (World English Bible, KJV, Reina-Valera, Fashion-MNIST).
# Installs them when running as root with apt; otherwise says which are missing and how to get them.
set -u
PACKAGES=(sword-text-web sword-text-kjv sword-text-sparv dataset-fashion-mnist)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq >/dev/null 2>&1 || true
  installable=()
  for p in "${missing[@]}"; do
    if apt-cache policy "$p" 2>/dev/null | grep -q 'Candidate: [0-9]'; then installable+=("$p")
    else echo "install: apt has no candidate for $p on this system; the data it carries is unavailable" >&2; fi
  done
  [ ${#installable[@]} -gt 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${installable[@]}" >/dev/null
else
  echo "install: missing Debian packages ${missing[*]}; install them with: sudo apt-get install ${missing[*]}" >&2
fi
exit 0
