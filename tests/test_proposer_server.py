"""Self-Pruner against a real OpenAI-compatible server: llama.cpp's (``python -m llama_cpp.server``) serving the
embedded SmolLM2 GGUF on 127.0.0.1, a free port.

Before the server is up, ``secateurs prune ... --proposer openai --endpoint URL`` stops with a clear message
(exit 2) and keeps its unfinished run; once the server answers, the same command resumes that run and finishes
with every answer usable: the server refuses the OpenAI ``json_schema`` form (HTTP 500 from its request
validation) and takes its own ``json_object`` + schema form, which it turns into a grammar. The server is then
stopped by its pid."""
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from secateurs.cli import main

pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] is installed by `make setup`")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(gguf, port, log):
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "4096", "--n_threads", "1"],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop(proc)
    pytest.fail(f"llama_cpp.server did not start; its log: {log.name}")


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_prune_with_llama_cpp_server(tmp_path, capsys):
    from secateurs.sources import embedded_gguf

    gguf = embedded_gguf("smollm2-135m")
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    out = tmp_path / "sp"
    cmd = ["prune", "smollm2-135m", "--method", "self-pruner", "--proposer", "openai", "--endpoint", url,
           "--endpoint-wait", "2", "--ratio", "0.2", "--population", "2", "--generations", "1", "--crossover", "1",
           "--mutation", "0", "--nsamples", "2", "--seqlen", "64", "--fitness-rows", "1", "--eval", "",
           "--out", str(out), "--quiet"]

    assert main(cmd) == 2  # nothing listens yet
    err = capsys.readouterr().err
    assert f"the endpoint {url} dropped or refused the connection" in err and "run the same command again" in err
    assert "Traceback" not in err and (tmp_path / "sp.partial" / "settings.json").exists() and not out.exists()

    with open(tmp_path / "server.log", "w") as log:
        proc = start_server(gguf, port, log)
        try:
            assert main(cmd) == 0
        finally:
            stop(proc)
    assert proc.returncode is not None
    captured = capsys.readouterr()
    assert "refused a request with response_format json_schema" in captured.err
    res = json.loads((out / "result.json").read_text())
    assert abs(res["ratio_achieved"] - 0.2) <= 0.005
    s = res["method_details"]["search"]
    assert s["proposer_model"] == {"kind": "openai", "endpoint": url, "model": str(gguf),
                                   "structured_output": "json_object+schema", "task": "vectors", "start": "llm",
                                   "responses_shown": False}
    assert s["llm_answers"]["answers"] == s["llm_answers"]["usable"] == 3  # 1 initial, 1 selection, 1 crossover
    assert s["failed_attempts"] == 0 and s["tokens"]["prompt"] > 0 and s["tokens"]["completion"] > 0
    recs = [json.loads(x) for x in (out / "search.jsonl").read_text().splitlines()]
    answers = [p["answer"] for r in recs for p in r["proposals"] if p["source"] != "uniform"]
    assert len(answers) == 2 and all(len(a) == 30 and all(isinstance(v, int) and 0 <= v <= 90 for v in a) for a in answers)
