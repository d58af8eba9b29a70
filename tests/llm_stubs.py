"""Stand-ins for an LLM in the Self-Pruner tests: ``Scripted`` (an LLM proposer answering from a script, to test
the answer cycle and the prompts without a model) and ``StubHandler`` with the ``stub`` fixture (an
OpenAI-compatible HTTP endpoint on 127.0.0.1 replying from a script)."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from secateurs.search.proposers import LLMProposer


class Scripted(LLMProposer):
    """An LLM proposer whose 'model' answers from a script (to test the answer cycle without a model)."""

    name = "scripted"

    def __init__(self, answers, **kw):
        super().__init__(**kw)
        self.answers = list(answers)
        self.prompts, self.schemas = [], []

    def chat(self, messages, schema, seed, max_tokens):
        self.prompts.append(messages[-1]["content"])
        self.schemas.append(schema)
        a = self.answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a, {"prompt": 10, "completion": 5}


class StubHandler(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that replies from a script. An item is the answer's content, or
    ("status", code) for an HTTP error, ("slow", seconds, content) for a late answer, "drop" to close the
    connection without an answer, or ("refuse", form, code) to refuse a request with that response_format."""

    script: list = []
    seen: list = []

    def _send(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
            pass

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "served-model", "object": "model", "owned_by": "me"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StubHandler.seen.append({"auth": self.headers.get("Authorization"), "body": body, "path": self.path})
        item = StubHandler.script.pop(0) if StubHandler.script else "out of script"
        fmt = (body.get("response_format") or {}).get("type")
        while isinstance(item, tuple) and item[0] == "refuse":
            if fmt == item[1]:
                return self._send(item[2], {"error": {"message": f"body.response_format.type: {fmt} not supported", "type": "x"}})
            item = StubHandler.script.pop(0)
        if item == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if isinstance(item, tuple) and item[0] == "status":
            return self._send(item[1], {"error": {"message": f"stub error {item[1]}", "type": "server_error"}})
        if isinstance(item, tuple) and item[0] == "slow":
            time.sleep(item[1])
            item = item[2]
        self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": item}}],
                         "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}})

    def log_message(self, *a):
        pass


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubHandler)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    StubHandler.script, StubHandler.seen = [], []
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()
