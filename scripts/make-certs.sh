#!/usr/bin/env bash
# Makes a private CA and certificates for outpost with openssl (see docs/tls.md).
#
#   scripts/make-certs.sh DIR CENTRAL_NAME [EDGE_ID...]
#
# DIR/ca.pem, DIR/ca.key        the private CA (reused when DIR already holds one)
# DIR/CENTRAL_NAME.pem/.key     the central's certificate: DNS names CENTRAL_NAME and localhost,
#                               IP 127.0.0.1 (add more with SANS="DNS:hq.example.com,IP:10.0.0.5")
# DIR/EDGE_ID.pem/.key          one client certificate per edge: common name and DNS name = the
#                               edge's id, which the central binds to the link's edge id (mTLS)
#
# DAYS (default 825) sets how long the node certificates are valid; CA_DAYS (default 3650) the
# CA's. Keys are EC P-256, written as PKCS#8 with mode 0600.
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
dir=$1
central=$2
shift 2
days=${DAYS:-825}
ca_days=${CA_DAYS:-3650}
mkdir -p "$dir"
umask 077

if [ ! -f "$dir/ca.pem" ] || [ ! -f "$dir/ca.key" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$dir/ca.key" -out "$dir/ca.pem" -days "$ca_days" \
        -subj "/CN=outpost private CA $(basename "$dir")" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    echo "made the CA: $dir/ca.pem (keep $dir/ca.key off the nodes)"
fi

# issue NAME SUBJECT_ALT_NAMES
issue() {
    local name=$1 sans=$2
    local ext
    ext=$(mktemp)
    printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n' "$sans" >"$ext"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$dir/$name.key" -out "$dir/$name.csr" -subj "/CN=$name" 2>/dev/null
    openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -CAcreateserial -days "$days" -sha256 -extfile "$ext" -out "$dir/$name.pem" 2>/dev/null
    rm -f "$ext" "$dir/$name.csr"
    chmod 600 "$dir/$name.key"
    chmod 644 "$dir/$name.pem" "$dir/ca.pem"
    echo "made $dir/$name.pem and $dir/$name.key ($sans)"
}

issue "$central" "DNS:$central,DNS:localhost,IP:127.0.0.1${SANS:+,$SANS}"
for edge in "$@"; do
    issue "$edge" "DNS:$edge"
done
