#!/usr/bin/python3
"""What a kept bearer token saves: `lazylayer pull` of busybox into an empty store
from a docker-registry with token auth, registry and token endpoint each behind a
delay relay (bench/rtt.py's), with the `tokens/` directory of an earlier process
copied into the store ("kept") or not ("none"), runs alternating.

    bench/token_reuse.py BIN [RTT_MS=80] [RUNS=5]

The token endpoint is a small HTTP server here signing RS256 JWTs with openssl;
the registry verifies them. Needs docker-registry, skopeo, openssl and
images/build.sh's busybox in $LAZYLAYER_IMAGE_CACHE (default /work/.image-cache).
Prints the median wall time and the token requests and 401 answers per mode.
"""
import base64, http.server, json, os, shutil, statistics, subprocess, sys, tempfile, threading, time, socket
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rtt import DelayRelay

LL = os.path.abspath(sys.argv[1])
RTT_MS = int(sys.argv[2]) if len(sys.argv) > 2 else 80
RUNS = int(sys.argv[3]) if len(sys.argv) > 3 else 5
CACHE = os.environ.get("LAZYLAYER_IMAGE_CACHE", "/work/.image-cache")
work = tempfile.mkdtemp(prefix="tokmeasure-")
key, cert = f"{work}/key.pem", f"{work}/cert.pem"
subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=iss",
                "-keyout", key, "-out", cert], check=True, capture_output=True)
x5c = "".join(l for l in open(cert).read().splitlines() if not l.startswith("-----"))
issued = [0]
b64 = lambda d: base64.urlsafe_b64encode(d).rstrip(b"=").decode()

class Issuer(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        from urllib.parse import urlparse, parse_qs
        q = parse_qs(urlparse(self.path).query)
        access = []
        for s in q.get("scope", []):
            t, n, acts = s.split(":", 2)
            access.append({"type": t, "name": n, "actions": acts.split(",")})
        now = int(time.time())
        hdr = json.dumps({"typ": "JWT", "alg": "RS256", "x5c": [x5c]}).encode()
        cl = json.dumps({"iss": "iss", "sub": "alice", "aud": "svc", "exp": now + 300, "nbf": now - 10,
                         "iat": now, "jti": str(issued[0]), "access": access}).encode()
        issued[0] += 1
        si = f"{b64(hdr)}.{b64(cl)}"
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key], input=si.encode(), capture_output=True).stdout
        body = json.dumps({"token": f"{si}.{b64(sig)}", "expires_in": 300}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

iss = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Issuer)
threading.Thread(target=iss.serve_forever, daemon=True).start()
iss_relay = DelayRelay(iss.server_address[1], RTT_MS / 2000)
reg_port = free_port()
cfg = f"""version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {work}/data
http:
  addr: 127.0.0.1:{reg_port}
auth:
  token:
    realm: http://127.0.0.1:{iss_relay.port}/token
    service: svc
    issuer: iss
    rootcertbundle: {cert}
"""
open(f"{work}/config.yml", "w").write(cfg)
reg = subprocess.Popen(["docker-registry", "serve", f"{work}/config.yml"], stdout=open(f"{work}/reg.log", "w"), stderr=subprocess.STDOUT)
try:
    while True:
        try:
            socket.create_connection(("127.0.0.1", reg_port)).close(); break
        except OSError:
            time.sleep(0.05)
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--dest-creds", "alice:pw",
                    f"oci:{CACHE}/busybox/oci", f"docker://127.0.0.1:{reg_port}/private/busybox:latest"], check=True)
    relay = DelayRelay(reg_port, RTT_MS / 2000)
    ref = f"127.0.0.1:{relay.port}/private/busybox:latest"
    auth = f"{work}/auth.json"
    json.dump({"auths": {f"127.0.0.1:{relay.port}": {"auth": base64.b64encode(b"alice:pw").decode()}}}, open(auth, "w"))
    env = dict(os.environ, HOME=work, REGISTRY_AUTH_FILE=auth)
    def pull(root):
        t = time.monotonic()
        subprocess.run([LL, "--root", root, "pull", "-q", ref], check=True, env=env, capture_output=True)
        return time.monotonic() - t
    warm = f"{work}/warm"
    pull(warm)
    res = {"kept": [], "none": []}
    tokens_before = issued[0]
    n401 = lambda: sum(1 for l in open(f"{work}/reg.log") if '" 401 ' in l)
    counts = {"kept": [0, 0], "none": [0, 0]}
    for i in range(RUNS):
        for mode in ("none", "kept"):
            root = f"{work}/r{i}{mode}"
            if mode == "kept":
                os.makedirs(root, mode=0o700)
                shutil.copytree(f"{warm}/tokens", f"{root}/tokens")
            a, b = issued[0], n401()
            res[mode].append(pull(root))
            counts[mode][0] += issued[0] - a; counts[mode][1] += n401() - b
            shutil.rmtree(root)
    for mode in ("none", "kept"):
        print(f"RTT {RTT_MS} ms, {mode:5}: median {statistics.median(res[mode]):.3f} s over {RUNS} "
              f"({', '.join(f'{x:.3f}' for x in res[mode])}); token requests {counts[mode][0]}, 401s {counts[mode][1]}")
finally:
    reg.kill(); reg.wait()
    shutil.rmtree(work, ignore_errors=True)
