#!/usr/bin/env bash
# Make sure Postgres and RabbitMQ answer; start them when they are installed but stopped.
set -u
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || python3 - <<'PY' 2>/dev/null
import socket, sys
s = socket.socket(); s.settimeout(1)
sys.exit(0 if s.connect_ex(("127.0.0.1", 5432)) == 0 else 1)
PY
}
amqp_up() { python3 - <<'PY' 2>/dev/null
import socket, sys
s = socket.socket(); s.settimeout(1)
sys.exit(0 if s.connect_ex(("127.0.0.1", 5672)) == 0 else 1)
PY
}
wait_for() { # name check seconds
  local i
  for ((i = 0; i < $3 * 4; i++)); do "$2" && return 0; sleep 0.25; done
  return 1
}

if ! pg_up; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    echo "starting Postgres ..."
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
  wait_for postgres pg_up 30 || {
    echo "Postgres is not reachable on 127.0.0.1:5432. Install it (apt-get install postgresql) or set DATABASE_URL." >&2
    exit 1
  }
fi
if ! amqp_up; then
  # A node that is still booting has no listener yet: starting a second one beside it only leaves
  # stray nodes fighting over the same name, so wait for the one that is there.
  if pgrep -f 'beam.*-s rabbit boot' >/dev/null; then
    echo "waiting for RabbitMQ to finish starting ..."
  elif command -v rabbitmq-server >/dev/null; then
    echo "starting RabbitMQ ..."
    # RabbitMQ 3.x hands out file handles from a budget set by the open-file limit; with Debian's
    # default of 1024 a node holding a few test vhosts (each ~40 quorum queues) runs out, and new
    # connections then hang in the handshake. Raise the limit for the node when we start it.
    # (`su`, which the Debian script uses when started as root, resets it: start it as its user here.)
    if [ "$(id -u)" = 0 ] && id rabbitmq >/dev/null 2>&1 && command -v setpriv >/dev/null; then
      (ulimit -n 16384 2>/dev/null; cd /var/lib/rabbitmq && HOME=/var/lib/rabbitmq \
        setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups rabbitmq-server -detached) || true
    else
      rabbitmq-server -detached || true
    fi
  fi
  wait_for rabbitmq amqp_up 60 || {
    echo "RabbitMQ is not reachable on 127.0.0.1:5672. Install it (apt-get install rabbitmq-server) or set AMQP_URL." >&2
    exit 1
  }
fi
echo "Postgres and RabbitMQ are up."
