#!/bin/sh
# Make the secret files docker-compose.yml mounts at /run/secrets: random
# values from openssl, hex only (safe inside a URL). Existing files are kept.
#   ./make-secrets.sh [DIR]    (default: secrets/ beside this script)
# The files are mode 0444 so that the containers' users (ainode, postgres,
# redis) can read their bind mounts; the folder is 0700, so other users of
# this host cannot.
set -eu
dir=${1:-$(dirname "$0")/secrets}
umask 077
mkdir -p "$dir"
chmod 0700 "$dir"
new() { [ -e "$dir/$1" ] && return 1; return 0; }
if new db_password; then openssl rand -hex 24 >"$dir/db_password"; fi
if new api_token; then openssl rand -hex 32 >"$dir/api_token"; fi
if new broker_url || new redis_acl; then
  rm -f "$dir/broker_url" "$dir/redis_acl"  # the two hold one password: made together
  p=$(openssl rand -hex 24)
  printf 'redis://ainode:%s@redis:6379/0\n' "$p" >"$dir/broker_url"
  # default: what an unauthenticated client may do (PING, the health check).
  printf 'user default on nopass -@all +ping\nuser ainode on >%s ~* &* +@all\n' "$p" >"$dir/redis_acl"
fi
chmod 0444 "$dir"/db_password "$dir"/api_token "$dir"/broker_url "$dir"/redis_acl
echo "secrets in $dir"
