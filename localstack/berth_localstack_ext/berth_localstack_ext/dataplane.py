"""The NLB data plane moto lacks: health checks and per-listener forwarders.

Health checks run every second (faster than AWS, so tests stay short) with each target
group's protocol, port, path, matcher and thresholds: TCP connects, HTTP(S) GETs. A
target starts ``initial``, turns ``healthy`` after HealthyThresholdCount passes and
``unhealthy`` after UnhealthyThresholdCount failures.

Each listener gets a forwarder on ``BERTH_LISTENER_HOST`` (default: the gateway's host)
at a free port; TCP_UDP listeners get TCP and UDP on the same port. Connections go to a
random healthy target of the listener's target group; when no target is healthy, to any
unhealthy one (AWS NLBs "fail open" the same way). A target still in ``initial`` (being
registered) or ``draining`` gets no new connections.

A deregistered target drains as on AWS: DescribeTargetHealth reports it ``draining`` for
the target group's ``deregistration_delay.timeout_seconds`` (default 300), it gets no new
connections, and the connections it already has go on (unless
``deregistration_delay.connection_termination.enabled`` is true: then they are closed when
the delay ends). Registering it again ends the draining. TLS listeners terminate TLS with
their certificate (an IAM server certificate; moto keeps its key) and relay the plain
stream, as an NLB TLS listener with a TCP target group does.

A flow reaches the listener only when the load balancer's security groups admit its
source (security.py): the forwarder sees the client's own address, since listeners are
bound on the gateway's address on the test network, which clients reach directly.
"""

import http.client
import json
import logging
import os
import random
import select
import socket
import ssl
import tempfile
import threading
import struct
import time
from concurrent.futures import ThreadPoolExecutor

from berth_localstack_ext import security

LOG = logging.getLogger("localstack.berth.dataplane")

_started = False
_lock = threading.Lock()


def _backends():
    """(account, region, elbv2 backend, ec2 backend) for every backend moto has."""
    from moto.ec2.models import ec2_backends
    from moto.elbv2.models import elbv2_backends

    out = []
    for account, regions in list(elbv2_backends.items()):
        for region, backend in list(regions.items()):
            try:
                ec2 = ec2_backends[account][region]
            except Exception:  # noqa: BLE001 - no EC2 state in that region
                ec2 = None
            out.append((account, region, backend, ec2))
    return out


def _target_address(ec2, target_id):
    if target_id.startswith("i-"):
        if ec2 is None:
            return None
        try:
            inst = ec2.get_instance_by_id(target_id)
        except Exception:  # noqa: BLE001
            return None
        return getattr(inst, "private_ip", None) if inst else None
    return target_id


def _codes_match(matcher, status):
    spec = (matcher or {}).get("HttpCode") or "200"
    for part in str(spec).split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            if int(lo) <= status <= int(hi):
                return True
        elif part and int(part) == status:
            return True
    return False


def _tg_attribute(tg, key, default):
    return (getattr(tg, "attributes", None) or {}).get(key, default)


class HealthMonitor:
    def __init__(self):
        self._state = {}  # (tg arn, id, port) -> dict(state, ok, fail)
        self._draining = {}  # (tg arn, id, port) -> (monotonic end, close connections)
        self._conns = {}  # (tg arn, id, port) -> set of relayed sockets
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="berth-hc")

    def deregistered(self, tg, targets):
        """Starts draining the targets just deregistered from ``tg``."""
        try:
            delay = int(_tg_attribute(tg, "deregistration_delay.timeout_seconds", "300"))
        except (TypeError, ValueError):
            delay = 300
        close = str(_tg_attribute(tg, "deregistration_delay.connection_termination.enabled", "false")).lower()
        end = time.monotonic() + max(delay, 0)
        with self._lock:
            for t in targets:
                key = (tg.arn, t["Id"], int(t.get("Port") or tg.port))
                self._draining[key] = (end, close == "true")
                self._state.pop(key, None)

    def registered(self, tg_arn, targets, default_port):
        """A target just registered is ``initial`` until its health checks pass (moto would
        call it healthy before the first check); registering a draining target again ends
        its draining."""
        with self._lock:
            for t in targets:
                key = (tg_arn, t["Id"], int(t.get("Port") or default_port))
                self._draining.pop(key, None)
                self._state.setdefault(key, {"state": "initial", "ok": 0, "fail": 0})

    def draining(self, tg_arn):
        """[(id, port)] of the targets of ``tg_arn`` still draining."""
        self._expire()
        with self._lock:
            return [(k[1], k[2]) for k in self._draining if k[0] == tg_arn]

    def _expire(self):
        now = time.monotonic()
        with self._lock:
            done = [(k, close) for k, (end, close) in self._draining.items() if end <= now]
            for k, _ in done:
                del self._draining[k]
            cut = [s for k, close in done if close for s in self._conns.pop(k, ())]
        for s in cut:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def track(self, key, sock):
        with self._lock:
            self._conns.setdefault(key, set()).add(sock)

    def untrack(self, key, sock):
        with self._lock:
            conns = self._conns.get(key)
            if conns is not None:
                conns.discard(sock)
                if not conns:
                    del self._conns[key]

    def health(self, tg_arn, target_id, port):
        """TargetHealth for DescribeTargetHealth (None for a malformed port: moto's answer)."""
        try:
            key = (tg_arn, target_id, int(port))
        except (TypeError, ValueError):
            return None
        with self._lock:
            st = self._state.get(key)
        # Not checked yet (registered before this process started, or before its first
        # round): initial, as AWS says until the checks pass; never moto's "healthy".
        if st is None or st["state"] == "initial":
            return {
                "State": "initial",
                "Reason": "Elb.InitialHealthChecking",
                "Description": "Initial health checks in progress",
            }
        if st["state"] == "healthy":
            return {"State": "healthy"}
        return {
            "State": "unhealthy",
            "Reason": "Target.FailedHealthChecks",
            "Description": st.get("why") or "Health checks failed",
        }

    def state(self, key):
        with self._lock:
            st = self._state.get(key)
            return st["state"] if st else None

    def _check(self, tg, address, port):
        proto = (tg.health_check_protocol or "TCP").upper()
        hc_port = tg.health_check_port
        if not hc_port or hc_port == "traffic-port":
            hc_port = port
        hc_port = int(hc_port)
        timeout = min(float(tg.health_check_timeout_seconds or 5), 2.0)
        try:
            if proto in ("HTTP", "HTTPS"):
                if proto == "HTTPS":
                    conn = http.client.HTTPSConnection(
                        address, hc_port, timeout=timeout, context=ssl._create_unverified_context()
                    )
                else:
                    conn = http.client.HTTPConnection(address, hc_port, timeout=timeout)
                conn.request("GET", tg.health_check_path or "/")
                status = conn.getresponse().status
                conn.close()
                if _codes_match(getattr(tg, "matcher", None), status):
                    return True, ""
                return False, f"Health checks failed with these codes: [{status}]"
            with socket.create_connection((address, hc_port), timeout=timeout):
                return True, ""
        except OSError as e:
            return False, f"Health check to {address}:{hc_port} failed: {e}"

    def _run_one(self, key, tg, address, port):
        ok, why = (False, "no address for the target") if not address else self._check(tg, address, port)
        healthy_n = int(tg.healthy_threshold_count or 3)
        unhealthy_n = int(tg.unhealthy_threshold_count or 2)
        with self._lock:
            st = self._state.setdefault(key, {"state": "initial", "ok": 0, "fail": 0})
            if ok:
                st["ok"] += 1
                st["fail"] = 0
                if st["ok"] >= healthy_n:
                    st["state"] = "healthy"
            else:
                st["fail"] += 1
                st["ok"] = 0
                st["why"] = why
                if st["fail"] >= unhealthy_n:
                    st["state"] = "unhealthy"

    def round(self):
        self._expire()
        seen = set()
        futures = []
        for _account, _region, backend, ec2 in _backends():
            for tg in list(backend.target_groups.values()):
                for t in list(tg.targets.values()):
                    try:
                        port = int(t.get("Port") or tg.port)
                    except (TypeError, ValueError):
                        continue
                    key = (tg.arn, t["Id"], port)
                    seen.add(key)
                    with self._lock:
                        self._state.setdefault(key, {"state": "initial", "ok": 0, "fail": 0})
                    address = _target_address(ec2, t["Id"])
                    futures.append(self._pool.submit(self._run_one, key, tg, address, port))
        for f in futures:
            try:
                f.result(timeout=5)
            except Exception:  # noqa: BLE001 - one bad target must not stop the rest
                LOG.exception("health check")
        with self._lock:
            for key in [k for k in self._state if k not in seen]:
                del self._state[key]

    def targets_for(self, tg_arn):
        """[(address, port, key)] of the healthy targets, or of the unhealthy ones when
        none is healthy; targets being registered (``initial``) get nothing."""
        for _account, _region, backend, ec2 in _backends():
            tg = backend.target_groups.get(tg_arn)
            if tg is None:
                continue
            unhealthy, healthy = [], []
            for t in list(tg.targets.values()):
                port = int(t.get("Port") or tg.port)
                address = _target_address(ec2, t["Id"])
                if not address:
                    continue
                key = (tg_arn, t["Id"], port)
                state = self.state(key)
                if state == "healthy":
                    healthy.append((address, port, key))
                elif state == "unhealthy":
                    unhealthy.append((address, port, key))
            return healthy or unhealthy
        return []


MONITOR = HealthMonitor()


def _listener_host():
    host = os.environ.get("BERTH_LISTENER_HOST")
    if host:
        return host
    try:
        from localstack import config

        return config.GATEWAY_LISTEN[0].host or "127.0.0.1"
    except Exception:  # noqa: BLE001
        return "127.0.0.1"


def _pipe(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _relay_one_thread(a, b):
    """Relays both directions in one thread: an SSL socket must not be read and written
    from two threads at once."""
    socks = [a, b]
    try:
        while True:
            ready = [s for s in socks if isinstance(s, ssl.SSLSocket) and s.pending()]
            if not ready:
                ready, _, _ = select.select(socks, [], [], 300)
                if not ready:
                    return
            for s in ready:
                data = s.recv(65536)
                if not data:
                    return
                (b if s is a else a).sendall(data)
    except OSError:
        pass
    finally:
        for s in socks:
            try:
                s.close()
            except OSError:
                pass


def _certificate(listener):
    certs = getattr(listener, "certificates", None) or []
    return certs[0] if certs else None


def _tls_context(lb_arn, cert_arn):
    """A server context with the listener's IAM server certificate, or None (logged)."""
    if not cert_arn:
        return None
    try:
        from moto.iam.models import iam_backends

        account = lb_arn.split(":")[4]
        cert = None
        for partition in iam_backends.get(account, {}).values():
            cert = partition.get_certificate_by_arn(cert_arn)
            if cert is not None:
                break
        if cert is None:
            LOG.warning("TLS listener of %s: certificate %s has no key here (only IAM ones do)", lb_arn, cert_arn)
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.NamedTemporaryFile("w", suffix=".pem") as f:
            f.write(cert.cert_body.strip() + "\n")
            if cert.cert_chain:
                f.write(cert.cert_chain.strip() + "\n")
            f.write(cert.private_key.strip() + "\n")
            f.flush()
            ctx.load_cert_chain(f.name)
        return ctx
    except Exception:  # noqa: BLE001 - a bad certificate must not stop the data plane
        LOG.exception("TLS listener of %s: certificate %s", lb_arn, cert_arn)
        return None


class Forwarder:
    """Serves one listener."""

    def __init__(self, listener, lb, host):
        self.arn = listener.arn
        self.listener = listener
        self.lb = lb
        self.protocol = (listener.protocol or "TCP").upper()
        self.certificate = _certificate(listener)
        self.tls = _tls_context(lb.arn, self.certificate) if self.protocol == "TLS" else None
        self.host = host
        self.closed = False
        self.tcp = None
        self.udp = None
        self._bind()
        for target, name in ((self._serve_tcp, "tcp"), (self._serve_udp, "udp")):
            if getattr(self, name) is not None:
                threading.Thread(target=target, daemon=True, name=f"berth-{name}-{self.port}").start()

    def _bind(self):
        wants_tcp = self.protocol in ("TCP", "TLS", "TCP_UDP", "HTTP", "HTTPS")
        wants_udp = self.protocol in ("UDP", "TCP_UDP")
        for _ in range(20):
            tcp = udp = None
            try:
                first = socket.socket(socket.AF_INET, socket.SOCK_STREAM if wants_tcp else socket.SOCK_DGRAM)
                first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                first.bind((self.host, 0))
                port = first.getsockname()[1]
                if wants_tcp:
                    tcp = first
                    tcp.listen(128)
                    if wants_udp:
                        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        udp.bind((self.host, port))
                else:
                    udp = first
                self.tcp, self.udp, self.port = tcp, udp, port
                return
            except OSError:
                for s in (tcp, udp):
                    if s is not None:
                        s.close()
        raise OSError("no free port for listener")

    def target_group(self):
        for action in self.listener.default_actions or []:
            data = getattr(action, "data", {}) or {}
            if data.get("TargetGroupArn"):
                return data["TargetGroupArn"]
            for tg in (data.get("ForwardConfig") or {}).get("TargetGroups", []):
                return tg.get("TargetGroupArn")
        return None

    def _pick(self):
        targets = MONITOR.targets_for(self.target_group())
        return random.choice(targets) if targets else None

    def _admits(self, protocol, address):
        try:
            return security.admits(self.lb, protocol, self.listener.port, address)
        except Exception:  # noqa: BLE001 - an unreadable rule admits nothing
            LOG.exception("security groups of %s", self.lb.arn)
            return False

    def _serve_tcp(self):
        while not self.closed:
            try:
                client, source = self.tcp.accept()
            except OSError:
                return
            if not self._admits("tcp", source[0]):
                LOG.info("listener %s: %s refused by the security groups", self.arn, source[0])
                # A reset: the kernel already completed the handshake AWS would not answer.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client):
        if self.protocol == "TLS":
            if self.tls is None:
                client.close()
                return
            try:
                client.settimeout(5)
                client = self.tls.wrap_socket(client, server_side=True)
                client.settimeout(None)
            except (OSError, ssl.SSLError):
                client.close()
                return
        target = self._pick()
        if target is None:
            client.close()
            return
        address, port, key = target
        try:
            upstream = socket.create_connection((address, port), timeout=3)
            upstream.settimeout(None)
        except OSError:
            client.close()
            return
        # Known per target, so the end of a draining can close them when asked to.
        MONITOR.track(key, upstream)
        try:
            if self.protocol == "TLS":
                _relay_one_thread(client, upstream)
            else:
                threading.Thread(target=_pipe, args=(client, upstream), daemon=True).start()
                _pipe(upstream, client)
        finally:
            MONITOR.untrack(key, upstream)

    def _serve_udp(self):
        flows = {}  # client address -> (upstream socket, last use)
        while not self.closed:
            try:
                data, client = self.udp.recvfrom(65535)
            except OSError:
                return
            flow = flows.get(client)
            if flow is None:
                # Security groups are stateful: only a new flow is checked.
                if not self._admits("udp", client[0]):
                    continue
                target = self._pick()
                if target is None:
                    continue
                upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                upstream.connect(target[:2])
                threading.Thread(target=self._udp_replies, args=(upstream, client), daemon=True).start()
                flows[client] = upstream
                flow = upstream
            try:
                flow.send(data)
            except OSError:
                flows.pop(client, None)

    def _udp_replies(self, upstream, client):
        upstream.settimeout(120)
        try:
            while not self.closed:
                data = upstream.recv(65535)
                self.udp.sendto(data, client)
        except OSError:
            pass

    def close(self):
        self.closed = True
        for s in (self.tcp, self.udp):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def describe(self):
        return {
            "loadBalancerArn": self.lb.arn,
            "loadBalancerName": self.lb.name,
            "dnsName": self.lb.dns_name,
            "listenerArn": self.arn,
            "port": int(self.listener.port),
            "protocol": self.protocol,
            "certificateArn": self.certificate,
            "targetGroupArn": self.target_group(),
            "address": f"{self.host}:{self.port}",
        }


FORWARDERS = {}


def _sync_forwarders():
    host = _listener_host()
    current = {}
    for _account, _region, backend, _ec2 in _backends():
        for lb in list(backend.load_balancers.values()):
            for listener in list(lb.listeners.values()):
                current[listener.arn] = (listener, lb)
    with _lock:
        for arn in [a for a in FORWARDERS if a not in current]:
            FORWARDERS.pop(arn).close()
        for arn, (listener, lb) in current.items():
            fwd = FORWARDERS.get(arn)
            if (
                fwd is not None
                and fwd.protocol == (listener.protocol or "TCP").upper()
                and fwd.certificate == _certificate(listener)
            ):
                fwd.listener = listener
                fwd.lb = lb
                continue
            if fwd is not None:
                FORWARDERS.pop(arn).close()
            try:
                FORWARDERS[arn] = Forwarder(listener, lb, host)
                LOG.info("serving listener %s on %s:%s", arn, host, FORWARDERS[arn].port)
            except OSError as e:
                LOG.warning("listener %s: %s", arn, e)


def listeners():
    with _lock:
        return [f.describe() for f in FORWARDERS.values()]


def _loop():
    while True:
        try:
            _sync_forwarders()
            MONITOR.round()
        except Exception:  # noqa: BLE001 - keep the data plane alive
            LOG.exception("berth data plane")
        time.sleep(1)


def _listeners_endpoint(_request, **_kwargs):
    from localstack.http import Response

    return Response(json.dumps(listeners()), status=200, mimetype="application/json")


def start():
    """Starts the data plane once per process and registers the discovery endpoint."""
    global _started
    with _lock:
        if _started:
            return
        _started = True
    from localstack.services.edge import ROUTER

    ROUTER.add(path="/_berth/elbv2/listeners", endpoint=_listeners_endpoint, methods=["GET"])
    threading.Thread(target=_loop, daemon=True, name="berth-dataplane").start()
