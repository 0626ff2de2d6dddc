#!/usr/bin/env bash
# TLS over TCP loopback, side by side in one run (see bench/compare.py):
#   1. nbdkit memory --tls=require (A) against scratchd memory --tls=require (B)
#   2. scratchd in plain TCP (A) against scratchd with TLS (B): what TLS costs us
# each with 1 and 4 connections (fio jobs), 1M sequential and 4k random.
#   bench/compare-tls.sh
#   ROUNDS=5 RUNTIME=10 JOBS=4 bench/compare-tls.sh
# Certificates (a P-256 CA and a server certificate for 127.0.0.1) are made
# by openssl in a temporary directory, nbdkit's and scratchd's layout
# (ca-cert.pem, server-cert.pem, server-key.pem); fio's nbd engine (libnbd,
# GnuTLS) verifies the server against the CA, which it finds in
# $HOME/.pki/libnbd (fio's libnbd refuses a tls-certificates= in the URI, a
# local file), so fio runs with HOME set to a temporary directory holding it.
# Needs nbdkit, fio, openssl.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3} RUNTIME=${RUNTIME:-5} SIZE=${SIZE:-1G}
# Writes first: a read of never-written memory is answered with a hole chunk
# (no data, no encryption), which would flatter scratchd's reads.
WORKLOADS=${WORKLOADS:-"write:1M read:1M randwrite:4k randread:4k"}
for tool in nbdkit fio openssl; do
  command -v "$tool" >/dev/null || { echo "$tool is needed: apt-get install $tool" >&2; exit 1; }
done
# SCRATCHD: a binary to measure instead of building this tree's
if [ -z "${SCRATCHD:-}" ]; then
  cargo build --release --locked -q
  SCRATCHD=$PWD/target/release/scratchd
fi
scratchd=$SCRATCHD

pki=$(mktemp -d)
trap 'rm -rf "$pki"' EXIT
(
  cd "$pki"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=scratchd-bench-CA -keyout ca-key.pem -out ca-cert.pem \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
    -keyout server-key.pem -out server.csr 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
  openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 2 \
    -out server-cert.pem -extfile server.ext 2>/dev/null
  chmod 600 ./*-key.pem
  mkdir -p home/.pki/libnbd
  cp ca-cert.pem home/.pki/libnbd/
)

tls_uri="nbds://127.0.0.1:{port}/"
plain_uri="nbd://127.0.0.1:{port}/"
nbdkit_tls="nbdkit -f -i 127.0.0.1 -p {port} --tls=require --tls-certificates=$pki memory 4G"
scratchd_tls="$scratchd serve -i 127.0.0.1 -p {port} --tls=require --tls-certificates=$pki memory size=4G"
scratchd_plain="$scratchd serve -i 127.0.0.1 -p {port} memory size=4G"

echo "machine: $(nproc) cores, $(uname -r), nbdkit $(nbdkit --version | awk '{print $2}'), $(fio --version)"
echo "TLS: $(openssl version); nbdkit and libnbd use GnuTLS, scratchd rustls"
for jobs in ${JOBS:-1 4}; do
  echo "== TLS: nbdkit (A) against scratchd (B), $jobs connection(s)"
  HOME=$pki/home /usr/bin/python3 bench/compare.py --rounds "$ROUNDS" --runtime "$RUNTIME" --size "$SIZE" --jobs "$jobs" \
    --workloads "$WORKLOADS" --uri "$tls_uri" --a "$nbdkit_tls" --b "$scratchd_tls"
  echo
  echo "== scratchd: plain TCP (A) against TLS (B), $jobs connection(s); the TLS cost is 1 - B/A"
  HOME=$pki/home /usr/bin/python3 bench/compare.py --rounds "$ROUNDS" --runtime "$RUNTIME" --size "$SIZE" --jobs "$jobs" \
    --workloads "$WORKLOADS" --uri "$plain_uri" --uri-b "$tls_uri" --a "$scratchd_plain" --b "$scratchd_tls"
  echo
done
