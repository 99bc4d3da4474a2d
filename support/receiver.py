"""A webhook receiver on loopback, as a host application would run one: it verifies each POST
with the `standardwebhooks` library, keeps what it got, and answers as a test plans (a status
code per attempt, or never)."""
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook, WebhookVerificationError


class Receiver:
    """`with Receiver(secret, answers=[500, 200]) as hooks:` then point a callback_url at
    `hooks.url`. `answers`: the status of each attempt in turn (the last one repeats); `hang`:
    never answer, holding the connection until the sender gives up."""

    def __init__(self, secret, answers=(200,), hang=False, path="/hooks"):
        self.verifier = Webhook(secret)
        self.answers = list(answers)
        self.hang = hang
        self.path = path
        self.received = []            # {"headers", "body", "verified" (payload or None), "error"}
        self.lock = threading.Lock()
        self.released = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.server.daemon_threads = True
        self.thread = None

    @property
    def url(self):
        return "http://127.0.0.1:%d%s" % (self.server.server_address[1], self.path)

    def __enter__(self):
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def verified(self):
        return [r["verified"] for r in self.received if r["verified"] is not None]

    def handler(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    verified, error = receiver.verifier.verify(body, headers), None
                except WebhookVerificationError as exc:
                    verified, error = None, str(exc)
                with receiver.lock:
                    attempt = len(receiver.received)
                    receiver.received.append({"headers": headers, "body": body, "verified": verified,
                                              "error": error})
                    status = receiver.answers[min(attempt, len(receiver.answers) - 1)]
                if receiver.hang:
                    receiver.released.wait(120)
                    return
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        return Handler
