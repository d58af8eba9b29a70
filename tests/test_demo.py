"""`make demo` (secateurs.demo) at tiny settings: it prunes with the method and ratio of its one-line choice, shows
the held-out perplexity with its rows, the measured speedups and what they mean, and a second run reuses the
finished run and its speed measurement."""
from secateurs import demo


def test_demo_runs_then_reuses(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "CHOICE", dict(method="uniform-drop", ratio=0.1))
    monkeypatch.setattr(demo, "SETTINGS", {**demo.SETTINGS, "nsamples": 2, "seqlen": 64, "eval_rows": 2})
    monkeypatch.setattr(demo, "SPEED", dict(prompt_len=16, decode_tokens=2, warmup=0, reps=1, seed=0))
    monkeypatch.setattr(demo, "SAMPLE_TOKENS", 2)
    assert demo.main() == 0
    out = capsys.readouterr().out
    folder = tmp_path / "runs" / "demo-uniform-drop-0.1"
    assert (folder / "result.json").exists() and (folder / "bench.json").exists()
    assert (folder / "bench-gguf.json").exists() and (folder / "model-q8_0.gguf").exists()
    assert "in llama.cpp (q8_0 GGUF" in out
    assert "wiki:test ppl (2 rows of 512)" in out and "calib ppl (2 rows of 64)" in out
    assert "measured speedup (side by side" in out and "What it means: " in out and "pruned: " in out
    assert demo.main() == 0
    again = capsys.readouterr().out
    assert "reusing the finished run" in again and "reusing the speed measurement" in again
    assert "reusing the llama.cpp measurement" in again
    # the same figures: the folder's, not new ones
    table = lambda text: text[text.index("ratio achieved"):text.index("\n'The capital")]  # noqa: E731
    assert table(again) == table(out)
