/**
 * The peers egress tests run in an "internet" network namespace of their own and in a guest's
 * network: small Python programs (python3 is on every test machine), passed as `python3 -c`.
 * Each server prints one line when it listens, so a test can wait for it.
 */

/** HTTP on 80 and TLS on 443 on every address; argv: cert.pem key.pem. Answers "<address> <Host>". */
export const WEB_SERVER_PY = `
import http.server, socketserver, ssl, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = ("%s %s\\n" % (self.connection.getsockname()[0], self.headers.get("Host", "-"))).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
class T(S):
    def finish_request(self, request, address):
        # The handshake in the connection's own thread: a silent client blocks nobody else.
        try: request = ctx.wrap_socket(request, server_side=True)
        except Exception: return
        self.RequestHandlerClass(request, address, self)
    def handle_error(self, request, address): pass
web = S(("0.0.0.0", 80), H)
tls = T(("0.0.0.0", 443), H)
threading.Thread(target=web.serve_forever, daemon=True).start()
print("ready", flush=True)
tls.serve_forever()
`;

/** Echoes every byte back, on every address; argv: port. */
export const ECHO_SERVER_PY = `
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
print("ready", flush=True)
def serve(c):
    with c:
        while True:
            d = c.recv(100)
            if not d: return
            c.sendall(d)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
`;

/**
 * A client holding one connection to an echo server (argv: address port name): it sends an HTTP
 * head naming the host, so a proxy judging by name lets it through, and prints "open" once the
 * head came back ("refused …" if it did not); then echoes once per stdin line, printing
 * "echo y", "closed" or "cut <error>" (how a test sees a live policy change cut it).
 */
export const NAMED_CLIENT_PY = `
import socket, sys
head = ("GET / HTTP/1.1\\r\\nHost: %s\\r\\n\\r\\n" % sys.argv[3]).encode()
got = b""
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    c.sendall(head)
    while len(got) < len(head):
        d = c.recv(200)
        if not d: break
        got += d
except Exception as e:
    print("refused " + type(e).__name__, flush=True); sys.exit(0)
print("open" if len(got) >= len(head) else "refused closed", flush=True)
for _ in sys.stdin:
    try:
        c.sendall(b"y"); d = c.recv(10)
        print("echo " + d.decode() if d else "closed", flush=True)
    except Exception as e:
        print("cut " + type(e).__name__, flush=True)
`;

/** `openssl` arguments for one self-signed certificate (its own CA) naming every one of `names`. */
export function selfSignedCertArgs(names: string[], certPath: string, keyPath: string): string[] {
  const san = names.map((n) => `DNS:${n}`).join(',');
  return [
    'req',
    '-x509',
    '-newkey',
    'rsa:2048',
    '-nodes',
    '-days',
    '2',
    '-subj',
    `/CN=${names[0]}`,
    '-addext',
    `subjectAltName=${san}`,
    '-keyout',
    keyPath,
    '-out',
    certPath,
  ];
}
